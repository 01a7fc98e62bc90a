"""napari-segdiff benchmarks: prints a table and writes JSON.

    python benchmarks/run.py [--quick] [--only tile,images,scale,flops,bf16] [--json bench_out/results.json]

1. tile:   the paper's Algorithm 1 done straightforwardly (G(I) recomputed at every step, the N samples
           one after another) against the engine (G once per tile, the N samples as one batch), same
           weights, same noise, same T and N, side by side; paper-size presets run a few steps and are
           reported per step.
2. images: whole RGB images (512, 1000, 4096) with the shipped default model and settings: seconds,
           megapixels per minute, peak resident memory (each size in a fresh subprocess).
3. scale:  a 20000x20000 RGB zarr store segmented into a zarr store with a tiny network and 1 step:
           peak resident memory against the image size (flat = no whole-image arrays).
4. flops:  FLOPs of one forward per preset (torch's FlopCounterMode) and achieved FLOP/s against a
           measured fp32 matmul peak on the same machine.
5. bf16:   bfloat16 autocast against fp32 for the default model: time and mask agreement.
6. train:  seconds per optimiser step per preset.
7. compile: one batched sampling forward of the default model (N samples of a 256 tile) eager, eager
           channels-last and under torch.compile (inductor), side by side, with the compile time and the
           largest output difference; and the same forward with 1 and with 2 torch threads.
8. attention: the same forward and segment() on the 512x512 sample with attention forced onto PyTorch's
           math fallback (what the old (b, c, hw) layout got) against the fused CPU SDPA kernel it takes now,
           side by side, with the share of self time in attention ops and the masks compared.
9. skip:   tiles that need no model (transparent, uniform, slide glass): the share skipped and the time with
           and without skipping on the aerial sample scene, on the scene rotated 30 degrees onto a nodata
           canvas (as an orthophoto's footprint sits in its raster), and on a slide-like image (the H&E
           sample pasted twice onto a 1536x1536 noisy glass background).
10. runtimes: the same batched forward in torch (fp32, channels-last fp32, channels-last bf16), ONNX
           Runtime and OpenVINO (fp32 and its bf16 hint) where installed (`pip install onnx onnxruntime
           openvino`; the ONNX export is cached in bench_out/runtimes), each checked against torch fp32.
11. speedup: the default model at its defaults now against the path before the speed work (attention on the
           math fallback, torch runtime, no skipping, and the sampling the defaults had then: 3 samples x 2
           steps), side by side at 512 and 2048 px, with masks and the validation Dice compared; also the new
           paths at the old sampling, which separates the engine's gain from the sampling's.
12. scene: the 2048x2048 aerial sample scene with buildings-all at its defaults (instances on), in a fresh
           process: seconds, peak RSS, IoU and the building count.
13. repeat: a script segmenting image after image by name: segment(img, "nuclei-he") (the model kept after its
           first load) against load_model + segment each time, interleaved, the 512x512 sample (median of 5).
14. labels: instance labels of a large mask (the aerial sample scene's building mask tiled to 4096 and 8192
           px) by buildings-all's h-maxima split, the whole image at once against a block of connected
           components at a time (the default), each in a fresh process: seconds, peak RSS, and how far the two
           splits agree (AJI, object F1 and SQ of one against the other).
15. slide: the shipped default model at its defaults on a whole-slide-sized region, zarr to zarr, each run in a
           fresh process: a 20000x20000 slide-like image (tissue made of the H&E sample in a few large
           ellipses, about 28% of the area, on noisy glass) with tile skipping on, and an 8192x8192 region of
           it with skipping on and off: seconds, MPx/min, peak RSS, tiles skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from reference_sampler import reference_tile_sample

import napari_segdiff as ns
from napari_segdiff.config import SamplingConfig, get_preset
from napari_segdiff.engine import TileSampler
from napari_segdiff.models import SegDiffModel, list_models
from napari_segdiff.network import count_parameters

HERE = Path(__file__).resolve().parent


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def default_model() -> SegDiffModel:
    if ns.DEFAULT_MODEL in list_models():
        return ns.load_model(ns.DEFAULT_MODEL)
    print(f"[shipped model {ns.DEFAULT_MODEL!r} not installed: timing an untrained cpu-small network]")
    return SegDiffModel.from_config("cpu-small", name="cpu-small (untrained)")


# ---------------------------------------------------------------------------------------- 1. tile
def bench_tile(model: SegDiffModel, samples: int, steps: int, tile: int, label: str) -> dict:
    img = torch.rand(1, model.config.in_channels, tile, tile) * 2 - 1
    with torch.inference_mode():
        t0 = time.perf_counter()
        ref_m, ref_s = reference_tile_sample(model, img, samples, steps, seed=0)
        t_naive = time.perf_counter() - t0
        runner = TileSampler(model, SamplingConfig(samples=samples, steps=steps, seed=0), torch.device("cpu"))
        t0 = time.perf_counter()
        m, s = runner(img.numpy(), [0], seed=0)
        t_engine = time.perf_counter() - t0
        # the engine at its defaults on this machine (bf16 autocast where native, channels-last on the CPU)
        fast = TileSampler(
            model, SamplingConfig(samples=samples, steps=steps, seed=0), torch.device("cpu"), precision="auto"
        )
        fast(img.numpy(), [0], seed=0)  # warm-up: the first bf16/channels-last call builds its kernels
        t0 = time.perf_counter()
        m2, _ = fast(img.numpy(), [0], seed=0)
        t_fast = time.perf_counter() - t0
    return {
        "model": label,
        "tile": tile,
        "samples": samples,
        "steps": steps,
        "straightforward_s": t_naive,
        "engine_s": t_engine,
        "speedup": t_naive / t_engine,
        "engine_defaults_s": t_fast,
        "engine_defaults_precision": fast.precision,
        "speedup_defaults": t_naive / t_fast,
        "max_abs_diff_mean_defaults": float(np.abs(m2[0] - ref_m).max()),
        "straightforward_s_per_step": t_naive / steps,
        "engine_s_per_step": t_engine / steps,
        "max_abs_diff_mean": float(np.abs(m[0] - ref_m).max()),
    }


# ---------------------------------------------------------------------------------------- 2. images
IMAGE_CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
import napari_segdiff as ns
from napari_segdiff.models import SegDiffModel, list_models
size = int(sys.argv[1])
rng = np.random.default_rng(0)
base = np.asarray(__import__('skimage.io', fromlist=['imread']).imread(sys.argv[2]))[..., :3]
reps = -(-size // base.shape[0])
img = np.tile(base, (reps, reps, 1))[:size, :size]   # real H&E texture, tiled up to size
model = ns.load_model(ns.DEFAULT_MODEL) if ns.DEFAULT_MODEL in list_models() else SegDiffModel.from_config('cpu-small')
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
res = ns.segment(img, model)
dt = time.perf_counter() - t0
print(json.dumps({"size": size, "seconds": dt, "mpx_per_min": size * size / 1e6 / dt * 60,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_before_mb": r0 / 1024, "tiles": res.info["tiles"], "samples": res.info["samples"],
                  "steps": res.info["steps"], "network_evaluations": res.info["network_evaluations"],
                  "model": res.info["model"]}))
"""


