"""The one road all segmentation takes: ``iter_segment`` yields progress per tile and, last, the result.

Per batch of tiles: G(I) once, repeated for the N samples, then T' reverse steps of the whole
(tiles x samples) batch; each tile's per-pixel sample mean and second moment go to the streaming
blender. Noise comes from one generator per tile seeded from (seed, tile index), so results do not
depend on batch size or on which process ran the tile.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import os
import secrets
import time
import warnings
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ._errors import SegDiffError
from .config import (
    DEFAULT,
    PRECISIONS,
    RUNTIME_ENV,
    RUNTIMES,
    SamplingConfig,
    SegmentConfig,
    TilingConfig,
    device_error,
)
from .models import SegDiffModel, shared_model
from .pixelsize import model_pixel_size, scale_factor
from .tiling import StreamingBlender, Window, iter_windows, taper_weights, window_grid
from .transforms import alpha_of, as_hwc, colour_transfer, empty_tile, image_lab_stats, intensity_range, to_chw


@dataclass(frozen=True)
class Progress:
    """Emitted after each finished tile."""

    done: int
    total: int
    elapsed: float

    @property
    def fraction(self) -> float:
        return self.done / max(self.total, 1)


@dataclass
class SegmentationResult:
    """probability = mean of the N samples (in [0, 1]); variance = their per-pixel variance
    (in [0, 0.25]); mask = probability > threshold. Arrays are numpy, or zarr when ``out`` was given."""

    probability: Any
    variance: Any
    mask: Any
    info: dict[str, Any] = field(default_factory=dict)
    #: instance ids (int32, 0 = background) when ``instances=True`` was asked for, else None
    labels: Any = None
    #: a 2-channel model's second channel: the sample mean of "inside an object's core" (objects eroded
    #: apart), which seeds its instance split; None for 1-channel models
    interior: Any = None

    def objects(self) -> dict[str, np.ndarray]:
        """One row per object of ``labels`` (:func:`napari_segdiff.objects.object_table`): area, centroid,
        axes, eccentricity, mean probability and mean variance, in physical units where the run was given
        the image's pixel size. Needs ``instances=True``."""
        from .objects import result_table

        return result_table(self)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU. An explicit device that is absent is an error."""
    error = device_error(device)
    if error:
        raise SegDiffError(error)
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SegDiffError(
            f"device {device!r} was asked for but this torch has no CUDA device "
            f"(torch {torch.__version__}); use device='auto' or 'cpu'"
        )
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SegDiffError("device 'mps' was asked for but is not available here; use device='auto' or 'cpu'")
    return torch.device(device)


def available_devices() -> list[str]:
    out = ["auto", "cpu"]
    if torch.cuda.is_available():
        out += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    return out


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (a CPU with AVX512-BF16 or AMX; a CUDA GPU with bf16)."""
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return False


BF16_EMULATED = (
    "bfloat16 was asked for on a CPU without native bfloat16 (no AVX512-BF16 or AMX): torch "
    "emulates it, which measured x25 slower than float32 for a training step on an AVX2 CPU; "
    "use precision 'auto' or 'fp32' (training: --amp none)"
)


