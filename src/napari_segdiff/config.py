"""Typed configuration shared by the library, the CLI and the napari widget.

Every config is a frozen dataclass validated on construction, so a bad value is refused with a
message that names the allowed range before any work starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ._errors import SegDiffError


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise SegDiffError(msg)


def _int_like(v) -> bool:
    """int or a numpy integer (np.int64(2) is fine), not bool and not a float such as 1.9."""
    import numbers

    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _normalise_ints(obj, names: tuple[str, ...]) -> None:
    for n in names:
        v = getattr(obj, n)
        if _int_like(v):
            object.__setattr__(obj, n, int(v))


@dataclass(frozen=True)
class NetworkConfig:
    """Architecture of a SegDiff network, eps_theta(x_t, I, t) = D(E(F(x_t) + G(I), t), t).

    ``image_size`` is the training resolution; it decides at which U-Net levels attention is used
    (the levels whose feature maps are 16x16 or 8x8 at that resolution, as in the paper). The network
    is fully convolutional, so inference tiles may be larger (any multiple of ``downsample_factor``).
    """

    image_size: int = 256
    in_channels: int = 3
    base_channels: int = 128  # C in the paper
    channel_mult: tuple[int, ...] = (1, 1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 2  # per encoder level; the decoder uses one more (skip from the downsample)
    attention_resolutions: tuple[int, ...] = (16, 8)
    num_heads: int = 4
    rrdb_blocks: int = 12
    rrdb_width: int = 64
    rrdb_growth: int = 32
    time_embedding: Literal["learned", "sinusoidal"] = "learned"
    dropout: float = 0.0
    # the network sees tiles resized by this factor (0.5: a 256 tile runs at 128 px), like cellpose's
    # diameter rescaling; probability and variance are resized back. Training data is resized alike.
    input_scale: float = 1.0
    # diffusion settings that a trained network is tied to
    diffusion_steps: int = 100
    beta_schedule: Literal["linear-scaled", "linear-paper"] = "linear-scaled"
    parameterization: Literal["eps", "x0"] = "eps"
    # channels of the diffused mask x: 1 = the mask; 2 = the mask and the interior of its objects (each
    # object eroded on its own, so touching objects are apart), learned from instance labels where the
    # training data has them and used to seed the instance split
    mask_channels: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions))
        _check(self.in_channels >= 1, f"in_channels must be >= 1, got {self.in_channels}")
        _check(self.mask_channels in (1, 2), f"mask_channels must be 1 or 2, got {self.mask_channels}")
        _check(
            self.base_channels >= 8 and self.base_channels % 8 == 0,
            f"base_channels must be a multiple of 8 (GroupNorm), got {self.base_channels}",
        )
        _check(len(self.channel_mult) >= 1, "channel_mult needs at least one level")
        _check(self.num_res_blocks >= 1, f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        _check(self.rrdb_blocks >= 0, f"rrdb_blocks must be >= 0, got {self.rrdb_blocks}")
        _check(self.diffusion_steps >= 2, f"diffusion_steps must be >= 2, got {self.diffusion_steps}")
        _check(
            self.time_embedding in ("learned", "sinusoidal"),
            f"time_embedding must be 'learned' or 'sinusoidal', got {self.time_embedding!r}",
        )
        _check(
            self.beta_schedule in ("linear-scaled", "linear-paper"),
            f"beta_schedule must be 'linear-scaled' or 'linear-paper', got {self.beta_schedule!r}",
        )
        _check(
            self.parameterization in ("eps", "x0"),
            f"parameterization must be 'eps' or 'x0', got {self.parameterization!r}",
        )
        _check(
            self.image_size % self.downsample_factor == 0,
            f"image_size {self.image_size} must be a multiple of the network's downsampling "
            f"factor {self.downsample_factor}",
        )
        _check(0.0 < self.input_scale <= 4.0, f"input_scale must be in (0, 4], got {self.input_scale}")
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def attention_levels(self) -> tuple[int, ...]:
        """U-Net levels (0 = full resolution) that carry attention."""
        return tuple(
            lvl for lvl in range(len(self.channel_mult)) if self.image_size // 2**lvl in self.attention_resolutions
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_resolutions"] = list(self.attention_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetworkConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        _check(not unknown, f"unknown network config keys {sorted(unknown)}; allowed: {sorted(names)}")
        return cls(**d)


#: Named presets. ``monuseg``/``vaihingen``/``cityscapes`` reproduce the paper's section 5;
#: ``cpu-*`` are sized so that training and sampling are practical on a 2-core CPU.
PRESETS: dict[str, NetworkConfig] = {
    "monuseg": NetworkConfig(image_size=256, base_channels=128, channel_mult=(1, 1, 1, 2, 2, 4, 4), rrdb_blocks=12),
    "vaihingen": NetworkConfig(image_size=256, base_channels=128, channel_mult=(1, 1, 1, 2, 2, 4, 4), rrdb_blocks=6),
    "cityscapes": NetworkConfig(image_size=128, base_channels=128, channel_mult=(1, 1, 2, 2, 4, 4), rrdb_blocks=15),
    # CPU-sized: 4 levels, attention at 16x16 of a 128 crop, x0 target (see training/ model cards)
    "cpu-small": NetworkConfig(
        image_size=128,
        base_channels=32,
        channel_mult=(1, 2, 2, 4),
        num_res_blocks=1,
        rrdb_blocks=1,
        rrdb_width=32,
        rrdb_growth=16,
        attention_resolutions=(16,),
        num_heads=4,
        parameterization="x0",
    ),
    "cpu-medium": NetworkConfig(
        image_size=128,
        base_channels=48,
        channel_mult=(1, 2, 2, 4),
        num_res_blocks=2,
        rrdb_blocks=2,
        rrdb_width=48,
        rrdb_growth=24,
        attention_resolutions=(16,),
        num_heads=4,
        parameterization="x0",
    ),
    # for tests: builds and runs in milliseconds
    "tiny": NetworkConfig(
        image_size=32,
        base_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        rrdb_blocks=1,
        rrdb_width=8,
        rrdb_growth=8,
        attention_resolutions=(16,),
        num_heads=2,
        diffusion_steps=20,
        parameterization="x0",
    ),
}


def get_preset(name: str, **overrides: Any) -> NetworkConfig:
    if name not in PRESETS:
        raise SegDiffError(f"unknown network preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides) if overrides else PRESETS[name]


# ---------------------------------------------------------------------------------------------- parameter table
class _Default:
    """The one sentinel for "the model's (or the config's) own value" where None already means something."""

    def __repr__(self) -> str:
        return "DEFAULT"

    def __reduce__(self):  # pickles (dask, thread workers) keep the singleton
        return "DEFAULT"


DEFAULT: Any = _Default()


@dataclass(frozen=True)
class Param:
    """One row of the parameter table: declared once on a config field, read by validation, by the CLI's
    flags (:func:`add_arguments`) and by the napari widget's controls (:func:`widget_options`)."""

    help: str
    min: float | None = None
    max: float | None = None
    max_open: bool = False  # the maximum itself is not allowed
    step: float | None = None  # the widget's step
    unit: str = ""
    choices: tuple[str, ...] | None = None
    none: str | None = None  # what None means, where it is allowed
    label: str | None = None  # the widget's label (default: the name with spaces)