def bench_images(sizes) -> list[dict]:
    sample = Path(ns.__file__).parent.parent.parent / "sample_data" / "nuclei_he.png"
    if not sample.exists():
        from importlib.resources import files

        sample = Path(str(files("napari_segdiff.sample_data") / "nuclei_he.png"))
    rows = []
    for size in sizes:
        out = subprocess.run(
            [sys.executable, "-c", IMAGE_CHILD, str(size), str(sample)], capture_output=True, text=True, check=True
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  image {size}x{size}: {rows[-1]['seconds']:.1f} s")
    return rows


# ---------------------------------------------------------------------------------------- 3. scale
SCALE_CHILD = r"""
import json, resource, sys, time, threading
import numpy as np, zarr, dask.array as da
import napari_segdiff as ns
from napari_segdiff.config import NetworkConfig
from napari_segdiff.models import SegDiffModel
src, dst, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = NetworkConfig(image_size=256, base_channels=8, channel_mult=(1, 1, 1, 1, 1), num_res_blocks=1, rrdb_blocks=0,
                    rrdb_width=8, rrdb_growth=8, attention_resolutions=(), num_heads=1, diffusion_steps=10,
                    parameterization="x0", input_scale=0.25)  # the pipeline is under test, not the network
model = SegDiffModel.from_config(cfg, name="scale-probe")
img = da.from_zarr(zarr.open_array(src, mode="r"))
peak = [0]
def watch():
    while True:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmRSS'):
                    peak[0] = max(peak[0], int(line.split()[1]))
        time.sleep(0.2)
threading.Thread(target=watch, daemon=True).start()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
res = ns.segment(img, model, samples=1, steps=1, overlap=0.0, batch_size=8, out=dst)
dt = time.perf_counter() - t0
print(json.dumps({"size": size, "seconds": dt, "tiles": res.info["tiles"], "rss_before_mb": r0 / 1024,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "whole_image_float32_mb": size * size * 4 / 2**20}))
"""


def make_zarr(path: str, size: int, chunk: int = 1024) -> None:
    import zarr

    z = zarr.open_array(path, mode="w", shape=(size, size, 3), chunks=(chunk, chunk, 3), dtype="u1")
    yy, xx = np.mgrid[:chunk, :chunk]
    block = np.stack([(127 + 120 * np.sin(yy / (7 + 5 * c)) * np.cos(xx / 11)) for c in range(3)], -1).astype(np.uint8)
    for y in range(0, size, chunk):
        for x in range(0, size, chunk):
            z[y : y + chunk, x : x + chunk] = block[: min(chunk, size - y), : min(chunk, size - x)]


def bench_scale(sizes) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("SEGDIFF_BENCH_TMP")) as d:
        for size in sizes:
            src, dst = f"{d}/in_{size}.zarr", f"{d}/out_{size}.zarr"
            make_zarr(src, size)
            out = subprocess.run(
                [sys.executable, "-c", SCALE_CHILD, src, dst, str(size)], capture_output=True, text=True, check=True
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  scale {size}: {rows[-1]['seconds']:.1f} s, peak {rows[-1]['peak_rss_mb']:.0f} MB")
    return rows


# ---------------------------------------------------------------------------------------- 4. flops
def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def bench_flops(names) -> tuple[float, list[dict]]:
    from torch.utils.flop_counter import FlopCounterMode

    from napari_segdiff.network import SegDiffNet

    peak = matmul_peak()
    rows = []
    for name in names:
        cfg = get_preset(name)
        side = 256 if name.startswith("cpu") else cfg.image_size
        net = SegDiffNet(cfg).eval()
        img, x = torch.randn(1, cfg.in_channels, side, side), torch.randn(1, 1, side, side)
        t = torch.zeros(1, dtype=torch.long)
        with torch.inference_mode():
            with FlopCounterMode(display=False) as fc:
                net(x, t, image=img)
            flops = fc.get_total_flops()
            net(x, t, image=img)
            t0 = time.perf_counter()
            net(x, t, image=img)
            dt = time.perf_counter() - t0
        rows.append(
            {
                "preset": name,
                "size": side,
                "parameters": count_parameters(net),
                "gflops": flops / 1e9,
                "forward_s": dt,
                "achieved_gflops_per_s": flops / dt / 1e9,
                "fraction_of_matmul_peak": flops / dt / peak,
            }
        )
        print(f"  flops {name}: {flops / 1e9:.1f} GFLOP, {dt:.2f} s")
    return peak, rows


# ---------------------------------------------------------------------------------------- 5. bf16
def sample_512() -> np.ndarray:
    """The shipped H&E sample (512x512 RGB), or seeded noise where the repository's sample is absent."""
    from skimage.io import imread

    sample = Path(ns.__file__).parent.parent.parent / "sample_data" / "nuclei_he.png"
    return (
        np.asarray(imread(sample))[:512, :512, :3]
        if sample.exists()
        else (np.random.default_rng(0).random((512, 512, 3)) * 255).astype(np.uint8)
    )


def tiled_sample(size: int) -> np.ndarray:
    """The H&E sample tiled up to ``size`` x ``size`` (every part of it tissue)."""
    base = sample_512()
    reps = -(-size // base.shape[0])
    return np.ascontiguousarray(np.tile(base, (reps, reps, 1))[:size, :size])


def bench_bf16(model: SegDiffModel) -> dict:
    img = sample_512()
    t0 = time.perf_counter()
    a = ns.segment(img, model, seed=0, precision="fp32")
    t32 = time.perf_counter() - t0
    t0 = time.perf_counter()
    b = ns.segment(img, model, seed=0, precision="bf16")
    t16 = time.perf_counter() - t0
    return {
        "fp32_s": t32,
        "bf16_s": t16,
        "speedup": t32 / t16,
        "mask_agreement": float((a.mask == b.mask).mean()),
        "max_abs_prob_diff": float(np.abs(a.probability - b.probability).max()),
    }


# ---------------------------------------------------------------------------------------- 6. train step
def bench_train_step(names_batches) -> list[dict]:
    """Seconds per optimiser step (forward + backward + AdamW) on random crops, per preset."""
    from napari_segdiff.diffusion import Diffusion
    from napari_segdiff.network import SegDiffNet

    rows = []
    for name, batch, crop in names_batches:
        cfg = get_preset(name)
        net = SegDiffNet(cfg)
        diff = Diffusion.from_config(cfg)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        img = torch.rand(batch, cfg.in_channels, crop, crop) * 2 - 1
        x0 = (torch.rand(batch, 1, crop, crop) > 0.5).float() * 2 - 1
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            opt.zero_grad()
            diff.training_loss(lambda x, t, net=net, img=img: net(x, t, image=img), x0).backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        rows.append({"preset": name, "batch": batch, "crop": crop, "seconds_per_step": min(times[1:])})
        print(f"  train step {name} batch {batch}x{crop}: {rows[-1]['seconds_per_step']:.2f} s", flush=True)
    return rows


# ---------------------------------------------------------------------------------------- 7. compile
def _best_of(fn, reps: int = 3) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _forward_inputs(model: SegDiffModel, batch: int, tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded inputs of one batched sampling forward at the network's side of a ``tile``: the image (1, C, s, s),
    x_t (batch, K, s, s) with K the model's mask channels, and a mid-schedule t."""
    side = int(round(tile * model.config.input_scale))
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, model.config.in_channels, side, side, generator=g) * 2 - 1
    x = torch.randn(batch, model.config.mask_channels, side, side, generator=g)
    return img, x, torch.full((batch,), model.diffusion.T // 2, dtype=torch.long)


def bench_compile(model: SegDiffModel, samples: int, tile: int = 256) -> dict:
    """Eager vs channels-last vs torch.compile for one batched forward (the engine's unit of work),
    and 1 vs 2 threads, measured side by side in this process."""
    net = model.net.eval()
    img, x, t = _forward_inputs(model, samples, tile)
    row: dict = {"model": model.name, "samples": samples, "tile": tile}
    with torch.inference_mode():
        feats = net.encode_image(img).repeat_interleave(samples, 0)
        ref = net(x, t, features=feats)
        row["eager_s"] = _best_of(lambda: net(x, t, features=feats))
        threads = torch.get_num_threads()
        for n in (1, 2):
            torch.set_num_threads(n)
            row[f"eager_{n}_threads_s"] = _best_of(lambda: net(x, t, features=feats))
        torch.set_num_threads(threads)
        net_cl = net.to(memory_format=torch.channels_last)
        x_cl, f_cl = x.to(memory_format=torch.channels_last), feats.to(memory_format=torch.channels_last)
        row["channels_last_s"] = _best_of(lambda: net_cl(x_cl, t, features=f_cl))
        net.to(memory_format=torch.contiguous_format)
        try:
            t0 = time.perf_counter()
            cnet = torch.compile(net, dynamic=False)
            out = cnet(x, t, features=feats)
            row["compile_time_s"] = time.perf_counter() - t0
            row["compiled_s"] = _best_of(lambda: cnet(x, t, features=feats))
            row["compiled_max_abs_diff"] = float((out - ref).abs().max())
            row["compile_speedup"] = row["eager_s"] / row["compiled_s"]
            # forwards needed before the compile time pays for itself
            saved = row["eager_s"] - row["compiled_s"]
            row["break_even_forwards"] = row["compile_time_s"] / saved if saved > 0 else None
        except Exception as e:  # no C++ compiler, unsupported platform, ...
            row["compile_error"] = f"{type(e).__name__}: {e}"[:300]
    # the whole engine on the 512x512 sample, contiguous vs channels-last (the CPU default), side by side
    img = sample_512()
    best, masks = {False: float("inf"), True: float("inf")}, {}
    for cl in (False, True, False, True):
        t0 = time.perf_counter()
        masks[cl] = ns.segment(img, model, seed=0, channels_last=cl, precision="fp32").mask
        best[cl] = min(best[cl], time.perf_counter() - t0)
    row["segment_512_contiguous_s"], row["segment_512_channels_last_s"] = best[False], best[True]
    row["segment_512_channels_last_speedup"] = best[False] / best[True]
    row["channels_last_mask_agreement"] = float((masks[False] == masks[True]).mean())
    print(f"  compile: {row}", flush=True)
    return row


# ---------------------------------------------------------------------------------------- 8. attention
OP_KINDS = {  # per-op self time grouped as in the profile of the speed issue
    "convolution": ("conv", "mkldnn_convolution"),
    "attention": ("attention", "softmax", "aten::bmm", "isneginf", "aten::where", "aten::all"),
    "groupnorm": ("group_norm", "native_group_norm"),
    "silu": ("silu",),
    "add": ("aten::add", "aten::add_"),  # exact names (aten::addmm is a matmul)
    "copies": ("copy_", "contiguous", "clone", "aten::to", "_to_copy", "aten::cat"),
}


def _op_is(name: str, kind: str, keys: tuple[str, ...]) -> bool:
    return name in keys if kind == "add" else any(key in name for key in keys)


def _op_shares(fn) -> dict[str, float]:
    """Share of one call's self CPU time by op kind (``OP_KINDS``; the rest is 'other')."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev) or 1.0
    shares = dict.fromkeys([*OP_KINDS, "other"], 0.0)
    for e in ev:
        kind = next((k for k, keys in OP_KINDS.items() if _op_is(e.key, k, keys)), "other")
        shares[kind] += e.self_cpu_time_total / total
    return shares


def bench_attention(model: SegDiffModel, samples: int, tile: int = 256) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from napari_segdiff.engine import precision_context, resolve_precision

    net = model.net.eval().to(memory_format=torch.channels_last)
    img, x, t = _forward_inputs(model, samples, tile)
    x = x.to(memory_format=torch.channels_last)
    cpu = torch.device("cpu")
    precision = resolve_precision("auto", cpu)  # what the defaults run here: bf16 where native, else fp32
    row: dict = {"model": model.name, "samples": samples, "tile": tile, "precision": precision}
    image = sample_512()
    with torch.inference_mode(), precision_context(precision, cpu):
        feats = net.encode_image(img).repeat_interleave(samples, 0).to(memory_format=torch.channels_last)
        fwd = lambda: net(x, t, features=feats)  # noqa: E731
        outs = {}
        for name in ("math", "fused", "math", "fused"):  # interleaved, best of each
            ctx = sdpa_kernel([SDPBackend.MATH]) if name == "math" else contextlib.nullcontext()
            with ctx:
                row[f"{name}_forward_s"] = min(row.get(f"{name}_forward_s", 1e9), _best_of(fwd, reps=2))
                outs[name] = fwd().float()
                row[f"{name}_op_shares"] = _op_shares(fwd)
                row[f"{name}_attention_share"] = row[f"{name}_op_shares"]["attention"]
    row["forward_speedup"] = row["math_forward_s"] / row["fused_forward_s"]
    row["forward_max_abs_diff"] = float((outs["math"] - outs["fused"]).abs().max())
    masks = {}
    for name in ("math", "fused", "math", "fused"):
        ctx = sdpa_kernel([SDPBackend.MATH]) if name == "math" else contextlib.nullcontext()
        with ctx:
            t0 = time.perf_counter()
            masks[name] = ns.segment(image, model, seed=0, runtime="torch").mask  # the kernel choice is torch's
            row[f"{name}_segment_512_s"] = min(row.get(f"{name}_segment_512_s", 1e9), time.perf_counter() - t0)
    row["segment_512_speedup"] = row["math_segment_512_s"] / row["fused_segment_512_s"]
    row["mask_agreement"] = float((masks["math"] == masks["fused"]).mean())
    net.to(memory_format=torch.contiguous_format)
    print(f"  attention: {row}", flush=True)
    return row


# ---------------------------------------------------------------------------------------- 9. skip
def skip_images() -> list[tuple[str, np.ndarray, str]]:
    from skimage.io import imread
    from skimage.transform import rotate

    root = Path(ns.__file__).parent.parent.parent / "sample_data"
    scene = np.asarray(imread(root / "buildings_scene.jpg"))[..., :3]
    rot = (rotate(scene, 30, resize=True, cval=0, order=1, preserve_range=True)).astype(np.uint8)
    rng = np.random.default_rng(0)
    slide = np.clip(235 + rng.normal(0, 4, (1536, 1536, 1)) + rng.normal(0, 2, (1536, 1536, 3)), 0, 255)
    slide = slide.astype(np.uint8)
    he = sample_512()
    slide[256:768, 256:768] = he
    slide[768:1280, 1024:1536] = he
    aerial = "buildings-all" if "buildings-all" in list_models() else "buildings-aerial"
    return [
        ("aerial sample scene 2048x2048", scene, aerial),
        (f"scene rotated 30 deg on nodata, {rot.shape[0]}x{rot.shape[1]}", rot, aerial),
        ("slide-like 1536x1536 (H&E sample twice on glass)", slide, "nuclei-he"),
    ]


def bench_skip() -> list[dict]:
    rows = []
    for label, img, name in skip_images():
        model = ns.load_model(name)
        row: dict = {"image": label, "model": name}
        res = {}
        for on in (True, False):
            t0 = time.perf_counter()
            res[on] = ns.segment(img, model, seed=0, skip_empty=on)
            row["seconds_skip" if on else "seconds_all"] = time.perf_counter() - t0
        row["tiles"] = res[True].info["tiles"]
        row["skipped_tiles"] = res[True].info["skipped_tiles"]
        row["skipped"] = res[True].info["skipped"]
        row["speedup"] = row["seconds_all"] / row["seconds_skip"]
        row["mask_agreement"] = float((res[True].mask == res[False].mask).mean())
        print(f"  skip: {row}", flush=True)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------- 10. runtimes
def bench_runtimes(model: SegDiffModel, batch: int, tile: int = 256, cache: str = "bench_out/runtimes") -> dict:
    """One batched sampling-network forward (the engine's unit of work) in torch (fp32, channels-last fp32,
    channels-last bf16 autocast: the CPU default), ONNX Runtime (fp32) and OpenVINO (fp32 and bf16 hint),
    each against torch fp32 on the same inputs. The ONNX export is cached under ``cache``."""
    net = model.net.eval()
    img, x, t = _forward_inputs(model, batch, tile)
    side = x.shape[-1]
    threads = torch.get_num_threads()
    row: dict = {"model": model.name, "batch": batch, "tile": tile, "threads": threads}
    with torch.inference_mode():
        feats = net.encode_image(img).repeat_interleave(batch, 0)
        ref = net(x, t, features=feats).float()
        row["torch_fp32_s"] = _best_of(lambda: net(x, t, features=feats))
        cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
        x_cl, f_cl = (
            x.contiguous(memory_format=torch.channels_last),
            feats.contiguous(memory_format=torch.channels_last),
        )
        row["torch_channels_last_fp32_s"] = _best_of(lambda: cl(x_cl, t, features=f_cl))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            row["torch_channels_last_bf16_s"] = _best_of(lambda: cl(x_cl, t, features=f_cl))
            row["torch_bf16_max_abs_diff"] = float((cl(x_cl, t, features=f_cl).float() - ref).abs().max())
    best_torch = min(row["torch_channels_last_fp32_s"], row["torch_channels_last_bf16_s"])
    os.makedirs(cache, exist_ok=True)
    onnx_path = Path(cache) / f"{model.sha256[:12] if model.sha256 else model.name}-b{batch}-{side}.onnx"
    feed = {"x": x.numpy(), "t": t.numpy(), "feats": feats.numpy()}
    try:
        if not onnx_path.exists():
            t0 = time.perf_counter()
            tmp = onnx_path.with_suffix(".tmp.onnx")
            from napari_segdiff._openvino import Denoiser

            torch.onnx.export(
                Denoiser(net),
                (x, t, feats),
                str(tmp),
                input_names=["x", "t", "feats"],
                output_names=["out"],
                opset_version=17,
                dynamo=False,
            )
            os.replace(tmp, onnx_path)
            row["onnx_export_s"] = time.perf_counter() - t0
    except Exception as e:
        row["onnx_error"] = f"export: {type(e).__name__}: {e}"[:300]
    if onnx_path.exists():
        try:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
            row["onnxruntime_version"] = ort.__version__
            row["onnxruntime_fp32_s"] = _best_of(lambda: sess.run(None, feed))
            row["onnxruntime_max_abs_diff"] = float(np.abs(sess.run(None, feed)[0] - ref.numpy()).max())
            row["onnxruntime_vs_best_torch"] = best_torch / row["onnxruntime_fp32_s"]
        except Exception as e:
            row["onnxruntime_error"] = f"{type(e).__name__}: {e}"[:300]
    try:  # the product's own OpenVINO path (its converted IR, cached per machine), ONNX or not
        from napari_segdiff import _openvino

        row["openvino_version"] = _openvino.version()
        for prec, hint in (("fp32", "f32"), ("bf16", "bf16")):
            ovn = _openvino.OpenVINONet(net, prec, threads)
            row[f"openvino_{hint}_s"] = _best_of(lambda ovn=ovn: ovn(x, t, feats))
            out = ovn(x, t, feats)
            row[f"openvino_{hint}_max_abs_diff"] = float((out - ref).abs().max())
            row[f"openvino_{hint}_vs_best_torch"] = best_torch / row[f"openvino_{hint}_s"]
    except Exception as e:
        row["openvino_error"] = f"{type(e).__name__}: {e}"[:300]
    print(f"  runtimes: {row}", flush=True)
    return row


# ---------------------------------------------------------------------------------------- 12. scene
SCENE_CHILD = r"""
import json, resource, sys, time
import numpy as np
from importlib.resources import files
from skimage.io import imread
import napari_segdiff as ns
d = files("napari_segdiff.sample_data")
img = np.asarray(imread(str(d / "buildings_scene.jpg")))[..., :3]
gt = np.asarray(imread(str(d / "buildings_scene_mask.png"))) > 0
model = ns.load_model("buildings-all")
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
res = ns.segment(img, model, pixel_size=0.1485, instances=True, seed=0)
dt = time.perf_counter() - t0
from skimage.measure import label
m = np.asarray(res.mask)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"size": img.shape[0], "seconds": dt, "peak_rss_mb": peak,
                  "rss_before_mb": r0 / 1024, "iou": float((m & gt).sum() / max(1, (m | gt).sum())),
                  "buildings_found": int(res.info["objects"]), "buildings_marked": int(label(gt).max()),
                  "tiles": res.info["tiles"], "runtime": res.info["runtime"], "threshold": res.info["threshold"],
                  "model": res.info["model"], "sha256": res.info["sha256"]}))
