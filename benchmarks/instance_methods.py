"""Which instance split suits nuclei? Scores each method of ``napari_segdiff.instances`` with the object
metrics (AJI, PQ, F1 at IoU 0.5, count error) on the MoNuSeg training images that carry instance maps.

    python benchmarks/instance_methods.py [--data ../shared/data/monuseg/train] [--model nuclei-he]

The model's probability maps (and a 2-channel model's interior maps) are computed once (at its defaults) and
cached in bench_out/; rows are the
mean over the held-out validation images (``training/nuclei-he/val.txt``) that have instance maps, and,
separately, over the training images that have them (in-sample: the model saw their masks).

``--agreement N`` adds the seeds that the samples agree on, on the validation images: each image segmented
N times with one sample (seeds 0..N-1), the mask from the mean of the N probabilities, and the watershed
seeded where at least k of the N samples' interiors exceed 0.5 (k = 1..N), beside the seeds of the mean
interior above 0.5 on the same maps.

``--oracle`` asks where the objects are lost, in the mask or in the split: on the validation images (and apart,
in-sample, on the training images), the model's
own split (its instance settings and mask threshold) of its own mask, of the annotated mask (a perfect mask),
and its mask split at the annotated nuclei (seeds: each annotated nucleus peeled as in training, a perfect
split), and the annotated mask split at the annotated nuclei (the ceiling of such seeds); with it, the
table of methods is left out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import napari_segdiff as ns
from napari_segdiff.instances import label_instances
from napari_segdiff.io import read_image
from napari_segdiff.models import load_model
from napari_segdiff.training.datasets import read_names
from napari_segdiff.training.metrics import dice, instance_metrics

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/monuseg/train"))
    ap.add_argument("--model", default="nuclei-he")
    ap.add_argument("--cache", default="", help="default: bench_out/<model>_maps.npz")
    ap.add_argument("--agreement", type=int, default=0, help="N single-sample runs per validation image")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    ap.add_argument("--oracle", action="store_true", help="perfect masks and perfect seeds, on validation")
    ap.add_argument("--samples", type=int, default=None, help="samples per tile (default: the model's)")
    ap.add_argument("--errors", action="store_true", help="what kind of pixel errors the model's mask makes")
    a = ap.parse_args()
    sampling = {k: v for k, v in (("steps", a.steps), ("samples", a.samples)) if v is not None}
    tag = "".join(f"_{k}{v}" for k, v in sampling.items())
    data = Path(a.data)
    val = set(read_names(ROOT / "training/nuclei-he/val.txt"))
    names = sorted(p.stem for p in (data / "instances").glob("*.png"))
    model = load_model(a.model, device="cpu")  # loaded once: segmenting, the oracle and the errors share it
    sha = model.sha256[:12]  # maps of other weights of the same name are not reused
    cache = Path(a.cache or ROOT / f"bench_out/{Path(a.model).stem}{tag}_{sha}_maps.npz")
    maps = dict(np.load(cache)) if cache.exists() else {}
    for n in names:
        if n not in maps:
            r = ns.segment(read_image(data / "images" / f"{n}.png"), model, seed=0, **sampling)
            maps[n] = r.probability
            if r.interior is not None:
                maps[f"{n}/interior"] = r.interior
            print(f"segmented {n} ({r.info['seconds']} s)", flush=True)
    cache.parent.mkdir(exist_ok=True)
    np.savez_compressed(cache, **maps)
    probs = {n: maps[n] for n in names}
    interiors = {n: maps.get(f"{n}/interior") for n in names}
    gts = {n: read_image(data / "instances" / f"{n}.png").astype(np.int64) for n in names}
    methods = [
        ("components", {}),
        ("watershed", {"min_distance": 3}),
        ("watershed", {"min_distance": 5}),
        ("watershed", {"min_distance": 7}),
        ("hmaxima", {"h": 0.5}),
        ("hmaxima", {"h": 1.0}),
        ("hmaxima", {"h": 2.0}),
        ("hmaxima", {"h": 3.0}),
    ]
    if all(v is not None for v in interiors.values()):  # a 2-channel model: seeds from its interior channel
        methods += [("interior", {"seed_threshold": t}) for t in (0.3, 0.4, 0.5, 0.6, 0.7)]
        methods += [("interior_peaks", {"h": h, "seed_threshold": 0.3}) for h in (0.07, 0.1, 0.15, 0.2, 0.25)]
    out = []
    if a.oracle or a.errors:
        methods = []
    for method, kw in methods:
        for min_area in (0, 10, 20):
            for part, keep in (("validation", lambda n: n in val), ("train (in-sample)", lambda n: n not in val)):
                rows = []
                for n in filter(keep, names):
                    extra = {"interior": interiors[n]} if method.startswith("interior") else {}
                    pred = label_instances(probs[n] > 0.5, probs[n], method=method, min_area=min_area, **kw, **extra)
                    rows.append({**instance_metrics(gts[n], pred), "dice": dice(probs[n] > 0.5, gts[n] > 0)})
                mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
                out.append({"method": method, **kw, "min_area": min_area, "part": part, "images": len(rows), **mean})
                print(
                    f"{method:10s} {json.dumps(kw):20s} min_area {min_area:2d} {part:18s} n={len(rows):2d} "
                    f"AJI {mean['aji']:.4f} PQ {mean['pq']:.4f} (DQ {mean['dq']:.3f} SQ {mean['sq']:.3f}) "
                    f"F1@.5 {mean['f1_50']:.4f} count err {mean['count_error']:+.1f} Dice {mean['dice']:.4f}",
                    flush=True,
                )
    if a.oracle:
        for part, keep in (("validation", lambda n: n in val), ("train (in-sample)", lambda n: n not in val)):
            out += oracle_rows(model, part, list(filter(keep, names)), probs, interiors, gts)
    if a.errors:
        out += error_rows(model, names, val, probs, gts)
    if a.agreement:
        out += agreement_rows(model, data, [n for n in names if n in val], gts, a.agreement)
    (ROOT / f"bench_out/instance_methods_{Path(a.model).stem}{tag}.json").write_text(json.dumps(out, indent=1))


def oracle_rows(model, part, names, probs, interiors, gts) -> list[dict]:
    from napari_segdiff.engine import instance_settings, recommended_config
    from napari_segdiff.instances import object_interior

    kw = instance_settings(model)
    t = recommended_config(model).sampling.threshold  # the mask threshold segment() uses
    out = []
    for mask_from in ("model", "annotation"):
        for seeds_from in ("model", "annotation"):
            rows = []
            for n in names:
                mask = probs[n] > t if mask_from == "model" else gts[n] > 0
                if seeds_from == "model":
                    pred = label_instances(mask, probs[n], interior=interiors[n], **kw)
                else:  # every annotated nucleus peeled as for training: one seed each
                    seeds = object_interior(gts[n], 2).astype(np.float32)
                    pred = label_instances(
                        mask,
                        probs[n],
                        method="interior",
                        interior=seeds,
                        seed_threshold=0.5,
                        min_area=kw.get("min_area", 0),
                    )
                rows.append({**instance_metrics(gts[n], pred), "dice": dice(mask, gts[n] > 0)})
            mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
            out.append({"oracle": f"mask {mask_from}, seeds {seeds_from}", "part": part, "threshold": t, **kw, **mean})
            print(
                f"{part:18s} mask from the {mask_from:10s} seeds from the {seeds_from:10s} n={len(rows)} "
                f"AJI {mean['aji']:.4f} PQ {mean['pq']:.4f} F1@.5 {mean['f1_50']:.4f} "
                f"count err {mean['count_error']:+.1f} Dice {mean['dice']:.4f}",
                flush=True,
            )
    return out


def error_rows(model, names, val, probs, gts) -> list[dict]:
    """Per image: where the model's mask is wrong (see ``--errors``)."""
    from scipy import ndimage
    from skimage.measure import label

    from napari_segdiff.engine import recommended_config

    t = recommended_config(model).sampling.threshold
    out = []
    for n in names:
        mask, gt = probs[n] > t, gts[n]
        truth = gt > 0
        missed, extra = truth & ~mask, mask & ~truth
        ids, counts = np.unique(gt[truth], return_counts=True)
        found = np.bincount(gt[truth & mask], minlength=int(gt.max()) + 1)[ids]
        wholly_missed = np.isin(gt, ids[found < 0.1 * counts]) & missed
        parts = label(mask)
        sizes = np.bincount(parts.ravel())
        right = np.bincount(parts[mask & truth], minlength=len(sizes))
        invented = np.isin(parts, np.flatnonzero(right < 0.1 * sizes)[1:]) & extra  # [1:]: not the background
        depth = ndimage.distance_transform_edt(truth)  # missed pixels: their distance to the annotated edge
        row = {
            "image": n,
            "part": "validation" if n in val else "train (in-sample)",
            "threshold": t,
            "missed_px": int(missed.sum()),
            "extra_px": int(extra.sum()),
            "missed_on_wholly_missed_nuclei": float(wholly_missed.sum() / max(missed.sum(), 1)),
            "extra_on_invented_parts": float(invented.sum() / max(extra.sum(), 1)),
            **{f"missed_within_{k}px_of_edge": float((depth[missed] <= k).mean()) for k in (1, 2, 3)},
        }
        out.append(row)
        print(
            f"{n[:23]:23s} {row['part']:18s} missed {row['missed_px']:6d} px "
            f"({row['missed_on_wholly_missed_nuclei']:.0%} on nuclei missed wholly), extra {row['extra_px']:6d} px "
            f"({row['extra_on_invented_parts']:.0%} on parts touching no nucleus); missed within 1/2/3 px of an edge: "
            + " / ".join(f"{row[f'missed_within_{k}px_of_edge']:.0%}" for k in (1, 2, 3)),
            flush=True,
        )
    return out


