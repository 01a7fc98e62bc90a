"""Does an object's mean variance point at the objects the model got wrong?

    python benchmarks/object_uncertainty.py --model nuclei-he --data ../shared/data/monuseg/train \
        --names training/nuclei-he/val.txt
    python benchmarks/object_uncertainty.py --model buildings-all --data ../shared/data/oam_buildings_all/train \
        --names training/buildings-all/val.txt

Each named image that has an instance map (``DATA/instances/``) is segmented at the model's defaults with
instances (an aerial folder's ``tiles.csv`` gives each tile's pixel size), measured with
``napari_segdiff.objects.object_table``, and each predicted object is called wrong when no annotated object
overlaps it at IoU > 0.5 (the PQ / object-F1 matching). Printed, pooled over the images: the number of objects,
the share wrong, and the AUROC for "wrong" of the object's mean variance, of 1 - its mean probability, and of
1 / its area (small objects are often wrong: the baseline a ranking must beat), and the share wrong among
the 10% most uncertain objects by each of the first two.

``--object-thresholds 0,0.3`` also scores the object thresholds (``segment(..., object_threshold=c)``: the
objects with a mean probability below c dropped) with AJI, PQ, object F1 and the count error, mean over images.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

import napari_segdiff as ns
from napari_segdiff.instances import drop_unsure
from napari_segdiff.io import read_image
from napari_segdiff.objects import object_table
from napari_segdiff.training.datasets import read_names
from napari_segdiff.training.metrics import _overlaps, instance_metrics


def best_iou(gt: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """For each predicted id in ``ids``: its highest IoU with any annotated object."""
    gi, pi, inter, ga, pa = _overlaps(gt, labels)  # every overlapping (annotated, predicted) pair
    best = np.zeros(max(len(pa), int(ids.max(initial=0)) + 1))
    np.maximum.at(best, pi, inter / (ga[gi] + pa[pi] - inter))
    return best[ids]


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney)."""
    from scipy.stats import rankdata

    pos, n_pos = positive.astype(bool), int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = rankdata(score)
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="nuclei-he")
    ap.add_argument("--data", required=True)
    ap.add_argument("--names", help="file of image names (e.g. a val.txt)")
    ap.add_argument("--place", help="instead of --names: every tile of this place (an aerial folder's tiles.csv)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    ap.add_argument("--samples", type=int, default=None, help="samples (default: the model's)")
    ap.add_argument("--object-thresholds", default="", help="e.g. 0,0.25,0.3: score these object thresholds")
    a = ap.parse_args()
    data = Path(a.data)
    rows = []
    if (data / "tiles.csv").exists():
        with open(data / "tiles.csv") as f:
            rows = list(csv.DictReader(f))
    gsd = {r["file"].rsplit(".", 1)[0]: float(r["gsd_m"]) for r in rows}
    if bool(a.names) == bool(a.place):
        raise SystemExit("give --names FILE or --place PLACE")
    names = read_names(a.names) if a.names else [r["file"].rsplit(".", 1)[0] for r in rows if r["place"] == a.place]
    cols: dict[str, list] = {"var": [], "prob": [], "area": [], "wrong": [], "total": []}
    used = []
    cuts = [float(c) for c in a.object_thresholds.split(",") if c.strip()]
    scores: dict[float, list] = {c: [] for c in cuts}
    for n in names:
        inst_files = list((data / "instances").glob(f"{n}.*"))
        if not inst_files:
            continue
        img = read_image(next((data / "images").glob(f"{n}.*")))[..., :3]
        gt = read_image(inst_files[0]).astype(np.int64)
        kw = {"pixel_size": gsd[n]} if n in gsd else {}
        kw.update({k: v for k, v in (("steps", a.steps), ("samples", a.samples)) if v is not None})
        r = ns.segment(img, a.model, seed=a.seed, instances=True, **kw)
        t = r.objects()
        cols["var"].append(t["mean_variance"])
        cols["prob"].append(t["mean_probability"])
        cols["area"].append(t["area_px"])
        # the total predictive variance of a pixel, p(1 - p) of the mean p: within-sample + between-sample
        pm = np.asarray(r.probability, np.float64)
        cols["total"].append(object_table(r.labels, pm * (1 - pm))["mean_probability"])
        cols["wrong"].append(best_iou(gt, np.asarray(r.labels), t["label"]) <= 0.5)
        used.append(n)
        for c in cuts:  # what segment(..., object_threshold=c) returns, from the same run
            kept = drop_unsure(np.asarray(r.labels), r.probability, c)[0] if c > 0 else np.asarray(r.labels)
            scores[c].append(instance_metrics(gt, kept))
    v, p, area, wrong, tot = (np.concatenate(cols[k]) for k in ("var", "prob", "area", "wrong", "total"))
    k = max(1, len(v) // 10)
    top, low = np.argsort(-v)[:k], np.argsort(p)[:k]
    print(f"model {a.model} ({r.info['samples']} x {r.info['steps']}): {len(used)} images with instance maps,")
    print(f"  {len(v)} predicted objects")
    print(f"wrong (no annotated object at IoU > 0.5): {wrong.mean():.3f}")
    print(f"AUROC for wrong: mean variance {auroc(v, wrong):.3f}, 1 - mean probability {auroc(-p, wrong):.3f}, ")
    print(f"  1 / area {auroc(-area.astype(float), wrong):.3f}, mean p(1 - p) {auroc(tot, wrong):.3f}")
    print(f"share wrong among the 10% with the highest mean variance: {wrong[top].mean():.3f}, ")
    print(f"  with the lowest mean probability: {wrong[low].mean():.3f}")
    for c in cuts:
        m = {k: float(np.mean([x[k] for x in scores[c]])) for k in ("aji", "pq", "f1_50", "count_error")}
        print(
            f"object threshold {c:g}: AJI {m['aji']:.3f}, PQ {m['pq']:.3f}, F1 {m['f1_50']:.3f}, "
            f"count error {m['count_error']:+.1f}"
        )


if __name__ == "__main__":
    main()