"""


def bench_scene() -> dict:
    """The 2048x2048 aerial sample scene (Zanzibar, 0.1485 m/px; it overlaps training tiles, so its IoU is not
    a held-out score) with buildings-all at its defaults and instances, in a fresh process: seconds, peak
    resident memory, IoU against the mask, buildings found against buildings marked."""
    out = subprocess.run([sys.executable, "-c", SCENE_CHILD], capture_output=True, text=True, check=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  scene: {row}", flush=True)
    return row


# ---------------------------------------------------------------------------------------- 14. labels
LABELS_CHILD = r"""
import json, resource, sys, time
import numpy as np
from importlib.resources import files
from skimage.io import imread
from napari_segdiff.instances import label_instances
size, block, dest = int(sys.argv[1]), sys.argv[2], sys.argv[3]
d = files("napari_segdiff.sample_data")
tile = np.asarray(imread(str(d / "buildings_scene_mask.png"))) > 0
reps = -(-size // tile.shape[0])
mask = np.tile(tile, (reps, reps))[:size, :size]
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
lab = label_instances(mask, method="hmaxima", h=6, min_area=90, block=None if block == "none" else int(block))
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
np.save(dest, lab)
print(json.dumps({"size": size, "block": block, "seconds": dt, "peak_rss_mb": peak, "rss_before_mb": r0 / 1024,
                  "objects": int(lab.max())}))
"""


def bench_labels(sizes, block: int | None = None) -> list[dict]:
    """h-maxima instance labels of the tiled sample scene's mask, whole against by blocks (fresh processes)."""
    import tempfile

    from napari_segdiff.instances import BLOCK
    from napari_segdiff.training.metrics import instance_metrics

    block = block or BLOCK
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            runs = {}
            for b in ("none", str(block)):
                dest = os.path.join(tmp, f"{size}-{b}.npy")
                out = subprocess.run(
                    [sys.executable, "-c", LABELS_CHILD, str(size), b, dest], capture_output=True, text=True, check=True
                )
                runs[b] = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"  labels {size} block {b}: {runs[b]}", flush=True)
            m = instance_metrics(np.load(os.path.join(tmp, f"{size}-none.npy")), np.load(dest))
            rows.append(
                {
                    "size": size,
                    "whole": runs["none"],
                    "blocks": runs[str(block)],
                    "aji": m["aji"],
                    "f1_50": m["f1_50"],
                    "sq": m["sq"],
                }
            )
    return rows