def param(default: Any, text: str, **kw: Any) -> Any:
    """A config field with its table row (``text`` is the help line)."""
    return field(default=default, metadata={"param": Param(text, **kw)})


def params(cls) -> dict[str, tuple[Any, Param]]:
    """(default, Param) of every tabled field of a config class, in declaration order."""
    return {f.name: (f.default, f.metadata["param"]) for f in dataclasses.fields(cls) if "param" in f.metadata}


def _is_int_param(default: Any, p: Param) -> bool:
    if isinstance(default, bool) or p.choices is not None or isinstance(default, str):
        return False
    return isinstance(default, int) or (default is None and p.step is not None and float(p.step).is_integer())


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _bounds_text(p: Param) -> str:
    if p.min is not None and p.max is not None:
        return f"in [{_num(p.min)}, {_num(p.max)}{')' if p.max_open else ']'}"
    if p.min is not None:
        return f">= {_num(p.min)}"
    if p.max is not None:
        return f"{'<' if p.max_open else '<='} {_num(p.max)}"
    return ""


def check_value(name: str, value: Any, default: Any, p: Param) -> Any:
    """``value`` checked against its table row (type from the default, bounds, choices); returns it with
    numpy scalars turned into Python ones. The message names what is allowed."""
    if value is None:
        _check(p.none is not None, f"{name} must not be None")
        return None
    if isinstance(default, bool):
        _check(isinstance(value, (bool, np.bool_)), f"{name} must be True or False, got {value!r}")
        return bool(value)
    if p.choices is not None:
        _check(value in p.choices, f"{name} must be one of {', '.join(p.choices)}; got {value!r}")
        return value
    if isinstance(default, str):
        _check(isinstance(value, str), f"{name} must be a string, got {value!r}")
        return value
    bounds = _bounds_text(p)
    if _is_int_param(default, p):
        what = "an integer" + (f" {bounds}" if bounds else "") + (f" (or None for {p.none})" if p.none else "")
        _check(_int_like(value), f"{name} must be {what}, got {value!r}")
        value = int(value)
    else:
        what = bounds or "a number"
        ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
        _check(ok and bool(np.isfinite(float(value))), f"{name} must be a number {bounds}, got {value!r}")
        value = float(value)
    too_low = p.min is not None and value < p.min
    too_high = p.max is not None and (value >= p.max if p.max_open else value > p.max)
    _check(not (too_low or too_high), f"{name} must be {what}, got {value!r}")
    return value


