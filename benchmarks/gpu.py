"""segment() on a GPU: MPx/min at its defaults for 512, 2048 and 8192 px in float32 and bfloat16 autocast, and
the validation Dice on the GPU against the CPU's, in one run, printed with the machine it ran on.

    python benchmarks/gpu.py [--device cuda] [--sizes 512,2048,8192] [--batch-size 64]
        [--data ../shared/data/monuseg/train --names training/nuclei-he/val.txt] [--json bench_out/gpu.json]

Images: the shipped H&E sample, tiled to each size (no tile is empty, so none is skipped). Each size and
precision runs once after a warm-up (best of two at 512); masks are compared with float32's. Dice: the mean over
the validation images of the probability thresholded as `segment()` does, on the device in each precision and
on the CPU at its defaults (`--cpu-runtime`, default torch: what every machine has). `--device cpu --sizes 512`
runs the same on a machine without a GPU (a smoke run of this script).

Beyond torch, `segment()` and the Dice need only numpy, dask, tifffile, scikit-image, scipy, pillow and tqdm
(zarr, platformdirs and OpenVINO are imported only where used). On a machine that has a CUDA torch but no network
and no dask, bring dask as a wheel and the validation images in a folder git ignores, e.g.

    echo /.device/ >> .git/info/exclude
    pip download --no-deps --only-binary=:all: --python-version 3.12 -d .device/whl dask
    cp -r ../shared/data/monuseg/train .device/monuseg            # 17 MB
    # there:
    pip install -q --no-index --no-deps --target /tmp/site .device/whl/*.whl
    PYTHONPATH=/tmp/site:src python3 benchmarks/gpu.py --data .device/monuseg --json $OUT/gpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from run import machine, sample_512, tiled_sample

import napari_segdiff as ns


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(img, model, device: str, precision: str, batch_size: int | None):
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    r = ns.segment(img, model, device=device, precision=precision, batch_size=batch_size, seed=0)
    _sync(device)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return r, dt, peak


def bench_sizes(model, device: str, sizes, precisions, batch_size) -> list[dict]:
    base = sample_512()
    rows = []
    for p in precisions:
        timed(base[:256, :256], model, device, p, batch_size)  # warm-up: kernels, autotuning, allocator
    for size in sizes:
        img = tiled_sample(size)
        masks = {}
        for p in precisions:
            best, peak, r = 1e18, None, None
            for _ in range(2 if size <= 512 else 1):
                r, dt, pk = timed(img, model, device, p, batch_size)
                best, peak = min(best, dt), pk if peak is None else max(peak, pk)
            masks[p] = np.asarray(r.mask)
            row = {
                "size": size,
                "precision": r.info["precision"],
                "runtime": r.info.get("runtime", "torch"),
                "tiles": r.info["tiles"],
                "seconds": best,
                "mpx_per_min": size * size / 1e6 / (best / 60),
                "peak_gpu_gib": peak,
            }
            if p != precisions[0]:
                row["mask_agreement_with_" + precisions[0]] = float((masks[p] == masks[precisions[0]]).mean())
            print(f"  {row}", flush=True)
            rows.append(row)
    return rows


def bench_dice(model, device: str, precisions, data: str, names: str | None, cpu_runtime: str) -> dict:
    from napari_segdiff.training.datasets import load_dataset, read_names
    from napari_segdiff.training.metrics import all_metrics

    keep = set(read_names(names)) if names else None
    items = [s for s in load_dataset(data) if keep is None or s.name in keep]
    runs = {f"{device} {p}": dict(device=device, precision=p) for p in precisions}
    runs[f"cpu auto ({cpu_runtime})"] = dict(device="cpu", precision="auto", runtime=cpu_runtime)
    out = {"images": len(items)}
    masks: dict[str, list] = {k: [] for k in runs}
    for name, kw in runs.items():
        dice = []
        for s in items:
            r = ns.segment(s.image, model, seed=0, **kw)
            dice.append(all_metrics(r.probability, s.mask, threshold=r.info.get("threshold", 0.5))["dice"])
            masks[name].append(np.asarray(r.mask))
        out[f"dice {name}"] = float(np.mean(dice))
    cpu = list(runs)[-1]
    for name in list(runs)[:-1]:
        out[f"dice difference {name} - cpu"] = out[f"dice {name}"] - out[f"dice {cpu}"]
        out[f"mask agreement {name} vs cpu"] = float(
            np.mean([(a == b).mean() for a, b in zip(masks[name], masks[cpu])])
        )
    print(f"  {out}", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default=None, help="model name or file (default: the default model)")
    ap.add_argument("--sizes", default="512,2048,8192")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument(
        "--batch-size", dest="batch_size", type=int, default=None, help="tiles per call (default: the library's)"
    )
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/monuseg/train"))
    ap.add_argument("--names", default=str(Path(__file__).resolve().parents[1] / "training/nuclei-he/val.txt"))
    ap.add_argument("--cpu-runtime", dest="cpu_runtime", default="torch", choices=("torch", "openvino", "auto"))
    ap.add_argument("--json", default="bench_out/gpu.json")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu for a smoke run", file=sys.stderr)
        return 2
    model = ns.load_model(args.model or ns.DEFAULT_MODEL)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    res: dict = {"machine": machine(), "model": model.name, "device": args.device}
    if args.device.startswith("cuda"):
        res["gpu"] = torch.cuda.get_device_name(0)
    print(f"## segment() on {args.device}: {res['machine']}", flush=True)
    res["sizes"] = bench_sizes(model, args.device, [int(s) for s in args.sizes.split(",")], precisions, args.batch_size)
    if Path(args.data).exists():
        res["validation"] = bench_dice(model, args.device, precisions, args.data, args.names, args.cpu_runtime)
    else:
        print(f"  no validation data at {args.data}: Dice not measured", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
