"""Accuracy and calibration against steps and samples, on held-out validation images.

    python benchmarks/sampling_sweep.py --model nuclei-he --data ../shared/data/monuseg/train \
        --names training/nuclei-he/val.txt --steps 1,2,3,5,10 --samples 1,3,5 --json bench_out/sweep-nuclei.json

For each step count T' every tile is sampled once with max(samples) samples (G(I) once per tile, the
samples as one batch, the engine's per-tile seeds), keeping each sample; the scores for N samples average
the first N. Each sample is an independent draw, so this is statistically what ``segment(samples=N)``
computes (not bit-identical: the engine draws one (N, 1, h, w) noise tensor per step). Windows do not
overlap here (the paper's protocol: stride 256). Seconds are measured separately with real
``segment()`` calls (default overlap) on the first image (``--time``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import napari_segdiff as ns
from napari_segdiff.config import SamplingConfig
from napari_segdiff.engine import TileSampler, resolve_precision
from napari_segdiff.tiling import iter_windows, window_grid
from napari_segdiff.training.datasets import load_dataset, split_samples
from napari_segdiff.training.metrics import all_metrics
from napari_segdiff.transforms import as_hwc, intensity_range, to_chw


def per_sample_maps(model, image, steps, n, seed=0, tile=256, precision="fp32"):
    """(n, H, W) probability map of each sample, stitched with overlap 0 windows, sampled by the engine's
    :class:`TileSampler` (its layout, precision and per-tile seeds); each map resized to the tile as drawn."""
    arr = as_hwc(image, model.config.in_channels)
    H, W = arr.shape[:2]
    scale = intensity_range(arr)
    wins = window_grid((H, W), tile, tile)
    out = np.zeros((n, H, W), np.float32)
    cnt = np.zeros((H, W), np.float32)
    runner = TileSampler(model, SamplingConfig(samples=n, steps=steps), torch.device("cpu"), precision)
    for win, block in iter_windows(arr, wins, tile):
        p = runner.sample_maps(to_chw(scale.apply(block))[None], [win.index], seed)
        if p.shape[-2:] != (tile, tile):
            p = torch.nn.functional.interpolate(p, size=(tile, tile), mode="bilinear", align_corners=False)
        p = p[0].numpy()
        out[:, win.y : win.y + win.h, win.x : win.x + win.w] += p[:, : win.h, : win.w]
        cnt[win.y : win.y + win.h, win.x : win.x + win.w] += 1
    return out / cnt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--names", required=True)
    ap.add_argument("--steps", default="1,2,3,5,10")
    ap.add_argument("--samples", default="1,3,5")
    ap.add_argument("--time", default="", help="'N:T,N:T,...' settings to time with segment() on the first image")
    ap.add_argument("--precision", default="auto", help="auto (what segment() uses here), fp32 or bf16")
    ap.add_argument("--json", default="bench_out/sweep.json")
    a = ap.parse_args(argv)
    model = ns.load_model(a.model)
    precision = resolve_precision(a.precision, torch.device("cpu"))
    print(f"precision {precision}", flush=True)
    _, val = split_samples(load_dataset(a.data), a.names)
    steps = [int(v) for v in a.steps.split(",")]
    samples = [int(v) for v in a.samples.split(",")]
    rows = []
    for T in steps:
        t0 = time.perf_counter()
        per = {N: [] for N in samples}
        for smp in val:
            maps = per_sample_maps(model, smp.image, T, max(samples), precision=precision)
            for N in samples:
                per[N].append(all_metrics(maps[:N].mean(0), smp.mask))
        for N in samples:
            m = {k: float(np.mean([r[k] for r in per[N]])) for k in per[N][0]}
            rows.append({"steps": T, "samples": N, **m})
            print(
                f"steps {T:3d} samples {N:2d}: dice {m['dice']:.4f} iou {m['iou']:.4f} boundf {m['boundf']:.4f} "
                f"wcov {m['wcov']:.4f} calibration {m['calibration']:.4f} ece {m['ece']:.4f}",
                flush=True,
            )
        print(f"  ({time.perf_counter() - t0:.0f} s for steps={T})", flush=True)
    timings = []
    for item in [t for t in a.time.split(",") if t]:
        N, T = (int(v) for v in item.split(":"))
        t0 = time.perf_counter()
        r = ns.segment(val[0].image, model, samples=N, steps=T, seed=0, precision=precision)
        timings.append(
            {
                "samples": N,
                "steps": T,
                "seconds": time.perf_counter() - t0,
                "image": val[0].name,
                "shape": list(val[0].image.shape),
                "tiles": r.info["tiles"],
                "overlap": r.info["overlap"],
                "precision": precision,
            }
        )
        print(
            f"segment() samples {N} steps {T}: {timings[-1]['seconds']:.1f} s on {val[0].name} "
            f"({r.info['tiles']} tiles, overlap {r.info['overlap']})",
            flush=True,
        )
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model": model.name,
                "sha256": model.sha256,
                "precision": precision,
                "images": [s.name for s in val],
                "grid": rows,
                "timings": timings,
                "torch_threads": torch.get_num_threads(),
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
