"""Evaluate a model on a folder with the same tiling and sampling users get; per image and mean."""

from __future__ import annotations

import json
import time

import numpy as np

from ..config import DEFAULT
from ..engine import segment
from ..io import atomic_write_bytes
from ..models import load_model
from .datasets import load_dataset, split_samples
from .metrics import all_metrics, error_auroc, instance_metrics

METRICS = ("dice", "iou", "wcov", "boundf", "calibration", "ece", "error_auroc")
OBJECT_METRICS = ("aji", "pq", "dq", "sq", "f1_50", "count_error")


def _mean(values) -> float:
    """Mean over the images where the metric is defined (error_auroc is NaN on an image without one wrong
    pixel); NaN where it is defined on none."""
    a = np.asarray(values, dtype=np.float64)
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else float("nan")


def evaluate_items(
    model,
    items,
    *,
    samples=None,
    steps=DEFAULT,
    seed=0,
    overlap=None,
    tile=None,
    device="auto",
    precision="auto",
    runtime="auto",
    verbose=True,
    tta=None,
    threshold=None,
) -> dict:
    mdl = load_model(model, device="cpu") if not hasattr(model, "net") else model
    rows = []
    settings = None
    t0 = time.perf_counter()
    # None (DEFAULT for steps, where None means all T steps): the model's recommendation
    given = {"samples": samples, "overlap": overlap, "tile": tile, "tta": tta, "threshold": threshold}
    kw = {"seed": seed, "device": device, "precision": precision, "runtime": runtime}
    kw.update({k: v for k, v in given.items() if v is not None})
    if steps is not DEFAULT:
        kw["steps"] = steps
    for s in items:
        has_instances = getattr(s, "instances", None) is not None
        r = segment(s.image, mdl, instances=has_instances, **kw)
        m = all_metrics(r.probability, s.mask, threshold=r.info["threshold"])  # the mask users get
        m["error_auroc"] = error_auroc(r.variance, r.mask, s.mask)  # does the variance point at its errors?
        if has_instances:  # object metrics against the instance map, by the model's instance method
            m.update(instance_metrics(s.instances, np.asarray(r.labels)))
        m["seconds"] = r.info["seconds"]
        rows.append({"image": s.name, **m})
        settings = {
            k: r.info[k]
            for k in (
                "model",
                "sha256",
                "samples",
                "steps",
                "sampler",
                "tta",
                "threshold",
                "seed",
                "tile",
                "overlap",
                "device",
                "precision",
                "runtime",
            )
        }
        if verbose:
            print(f"{s.name:40s} " + " ".join(f"{k} {m[k]:.4f}" for k in METRICS + OBJECT_METRICS if k in m))
    mean = {k: _mean([r[k] for r in rows]) for k in METRICS + ("seconds",)}
    with_objects = [r for r in rows if "aji" in r]
    if with_objects:  # over the images that have instance maps
        mean.update({k: float(np.mean([r[k] for r in with_objects])) for k in OBJECT_METRICS})
        mean["images_with_instances"] = len(with_objects)
    if verbose:
        print(
            f"{'mean (' + str(len(rows)) + ' images)':40s} "
            + " ".join(f"{k} {mean[k]:.4f}" for k in METRICS + OBJECT_METRICS if k in mean)
        )
    return {"settings": settings, "mean": mean, "images": rows, "wall_seconds": time.perf_counter() - t0}


def evaluate_folder(
    model,
    data,
    fmt="folder",
    names=None,
    samples=None,
    steps=None,
    seed=0,
    overlap=None,
    tile=None,
    out_json=None,
    device="auto",
    precision="auto",
    tta=None,
    runtime="auto",
    threshold=None,
) -> dict:
    data_samples = load_dataset(data, fmt)
    if names:
        _, data_samples = split_samples(data_samples, names)
    report = evaluate_items(
        model,
        data_samples,
        samples=samples,
        steps=steps if steps is not None else DEFAULT,
        seed=seed,
        overlap=overlap,
        tile=tile,
        device=device,
        precision=precision,
        runtime=runtime,
        tta=tta,
        threshold=threshold,
    )
    report["data"] = str(data)
    if out_json:
        atomic_write_bytes(out_json, lambda f: f.write(json.dumps(report, indent=2).encode()))
        print(f"wrote {out_json}")
    return report
