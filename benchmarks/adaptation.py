"""The adaptation curve: a model that never saw a place (or organ), fine-tuned on k of its images for a few
minutes, scored on the place's other images. The k images are chosen by highest mean variance of the base
model's run (the review list) or at random.

    python benchmarks/adaptation.py --base runs/lopo-kampala.pt --place Kampala --minutes 2,5 --k 4

Prints one row per (choice, minutes): pooled IoU on the held-out tiles of the place, against the base model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from buildings_eval import DATA, evaluate, summary, tiles

from napari_segdiff.training.finetune import finetune


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--place", required=True)
    ap.add_argument("--minutes", default="2,5,10")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--choices", default="variance,random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    a = ap.parse_args()
    names = sorted(n for n, r in tiles(DATA).items() if r["place"] == a.place)
    base_rows = evaluate(a.base, names)
    by_var = [r["name"] for r in sorted(base_rows, key=lambda r: -r["mean_variance"])]
    rng = np.random.default_rng(a.seed)
    picks = {"variance": by_var[: a.k], "random": sorted(rng.choice(names, a.k, replace=False).tolist())}
    out = []
    for choice in a.choices.split(","):
        train = picks[choice]
        test = [n for n in names if n not in train]
        base = summary([r for r in base_rows if r["name"] in test])["all"]["pooled_iou"]
        print(f"{choice}: fine-tune on {train}, score on {test}; base pooled IoU {base:.4f}", flush=True)
        for minutes in [float(m) for m in a.minutes.split(",")]:
            tmp = Path(tempfile.mkdtemp())
            try:
                (tmp / "data" / "images").mkdir(parents=True)
                (tmp / "data" / "masks").mkdir()
                for n in train:
                    shutil.copy(DATA / "images" / f"{n}.png", tmp / "data" / "images")
                    shutil.copy(DATA / "masks" / f"{n}.png", tmp / "data" / "masks")
                res = finetune(a.base, tmp / "data", tmp / "ft.pt", minutes=minutes, progress=False, seed=a.seed)
                s = summary(evaluate(str(tmp / "ft.pt"), test))["all"]
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            row = {
                "place": a.place,
                "choice": choice,
                "minutes": minutes,
                "steps": res.steps,
                "train": train,
                "test": test,
                "base_pooled_iou": base,
                "pooled_iou": s["pooled_iou"],
                "f1_50": s["f1_50"],
            }
            out.append(row)
            print(
                f"  {minutes:4.1f} min ({res.steps} steps): pooled IoU {s['pooled_iou']:.4f} (base {base:.4f}), "
                f"F1@.5 {s['f1_50']:.3f}",
                flush=True,
            )
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
