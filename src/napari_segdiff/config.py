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

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions))
        _check(self.in_channels >= 1, f"in_channels must be >= 1, got {self.in_channels}")
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


@dataclass(frozen=True)
class SamplingConfig:
    """How a trained model is sampled: N stochastic samples of ``steps`` reverse steps each."""

    samples: int = 5
    steps: int | None = 10  # None = all T steps (the paper's Algorithm 1)
    sampler: Literal["ddpm", "ddim"] = "ddpm"
    eta: float = 1.0  # DDIM only: 0 = deterministic, 1 = DDPM-like variance
    seed: int | None = 0
    threshold: float = 0.5

    def __post_init__(self) -> None:
        _normalise_ints(self, ("samples", "steps", "seed"))
        _check(
            self.seed is None or isinstance(self.seed, int),
            f"seed must be an integer (or None for a random one), got {self.seed!r}",
        )
        _check(
            isinstance(self.samples, int) and self.samples >= 1,
            f"samples must be an integer >= 1, got {self.samples!r}",
        )
        _check(
            self.steps is None or (isinstance(self.steps, int) and self.steps >= 1),
            f"steps must be an integer >= 1 (or None for all diffusion steps), got {self.steps!r}",
        )
        _check(self.sampler in ("ddpm", "ddim"), f"sampler must be 'ddpm' or 'ddim', got {self.sampler!r}")
        _check(0.0 <= self.eta <= 1.0, f"eta must be in [0, 1], got {self.eta}")
        _check(0.0 <= self.threshold <= 1.0, f"threshold must be in [0, 1], got {self.threshold}")


@dataclass(frozen=True)
class TilingConfig:
    """Sliding windows over large images. ``overlap`` is a fraction of the tile size."""

    tile: int = 256
    overlap: float = 0.25
    batch_size: int = 2  # tiles per network batch (each carries all its samples)
    # tiles that need no model (fully transparent, uniform, or slide background for models that declare a
    # bright background) get probability 0 and variance 0 without sampling; False samples every tile
    skip_empty: bool = True

    def __post_init__(self) -> None:
        _normalise_ints(self, ("tile", "batch_size"))
        _check(
            isinstance(self.skip_empty, (bool, np.bool_)), f"skip_empty must be True or False, got {self.skip_empty!r}"
        )
        _check(isinstance(self.tile, int) and self.tile >= 8, f"tile must be an integer >= 8, got {self.tile!r}")
        _check(0.0 <= self.overlap < 1.0, f"overlap must be in [0, 1), got {self.overlap}")
        _check(
            isinstance(self.batch_size, int) and self.batch_size >= 1,
            f"batch_size must be an integer >= 1, got {self.batch_size!r}",
        )

    @property
    def stride(self) -> int:
        return max(1, int(round(self.tile * (1.0 - self.overlap))))


PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class SegmentConfig:
    """Everything one segmentation run needs besides the image and the model."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    device: str = "auto"
    # auto = bfloat16 autocast on a CPU with native bf16 (AVX512-BF16/AMX: x2.2 on 7 validation images,
    # Dice 0.7833 vs 0.7834), float32 elsewhere; fp32 or bf16 force one
    precision: Literal["auto", "fp32", "bf16"] = "auto"

    def __post_init__(self) -> None:
        _check(
            self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:"),
            f"device must be one of auto, cpu, cuda, cuda:N, mps; got {self.device!r}",
        )
        _check(
            self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}"
        )