# ---------------------------------------------------------------------------------------- 15. slide
SLIDE_CHILD = r"""
import json, resource, sys, time
import numpy as np, zarr, dask.array as da
import napari_segdiff as ns
src, dst, size, skip = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
model = ns.load_model(ns.DEFAULT_MODEL)
img = da.from_zarr(zarr.open_array(src, mode="r"))[:size, :size]
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
res = ns.segment(img, model, seed=0, skip_empty=skip, out=dst)
dt = time.perf_counter() - t0
print(json.dumps({"size": size, "skip": skip, "seconds": dt, "mpx_per_min": size * size / 1e6 / (dt / 60),
                  "tiles": res.info["tiles"], "skipped_tiles": res.info.get("skipped_tiles", 0),
                  "runtime": res.info.get("runtime"), "rss_before_mb": r0 / 1024,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_slide_zarr(path: str, size: int, chunk: int = 1024, seed: int = 0) -> float:
    """A slide-like RGB zarr: noisy glass (grey 235) with a few large tissue ellipses filled with the H&E
    sample (each 512 block flipped at random); returns the tissue share of the area."""
    import zarr

    rng = np.random.default_rng(seed)
    he = sample_512()
    flips = [he, he[::-1], he[:, ::-1], he[::-1, ::-1]]
    n = 5
    cy, cx = rng.uniform(0.2, 0.8, n) * size, rng.uniform(0.2, 0.8, n) * size
    ry, rx = rng.uniform(0.12, 0.22, n) * size, rng.uniform(0.12, 0.22, n) * size
    z = zarr.open_array(path, mode="w", shape=(size, size, 3), chunks=(chunk, chunk, 3), dtype="u1")
    tissue = 0
    for y in range(0, size, chunk):
        for x in range(0, size, chunk):
            h, w = min(chunk, size - y), min(chunk, size - x)
            yy, xx = np.mgrid[y : y + h, x : x + w]
            inside = np.zeros((h, w), bool)
            for i in range(n):
                inside |= ((yy - cy[i]) / ry[i]) ** 2 + ((xx - cx[i]) / rx[i]) ** 2 <= 1
            glass = 235 + rng.normal(0, 4, (h, w, 1)) + rng.normal(0, 2, (h, w, 3))
            block = np.clip(glass, 0, 255).astype(np.uint8)
            if inside.any():
                src = np.empty((h, w, 3), np.uint8)
                for by in range(0, h, 512):
                    for bx in range(0, w, 512):
                        f = flips[int(rng.integers(4))]
                        src[by : by + 512, bx : bx + 512] = f[: min(512, h - by), : min(512, w - bx)]
                block[inside] = src[inside]
            tissue += int(inside.sum())
            z[y : y + h, x : x + w] = block
    return tissue / size / size


def bench_slide(size: int = 20000, crop: int = 8192) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("SEGDIFF_BENCH_TMP")) as d:
        src = f"{d}/slide.zarr"
        share = make_slide_zarr(src, size)
        # the crop is the slide's top-left corner (mostly glass: its skipped share says how much); the tissue
        # share reported is the whole slide's
        for n, skip in ((size, True), (crop, True), (crop, False)):
            dst = f"{d}/out_{n}_{int(skip)}.zarr"
            out = subprocess.run(
                [sys.executable, "-c", SLIDE_CHILD, src, dst, str(n), "1" if skip else "0"],
                capture_output=True,
                text=True,
                check=True,
            )
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["tissue_share_of_slide"] = share
            rows.append(row)
            print(f"  slide {n} skip={skip}: {row}", flush=True)
            shutil.rmtree(dst, ignore_errors=True)
    return rows


# ---------------------------------------------------------------------------------------- 11. speedup
def with_attention(model: SegDiffModel, attention: str) -> SegDiffModel:
    """A shallow copy of ``model`` that segments with ``attention``: 'window' (by blocks of a training crop) or
    'global' (over the whole tile); the model itself is left as it is."""
    m = copy.copy(model)
    m.meta = {**model.meta, "attention": attention}
    return m


#: nuclei-he's sampling when the speed work began (its defaults now: 3 x 1, model card)
BEFORE_SAMPLING = {"samples": 3, "steps": 2}


def bench_speedup(model: SegDiffModel, sizes, val_data: str | None, val_names: str | None) -> dict:
    """The default model at its defaults, now, against the path before the speed work, side by side in this
    process: 'before' = attention over the whole tile forced onto PyTorch's math fallback (what the old layout
    got), the torch runtime, no tile skipping; 'now' = the defaults (fused SDPA attention, runtime auto: OpenVINO where
    installed on an AVX-512 CPU, skipping on); 'torch' = the defaults on the torch runtime, so a machine where
    the second runtime does not help shows what the rest gives. Same seed; masks compared; validation Dice of
    each where the data is here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    before_kw = dict(runtime="torch", skip_empty=False, **BEFORE_SAMPLING)
    plain = with_attention(model, "global")  # as before local attention
    paths = {
        "before": lambda img: _with(sdpa_kernel([SDPBackend.MATH]), ns.segment, img, plain, seed=0, **before_kw),
        "torch": lambda img: ns.segment(img, model, seed=0, runtime="torch"),
        "now": lambda img: ns.segment(img, model, seed=0),
        "now_old_sampling": lambda img: ns.segment(img, model, seed=0, **BEFORE_SAMPLING),
    }
    base = sample_512()
    res: dict = {"model": model.name, "sizes": []}
    warm = paths["now"](base[:256, :256])  # the OpenVINO conversion (once per machine) and compile are not timed
    res["runtime_now"] = warm.info["runtime"]
    res["precision"] = warm.info["precision"]
    for size in sizes:
        img = tiled_sample(size)
        row: dict = {"size": size}
        masks = {}
        order = tuple(paths) * (2 if size <= 512 else 1)
        for name in order:  # interleaved, best of each
            t0 = time.perf_counter()
            r = paths[name](img)
            dt = time.perf_counter() - t0
            row[f"{name}_s"] = min(row.get(f"{name}_s", 1e9), dt)
            masks[name] = np.asarray(r.mask)
            if name == "now":
                row["skipped_tiles"] = r.info.get("skipped_tiles", 0)
                row["tiles"] = r.info["tiles"]
        for name in paths:
            row[f"{name}_mpx_per_min"] = size * size / 1e6 / (row[f"{name}_s"] / 60)
        row["speedup"] = row["before_s"] / row["now_s"]
        row["speedup_torch"] = row["before_s"] / row["torch_s"]
        row["speedup_old_sampling"] = row["before_s"] / row["now_old_sampling_s"]
        for name in ("now", "torch", "now_old_sampling"):
            key = "mask_agreement" + ("" if name == "now" else "_" + name.removeprefix("now_"))
            row[key] = float((masks["before"] == masks[name]).mean())
        print(f"  speedup {size}: {row}", flush=True)
        res["sizes"].append(row)
    if res["runtime_now"].startswith("openvino"):
        res["openvino_profile"] = openvino_profile(model, 2 * model.meta.get("sampling", {}).get("samples", 3))
    if val_data and Path(val_data).exists():
        from napari_segdiff.training.datasets import load_dataset, read_names
        from napari_segdiff.training.metrics import all_metrics

        names = None
        if val_names and Path(val_names).exists():
            names = set(read_names(val_names))
        items = [s for s in load_dataset(val_data) if names is None or s.name in names]
        dice = {name: [] for name in paths}
        agree = {name: [] for name in paths if name != "before"}
        for s in items:
            ms = {}
            for name in paths:
                r = paths[name](s.image)
                dice[name].append(all_metrics(r.probability, s.mask)["dice"])
                ms[name] = np.asarray(r.mask)
            for name in agree:
                agree[name].append(float((ms["before"] == ms[name]).mean()))
        res["validation"] = {
            "images": len(items),
            **{f"dice_{name}": float(np.mean(v)) for name, v in dice.items()},
            "mask_agreement": float(np.mean(agree["now"])),
            "mask_agreement_old_sampling": float(np.mean(agree["now_old_sampling"])),
        }
        print(f"  speedup validation: {res['validation']}", flush=True)
    return res


