"""Pure array functions that bring user images into the network's form. No torch.

``as_hwc`` decides the layout (grey, RGB, RGBA, channel-first/last) without reading pixels; the
intensity range is found once (streamed for lazy arrays) and every window is scaled with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask.array as da
import numpy as np

from ._errors import SegDiffError


def as_hwc(image, in_channels: int = 3) -> da.Array:
    """A lazy (H, W, C) dask view of a 2-D grey or RGB(A) image (channel-last or channel-first)."""
    arr = _layout(image)
    if arr.shape[-1] == 4:
        arr = arr[..., :3]  # drop alpha
    if arr.shape[-1] == 1 and in_channels == 3:
        arr = da.concatenate([arr] * 3, axis=-1)
    elif arr.shape[-1] == 3 and in_channels == 1:
        arr = arr.mean(axis=-1, keepdims=True)
    return arr


def alpha_of(image) -> da.Array | None:
    """The lazy (H, W) alpha channel of an RGBA image, None for grey or RGB."""
    arr = _layout(image)
    return arr[..., 3] if arr.shape[-1] == 4 else None


def _layout(image) -> da.Array:
    """(H, W, 1|3|4) lazy view of a supported image, or a SegDiffError that says what to do."""
    shape = tuple(getattr(image, "shape", ()))
    if not shape:
        raise SegDiffError(f"image must be an array with a shape (numpy, dask or zarr); got {type(image).__name__}")
    arr = image if isinstance(image, da.Array) else da.from_array(image, chunks=_chunks(image))
    if arr.ndim == 2:
        arr = arr[:, :, None]
    elif arr.ndim == 3:
        if arr.shape[-1] not in (1, 3, 4) and arr.shape[0] in (1, 3, 4):
            arr = arr.transpose(1, 2, 0)  # channel-first -> channel-last
        if arr.shape[-1] not in (1, 3, 4):
            lead, last = shape[0], shape[-1]
            if last <= 16:  # channel-last with an unsupported number of channels
                raise SegDiffError(
                    f"image of shape {shape} has {last} channels; napari-segdiff takes grey (H, W), "
                    "RGB or RGBA (H, W, 3|4, or 3|4 first). Select one channel or merge channels "
                    "into RGB first."
                )
            raise SegDiffError(
                f"image of shape {shape} is either a stack of {lead} 2-D slices or a {lead}-channel "
                "channel-first image; segment() takes one grey/RGB/RGBA image. For a stack, loop "
                "over the slices (the napari widget does this for you); for channels, "
                "select one or merge them into RGB."
            )
    else:
        raise SegDiffError(
            f"image of shape {shape} is not a single 2-D image; segment() takes (H, W) or "
            "(H, W, C). For stacks loop over the leading axes (the napari widget does this for you)."
        )
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise SegDiffError(f"image of shape {shape} is empty; it needs at least 1x1 pixels")
    if arr.dtype.kind not in "biuf":
        raise SegDiffError(f"image dtype {arr.dtype} is not supported; use bool, integer or float pixels")
    return arr


def _chunks(image):
    chunks = getattr(image, "chunks", None)
    if isinstance(chunks, tuple) and len(chunks) == len(image.shape) and all(isinstance(c, int) for c in chunks):
        return chunks  # zarr chunking
    return tuple(min(s, 1024) if i < 2 else s for i, s in enumerate(image.shape)) or "auto"


@dataclass(frozen=True)
class Intensity:
    """Maps raw pixel values to [-1, 1] by ``(v - lo) / (hi - lo) * 2 - 1``."""

    lo: float
    hi: float

    def apply(self, block: np.ndarray) -> np.ndarray:
        # in float64 with lo and hi scaled first: values up to the float64 limit (and a range hi - lo that
        # overflows) map into [0, 1] without inf or NaN; float32 only for the result
        scale = max(abs(self.lo), abs(self.hi), 1e-300)
        lo, hi = self.lo / scale, self.hi / scale
        x = (block.astype(np.float64) / scale - lo) / max(hi - lo, 1e-12)
        return (np.clip(x, 0.0, 1.0) * 2.0 - 1.0).astype(np.float32)


def intensity_range(arr: da.Array) -> Intensity:
    """uint8 -> [0, 255]; bool -> [0, 1]; other integers -> [0, max]; floats -> [0, 1] when inside it,
    else [min, max]. Non-finite floats are refused."""
    kind = arr.dtype.kind
    if kind == "b":
        return Intensity(0.0, 1.0)
    if arr.dtype == np.uint8:
        return Intensity(0.0, 255.0)
    lo, hi = (float(v) for v in da.compute(arr.min(), arr.max()))
    if kind == "f" and not (np.isfinite(lo) and np.isfinite(hi)):
        raise SegDiffError(
            "image contains NaN or infinite values; replace them first (e.g. numpy.nan_to_num(image)) or crop them away"
        )
    if kind in "iu":
        if lo < 0:
            return Intensity(lo, hi)
        return Intensity(0.0, hi if hi > 0 else 1.0)
    if lo >= 0.0 and hi <= 1.0:
        return Intensity(0.0, 1.0)
    return Intensity(lo, hi if hi > lo else lo + 1.0)


# ------------------------------------------------------------------------------------------ colour normalisation
#: at most this many pixels are read to measure an image's colour statistics (a strided subsample)
COLOUR_STATS_PIXELS = 1 << 20


def lab_stats(rgb01: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """(2, 3) array: per-channel mean and standard deviation of an RGB image in [0, 1] in CIE Lab, over its
    ``valid`` pixels (default all)."""
    from skimage.color import rgb2lab

    lab = rgb2lab(np.clip(np.asarray(rgb01, np.float64), 0.0, 1.0)).reshape(-1, 3)
    if valid is not None:
        lab = lab[np.asarray(valid, bool).reshape(-1)]
    if not len(lab):
        raise SegDiffError("no valid pixels to measure the image's colours (is every pixel transparent?)")
    return np.stack([lab.mean(0), np.maximum(lab.std(0), 1e-3)])


def colour_transfer(rgb01: np.ndarray, source: np.ndarray, target: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """Reinhard et al. (2001) colour transfer: each Lab channel of an RGB image in [0, 1] shifted and scaled from
    the ``source`` statistics (its image's :func:`lab_stats`) to the ``target`` ones; ``strength`` < 1 goes that
    share of the way (in Lab). A per-pixel map, so tiles of one image transformed apart agree where they
    overlap. Returns RGB in [0, 1] (float32)."""
    from skimage.color import lab2rgb, rgb2lab

    src, tgt = np.asarray(source, np.float64), np.asarray(target, np.float64)
    lab = rgb2lab(np.clip(np.asarray(rgb01, np.float64), 0.0, 1.0))
    moved = (lab - src[0]) / src[1] * tgt[1] + tgt[0]
    if strength != 1.0:
        moved = strength * moved + (1.0 - strength) * lab
    return np.clip(lab2rgb(moved), 0.0, 1.0).astype(np.float32)


def mean_lab_stats(images) -> np.ndarray:
    """The mean over uint8 RGB ``images`` of each image's :func:`lab_stats`: a set's colour statistics."""
    return np.mean([lab_stats(np.asarray(im) / 255.0) for im in images], axis=0)


def match_colours_uint8(img: np.ndarray, target, strength: float = 1.0) -> np.ndarray:
    """A uint8 RGB image moved ``strength`` of the way from its own Lab statistics to ``target`` (uint8 kept)."""
    rgb = np.asarray(img) / 255.0
    return (colour_transfer(rgb, lab_stats(rgb), np.asarray(target), strength) * 255.0 + 0.5).astype(np.uint8)


def image_lab_stats(arr: da.Array, scale: Intensity, alpha: da.Array | None = None) -> np.ndarray:
    """:func:`lab_stats` of a (lazy) RGB image scaled by ``scale``, read on a strided grid of at most
    :data:`COLOUR_STATS_PIXELS` pixels; transparent pixels (alpha 0) are left out."""
    h, w = int(arr.shape[0]), int(arr.shape[1])
    step = max(1, int(np.ceil(np.sqrt(h * w / COLOUR_STATS_PIXELS))))
    sub = (scale.apply(np.asarray(arr[::step, ::step])) + 1.0) * 0.5
    valid = None if alpha is None else np.asarray(alpha[::step, ::step]) > 0
    return lab_stats(sub, valid)


def to_chw(block: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(block, -1, 0))


#: a tile whose every channel spans at most this much of [-1, 1] is uniform: 2 grey levels of an 8-bit image
UNIFORM_SPAN = 4.0 / 255.0


def empty_tile(block: np.ndarray, alpha: np.ndarray | None = None, bright_background: bool = False) -> str | None:
    """Why a tile needs no model, or None when it does. ``block``: the tile's valid pixels, (h, w, C) scaled to
    [-1, 1]; ``alpha``: its alpha values (an RGBA image).

    * ``"transparent"``: every alpha value is 0 (an orthophoto's outside);
    * ``"uniform"``: every channel is constant to within :data:`UNIFORM_SPAN` (nodata fill, blank canvas);
    * ``"background"`` (only with ``bright_background``, for bright-field slides): on the tile averaged over
      4 x 4 blocks (which quiets sensor and JPEG noise), fewer than 3 blocks look like tissue,
      i.e. coloured (chroma > 0.06) or darker than 0.8 of full scale; glass is bright and grey. A single
      nucleus of 4 px radius covers about 3 blocks, so its tile is sampled.
    """
    if alpha is not None and alpha.size and not np.any(alpha):
        return "transparent"
    flat = block.reshape(-1, block.shape[-1])
    if not flat.size or np.all(flat.max(axis=0) - flat.min(axis=0) <= UNIFORM_SPAN):
        return "uniform"
    if bright_background and block.shape[-1] == 3:
        h, w = block.shape[0] // 4 * 4, block.shape[1] // 4 * 4
        if h and w:
            rgb = (block[:h, :w].reshape(h // 4, 4, w // 4, 4, 3).mean(axis=(1, 3)).reshape(-1, 3) + 1.0) * 0.5
        else:
            rgb = (flat + 1.0) * 0.5
        hi, lo = rgb.max(axis=1), rgb.min(axis=1)
        if np.count_nonzero((hi - lo > 0.06) | (hi < 0.8)) < 3:
            return "background"
    return None
