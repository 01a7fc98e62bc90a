"""Sliding windows, blend weights and a streaming accumulator. Pure numpy; no torch.

Windows are ``tile`` x ``tile``; the last window of a row/column is pushed back to end at the image
border, and images smaller than a tile are padded (symmetric) to a full tile and cropped back.

Blending: each window's per-pixel sample mean m and second moment s (= mean of p^2) are accumulated
with a smooth positive weight w (a raised-cosine taper with a floor), giving

    mean = sum w m / sum w,    E[p^2] = sum w s / sum w,    var = E[p^2] - mean^2

i.e. the mean and variance of the mixture of all samples covering a pixel: the stitched variance is
the variance of the blended samples, with no seams. Rows are finalised as soon as no later window can
touch them, so memory is one band of ``tile`` rows, never the whole image.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np


def window_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of windows covering [0, length); the last ends at ``length`` (or 0 if short)."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return sorted(set(starts))


@dataclass(frozen=True)
class Window:
    index: int
    y: int
    x: int
    h: int  # valid (unpadded) height inside the image
    w: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y, self.y + self.h), slice(self.x, self.x + self.w)


def window_grid(shape: tuple[int, int], tile: int, stride: int) -> list[Window]:
    """Windows in raster order (row-major): rows of windows sorted by y."""
    H, W = shape
    out = []
    for y in window_starts(H, tile, stride):
        for x in window_starts(W, tile, stride):
            out.append(Window(len(out), y, x, min(tile, H - y), min(tile, W - x)))
    return out


def taper_weights(tile: int, overlap_px: int, floor: float = 1e-3) -> np.ndarray:
    """2-D raised-cosine taper over ``overlap_px`` at each edge, 1 in the middle, >= floor everywhere."""
    ramp = np.ones(tile, dtype=np.float64)
    n = max(0, min(overlap_px, tile // 2))
    if n > 0:
        r = 0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)
        ramp[:n] = r
        ramp[tile - n :] = r[::-1]
    ramp = np.maximum(ramp, floor)
    return np.outer(ramp, ramp).astype(np.float32)


def pad_to_tile(block: np.ndarray, tile: int) -> np.ndarray:
    """Pad a (h, w, ...) block to (tile, tile, ...) by symmetric reflection (works down to 1 px)."""
    h, w = block.shape[:2]
    if h == tile and w == tile:
        return block
    pad = [(0, tile - h), (0, tile - w)] + [(0, 0)] * (block.ndim - 2)
    out = block
    # symmetric padding of a 1-px edge repeats it; repeat until large enough
    while out.shape[0] < tile or out.shape[1] < tile:
        ph, pw = min(tile - out.shape[0], out.shape[0]), min(tile - out.shape[1], out.shape[1])
        out = np.pad(out, [(0, ph), (0, pw)] + pad[2:], mode="symmetric")
    return out


class StreamingBlender:
    """Accumulates weighted window moments; hands finished row bands to ``emit(y0, y1, mean, var)``.

    Windows must arrive in the raster order of :func:`window_grid`. Memory: three float32 arrays of
    ``tile`` x ``W`` (x ``channels``) plus one window.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        tile: int,
        weights: np.ndarray,
        emit: Callable[[int, int, np.ndarray, np.ndarray], None],
        channels: int = 1,
    ):
        self.H, self.W = shape
        self.tile = tile
        # with channels > 1 the windows' moments are (tile, tile, channels) and so are the emitted bands
        self.weights = weights if channels == 1 else weights[..., None]
        self.emit = emit
        bh = min(tile, self.H)
        band = (bh, self.W) if channels == 1 else (bh, self.W, channels)
        self._w = np.zeros(band[:2] + (1,) * (len(band) - 2), np.float32)
        self._s1 = np.zeros(band, np.float32)
        self._s2 = np.zeros(band, np.float32)
        self._top = 0  # image row of the band's first row

    def _flush_to(self, y: int) -> None:
        """Finalise rows [top, y) and shift the band so that it starts at y."""
        n = y - self._top
        if n <= 0:
            return
        w = self._w[:n]
        mean = self._s1[:n] / w
        var = np.clip(self._s2[:n] / w - mean**2, 0.0, None)
        self.emit(self._top, y, np.clip(mean, 0.0, 1.0), var)
        for a in (self._w, self._s1, self._s2):
            if n < a.shape[0]:
                a[:-n] = a[n:].copy()
                a[-n:] = 0.0
            else:
                a[:] = 0.0
        self._top = y

    def add(self, win: Window, mean: np.ndarray, second: np.ndarray) -> None:
        """Add a window's per-pixel sample mean and second moment (both tile x tile, x channels)."""
        self._flush_to(win.y)
        wt = self.weights[: win.h, : win.w]
        r0 = win.y - self._top
        rows = slice(r0, r0 + win.h)
        cols = slice(win.x, win.x + win.w)
        self._w[rows, cols] += wt
        self._s1[rows, cols] += wt * mean[: win.h, : win.w]
        self._s2[rows, cols] += wt * second[: win.h, : win.w]

    def finish(self) -> None:
        self._flush_to(self.H)


def iter_windows(image, windows: list[Window], tile: int, span: int = 4096) -> Iterator[tuple[Window, np.ndarray]]:
    """Read each window from a numpy/dask/zarr (H, W, C) array and pad it to a full tile.

    Consecutive windows of one row are read together, one block of at most ``max(span, tile)`` columns
    (one dask/zarr read per block instead of per window: with small tiles the per-read overhead of a
    lazy array otherwise dominates), so memory stays one band of ``tile`` rows by ``span`` columns."""
    i = 0
    while i < len(windows):
        first = windows[i]
        j = i + 1
        while j < len(windows) and windows[j].y == first.y and windows[j].x + windows[j].w - first.x <= max(span, tile):
            j += 1
        group = windows[i:j]
        x1 = max(w.x + w.w for w in group)
        block = np.asarray(image[first.y : first.y + first.h, first.x : x1])
        for win in group:
            yield win, pad_to_tile(block[:, win.x - first.x : win.x - first.x + win.w], tile)
        i = j
