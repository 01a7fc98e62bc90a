"""Score a buildings model on whole aerial tiles (every building marked), per place: pooled building IoU
(sum of intersections / sum of unions over a place's tiles), mean per-tile IoU, object F1 at IoU 0.5 and AJI
against the per-building instance maps, and the per-pixel AUROC of the variance map for the mask's errors
(mean over tiles). Each tile is segmented at its own ground sample distance
(``pixel_size`` from tiles.csv), as a user with a georeferenced orthophoto would run it.

    python benchmarks/buildings_eval.py --model buildings-all --names training/buildings-all/val.txt
    python benchmarks/buildings_eval.py --model runs/lopo.pt --place Kampala [--json out.json]

``--recolour hist|reinhard|reinhard:S`` moves each scored tile's colours towards the tiles that are not scored
(for a leave-one-place-out model: the other places' tiles, its training places) before segmenting:
per-channel histogram matching to their pooled pixels, or a Reinhard colour transfer in Lab to their mean
statistics (strength S in [0, 1], default 1). A test-time experiment; the models do not do it.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from skimage.filters import threshold_otsu

import napari_segdiff as ns
from napari_segdiff.io import read_image
from napari_segdiff.training.datasets import read_names
from napari_segdiff.training.metrics import error_auroc, instance_metrics

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared/data/oam_buildings_all/train"
#: thresholds of the probability map at which the pooled IoU is also reported (the threshold sweep)
THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6)


def tiles(data: Path) -> dict[str, dict]:
    with open(data / "tiles.csv") as f:
        return {r["file"].rsplit(".", 1)[0]: r for r in csv.DictReader(f)}


def recolourer(method: str, data: Path, reference: list[str]):
    """img (uint8 RGB) -> img moved towards the ``reference`` tiles' colours (see the module's docstring)."""
    from skimage.exposure import match_histograms

    from napari_segdiff.transforms import match_colours_uint8, mean_lab_stats

    kind, _, strength = method.partition(":")
    if kind == "hist":
        ref = np.concatenate([read_image(data / "images" / f"{n}.png")[..., :3][::8, ::8] for n in reference])
        return lambda img: match_histograms(img, ref, channel_axis=-1).astype(np.uint8)
    if kind != "reinhard":
        raise SystemExit(f"--recolour: hist, reinhard or reinhard:S, got {method!r}")
    s = float(strength or 1.0)
    target = mean_lab_stats(read_image(data / "images" / f"{n}.png")[..., :3][::4, ::4] for n in reference)
    return lambda img: match_colours_uint8(img, target, s)


def evaluate(
    model,
    names,
    data: Path = DATA,
    samples=None,
    steps=None,
    seed=0,
    use_pixel_size=True,
    tta=None,
    threshold=None,
    recolour=None,
    tile=None,
    attention=None,
):
    meta = tiles(data)
    if attention:  # 'window' or 'global', over what the model records
        model = copy.copy(ns.load_model(model))
        model.meta = {**model.meta, "attention": attention}
    move = recolourer(recolour, data, [n for n in meta if n not in set(names)]) if recolour else None
    rows = []
    for n in names:
        img = read_image(data / "images" / f"{n}.png")[..., :3]
        if move is not None:
            img = move(img)
        gt = read_image(data / "masks" / f"{n}.png") > 0
        inst = read_image(data / "instances" / f"{n}.png").astype(np.int64)
        kw = {"pixel_size": float(meta[n]["gsd_m"])} if use_pixel_size else {}
        # None: the model's recommended sampling (steps=None would mean all T diffusion steps)
        opts = (("samples", samples), ("steps", steps), ("tta", tta), ("threshold", threshold), ("tile", tile))
        kw.update({k: v for k, v in opts if v is not None})
        r = ns.segment(img, model, seed=seed, instances=True, **kw)
        m = np.asarray(r.mask)
        prob = np.asarray(r.probability)
        sweep = {f"{t:g}": [int(((prob > t) & gt).sum()), int(((prob > t) | gt).sum())] for t in THRESHOLDS}
        # an unsupervised per-tile threshold, for comparison: Otsu's on the tile's probability map
        t_otsu = float(threshold_otsu(prob)) if np.ptp(prob) > 0 else 0.5
        sweep["otsu"] = [int(((prob > t_otsu) & gt).sum()), int(((prob > t_otsu) | gt).sum())]
        rows.append(
            {
                "name": n,
                "place": meta[n]["place"],
                "inter": int((m & gt).sum()),
                "union": int((m | gt).sum()),
                "iou": float((m & gt).sum() / max(1, (m | gt).sum())) if (m | gt).any() else 1.0,
                **instance_metrics(inst, r.labels),
                "seconds": r.info["seconds"],
                "mean_variance": float(np.mean(r.variance)),
                "error_auroc": error_auroc(r.variance, m, gt),
                "threshold": r.info["threshold"],
                "sweep": sweep,
            }
        )
    return rows


def pooled_iou_at(rows) -> dict[str, float]:
    """Pooled IoU of ``rows`` at each threshold of their ``sweep`` (the same runs, other mask thresholds)."""
    return {
        t: sum(r["sweep"][t][0] for r in rows) / max(1, sum(r["sweep"][t][1] for r in rows)) for t in rows[0]["sweep"]
    }


def summary(rows) -> dict[str, dict]:
    by = defaultdict(list)
    for r in rows:
        by[r["place"]].append(r)
        by["all"].append(r)
    out = {}
    for place, rs in by.items():
        out[place] = {
            "tiles": len(rs),
            "pooled_iou": sum(r["inter"] for r in rs) / max(1, sum(r["union"] for r in rs)),
            "mean_iou": float(np.mean([r["iou"] for r in rs])),
            "f1_50": float(np.mean([r["f1_50"] for r in rs])),
            "aji": float(np.mean([r["aji"] for r in rs])),
            "count_error": float(np.mean([r["count_error"] for r in rs])),
            "error_auroc": float(np.nanmean([r["error_auroc"] for r in rs])),
            "pooled_iou_at": pooled_iou_at(rs),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--names", help="file of tile names (e.g. training/buildings-all/val.txt)")
    ap.add_argument("--place", help="every tile of this place (Zanzibar, Nairobi, Kampala, Philippines)")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--samples", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None, help="test-time augmentation")
    ap.add_argument("--threshold", type=float, help="mask threshold (default: the model's); the sweep ignores it")
    ap.add_argument("--no-pixel-size", action="store_true", help="run every tile as if at the model's pixel size")
    ap.add_argument("--recolour", help="hist, reinhard or reinhard:S: move the tiles' colours first (docstring)")
    ap.add_argument("--tile", type=int, help="window side in image pixels (default: the model's)")
    ap.add_argument("--attention", choices=("window", "global"), help="local or whole-window attention")
    ap.add_argument("--json")
    a = ap.parse_args()
    data = Path(a.data)
    if a.names:
        names = read_names(a.names)
    else:
        names = [n for n, r in tiles(data).items() if r["place"] == a.place]
    t0 = time.time()
    rows = evaluate(
        a.model,
        names,
        data,
        a.samples,
        a.steps,
        use_pixel_size=not a.no_pixel_size,
        tta=a.tta,
        threshold=a.threshold,
        recolour=a.recolour,
        tile=a.tile,
        attention=a.attention,
    )
    s = summary(rows)
    for place, v in s.items():
        print(
            f"{place:12s} tiles {v['tiles']:2d}  pooled IoU {v['pooled_iou']:.4f}  mean IoU {v['mean_iou']:.4f}  "
            f"F1@.5 {v['f1_50']:.3f}  AJI {v['aji']:.3f}  count err {v['count_error']:+.1f}  "
            f"error AUROC {v['error_auroc']:.3f}"
        )
    sweep = "  ".join(f"{t}: {v:.4f}" for t, v in s["all"]["pooled_iou_at"].items())
    print(
        f"pooled IoU, all tiles, by threshold of the probability (the model's: {rows[0]['threshold']}; "
        f"otsu: Otsu's threshold of each tile's probability map): {sweep}"
    )
    print(f"({time.time() - t0:.0f} s)")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, "rows": rows, "summary": s}, indent=1))


if __name__ == "__main__":
    main()