def warn_if_bf16_emulated(device: torch.device) -> None:
    """Warn (with the fix) where bf16 is asked for on a CPU that only emulates it."""
    if device.type == "cpu" and not native_bf16(device):
        warnings.warn(BF16_EMULATED, RuntimeWarning, stacklevel=3)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` is bf16 on a CPU with native bf16 (measured there: x2.2 faster, Dice unchanged to 1e-4) and
    fp32 elsewhere (GPUs included: not measured yet). ``bf16`` where it is not native is honoured, with a warning."""
    if precision not in PRECISIONS:
        raise SegDiffError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cpu" and native_bf16(device) else "fp32"
    if precision == "bf16":
        warn_if_bf16_emulated(device)
    return precision


def cpu_capability() -> str:
    """The widest vector instruction set torch's CPU kernels use here: ``AVX512``, ``AVX2``, ``DEFAULT``, ..."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "DEFAULT"


def openvino_pays(device: torch.device) -> bool:
    """Whether ``auto`` should take OpenVINO: on a CPU with AVX-512, where it measured faster than torch for the
    sampling network (Intel Xeon with AMX-BF16: x1.91 per batched forward in bf16, x1.22 in fp32). On an
    AVX2-only CPU (AMD EPYC) it measured no faster, slower once torch had run in the same process (33-40 s
    against 22-24 s for the 512x512 sample), and a CLI run pays its compile on top, so ``auto`` keeps torch."""
    return device.type == "cpu" and cpu_capability().startswith("AVX512")


def resolve_runtime(runtime: str, device: torch.device) -> str:
    """``torch`` or ``openvino``. ``auto`` is ``$NAPARI_SEGDIFF_RUNTIME`` when set, else OpenVINO where it is
    installed and measured faster (:func:`openvino_pays`: a CPU with AVX-512), else torch. OpenVINO runs on the
    CPU only; asking for it elsewhere, or without the package, is an error that says what to do."""
    if runtime not in RUNTIMES:
        raise SegDiffError(f"runtime must be one of {', '.join(RUNTIMES)}; got {runtime!r}")
    from . import _openvino

    if runtime == "auto":
        env = os.environ.get(RUNTIME_ENV, "").strip().lower()
        if env and env != "auto":
            if env not in RUNTIMES:
                raise SegDiffError(f"${RUNTIME_ENV} must be one of {', '.join(RUNTIMES)}; got {env!r}")
            if env == "torch" or device.type != "cpu":
                return "torch"
            runtime = env
        else:
            return "openvino" if openvino_pays(device) and _openvino.available() else "torch"
    if runtime == "openvino":
        if device.type != "cpu":
            raise SegDiffError(f"runtime 'openvino' runs on the CPU; the device here is {device}: use runtime 'torch'")
        _openvino.require()
    return runtime


def runtime_label(runtime: str) -> str:
    """The runtime with its version, for ``info``."""
    if runtime == "openvino":
        from . import _openvino

        return f"openvino {_openvino.version()}"
    return f"torch {torch.__version__}"


def precision_context(precision: str, device: torch.device):
    """The autocast context of a resolved precision (``bf16`` or ``fp32``)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def estimate_sample_bytes(cfg, tile: int, scale: float | None = None) -> int:
    """Peak inference memory of one sample of one tile: activations (measured on CPU at about 66 bytes
    per pixel per base channel for the cpu presets) plus the attention matrices of the attention levels.
    ``scale``: what the tile is resized by before the network (default: the model's input_scale)."""
    side = int(round(tile * (cfg.input_scale if scale is None else scale)))
    conv = 70 * side * side * cfg.base_channels
    levels = set(cfg.attention_levels) | {len(cfg.channel_mult) - 1}  # the bottleneck always attends
    attn = max((cfg.num_heads * ((side // 2**lvl) ** 2) ** 2 * 4 * 2 for lvl in levels), default=0)
    return int(conv + attn)


def available_memory(device: torch.device) -> int | None:
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            with open("/proc/meminfo") as f:  # Linux: MemAvailable counts reclaimable cache too
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    except (ValueError, OSError, RuntimeError, IndexError):
        pass
    return None


def fit_batch_size(cfg, tiling: TilingConfig, samples: int, device: torch.device, scale: float | None = None) -> int:
    """Tiles per batch that fit in 70% of free memory; refuses up front when one tile does not fit."""
    need = estimate_sample_bytes(cfg, tiling.tile, scale) * samples
    avail = available_memory(device)
    if avail is None:
        return tiling.batch_size
    budget = 0.7 * avail
    if need > budget:
        raise SegDiffError(
            f"one {tiling.tile}x{tiling.tile} tile with {samples} samples needs about {need / 2**30:.1f} GiB "
            f"but only {avail / 2**30:.1f} GiB is free on {device}; lower samples or tile"
        )
    fit = max(1, int(budget // need))
    if fit < tiling.batch_size:
        warnings.warn(
            f"batch_size lowered from {tiling.batch_size} to {fit} tiles to fit in free memory "
            f"({avail / 2**30:.1f} GiB on {device}; about {need / 2**30:.2f} GiB per tile)",
            stacklevel=3,
        )
        return fit
    return tiling.batch_size


def tile_multiple(mdl: SegDiffModel) -> int:
    """The tile step a model needs: its tiles reach the network resized by ``input_scale`` and must then be a
    multiple of its downsampling factor (8 for cpu-small; x2 at input scale 0.5, so 16)."""
    f, s = mdl.config.downsample_factor, mdl.config.input_scale
    exact = f / s
    if float(exact).is_integer():
        return int(exact)
    return next(t for t in range(1, 64 * f) if int(round(t * s)) % f == 0 and int(round(t * s)) >= f)


def tile_seed(seed: int, index: int) -> int:
    return (int(seed) * 1_000_003 + int(index) * 7919 + 12345) % (2**63 - 1)


#: the dihedral group as (quarter turns, mirror first): the four that keep a non-square tile's shape first
DIHEDRAL = ((0, False), (0, True), (2, True), (2, False), (1, False), (3, False), (1, True), (3, True))


def dihedral(x: torch.Tensor, n: int, inverse: bool = False) -> torch.Tensor:
    """Sample j (of ``n`` per tile, batch ordered tile-major) of ``x`` (B*n, C, h, w) under group element
    j mod 8 of :data:`DIHEDRAL` (mod 4, the shape-keeping ones, when the tile is not square); ``inverse``
    maps back. Every element used keeps the tile's shape."""
    m = 8 if x.shape[-1] == x.shape[-2] else 4
    out = torch.empty_like(x)
    for j in range(n):
        k, mirror = DIHEDRAL[j % m]
        part = x[j::n]
        if inverse:
            part = torch.rot90(part, -k, dims=(-2, -1))
            out[j::n] = torch.flip(part, dims=(-1,)) if mirror else part
        else:
            part = torch.flip(part, dims=(-1,)) if mirror else part
            out[j::n] = torch.rot90(part, k, dims=(-2, -1))
    return out


class TileSampler:
    """Samples batches of tiles with one model: the unit a worker process holds."""

    def __init__(
        self,
        model: SegDiffModel,
        sampling: SamplingConfig,
        device: torch.device,
        precision: str = "fp32",
        channels_last: bool | None = None,
        scale: float | None = None,
        runtime: str = "torch",
    ):
        self.model = model
        # tiles are resized by this factor before the network: the model's input_scale, times the ratio of
        # the image's pixel size to the model's native one when the caller gave a pixel size
        self.scale = model.config.input_scale if scale is None else float(scale)
        self.sampling = sampling
        self.device = device
        self.precision = resolve_precision(precision, device)
        # channels-last (NHWC) convolutions: x1.19 per batched forward of nuclei-he on this project's CPU
        # (`benchmarks/run.py --only compile`), same values to float rounding. On by default on the CPU.
        self.runtime = resolve_runtime(runtime, device)
        # attention by blocks of a training crop where the model says so (meta['attention'] = 'window'): converted
        # so for OpenVINO, a copy for torch, so the caller's model is left as it was
        local = model.meta.get("attention") == "window"
        net = model.net
        if self.runtime == "openvino":  # OpenVINO picks its own layouts; it converts the model's own network
            from ._openvino import OpenVINONet

            self.channels_last = False
            self.net = OpenVINONet(net, self.precision, local=local)
        else:
            if local != getattr(net, "local_attention", False):  # (a stand-in network may not have attention)
                net = copy.deepcopy(net).set_local_attention(local)
            self.channels_last = device.type == "cpu" if channels_last is None else bool(channels_last)
            if self.channels_last:  # its own channels-last copy
                net = (copy.deepcopy(net) if net is model.net else net).to(memory_format=torch.channels_last)
            self.net = net
        self.network_evaluations = 0
        self.encoder_evaluations = 0

    def sample_maps(
        self, images: np.ndarray, indices: list[int], seed: int, all_channels: bool = False
    ) -> torch.Tensor:
        """images: (B, C, h, w) in [-1, 1]. Returns every sample's probability map, (B, N, h', w') at the
        network's resolution (h' = h * input_scale), in float32; with ``all_channels`` every mask channel
        of a multi-channel model, (B, N, K, h', w')."""
        s = self.sampling
        net, diff = self.net, self.model.diffusion
        B, _, h0, w0 = images.shape
        scale = self.scale
        h, w = (h0, w0) if scale == 1.0 else (int(round(h0 * scale)), int(round(w0 * scale)))
        N = s.samples
        K = self.model.config.mask_channels
        gens = [torch.Generator().manual_seed(tile_seed(seed, i)) for i in indices]

        def noise_fn(shape):  # per-tile generators: batching does not change the noise
            return torch.cat([torch.randn((N, K, h, w), generator=g) for g in gens])

        autocast = precision_context(self.precision if self.runtime == "torch" else "fp32", self.device)
        with torch.inference_mode(), autocast:
            x_img = torch.from_numpy(images).to(self.device)
            if (h, w) != (h0, w0):
                x_img = torch.nn.functional.interpolate(x_img, size=(h, w), mode="area" if scale < 1 else "bilinear")
            if self.channels_last:
                x_img = x_img.contiguous(memory_format=torch.channels_last)
            if s.tta:  # sample j of a tile sees the tile under group element j: G(I) once per sample
                x_img = dihedral(x_img.repeat_interleave(N, dim=0), N)
                if self.channels_last:
                    x_img = x_img.contiguous(memory_format=torch.channels_last)
                feats = net.encode_image(x_img)
                self.encoder_evaluations += B * N
            else:
                feats = net.encode_image(x_img)  # G(I): once per tile, reused by every step and sample
                self.encoder_evaluations += B
                feats = feats.repeat_interleave(N, dim=0)

            def model_fn(x_t, t):
                self.network_evaluations += 1
                if self.channels_last:
                    x_t = x_t.contiguous(memory_format=torch.channels_last)
                return net(x_t, t, features=feats)

            x0 = diff.sample(
                model_fn,
                (B * N, K, h, w),
                steps=s.steps,
                sampler=s.sampler,
                eta=s.eta,
                device=self.device,
                noise_fn=noise_fn,
            )
            if s.tta:
                x0 = dihedral(x0, N, inverse=True)  # each sample back to the tile's own orientation
        p = ((x0.float().clamp(-1, 1) + 1.0) * 0.5).reshape(B, N, K, h, w)
        return p if all_channels else p[:, :, 0]

    def __call__(self, images: np.ndarray, indices: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
        """images: (B, C, h, w) in [-1, 1]. Returns per-tile sample mean and second moment (B, h, w), or
        (B, h, w, K) for a model with K > 1 mask channels."""
        p = self.sample_maps(images, indices, seed, all_channels=True)  # (B, N, K, h, w)
        h0, w0 = images.shape[-2:]
        mean, second = p.mean(dim=1), (p * p).mean(dim=1)
        if p.shape[-2:] != (h0, w0):  # bilinear weights are convex: the moments stay a valid mixture
            mean, second = (
                torch.nn.functional.interpolate(a, size=(h0, w0), mode="bilinear", align_corners=False)
                for a in (mean, second)
            )
        if p.shape[2] == 1:
            return mean[:, 0].cpu().numpy(), second[:, 0].cpu().numpy()
        return mean.permute(0, 2, 3, 1).cpu().numpy(), second.permute(0, 2, 3, 1).cpu().numpy()


def _make_outputs(shape, out, tile, interior: bool = False):
    """probability, variance, mask and (for a 2-channel model, else None) interior: numpy or zarr arrays."""
    names = [("probability", "f4"), ("variance", "f4"), ("mask", "bool")] + ([("interior", "f4")] if interior else [])
    if out is None:
        arrays = [np.zeros(shape, np.float32 if dt == "f4" else bool) for _, dt in names]
        return tuple(arrays) + ((None,) if not interior else ())
    import zarr

    if isinstance(out, (str, os.PathLike)):
        group = zarr.open_group(str(out), mode="w")
    else:
        group = out
    chunks = (min(tile, shape[0]), min(tile * 4, shape[1]))
    arrays = [
        group.create_array(name, shape=shape, chunks=chunks, dtype=dt)
        if hasattr(group, "create_array")
        else group.create_dataset(name, shape=shape, chunks=chunks, dtype=dt)
        for name, dt in names
    ]
    return tuple(arrays) + ((None,) if not interior else ())


def iter_segment(
    image,
    model: SegDiffModel | str | os.PathLike | None = None,
    *,
    samples: int | None = None,
    steps: int | None = DEFAULT,
    sampler: str | None = None,
    eta: float | None = None,
    tta: bool | None = None,
    seed: int | None = DEFAULT,
    threshold: float | None = None,
    object_threshold: float | None = None,
    tile: int | None = None,
    overlap: float | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    config: SegmentConfig | None = None,
    out=None,
    client=None,
    precision: str | None = None,
    channels_last: bool | None = None,
    runtime: str | None = None,
    pixel_size: float | None = None,
    pixel_unit: str | None = None,
    instances: bool = False,
    skip_empty: bool | None = None,
    colour_match: bool | None = None,
    overwrite: bool = False,
) -> Iterator[Progress | SegmentationResult]:
    """Segment a 2-D grey or RGB(A) image (numpy, dask or zarr), yielding :class:`Progress` per tile
    and finally a :class:`SegmentationResult`. Keyword arguments override ``config``; a model's own
    recommended sampling settings (``meta['sampling']``) are the defaults for a shipped model.
    ``precision`` is ``auto`` (bfloat16 autocast on a CPU with native bf16, else float32), ``fp32`` or
    ``bf16``; ``channels_last`` (default: on for the CPU) runs the convolutions in NHWC layout (torch runtime).
    ``runtime`` runs the sampling network in ``torch`` or ``openvino`` (CPU, the ``openvino`` extra); ``auto``
    (the default) takes OpenVINO on the CPU where it is installed. ``info['runtime']`` says which ran.

    ``pixel_size`` (with ``pixel_unit``, default the model's unit) is the image's pixel size: each tile is
    resized to the model's native pixel size (``model.meta['pixel_size']``) and the outputs back, so they
    stay on the image's grid; the default tile is then the model's tile in its own pixels. ``instances``
    adds ``result.labels`` (int32 ids, 0 = background) by the model's instance method
    (``meta['instances']``; connected components by default); ``object_threshold`` then drops the objects
    whose mean probability is below it (``info['instances']['dropped']`` counts them).

    ``skip_empty`` (default on) gives tiles that need no model probability 0 and variance 0 without sampling
    them: fully transparent tiles of an RGBA image, uniform tiles (nodata fill) and, for a model whose file
    declares a bright background (``meta['background'] == 'bright'``: bright-field slides), tiles without
    tissue. ``info['skipped_tiles']`` counts them and ``info['skipped']`` gives the reasons.

    ``colour_match`` (default on) moves the image's colours towards the model's training images (a Reinhard
    colour transfer in Lab, from the image's own statistics) where the model records them
    (``meta['colour_norm']``, ``meta['colour_strength']``); ``info['colour_norm']`` says what was used.

    ``out`` (a path or a zarr group) streams the outputs into a zarr store instead of memory. A path is
    refused when it is, holds or lies inside a store the image is read from, and when it already exists
    unless ``overwrite=True``; it is checked to be writable before any work."""
    t_start = time.perf_counter()
    if isinstance(out, (str, os.PathLike)):
        from .io import check_output

        check_output(out, [image], overwrite, formats=False, how="pass overwrite=True")
    dev = resolve_device(device or (config.device if config else "auto"))
    mdl = shared_model(model, device=dev)
    cfg = config or recommended_config(mdl)
    prec = resolve_precision(precision or cfg.precision, dev)
    rt = resolve_runtime(runtime or cfg.runtime, dev) if client is None else None
    s_over = {
        k: v
        for k, v in dict(
            samples=samples, sampler=sampler, eta=eta, tta=tta, threshold=threshold, object_threshold=object_threshold
        ).items()
        if v is not None
    }
    if steps is not DEFAULT:
        s_over["steps"] = steps
    if seed is not DEFAULT:
        s_over["seed"] = seed
    sampling = dataclasses.replace(cfg.sampling, **s_over)
    if sampling.steps is not None and sampling.steps > mdl.diffusion.T:
        raise SegDiffError(
            f"steps must be between 1 and {mdl.diffusion.T} (the model's diffusion steps), got {sampling.steps}"
        )
    t_over = {
        k: v
        for k, v in dict(
            tile=tile, overlap=overlap, batch_size=batch_size, skip_empty=skip_empty, colour_match=colour_match
        ).items()
        if v is not None
    }
    tiling = dataclasses.replace(cfg.tiling, **t_over)
    f = mdl.config.downsample_factor
    factor = scale_factor(pixel_size, pixel_unit, mdl.meta, mdl.name)
    in_scale = mdl.config.input_scale * factor

    def _fits(t: int) -> bool:  # the network sees round(t * in_scale) pixels (TileSampler resizes)
        return int(round(t * in_scale)) % f == 0 and int(round(t * in_scale)) >= f

    if factor != 1.0 and tile is None:  # the model's tile, measured in its own pixels, on this image's grid
        side = int(round(tiling.tile * mdl.config.input_scale))
        guess = max(8, int(round(side / in_scale)))
        tiling = dataclasses.replace(
            tiling, tile=next((t for d in range(0, 64) for t in (guess + d, guess - d) if t >= 8 and _fits(t)), guess)
        )
    if not _fits(tiling.tile):
        good = next((t for t in range(tiling.tile, 7, -1) if _fits(t)), None) or next(
            t for t in range(tiling.tile, 1 << 20) if _fits(t)
        )
        what = (
            f"tile {tiling.tile}"
            if in_scale == 1.0
            else f"tile {tiling.tile} (resized to {int(round(tiling.tile * in_scale))} px at input scale {in_scale})"
        )
        raise SegDiffError(
            f"{what} must be a multiple of {f} (the downsampling factor of model {mdl.name!r}); e.g. tile={good}"
        )
    tiling = dataclasses.replace(
        tiling, batch_size=fit_batch_size(mdl.config, tiling, sampling.samples, dev, scale=in_scale)
    )
    run_seed = secrets.randbits(31) if sampling.seed is None else int(sampling.seed)

    arr = as_hwc(image, mdl.config.in_channels)
    H, W = int(arr.shape[0]), int(arr.shape[1])
    scale = intensity_range(arr)
    windows = window_grid((H, W), tiling.tile, tiling.stride)
    plain = -(-H // tiling.tile) * -(-W // tiling.tile)
    if len(windows) > 64 and len(windows) > 8 * plain:
        warnings.warn(
            f"overlap {tiling.overlap} makes {len(windows)} tiles for this {H}x{W} image, {len(windows) / plain:.0f} "
            f"times the {plain} without overlap (and as many times the work); 0.25 blends seams well",
            stacklevel=2,
        )
    weights = taper_weights(tiling.tile, tiling.tile - tiling.stride)
    K = mdl.config.mask_channels
    prob, var, mask, interior = _make_outputs((H, W), out, tiling.tile, interior=K > 1)
    thr = sampling.threshold

    def emit(y0, y1, m, v):
        if K > 1:  # the mask channel is the probability; the interior channel seeds the instance split
            interior[y0:y1] = m[..., 1]
            m, v = m[..., 0], v[..., 0]
        prob[y0:y1] = m
        var[y0:y1] = v
        mask[y0:y1] = m > thr

    blender = StreamingBlender((H, W), tiling.tile, weights, emit, channels=K)
    info = {
        "model": mdl.name,
        "sha256": mdl.sha256,
        "samples": sampling.samples,
        "steps": sampling.steps if sampling.steps is not None else mdl.diffusion.T,
        "sampler": sampling.sampler,
        "tta": sampling.tta,
        "seed": run_seed,
        "threshold": thr,
        "tile": tiling.tile,
        "overlap": tiling.overlap,
        "batch_size": tiling.batch_size,
        "device": str(dev),
        "precision": prec,
        "runtime": runtime_label(rt) if rt else f"workers ({runtime or cfg.runtime})",
        "tiles": len(windows),
        "skip_empty": tiling.skip_empty,
    }
    if pixel_size is not None:
        native = model_pixel_size(mdl.meta)
        info.update(
            pixel_size=float(pixel_size),
            pixel_unit=pixel_unit or native[1],
            model_pixel_size=native[0],
            model_pixel_unit=native[1],
            scale_factor=round(factor, 6),
        )
    items = ((win, scale.apply(block)) for win, block in iter_windows(arr, windows, tiling.tile))
    # a model that records its training images' colour statistics (meta['colour_norm'], Lab mean and spread)
    # gets every image moved towards them, all the way (trained so) or meta['colour_strength'] of it
    target = mdl.meta.get("colour_norm") if tiling.colour_match else None
    if target is not None and arr.shape[-1] == 3:
        source = image_lab_stats(arr, scale, alpha_of(image))
        strength = float(mdl.meta.get("colour_strength", 1.0))
        info["colour_norm"] = {
            "image_lab": source.round(2).tolist(),
            "model_lab": np.round(target, 2).tolist(),
            "strength": strength,
        }

        def normalised(its):
            for win, block in its:
                yield win, colour_transfer((block + 1.0) * 0.5, source, target, strength) * 2.0 - 1.0

        items = normalised(items)
    skipped: Counter = Counter()
    if client is not None:
        from ._distributed import distributed_tiles

        # workers resolve device and precision themselves: theirs may differ from this process's
        def run(its):
            return distributed_tiles(
                client,
                its,
                tiling,
                mdl,
                sampling,
                run_seed,
                device=device or (config.device if config else "auto"),
                precision=precision or cfg.precision,
                input_scale=in_scale,
                runtime=runtime or cfg.runtime,
            )
    else:
        runner = TileSampler(
            mdl, sampling, dev, precision=prec, channels_last=channels_last, scale=in_scale, runtime=rt
        )

        def run(its):
            return _local_tiles(runner, its, tiling, run_seed)

    if tiling.skip_empty:
        alpha = alpha_of(image)
        bright = mdl.meta.get("background") == "bright"

        def why_empty(win: Window, block: np.ndarray) -> str | None:
            a = None if alpha is None else np.asarray(alpha[win.slices])
            return empty_tile(block[: win.h, : win.w], a, bright_background=bright)

        results = _skipping(items, why_empty, run, tiling.tile, skipped, channels=K)
    else:
        results = run(items)
    for done, (win, m, s2) in enumerate(results, start=1):
        blender.add(win, m, s2)
        yield Progress(done, len(windows), time.perf_counter() - t_start)
    blender.finish()
    info["skipped_tiles"] = sum(skipped.values())
    info["skipped"] = dict(skipped)
    if client is None:
        info["network_evaluations"] = runner.network_evaluations
        info["encoder_evaluations"] = runner.encoder_evaluations
    labels = None
    if instances:
        # the interior (numpy or zarr) is read a block at a time by the block-wise split
        labels, info["instances"] = _instances(mdl, np.asarray(mask[:]), factor, interior)
        if sampling.object_threshold > 0:
            from .instances import drop_unsure

            labels, dropped = drop_unsure(labels, prob, sampling.object_threshold)
            info["instances"].update(object_threshold=sampling.object_threshold, dropped=dropped)
        info["objects"] = int(labels.max())
        if out is not None:
            labels = _write_labels(prob, labels, tiling.tile)
    info["seconds"] = round(time.perf_counter() - t_start, 3)
    yield SegmentationResult(prob, var, mask, info, labels, interior)


def instance_settings(mdl: SegDiffModel) -> dict[str, Any]:
    """The model's instance method and parameters (``meta['instances']``), in its native pixels."""
    d = {"method": "components", "min_area": 0.0}
    d.update(mdl.meta.get("instances") or {})
    return d


def _instances(
    mdl: SegDiffModel, mask: np.ndarray, factor: float, interior: np.ndarray | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Labels by the model's method; lengths in its native pixels are converted to this image's."""
    from .instances import H_INTERIOR, label_instances

    st = instance_settings(mdl)
    if interior is not None and "method" not in (mdl.meta.get("instances") or {}):
        st["method"] = "interior"  # a 2-channel model's own seeds, unless its file says otherwise
    if st["method"] in ("interior", "interior_peaks"):
        if interior is None:
            raise SegDiffError(
                f"model {mdl.name!r} asks for the {st['method']!r} instance split, which needs a 2-channel model "
                "(network mask_channels 2); set meta['instances'] to another method"
            )
        kw = {"min_area": float(st.get("min_area", 0)) / factor**2, "seed_threshold": st.get("seed_threshold", 0.5)}
        if st["method"] == "interior_peaks":  # h is in units of the interior map; the smoothing is a length
            kw.update(h=float(st.get("h", H_INTERIOR)), sigma=float(st.get("sigma", 1.0)) / factor)
        method = st["method"]
        return label_instances(mask, method=method, interior=interior, **kw), {"method": method, **kw}
    kw: dict[str, Any] = {"method": st["method"], "min_area": float(st.get("min_area", 0)) / factor**2}
    if "min_distance" in st:
        kw["min_distance"] = max(1, int(round(float(st["min_distance"]) / factor)))
    if "h" in st:
        kw["h"] = float(st["h"]) / factor
    return label_instances(mask, method=kw.pop("method"), **kw), {"method": st["method"], **kw}


def _write_labels(prob_array, labels: np.ndarray, tile: int):
    """Beside the zarr outputs: a ``labels`` array in the same group."""
    import zarr

    group = zarr.open_group(
        store=prob_array.store, path=prob_array.path.rsplit("/", 1)[0] if "/" in prob_array.path else "", mode="a"
    )
    chunks = (min(tile, labels.shape[0]), min(tile * 4, labels.shape[1]))
    arr = (
        group.create_array("labels", shape=labels.shape, chunks=chunks, dtype="i4", overwrite=True)
        if hasattr(group, "create_array")
        else group.create_dataset("labels", shape=labels.shape, chunks=chunks, dtype="i4", overwrite=True)
    )
    arr[:] = labels
    return arr


def _local_tiles(runner: TileSampler, items, tiling: TilingConfig, seed: int):
    """items: (window, tile scaled to [-1, 1], (tile, tile, C)); yields (window, mean, second moment) in order."""
    batch: list[tuple[Window, np.ndarray]] = []

    def flush():
        imgs = np.stack([to_chw(b) for _, b in batch])
        means, second_moments = runner(imgs, [w.index for w, _ in batch], seed)
        return zip([w for w, _ in batch], means, second_moments)

    for item in items:
        batch.append(item)
        if len(batch) == tiling.batch_size:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


def _skipping(items, why_empty, run, tile: int, counts: Counter, channels: int = 1):
    """Tiles for which ``why_empty`` gives a reason bypass ``run`` and come back as zero mean and second
    moment; the rest go through ``run`` (batched, local or distributed). Results keep the raster order the
    streaming blender needs."""
    order: deque = deque()  # (window, skipped?) in input order, until its result is out
    zero = np.zeros((tile, tile) if channels == 1 else (tile, tile, channels), np.float32)

    def feed():
        for win, block in items:
            why = why_empty(win, block)
            order.append((win, why is not None))
            if why is None:
                yield win, block
            else:
                counts[why] += 1

    for win, m, s2 in run(feed()):
        while order[0][1]:
            yield order.popleft()[0], zero, zero
        order.popleft()
        yield win, m, s2
    while order:
        yield order.popleft()[0], zero, zero


def recommended_config(mdl: SegDiffModel) -> SegmentConfig:
    """The settings ``segment()`` uses for a model when none are given: the sampling (and tiling)
    recommended in its file's metadata (measured for the shipped models), else the config defaults."""
    rec = mdl.meta.get("sampling") or {}
    keys = ("samples", "steps", "sampler", "eta", "tta", "threshold", "object_threshold")
    sampling = SamplingConfig(**{k: v for k, v in rec.items() if k in keys})
    trec = mdl.meta.get("tiling") or {}
    tiling = TilingConfig(**{k: v for k, v in trec.items() if k in ("tile", "overlap", "batch_size")})
    return SegmentConfig(sampling=sampling, tiling=tiling)


def drain(items: Iterator, result_type: type, on_progress=None):
    """Run one of the package's generators to its end and return its last item, the result (the protocol
    every iterator here follows: progress items, then the result); ``on_progress`` sees the others."""
    last = None
    for last in items:
        if on_progress is not None and not isinstance(last, result_type):
            on_progress(last)
    if not isinstance(last, result_type):
        raise RuntimeError(f"the generator ended without a {result_type.__name__} (last item: {last!r})")
    return last


@functools.wraps(iter_segment, assigned=("__module__", "__qualname__", "__doc__"))
def segment(image, model=None, **kwargs) -> SegmentationResult:
    return drain(iter_segment(image, model, **kwargs), SegmentationResult)


segment.__qualname__ = segment.__name__ = "segment"
segment.__signature__ = inspect.signature(iter_segment).replace(return_annotation="SegmentationResult")
segment.__doc__ = (
    "Segment a 2-D image and return its :class:`SegmentationResult` (drains :func:`iter_segment`, which\n"
    "takes the same arguments and yields :class:`Progress` per tile first).\n\n    " + (iter_segment.__doc__ or "")
)