def agreement_rows(model, data: Path, names, gts, n_runs: int) -> list[dict]:
    """Seeds that k of n single-sample runs agree on, against the mean interior's seeds on the same maps."""
    runs = {
        n: [ns.segment(read_image(data / "images" / f"{n}.png"), model, samples=1, seed=s) for s in range(n_runs)]
        for n in names
    }
    if any(r.interior is None for rs in runs.values() for r in rs):
        raise SystemExit("--agreement needs a 2-channel model (one that generates the interior)")
    probs = {n: np.mean([r.probability for r in rs], axis=0) for n, rs in runs.items()}
    means = {n: np.mean([r.interior for r in rs], axis=0) for n, rs in runs.items()}
    votes = {n: np.mean([r.interior > 0.5 for r in rs], axis=0) for n, rs in runs.items()}  # share of samples on
    out = []
    # >= k of n votes is a share of samples above (k - 0.5) / n
    rules = [("mean interior > 0.5", means, 0.5)]
    rules += [
        (f"interior > 0.5 in >= {k} of {n_runs} samples", votes, (k - 0.5) / n_runs) for k in range(1, n_runs + 1)
    ]
    for seeds, inners, t in rules:
        for min_area in (10, 20):
            rows = []
            for n in runs:
                prob, inner = probs[n], inners[n]
                pred = label_instances(
                    prob > 0.5, prob, method="interior", interior=inner, seed_threshold=t, min_area=min_area
                )
                rows.append({**instance_metrics(gts[n], pred), "dice": dice(prob > 0.5, gts[n] > 0)})
            mean = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
            out.append(
                {
                    "method": "agreement",
                    "seeds": seeds,
                    "min_area": min_area,
                    "part": "validation",
                    "images": len(rows),
                    **mean,
                }
            )
            print(
                f"{seeds:34s} min_area {min_area:2d} n={len(rows)} AJI {mean['aji']:.4f} PQ {mean['pq']:.4f} "
                f"(DQ {mean['dq']:.3f} SQ {mean['sq']:.3f}) F1@.5 {mean['f1_50']:.4f} "
                f"count err {mean['count_error']:+.1f} Dice {mean['dice']:.4f}",
                flush=True,
            )
    return out


if __name__ == "__main__":
    main()
