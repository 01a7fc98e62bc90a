"""Where do a nuclei model's objects go wrong, and what does the mask threshold do to them?

    python benchmarks/object_errors.py [--model nuclei-he] [--threshold T] [--thresholds 0.5,0.45,0.4,0.35,0.3]

On the MoNuSeg training images that carry instance maps: the held-out validation images
(``training/nuclei-he/val.txt``) and, apart, the training images (in-sample). Each image is segmented once at
the model's defaults (``instances=True``; ``--threshold`` another mask threshold); then

* the annotated nuclei not matched at IoU > 0.5 are sorted into *missed* (less than half of the nucleus inside
  the mask), *merged* (its best-overlapping object covers it and at least one other nucleus), *split* (two or
  more objects each hold a fifth of it) and *loose* (the rest), and the unmatched predicted objects into
  *background* (mostly outside every nucleus) and *partial*;
* the same probability and interior maps are thresholded at each of ``--thresholds`` and split with the
  model's instance method: mean AJI, object F1 at IoU 0.5 and count error per threshold.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import napari_segdiff as ns
from napari_segdiff.instances import label_instances
from napari_segdiff.training.datasets import load_dataset, read_names
from napari_segdiff.training.metrics import instance_metrics

ROOT = Path(__file__).resolve().parents[1]


def error_kinds(gt: np.ndarray, pred: np.ndarray) -> dict[str, int]:
    """Counts of matched, missed, merged, split and loose nuclei and of background and partial objects."""
    n_gt, n_pred = int(gt.max()), int(pred.max())
    cont = np.zeros((n_gt + 1, n_pred + 1), np.int64)
    np.add.at(cont, (gt.ravel(), pred.ravel()), 1)
    gt_area, pred_area = cont.sum(1), cont.sum(0)
    inter = cont[1:, 1:]
    iou = inter / np.maximum(gt_area[1:, None] + pred_area[None, 1:] - inter, 1)
    gt_hit, pred_hit = (iou > 0.5).any(1), (iou > 0.5).any(0)
    kinds = ("nuclei", "objects", "matched", "missed", "merged", "split", "loose", "background", "partial")
    c = dict.fromkeys(kinds, 0)
    for g in range(1, n_gt + 1):
        if not gt_area[g]:
            continue
        c["nuclei"] += 1
        if gt_hit[g - 1]:
            c["matched"] += 1
        elif cont[g, 0] / gt_area[g] > 0.5:
            c["missed"] += 1
        else:
            best = int(np.argmax(inter[g - 1]))
            if inter[g - 1, best] > 0.5 * gt_area[g] and (inter[:, best] > 0.2 * pred_area[best + 1]).sum() >= 2:
                c["merged"] += 1
            elif (inter[g - 1] > 0.2 * gt_area[g]).sum() >= 2:
                c["split"] += 1
            else:
                c["loose"] += 1
    for p in range(1, n_pred + 1):
        if not pred_area[p]:
            continue
        c["objects"] += 1
        if not pred_hit[p - 1]:
            c["background" if cont[0, p] > 0.5 * pred_area[p] else "partial"] += 1
    return c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/monuseg/train"))
    ap.add_argument("--model", default="nuclei-he")
    ap.add_argument("--thresholds", default="0.5,0.45,0.4,0.35,0.3")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threshold", type=float, default=None, help="mask threshold of the error sort")
    args = ap.parse_args()
    model = ns.load_model(args.model)
    inst = dict(model.meta.get("instances") or {})
    method = inst.pop("method", "components")
    val = set(read_names(ROOT / "training/nuclei-he/val.txt"))
    have = [s for s in load_dataset(args.data) if s.instances is not None]
    held = [s for s in have if s.name in val]
    for label, items in (("held-out", held), ("in-sample", [s for s in have if s.name not in val])):
        kinds: dict[str, int] = {}
        maps = []
        for s in items:
            gt = s.instances.astype(np.int64)
            r = ns.segment(s.image, model, seed=args.seed, instances=True, threshold=args.threshold)
            for k, v in error_kinds(gt, np.asarray(r.labels)).items():
                kinds[k] = kinds.get(k, 0) + v
            maps.append((gt, np.asarray(r.probability), None if r.interior is None else np.asarray(r.interior)))
        at = "the model's defaults" if args.threshold is None else f"mask threshold {args.threshold:g}"
        print(f"{label} ({len(items)} images, {at}): {kinds}")
        for t in (float(v) for v in args.thresholds.split(",")):
            rows = []
            for gt, prob, interior in maps:
                labels = label_instances(prob > t, prob, method=method, interior=interior, **inst)
                m = instance_metrics(gt, labels)
                rows.append((m["aji"], m["f1_50"], m["count_error"]))
            aji, f1, count = np.mean(rows, axis=0)
            print(f"  mask threshold {t:g}: AJI {aji:.4f}, F1 @ 0.5 {f1:.4f}, count error {count:+.1f}")


if __name__ == "__main__":
    main()
