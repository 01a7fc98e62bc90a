"""How many mask pixels a change of sampling moves, against how many the sampler's own noise moves.

The path before the speed work (PyTorch's math attention, the torch runtime, no tile skipping, 3 samples x 2
steps) is run with two seeds on the held-out validation images and compared with itself and with the defaults
of now (seed 0): the mean share of pixels whose mask label agrees, per pair.

    python benchmarks/agreement.py [--data ../shared/data/monuseg/train] [--names training/nuclei-he/val.txt]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from torch.nn.attention import SDPBackend, sdpa_kernel

import napari_segdiff as ns
from napari_segdiff.training.datasets import load_dataset, read_names

sys.path.insert(0, str(Path(__file__).parent))
from run import BEFORE_SAMPLING, default_model, machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/monuseg/train"))
    p.add_argument("--names", default=str(ROOT / "training/nuclei-he/val.txt"))
    args = p.parse_args(argv)
    names = set(read_names(args.names))
    items = [s for s in load_dataset(args.data) if s.name in names]
    if not items:
        raise SystemExit(f"no image of {args.names} in {args.data}")
    model = default_model()

    def before(img, seed):
        with sdpa_kernel([SDPBackend.MATH]):
            r = ns.segment(img, model, seed=seed, runtime="torch", skip_empty=False, **BEFORE_SAMPLING)
        return np.asarray(r.mask)

    pairs: dict[str, list[float]] = {
        "before seed 0 vs seed 1": [],
        "before seed 0 vs now": [],
        "before seed 1 vs now": [],
    }
    for s in items:
        b0, b1, now = before(s.image, 0), before(s.image, 1), np.asarray(ns.segment(s.image, model, seed=0).mask)
        for key, (a, b) in zip(pairs, ((b0, b1), (b0, now), (b1, now))):
            pairs[key].append(float((a == b).mean()))
        print(f"  {s.name}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in pairs.items()), flush=True)
    print(f"{machine()}; {model.name}, {len(items)} images; mask pixels that agree (mean over images):")
    for key, v in pairs.items():
        print(f"  {key}: {100 * np.mean(v):.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
