"""Paired augmentations (image and mask stay aligned), driven by an explicit numpy Generator.

One affine warp per crop (rotation, scale, flips and crop position composed into one matrix, the
image with bilinear and the mask with nearest interpolation, reflecting at the borders), then colour
jitter on the image only. Presets follow the paper's section 5.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .._errors import SegDiffError


@dataclass(frozen=True)
class AugmentConfig:
    rotation: tuple[float, float] = (-22.0, 22.0)  # degrees
    scale: tuple[float, float] = (0.75, 1.25)
    hflip: bool = True
    vflip: bool = False
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    # place/scanner shift: gamma in [1/(1+g), 1+g], a Gaussian blur or an unsharp mask (probability
    # each), JPEG re-compression at quality 30-90 (probability) and Gaussian noise (sigma in 0-255 units)
    gamma: float = 0.0
    blur: float = 0.0
    sharpen: float = 0.0
    jpeg: float = 0.0
    noise: float = 0.0
    # H&E stain shift (HED jitter, Tellez et al. 2018): each stain's optical density from colour
    # deconvolution (Ruifrok & Johnston 2001) scaled by U(1-s, 1+s) and shifted by U(-s, s) times the crop's
    # mean density of that stain, so that haematoxylin and eosin vary apart, as between labs and scanners
    stain: float = 0.0


AUGMENT_PRESETS = {
    # MoNuSeg (as [45]): random 256 crops, flips, +-22 deg, scale 0.75-1.25, colour jitter
    "monuseg": AugmentConfig((-22, 22), (0.75, 1.25), True, True, 0.2, 0.2, 0.2, 0.02),
    # H&E from labs and scanners the model never saw: the MoNuSeg preset plus stain shift (HED-strong of
    # Tellez et al. 2018), mild gamma, blur or sharpening, JPEG (slides are stored JPEG-compressed) and noise
    "he-shift": AugmentConfig(
        (-22, 22),
        (0.75, 1.25),
        True,
        True,
        0.2,
        0.2,
        0.2,
        0.02,
        gamma=0.2,
        blur=0.2,
        sharpen=0.1,
        jpeg=0.3,
        noise=3.0,
        stain=0.2,
    ),
    # Vaihingen (as [7]): 0-360 deg, scale 0.75-1.5, h+v flips, jitter 0.6/0.5/0.4/0.025
    "vaihingen": AugmentConfig((0, 360), (0.75, 1.5), True, True, 0.6, 0.5, 0.4, 0.025),
    # aerial tiles from places the model never saw: all rotations, scale 0.5-2x (pixel sizes differ),
    # strong colour jitter, gamma, blur/sharpen, JPEG and sensor noise
    "aerial-shift": AugmentConfig(
        (0, 360), (0.5, 2.0), True, True, 0.4, 0.4, 0.5, 0.05, gamma=0.5, blur=0.25, sharpen=0.2, jpeg=0.3, noise=4.0
    ),
    # Cityscapes (as [14]): scale 0.75-1.25, +-22 deg, horizontal flip
    "cityscapes": AugmentConfig((-22, 22), (0.75, 1.25), True, False),
    "none": AugmentConfig((0, 0), (1, 1), False, False),
}


def get_augment(name: str) -> AugmentConfig:
    """A preset by name, optionally with fields overridden: ``"aerial-shift,jpeg=0,noise=0"`` (ranges as
    ``scale=0.75:1.5``, switches as ``vflip=0``), which is how an ablation turns one augmentation off."""
    preset, *overrides = [part.strip() for part in str(name).split(",")]
    if preset not in AUGMENT_PRESETS:
        raise SegDiffError(f"unknown augmentation preset {preset!r}; choose one of {sorted(AUGMENT_PRESETS)}")
    cfg = AUGMENT_PRESETS[preset]
    fields = {f.name: f.type for f in dataclasses.fields(AugmentConfig)}
    changes: dict = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise SegDiffError(
                f"augmentation override {item!r} in {name!r} is not KEY=VALUE with KEY one of {', '.join(fields)}"
            )
        current = getattr(cfg, key)
        try:
            if isinstance(current, tuple):
                lo, hi = (float(v) for v in value.split(":"))
                if lo > hi:
                    raise ValueError
                changes[key] = (lo, hi)
            elif isinstance(current, bool):
                if value not in ("0", "1", "true", "false"):
                    raise ValueError
                changes[key] = value in ("1", "true")
            else:
                changes[key] = float(value)
                if changes[key] < 0:
                    raise ValueError
        except ValueError:
            want = "LOW:HIGH" if isinstance(current, tuple) else "0 or 1" if isinstance(current, bool) else ">= 0"
            raise SegDiffError(f"augmentation override {item!r}: {key} takes {want}") from None
    return dataclasses.replace(cfg, **changes)


def random_affine_crop(
    image: np.ndarray, mask: np.ndarray, size: int, aug: AugmentConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A ``size`` x ``size`` crop of a randomly rotated/scaled/flipped view; mask (bool, or uint8 values
    moved by nearest neighbour) stays aligned."""
    H, W = mask.shape
    ang = np.deg2rad(rng.uniform(*aug.rotation))
    s = rng.uniform(*aug.scale)  # >1 zooms in
    fy = -1.0 if aug.vflip and rng.random() < 0.5 else 1.0
    fx = -1.0 if aug.hflip and rng.random() < 0.5 else 1.0
    # output coord o (centred) -> input coord: c + R(ang) @ diag(fy, fx) @ o / s
    R = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    M = R @ np.diag([fy, fx]) / s
    half = size / 2.0
    # choose the centre so the crop's extent stays mostly inside the image
    ext = np.abs(M).sum(axis=1) * half
    cy = rng.uniform(min(ext[0], H / 2), max(H - ext[0], H / 2))
    cx = rng.uniform(min(ext[1], W / 2), max(W - ext[1], W / 2))
    offset = np.array([cy, cx]) - M @ np.array([half - 0.5, half - 0.5])
    img = np.stack(
        [
            ndimage.affine_transform(image[..., c].astype(np.float32), M, offset, (size, size), order=1, mode="mirror")
            for c in range(image.shape[-1])
        ],
        -1,
    )
    msk = ndimage.affine_transform(mask.astype(np.uint8), M, offset, (size, size), order=0, mode="mirror")
    # a bool mask stays bool; a uint8 map (e.g. bit-packed targets) keeps its values (nearest neighbour)
    return img, (msk > 0 if mask.dtype == bool else msk)


