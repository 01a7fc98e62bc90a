"""Does moving each image's colours towards the training images' help a model on held-out images?

    python benchmarks/colour_match.py [--model nuclei-he] [--strengths 0,0.5,1]
        [--data ../shared/data/monuseg/train] [--names training/nuclei-he/val.txt]

The training images are the folder's images not named in ``--names``; their mean Lab statistics
(:func:`napari_segdiff.transforms.mean_lab_stats`) become the model's ``colour_norm`` and each strength its
``colour_strength`` (0: no matching), as ``export --colour-match`` records them for ``buildings-all``. Each
strength scores the named images with ``eval``'s code at the model's defaults (Dice over all of them; AJI and
PQ over those with instance maps), seed 0.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from napari_segdiff.models import load_model
from napari_segdiff.training.datasets import load_dataset, read_names
from napari_segdiff.training.evaluate import evaluate_items
from napari_segdiff.transforms import mean_lab_stats

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="nuclei-he")
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/monuseg/train"))
    ap.add_argument("--names", default=str(ROOT / "training/nuclei-he/val.txt"))
    ap.add_argument("--strengths", default="0,0.5,1")
    args = ap.parse_args()
    held = set(read_names(args.names))
    items = load_dataset(args.data)
    train = [s for s in items if s.name not in held]
    scored = [s for s in items if s.name in held]
    stats = np.round(mean_lab_stats(s.image for s in train), 4).tolist()
    print(f"{len(train)} training images, Lab mean/std {stats}; scoring {len(scored)} images")
    for strength in (float(v) for v in args.strengths.split(",")):
        mdl = load_model(args.model)
        if strength > 0:
            mdl.meta["colour_norm"], mdl.meta["colour_strength"] = stats, strength
        m = evaluate_items(mdl, scored, verbose=False)["mean"]
        objects = f" AJI {m['aji']:.4f} PQ {m['pq']:.4f}" if "aji" in m else ""
        print(f"strength {strength:g}: Dice {m['dice']:.4f} IoU {m['iou']:.4f}{objects}", flush=True)


if __name__ == "__main__":
    main()