def _check_table(obj) -> None:
    for name, (default, p) in params(type(obj)).items():
        object.__setattr__(obj, name, check_value(name, getattr(obj, name), default, p))


def device_error(device: Any) -> str | None:
    """Why ``device`` is not a device string this package takes (None when it is); the one check for the
    configs and the engine's ``resolve_device`` alike."""
    if isinstance(device, str) and (
        device in ("auto", "cpu", "cuda", "mps") or (device.startswith("cuda:") and device[5:].isdigit())
    ):
        return None
    return f"device must be one of auto, cpu, cuda, cuda:N, mps; got {device!r}"


@dataclass(frozen=True)
class SamplingConfig:
    """How a trained model is sampled: N stochastic samples of ``steps`` reverse steps each."""

    samples: int = param(
        5,
        "stochastic samples per pixel: their mean is the probability, their variance the uncertainty",
        min=1,
        max=1024,
        step=1,
    )
    steps: int | None = param(
        10,
        "reverse diffusion steps per sample (respaced; at most the model's diffusion steps)",
        min=1,
        max=100_000,
        step=1,
        none="all diffusion steps (the paper's Algorithm 1)",
    )
    sampler: Literal["ddpm", "ddim"] = param(
        "ddpm", "reverse update: the DDPM posterior or DDIM", choices=("ddpm", "ddim")
    )
    eta: float = param(1.0, "DDIM only: 0 deterministic, 1 DDPM-like noise", min=0.0, max=1.0, step=0.1)
    tta: bool = param(
        False,
        "test-time augmentation: each sample of a tile sees the tile flipped or rotated (a different one of "
        "the 8 for each sample, mapped back before averaging); same number of network evaluations",
        label="flip/rotate samples (TTA)",
    )
    seed: int | None = param(0, "random seed of the sampling noise", min=0, max=2**63 - 1, step=1, none="a random seed")
    threshold: float = param(0.5, "mask = probability > threshold", min=0.0, max=1.0, step=0.05)
    object_threshold: float = param(
        0.0,
        "instances: drop objects whose mean probability is below this (0 keeps every object; the mask keeps "
        "every pixel above the threshold)",
        min=0.0,
        max=1.0,
        step=0.05,
        label="object threshold",
    )

    def __post_init__(self) -> None:
        _check_table(self)


@dataclass(frozen=True)
class TilingConfig:
    """Sliding windows over large images. ``overlap`` is a fraction of the tile size."""

    tile: int = param(
        256,
        "window size in pixels (a multiple of what the model needs: its downsampling factor over its input scale)",
        min=8,
        max=8192,
        step=8,
        unit="px",
    )
    overlap: float = param(
        0.25,
        "overlap of neighbouring windows, as a fraction of the tile",
        min=0.0,
        max=1.0,
        max_open=True,
        step=0.05,
        label="tile overlap",
    )
    batch_size: int = param(
        2,
        "tiles per network batch (each carries all its samples); lowered to fit in free memory",
        min=1,
        max=256,
        step=1,
        label="batch size",
    )
    skip_empty: bool = param(
        True,
        "skip empty tiles: fully transparent, uniform (nodata) or, for slide models, glass-only tiles get "
        "probability 0 without sampling",
        label="skip empty tiles",
    )
    colour_match: bool = param(
        True,
        "match colours: move the image's colours towards the model's training images (a Lab colour transfer), "
        "for a model that records them (buildings-all: half way, measured better on places it never saw)",
        label="match colours",
    )

    def __post_init__(self) -> None:
        _check_table(self)

    @property
    def stride(self) -> int:
        return max(1, int(round(self.tile * (1.0 - self.overlap))))