def colour_jitter(img: np.ndarray, aug: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """img: float (h, w, 3) in [0, 255]. torchvision-like brightness/contrast/saturation/hue."""
    x = img / 255.0
    if aug.brightness:
        x = x * rng.uniform(max(0, 1 - aug.brightness), 1 + aug.brightness)
    if aug.contrast:
        m = x.mean()
        x = (x - m) * rng.uniform(max(0, 1 - aug.contrast), 1 + aug.contrast) + m
    if aug.saturation:
        g = x.mean(axis=-1, keepdims=True)
        x = (x - g) * rng.uniform(max(0, 1 - aug.saturation), 1 + aug.saturation) + g
    if aug.hue:
        x = _hue_shift(np.clip(x, 0, 1), rng.uniform(-aug.hue, aug.hue))
    return np.clip(x, 0.0, 1.0) * 255.0


def stain_jitter(img: np.ndarray, aug: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """img: float (h, w, 3) in [0, 255]. The HED jitter of ``aug.stain`` (see :class:`AugmentConfig`), in the
    optical-density space of scikit-image's ``rgb2hed``."""
    from skimage.color import hed2rgb, rgb2hed

    s = aug.stain
    hed = rgb2hed(np.clip(img / 255.0, 0.0, 1.0))
    scale = rng.uniform(1 - s, 1 + s, 3)
    shift = rng.uniform(-s, s, 3) * np.abs(hed.reshape(-1, 3).mean(axis=0))
    return np.clip(hed2rgb(hed * scale + shift), 0.0, 1.0) * 255.0


def degrade(img: np.ndarray, aug: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """img: float (h, w, 3) in [0, 255]; gamma, blur or sharpen, JPEG and noise as ``aug`` asks."""
    x = img
    if aug.gamma:
        g = float(np.exp(rng.uniform(-np.log1p(aug.gamma), np.log1p(aug.gamma))))
        x = 255.0 * (np.clip(x, 0, 255) / 255.0) ** g
    r = rng.random()
    if r < aug.blur:
        x = ndimage.gaussian_filter(x, (rng.uniform(0.5, 1.5),) * 2 + (0,))
    elif r < aug.blur + aug.sharpen:
        soft = ndimage.gaussian_filter(x, (1.0, 1.0, 0))
        x = x + rng.uniform(0.3, 1.0) * (x - soft)
    if aug.jpeg and rng.random() < aug.jpeg:
        x = jpeg_roundtrip(x, int(rng.integers(30, 91)))
    if aug.noise:
        x = x + rng.normal(0.0, rng.uniform(0, aug.noise), x.shape)
    return np.clip(x, 0.0, 255.0)


def jpeg_roundtrip(img: np.ndarray, quality: int) -> np.ndarray:
    """img: (h, w, 3) in [0, 255], rounded to uint8, saved as JPEG at ``quality`` and read back (float32)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), np.float32)


def _hue_shift(x: np.ndarray, h: float) -> np.ndarray:
    # rotate chroma around the grey axis in YIQ space (a hue rotation by 2*pi*h)
    t = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    a = 2 * np.pi * h
    r = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    m = np.linalg.inv(t) @ r @ t
    return np.clip(x @ m.T, 0, 1)


def augment_pair(
    image: np.ndarray, mask: np.ndarray, size: int, aug: AugmentConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    img, msk = random_affine_crop(image, mask, size, aug, rng)
    if aug.stain:
        img = stain_jitter(img, aug, rng)
    img = colour_jitter(img, aug, rng)
    if aug.gamma or aug.blur or aug.sharpen or aug.jpeg or aug.noise:
        img = degrade(img, aug, rng)
    return img, msk
