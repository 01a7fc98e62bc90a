"""The SegDiff network (Amit et al., section 4.3), pure torch.

eps_theta(x_t, I, t) = D(E(F(x_t) + G(I), t), t)       (Eq. 17)

* G: RRDB image encoder (input conv, RRDBs with a residual around them, conv, leaky ReLU, output conv).
* F: one conv from the 1-channel current mask estimate to C channels.
* E/D: U-Net encoder/decoder of residual blocks, attention at 16x16 and 8x8 (of the training
  resolution) and in the bottleneck, strided-conv downsampling, nearest-x2 + conv upsampling.
* t: a learned look-up table shared by E and D (or the sinusoidal variant of the public code).

G(I) does not depend on x_t or t, so :meth:`SegDiffNet.encode_image` is exposed separately and
:meth:`SegDiffNet.forward` accepts precomputed features: samplers call G once per image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as Fn
from torch import nn

from .config import NetworkConfig


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, ch), ch)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


# ---------------------------------------------------------------- G: RRDB image encoder
class ResidualDenseBlock(nn.Module):
    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(nf + i * gc, gc, 3, padding=1) for i in range(4))
        self.conv_out = nn.Conv2d(nf + 4 * gc, nf, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv in self.convs:
            feats.append(Fn.leaky_relu(conv(torch.cat(feats, 1)), 0.2))
        return x + 0.2 * self.conv_out(torch.cat(feats, 1))


class RRDB(nn.Module):
    """Residual in Residual Dense Block (ESRGAN), no batch norm."""

    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.rdbs = nn.Sequential(*(ResidualDenseBlock(nf, gc) for _ in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.rdbs(x)


class ImageEncoder(nn.Module):
    """G(I): full-resolution features of the conditioning image, C channels."""

    def __init__(self, in_ch: int, out_ch: int, nf: int, gc: int, n_blocks: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_ch, nf, 3, padding=1)
        self.trunk = nn.Sequential(*(RRDB(nf, gc) for _ in range(n_blocks)))
        self.trunk_conv = nn.Conv2d(nf, nf, 3, padding=1)
        self.conv_hr = nn.Conv2d(nf, nf, 3, padding=1)
        self.conv_out = nn.Conv2d(nf, out_ch, 3, padding=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        f = self.conv_in(image)
        f = f + self.trunk_conv(self.trunk(f))  # residual around the RRDBs
        return self.conv_out(Fn.leaky_relu(self.conv_hr(f), 0.2))


# ---------------------------------------------------------------- E/D building blocks
class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + time embedding (linear-SiLU-linear), GroupNorm-SiLU-conv, skip."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float):
        super().__init__()
        self.block1 = nn.Sequential(_norm(in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.temb = nn.Sequential(nn.Linear(temb_ch, out_ch), nn.SiLU(), nn.Linear(out_ch, out_ch))
        self.block2 = nn.Sequential(
            _norm(out_ch),
            nn.SiLU(),
            nn.Dropout(dropout),
            _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1)),
        )
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x) + self.temb(temb)[:, :, None, None]
        return self.skip(x) + self.block2(h)


class Attention(nn.Module):
    """Multi-head self-attention over the spatial positions: all of them (the paper's), or, with ``window``
    set, those within each ``window`` x ``window`` block of positions (local attention).

    ``tokens`` is the side of the position grid this attention sees in a training crop (``image_size`` /
    2**level): the window :meth:`SegDiffNet.set_local_attention` gives it, so that a tile larger than the
    training crops is attended to in blocks the size of a crop, as in training, at a cost that grows with the
    tile's area instead of its square. A grid that is not a multiple of the window is attended to whole."""

    def __init__(self, ch: int, heads: int, tokens: int = 0):
        super().__init__()
        self.heads = heads if ch % heads == 0 else 1
        self.norm = _norm(ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj = _zero(nn.Conv1d(ch, ch, 1))
        self.tokens = int(tokens)
        self.window = 0  # 0: global attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Work token-major, (n, tokens, c): for a channels-last x this view is free, and q, k, v then have a
        # unit stride in their last (head) dimension, which the fused CPU SDPA kernel requires; with the
        # (b, c, hw) layout torch falls back to its math path (bmm + softmax + NaN guards), x1.5-2 slower.
        # The 1x1 Conv1d weights are applied as linear maps, so the state dict is unchanged.
        b, c, h, w = x.shape
        d, s = c // self.heads, self.window
        t = self.norm(x).permute(0, 2, 3, 1)  # (b, h, w, c)
        local = s > 0 and h % s == 0 and w % s == 0 and (h > s or w > s)
        if local:  # (b * blocks, s * s, c): each block of s x s positions a sequence of its own
            t = t.reshape(b, h // s, s, w // s, s, c).transpose(2, 3)
        n, m = (b * (h // s) * (w // s), s * s) if local else (b, h * w)
        tokens = t.reshape(n, m, c)
        qkv = Fn.linear(tokens, self.qkv.weight[:, :, 0], self.qkv.bias)  # (n, m, 3c), channel order (3, heads, d)
        q, k, v = qkv.reshape(n, m, 3, self.heads, d).permute(2, 0, 3, 1, 4)  # each (n, heads, m, d)
        out = Fn.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(n, m, c)
        out = Fn.linear(out, self.proj.weight[:, :, 0], self.proj.bias)
        if local:
            out = out.reshape(b, h // s, w // s, s, s, c).transpose(2, 3)
        return x + out.reshape(b, h, w, c).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(Fn.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """A residual block, optionally followed by attention."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, attn: bool, heads: int, dropout: float, tokens: int = 0):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, temb_ch, dropout)
        self.attn = Attention(out_ch, heads, tokens) if attn else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        x = self.res(x, temb)
        return self.attn(x) if self.attn is not None else x


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


# ---------------------------------------------------------------- the whole network
class SegDiffNet(nn.Module):
    def __init__(self, config: NetworkConfig):
        super().__init__()
        self.config = cfg = config
        C = cfg.base_channels
        temb_ch = 4 * C
        if cfg.time_embedding == "learned":
            # the paper: "embedded using a shared learned look-up table"
            self.time_table = nn.Embedding(cfg.diffusion_steps, temb_ch)
            self.time_mlp = None
        else:
            self.time_table = None
            self.time_mlp = nn.Sequential(nn.Linear(C, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))

        self.G = ImageEncoder(cfg.in_channels, C, cfg.rrdb_width, cfg.rrdb_growth, cfg.rrdb_blocks)
        self.F = nn.Conv2d(cfg.mask_channels, C, 3, padding=1)

        attn_levels = set(cfg.attention_levels)
        heads, drop = cfg.num_heads, cfg.dropout
        # encoder E
        self.down = nn.ModuleList()
        skip_chs = [C]
        ch = C
        n_levels = len(cfg.channel_mult)
        grid = [cfg.image_size // 2**lvl for lvl in range(n_levels)]  # a training crop's positions per level
        for lvl, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(_Level(ch, mult * C, temb_ch, lvl in attn_levels, heads, drop, grid[lvl]))
                ch = mult * C
                skip_chs.append(ch)
            if lvl != n_levels - 1:
                self.down.append(Downsample(ch))
                skip_chs.append(ch)
        # bottleneck: res - attn - res
        self.mid1 = ResBlock(ch, ch, temb_ch, drop)
        self.mid_attn = Attention(ch, heads, grid[-1])
        self.mid2 = ResBlock(ch, ch, temb_ch, drop)
        # decoder D
        self.up = nn.ModuleList()
        for lvl, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(
                    _Level(ch + skip_chs.pop(), mult * C, temb_ch, lvl in attn_levels, heads, drop, grid[lvl])
                )
                ch = mult * C
            if lvl != 0:
                self.up.append(Upsample(ch))
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), _zero(nn.Conv2d(ch, cfg.mask_channels, 3, padding=1)))

    # ------------------------------------------------------------
    def set_local_attention(self, on: bool) -> SegDiffNet:
        """Attention within blocks of a training crop's size (``image_size`` network pixels) instead of over the
        whole tile: the same computation on tiles no larger than the crops, and on larger ones (whose sides are
        multiples of ``image_size``) the attention the network was trained with, at a cost linear in the
        tile's area (a model's ``meta['attention'] = 'window'``)."""
        for m in self.modules():
            if isinstance(m, Attention):
                m.window = m.tokens if on else 0
        return self

    @property
    def local_attention(self) -> bool:
        return any(m.window for m in self.modules() if isinstance(m, Attention))

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        if self.time_table is not None:
            return self.time_table(t.long())
        return self.time_mlp(sinusoidal_embedding(t, self.config.base_channels))

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """G(I). Independent of x_t and t: compute once per image and reuse."""
        return self.G(image)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        image: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if features is None:
            if image is None:
                raise ValueError("forward needs the image or its precomputed features G(image)")
            features = self.encode_image(image)
        temb = self.time_embedding(t)
        h = self.F(x_t) + features  # F(x_t) + G(I)
        hs = [h]
        for m in self.down:
            h = m(h, temb) if isinstance(m, _Level) else m(h)
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, temb)), temb)
        for m in self.up:
            if isinstance(m, _Level):
                h = m(torch.cat([h, hs.pop()], 1), temb)
            else:
                h = m(h)
        return self.out(h)


def widen_mask_channels(state: dict[str, torch.Tensor], channels: int) -> dict[str, torch.Tensor]:
    """A 1-channel network's weights for a ``channels``-channel mask: F sees the new channels with zero
    weights (the network starts as it was) and the output's new channels start as copies of the mask's,
    so each starts by predicting the mask and learns its own target from there."""
    state = dict(state)
    f, o, ob = state["F.weight"], state["out.2.weight"], state["out.2.bias"]
    have = f.shape[1]
    if have == channels:
        return state
    if have != 1 or channels < 1:
        raise ValueError(f"can widen a 1-channel network only, this one has {have} mask channels")
    state["F.weight"] = torch.cat([f, f.new_zeros(f.shape[0], channels - 1, *f.shape[2:])], 1)
    state["out.2.weight"] = torch.cat([o] * channels, 0)
    state["out.2.bias"] = torch.cat([ob] * channels, 0)
    return state


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