PRECISIONS = ("auto", "fp32", "bf16")
RUNTIMES = ("auto", "torch", "openvino")
#: environment variable that sets what runtime 'auto' means (e.g. torch, to keep OpenVINO out of a run)
RUNTIME_ENV = "NAPARI_SEGDIFF_RUNTIME"


@dataclass(frozen=True)
class SegmentConfig:
    """Everything one segmentation run needs besides the image and the model."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    device: str = param("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    # auto = bfloat16 autocast on a CPU with native bf16 (AVX512-BF16/AMX: x2.2 on 7 validation images,
    # Dice 0.7833 vs 0.7834), float32 elsewhere; fp32 or bf16 force one
    precision: Literal["auto", "fp32", "bf16"] = param(
        "auto",
        "auto: bfloat16 on a CPU with native bf16 (about x2 faster, same masks), else float32",
        choices=PRECISIONS,
    )
    # auto = OpenVINO for the sampling network on a CPU with AVX-512 where the openvino extra is installed
    # (x1.9 per batched forward of nuclei-he on a 2-core AMX Xeon, `benchmarks/run.py --only runtimes`), else
    # torch (on an AVX2-only AMD EPYC OpenVINO measured no faster: engine.openvino_pays)
    runtime: Literal["auto", "torch", "openvino"] = param(
        "auto",
        "auto: OpenVINO on a CPU with AVX-512 where it is installed (about x2 per network call there), else torch; "
        f"${RUNTIME_ENV} sets what auto means",
        choices=RUNTIMES,
    )

    def __post_init__(self) -> None:
        error = device_error(self.device)
        _check(error is None, error or "")
        _check_table(self)


# ---------------------------------------------------------------------------------------------- faces
def add_arguments(parser, cls, names=None, model_defaults: bool = True) -> None:
    """CLI flags for the tabled fields of ``cls`` (all, or ``names``): ``--batch-size`` for ``batch_size``,
    type, choices and help from the table, default None (= the model's recommendation, else the config's
    default); a boolean that defaults to True gets ``--no-NAME``."""
    for name, (default, p) in params(cls).items():
        if names is not None and name not in names:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            if default:
                parser.add_argument(
                    "--no-" + name.replace("_", "-"),
                    dest=name,
                    action="store_false",
                    default=None,
                    help=f"do not {p.help}",
                )
            else:
                parser.add_argument(flag, dest=name, action="store_true", default=None, help=p.help)
            continue
        if p.choices is not None or isinstance(default, str):
            kind = str
        else:
            kind = int if _is_int_param(default, p) else float
        bounds = _bounds_text(p) if kind is not str else ""
        parser.add_argument(
            flag,
            dest=name,
            type=kind,
            choices=p.choices,
            default=None,
            help=f"{p.help}{f' ({bounds})' if bounds else ''}; default: "
            + (f"the model's recommendation, else {default!r}" if model_defaults else repr(default)),
        )


def widget_options(cls, name: str, **override: Any) -> dict[str, Any]:
    """magicgui keyword arguments (label, tooltip, min, max, step, choices) for a tabled field."""
    default, p = params(cls)[name]
    opts: dict[str, Any] = {"label": p.label or name.replace("_", " "), "tooltip": p.help[:1].upper() + p.help[1:]}
    if p.choices is not None:
        opts["choices"] = list(p.choices)
    for key in ("min", "max", "step"):
        v = getattr(p, key)
        if v is not None:
            opts[key] = v
    if p.max_open and p.max is not None and p.step:
        opts["max"] = p.max - p.step
    if _is_int_param(default, p):
        opts = {k: (int(v) if k in ("min", "max", "step") else v) for k, v in opts.items()}
    opts.update(override)
    return opts