def bench_window(model: SegDiffModel, sizes, tiles=(256, 512)) -> list[dict]:
    """segment() at its defaults with each tile side, attention over the whole tile (global) and by blocks of a
    training crop (local: meta['attention'] = 'window'), interleaved in this process (best of 3 at 512 px, of
    2 above); masks compared with the first configuration's."""
    variants = {}
    for tile in tiles:
        for attention in ("global", "window"):
            name = f"tile {tile}, {'local' if attention == 'window' else 'global'}"
            variants[name] = (with_attention(model, attention), tile)
    base = sample_512()
    for m, tile in variants.values():  # conversions and compiles are not timed
        ns.segment(base, m, tile=tile, seed=0)
    rows = []
    for size in sizes:
        img = tiled_sample(size)
        best: dict = {}
        masks = {}
        for _ in range(3 if size <= 512 else 2):
            for name, (m, tile) in variants.items():
                t0 = time.perf_counter()
                r = ns.segment(img, m, tile=tile, seed=0)
                best[name] = min(best.get(name, 1e18), time.perf_counter() - t0)
                masks[name] = np.asarray(r.mask)
        first = next(iter(variants))
        for name in variants:
            row = {
                "size": size,
                "variant": name,
                "seconds": best[name],
                "mpx_per_min": size * size / 1e6 / (best[name] / 60),
                "relative_time": best[name] / best[first],
                "mask_agreement_with_first": float((masks[name] == masks[first]).mean()),
            }
            print(f"  window {row}", flush=True)
            rows.append(row)
    return rows


def bench_repeat(reps: int = 5) -> dict:
    """segment() by name, image after image (the model loaded once and kept), against loading it every time."""
    img = sample_512()
    ns.segment(img, ns.DEFAULT_MODEL, seed=0)  # the first load, the OpenVINO conversion and compile: not timed
    times: dict[str, list[float]] = {"kept": [], "reloaded": []}
    for _ in range(reps):
        t0 = time.perf_counter()
        ns.segment(img, ns.DEFAULT_MODEL, seed=0)
        times["kept"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ns.segment(img, ns.load_model(ns.DEFAULT_MODEL), seed=0)
        times["reloaded"].append(time.perf_counter() - t0)
    row = {k: float(np.median(v)) for k, v in times.items()}
    row["speedup"] = row["reloaded"] / row["kept"]
    print(f"  repeat: {row}", flush=True)
    return row


def openvino_profile(model: SegDiffModel, batch: int, tile: int = 256) -> dict:
    """Share of OpenVINO's own per-node times (PERF_COUNT) by node type for one batched denoiser call of the
    default runtime's compiled network (bf16 hint), the counterpart of the torch profile."""
    import openvino as ov

    from napari_segdiff import _openvino

    folder = _openvino.cache_dir() / _openvino.ir_key(model.net)
    img, x, t = _forward_inputs(model, batch, tile)
    with torch.inference_mode():
        feats = model.net.float().encode_image(img).repeat_interleave(batch, 0)
    props = {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERF_COUNT": True}
    cm = ov.Core().compile_model(str(folder / "denoiser.xml"), "CPU", props)
    req = cm.create_infer_request()
    feed = [x.numpy(), t.numpy(), feats.numpy()]
    req.infer(feed)
    req.infer(feed)
    shares: dict = {}
    for p in req.profiling_info:
        key = p.node_type if p.node_type != "Subgraph" else "Subgraph (fused elementwise)"
        shares[key] = shares.get(key, 0.0) + p.real_time.total_seconds()
    total = sum(shares.values())
    top = dict(sorted(((k, v / total) for k, v in shares.items()), key=lambda kv: -kv[1])[:8])
    return {"total_s": total, "shares": top}


def _with(ctx, fn, *args, **kw):
    with ctx:
        return fn(*args, **kw)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    p.add_argument(
        "--only", default="tile,images,scale,flops,bf16,train,compile,attention,skip,speedup,scene,repeat,labels"
    )
    p.add_argument("--label-sizes", default="4096,8192", help="mask sizes for the labels part")
    p.add_argument("--sizes", default="512,1000,4096", help="image sizes for the images part")
    p.add_argument(
        "--tile-models",
        default="default,monuseg,vaihingen",
        help="'default' (the shipped default model) and/or paper presets for the tile part",
    )
    p.add_argument("--scale-sizes", default="2048,20000", help="image sizes for the scale part")
    p.add_argument("--json", default="bench_out/results.json")
    p.add_argument("--slide-size", type=int, default=20000, help="side of the slide-like image of the slide part")
    p.add_argument("--slide-crop", type=int, default=8192, help="side of its region run with and without skipping")
    p.add_argument("--speedup-sizes", default="512,2048", help="image sizes for the speedup part")
    p.add_argument(
        "--val-data",
        default=str(HERE.parent.parent / "shared" / "data" / "monuseg" / "train"),
        help="labelled folder for the speedup part's validation Dice",
    )
    p.add_argument("--val-names", default=str(HERE.parent / "training" / "nuclei-he" / "val.txt"))
    args = p.parse_args(argv)
    parts = set(args.only.split(","))
    res: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
    print(f"machine: {res['machine']}")
    model = default_model()
    res["default_model"] = {"name": model.name, "sha256": model.sha256, "sampling": model.meta.get("sampling", {})}
    if "tile" in parts:
        rows = []
        s = model.meta.get("sampling", {})
        N, T = (2, 3) if args.quick else (s.get("samples", 5), s.get("steps", 10))
        wanted = args.tile_models.split(",")
        if "default" in wanted:
            rows.append(bench_tile(model, N, T, 256, model.name))
            print(f"  tile {model.name}: x{rows[-1]['speedup']:.1f}", flush=True)
        for name in [] if args.quick else [w for w in wanted if w != "default"]:
            m = SegDiffModel.from_config(name)
            rows.append(bench_tile(m, 2, 2, 256, f"{name} (paper size, untrained)"))
            print(f"  tile {name}: x{rows[-1]['speedup']:.1f}")
        res["tile"] = rows
    if "images" in parts:
        res["images"] = bench_images([512] if args.quick else [int(v) for v in args.sizes.split(",")])
    if "scale" in parts:
        res["scale"] = bench_scale([2048] if args.quick else [int(v) for v in args.scale_sizes.split(",")])
    if "flops" in parts:
        peak, rows = bench_flops(["cpu-small", "cpu-medium"] + ([] if args.quick else ["monuseg", "cityscapes"]))
        res["matmul_peak_gflops_per_s"] = peak / 1e9
        res["flops"] = rows
    if "bf16" in parts:
        res["bf16"] = bench_bf16(model)
    if "train" in parts:
        res["train"] = bench_train_step(
            [("cpu-small", 4, 128), ("cpu-medium", 4, 128)]
            + ([] if args.quick else [("monuseg", 1, 256), ("vaihingen", 1, 256), ("cityscapes", 1, 128)])
        )
    if "compile" in parts:
        res["compile"] = bench_compile(model, model.meta.get("sampling", {}).get("samples", 3))
    if "attention" in parts:
        res["attention"] = bench_attention(model, 2 * model.meta.get("sampling", {}).get("samples", 3))
    if "skip" in parts:
        res["skip"] = bench_skip()
    if "runtimes" in parts:
        res["runtimes"] = bench_runtimes(model, 2 * model.meta.get("sampling", {}).get("samples", 3))
    if "scene" in parts:
        res["scene"] = bench_scene()
    if "repeat" in parts:
        res["repeat"] = bench_repeat()
    if "labels" in parts:
        res["labels"] = bench_labels(
            [1024] if args.quick else [int(v) for v in args.label_sizes.split(",")], block=512 if args.quick else None
        )
    if "slide" in parts:
        res["slide"] = bench_slide(2048, 1024) if args.quick else bench_slide(args.slide_size, args.slide_crop)
    if "window" in parts:
        res["window"] = bench_window(model, [512] if args.quick else [int(v) for v in args.speedup_sizes.split(",")])
    if "speedup" in parts:
        res["speedup"] = bench_speedup(
            model, [int(v) for v in args.speedup_sizes.split(",")], args.val_data, args.val_names
        )
    print_table(res)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")
    return 0


def print_table(res: dict) -> None:
    print(f"\n## napari-segdiff benchmarks ({res['date']})\nmachine: {res['machine']}\n")
    for r in res.get("tile", []):
        print(
            f"tile {r['tile']} {r['model']}: N={r['samples']} T'={r['steps']}: straightforward "
            f"{r['straightforward_s']:.2f} s ({r['straightforward_s_per_step']:.2f} s/step), "
            f"engine {r['engine_s']:.2f} s ({r['engine_s_per_step']:.2f} s/step): x{r['speedup']:.1f} "
            f"(same noise, max |diff| {r['max_abs_diff_mean']:.1e}); "
            f"engine at its defaults ({r['engine_defaults_precision']}, channels-last) {r['engine_defaults_s']:.2f} s: "
            f"x{r['speedup_defaults']:.1f} (max |diff| {r['max_abs_diff_mean_defaults']:.1e})"
        )
    for r in res.get("images", []):
        print(
            f"image {r['size']}x{r['size']} ({r['model']}, N={r['samples']}, T'={r['steps']}, {r['tiles']} tiles): "
            f"{r['seconds']:.1f} s, {r['mpx_per_min']:.2f} MPx/min, peak RSS {r['peak_rss_mb']:.0f} MB, "
            f"{r['network_evaluations']} network evaluations"
        )
    for r in res.get("scale", []):
        print(
            f"scale {r['size']}x{r['size']} zarr->zarr ({r['tiles']} tiles, 1 step): {r['seconds']:.0f} s, peak RSS "
            f"{r['peak_rss_mb']:.0f} MB (a whole-image float32 array would be {r['whole_image_float32_mb']:.0f} MB)"
        )
    if "flops" in res:
        print(f"fp32 matmul peak: {res['matmul_peak_gflops_per_s']:.1f} GFLOP/s")
        for r in res["flops"]:
            print(
                f"forward {r['preset']} @{r['size']} ({r['parameters']:,} params): {r['gflops']:.1f} GFLOP in "
                f"{r['forward_s']:.2f} s = {r['achieved_gflops_per_s']:.1f} GFLOP/s "
                f"({100 * r['fraction_of_matmul_peak']:.0f}% of matmul peak)"
            )
    for r in res.get("train", []):
        print(
            f"train step {r['preset']} (batch {r['batch']} of {r['crop']}x{r['crop']}): {r['seconds_per_step']:.2f} s"
        )
    if "bf16" in res:
        r = res["bf16"]
        print(
            f"bf16 autocast vs fp32 (512x512): {r['fp32_s']:.1f} s vs {r['bf16_s']:.1f} s (x{r['speedup']:.2f}), "
            f"mask agreement {100 * r['mask_agreement']:.2f}%"
        )
    if "compile" in res:
        r = res["compile"]
        print(
            f"one forward, {r['samples']} samples of a {r['tile']} tile ({r['model']}): eager {r['eager_s']:.2f} s, "
            f"channels-last {r['channels_last_s']:.2f} s, 1 thread {r['eager_1_threads_s']:.2f} s, "
            f"2 threads {r['eager_2_threads_s']:.2f} s"
        )
        print(
            f"segment() 512x512 ({r['model']} defaults): contiguous {r['segment_512_contiguous_s']:.1f} s, "
            "channels-last "
            f"{r['segment_512_channels_last_s']:.1f} s (x{r['segment_512_channels_last_speedup']:.2f}), masks agree on "
            f"{100 * r['channels_last_mask_agreement']:.3f}% of pixels"
        )
        if "compile_error" in r:
            print(f"torch.compile failed: {r['compile_error']}")
        else:
            be = r["break_even_forwards"]
            print(
                f"torch.compile: {r['compiled_s']:.2f} s (x{r['compile_speedup']:.2f}) "
                f"after {r['compile_time_s']:.0f} s "
                f"of compiling (pays off after {'never' if be is None else f'{be:.0f} forwards'}), "
                f"max |diff| {r['compiled_max_abs_diff']:.1e}"
            )
    if "attention" in res:
        r = res["attention"]
        print(
            f"attention, math fallback vs fused SDPA kernel ({r['model']}, {r['precision']}, channels-last, torch): "
            f"one forward of "
            f"{r['samples']} x {r['tile']} {r['math_forward_s']:.2f} s vs {r['fused_forward_s']:.2f} s "
            f"(x{r['forward_speedup']:.2f}; attention ops {100 * r['math_attention_share']:.0f}% vs "
            f"{100 * r['fused_attention_share']:.0f}% of self time; max |diff| {r['forward_max_abs_diff']:.1e}); "
            f"segment() 512x512 {r['math_segment_512_s']:.1f} s vs {r['fused_segment_512_s']:.1f} s "
            f"(x{r['segment_512_speedup']:.2f}), masks agree on {100 * r['mask_agreement']:.3f}% of pixels"
        )
        for name in ("math", "fused"):
            shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r[f"{name}_op_shares"].items())
            print(f"  per-op self time, {name} attention: {shares}")
    if "scene" in res:
        r = res["scene"]
        print(
            f"aerial sample scene {r['size']}x{r['size']} ({r['model']}, {r['runtime']}, threshold {r['threshold']}, "
            f"instances): {r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB, IoU {r['iou']:.3f}, "
            f"{r['buildings_found']} buildings found ({r['buildings_marked']} marked)"
        )
    for r in res.get("labels", []):
        w, b = r["whole"], r["blocks"]
        grow_w, grow_b = (x["peak_rss_mb"] - x["rss_before_mb"] for x in (w, b))
        print(
            f"instance labels (h-maxima) of a {r['size']}x{r['size']} building mask: whole {w['seconds']:.1f} s, "
            f"peak RSS {w['peak_rss_mb']:.0f} MB (+{grow_w:.0f} MB for the labelling); by blocks of {b['block']} "
            f"{b['seconds']:.1f} s, peak RSS {b['peak_rss_mb']:.0f} MB (+{grow_b:.0f} MB): "
            f"x{w['seconds'] / b['seconds']:.2f} the speed, x{grow_w / max(grow_b, 1):.2f} less memory for the "
            f"labelling; {w['objects']} / {b['objects']} objects, "
            f"agreement AJI {r['aji']:.4f}, F1 {r['f1_50']:.4f}, SQ {r['sq']:.4f}"
        )
    for r in res.get("slide", []):
        print(
            f"slide-like {r['size']}x{r['size']} zarr -> zarr ({r['runtime']}, tissue "
            f"{100 * r['tissue_share_of_slide']:.0f}% of the whole slide), "
            f"skipping {'on' if r['skip'] else 'off'}: {r['seconds']:.0f} s, "
            f"{r['mpx_per_min']:.2f} MPx/min, {r['skipped_tiles']} of {r['tiles']} tiles skipped, "
            f"peak RSS {r['peak_rss_mb']:.0f} MB"
        )
    if "repeat" in res:
        r = res["repeat"]
        print(
            f"segment() by name, 512x512, image after image: {r['kept']:.2f} s with the model kept, "
            f"{r['reloaded']:.2f} s loading it each time (x{r['speedup']:.2f})"
        )
    if "speedup" in res:
        r = res["speedup"]
        for row in r["sizes"]:
            print(
                f"speedup, {r['model']} defaults, {row['size']}x{row['size']}: before (math attention, torch, "
                f"no skip) {row['before_s']:.1f} s = {row['before_mpx_per_min']:.2f} MPx/min; now ({r['runtime_now']}, "
                f"{r['precision']}) {row['now_s']:.1f} s = {row['now_mpx_per_min']:.2f} MPx/min: "
                f"x{row['speedup']:.2f}; "
                f"masks agree on {100 * row['mask_agreement']:.3f}%; {row['skipped_tiles']} of {row['tiles']} skipped; "
                f"the defaults on torch {row['torch_s']:.1f} s: x{row['speedup_torch']:.2f}; "
                f"now at 3 x 2 {row['now_old_sampling_s']:.1f} s: x{row['speedup_old_sampling']:.2f} "
                f"(masks agree on {100 * row['mask_agreement_old_sampling']:.3f}%)"
            )
        if "openvino_profile" in r:
            shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["openvino_profile"]["shares"].items())
            print(f"OpenVINO per-node time, one batched denoiser call: {shares}")
        if "validation" in r:
            v = r["validation"]
            print(
                f"speedup, validation ({v['images']} images): Dice before {v['dice_before']:.4f}, now "
                f"{v['dice_now']:.4f} (on torch {v['dice_torch']:.4f}; now at 3 x 2 "
                f"{v['dice_now_old_sampling']:.4f}); masks agree on {100 * v['mask_agreement']:.3f}% "
                f"({100 * v['mask_agreement_old_sampling']:.3f}% at 3 x 2)"
            )
    for r in res.get("skip", []):
        print(
            f"skip empty tiles, {r['image']} ({r['model']}): {r['skipped_tiles']} of {r['tiles']} tiles skipped "
            f"({100 * r['skipped_tiles'] / r['tiles']:.0f}%: {r['skipped']}); {r['seconds_all']:.1f} s -> "
            f"{r['seconds_skip']:.1f} s (x{r['speedup']:.2f}); masks agree on {100 * r['mask_agreement']:.2f}%"
        )


if __name__ == "__main__":
    sys.exit(main())
