"""Sliding windows, taper weights, padding and the streaming blender (pure numpy)."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from napari_segdiff.tiling import StreamingBlender, iter_windows, pad_to_tile, taper_weights, window_grid, window_starts

SIZES = [(1, 1), (1, 300), (5, 7), (64, 64), (65, 63), (255, 257), (257, 3000)]


@pytest.mark.parametrize("length", [1, 7, 63, 64, 65, 100, 255, 257, 3000])
@pytest.mark.parametrize("tile,stride", [(64, 48), (64, 64), (32, 8), (64, 1)])
def test_window_starts_cover_every_pixel(length, tile, stride):
    starts = window_starts(length, tile, stride)
    assert starts == sorted(set(starts)) and starts[0] == 0
    if length <= tile:
        assert starts == [0]
        return
    assert starts[-1] == length - tile  # the last window ends exactly at the border
    assert all(b - a <= stride for a, b in zip(starts, starts[1:]))  # no gaps, never more than a stride
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered.all()


def test_window_grid_is_raster_ordered_and_clipped():
    wins = window_grid((100, 150), 64, 48)
    assert [w.index for w in wins] == list(range(len(wins)))
    assert [(w.y, w.x) for w in wins] == sorted((w.y, w.x) for w in wins)
    for w in wins:
        assert w.y >= 0 and w.y + w.h <= 100 and w.x >= 0 and w.x + w.w <= 150
        assert w.h == 64 and w.w == 64
    small = window_grid((10, 20), 64, 48)
    assert len(small) == 1 and (small[0].h, small[0].w) == (10, 20)


def test_taper_weights():
    w = taper_weights(64, 16)
    assert w.shape == (64, 64) and w.dtype == np.float32
    assert (w >= 1e-3**2 * 0.999).all() and w.max() == pytest.approx(1.0)
    np.testing.assert_allclose(w, w.T)
    np.testing.assert_allclose(w, w[::-1, ::-1])
    assert (w[16:48, 16:48] == 1).all()  # flat in the middle
    assert w[0, 32] < w[8, 32] < w[15, 32] < 1  # rising ramp at the edge
    assert (taper_weights(64, 0) == 1).all()
    assert (taper_weights(8, 100) > 0).all()  # overlap larger than half a tile is capped


@pytest.mark.parametrize("h,w", [(1, 1), (1, 5), (3, 2), (20, 64), (64, 64)])
def test_pad_to_tile_reflects_and_keeps_the_block(h, w):
    rng = np.random.default_rng(0)
    block = rng.random((h, w, 3)).astype(np.float32)
    out = pad_to_tile(block, 64)
    assert out.shape == (64, 64, 3)
    np.testing.assert_array_equal(out[:h, :w], block)
    if w > 1 and w < 64:  # symmetric: the column after the last repeats it
        np.testing.assert_array_equal(out[:h, w], block[:, w - 1])
    if h == 1 and w == 1:
        assert (out == block[0, 0]).all()
    # values only come from the block
    assert set(np.unique(out)) <= set(np.unique(block))


# ---------------------------------------------------------------- the streaming blender
def _blend(shape, tile, stride, per_window):
    """Run the streaming blender; per_window(win) -> (mean, second) of shape (tile, tile)."""
    H, W = shape
    prob = np.full((H, W), np.nan, np.float32)
    var = np.full((H, W), np.nan, np.float32)
    emitted = []

    def emit(y0, y1, m, v):
        emitted.append((y0, y1))
        assert m.shape == (y1 - y0, W) and v.shape == (y1 - y0, W)
        prob[y0:y1] = m
        var[y0:y1] = v

    wins = window_grid(shape, tile, stride)
    bl = StreamingBlender(shape, tile, taper_weights(tile, tile - stride), emit)
    assert bl._w.shape[0] <= tile  # one band of rows, never the whole image
    for win in wins:
        m, s = per_window(win)
        bl.add(win, m, s)
    bl.finish()
    # every row emitted exactly once, in order
    rows = [r for y0, y1 in emitted for r in range(y0, y1)]
    assert rows == list(range(H))
    return prob, var


def _reference(shape, tile, stride, per_window):
    """Whole-image weighted accumulation (not streaming), written independently."""
    H, W = shape
    wts = taper_weights(tile, tile - stride).astype(np.float64)
    acc_w = np.zeros((H, W))
    acc_1 = np.zeros((H, W))
    acc_2 = np.zeros((H, W))
    for win in window_grid(shape, tile, stride):
        m, s = per_window(win)
        ww = wts[: win.h, : win.w]
        acc_w[win.y : win.y + win.h, win.x : win.x + win.w] += ww
        acc_1[win.y : win.y + win.h, win.x : win.x + win.w] += ww * m[: win.h, : win.w]
        acc_2[win.y : win.y + win.h, win.x : win.x + win.w] += ww * s[: win.h, : win.w]
    mean = acc_1 / acc_w
    return mean, acc_2 / acc_w - mean**2


def _smooth_field(H, W):
    yy, xx = np.mgrid[:H, :W].astype(np.float64)
    return 0.5 + 0.3 * np.sin(yy / 17.0 + 0.3) * np.cos(xx / 23.0) + 0.1 * np.sin((yy + 2 * xx) / 40.0)


@pytest.mark.parametrize("shape", SIZES)
@pytest.mark.parametrize("tile,stride", [(64, 48), (32, 32)])
def test_pointwise_window_function_stitches_seamlessly(shape, tile, stride):
    """A window function that depends only on the pixel (a smooth field and a known per-pixel
    variance) must give back exactly that field and variance over the whole image."""
    H, W = shape
    field = _smooth_field(H, W)
    v = 0.02 + 0.01 * np.cos(np.arange(W) / 9.0)[None, :] * np.ones((H, 1))

    def per_window(win):
        m = np.zeros((tile, tile), np.float32)
        s = np.zeros((tile, tile), np.float32)
        m[: win.h, : win.w] = field[win.slices]
        s[: win.h, : win.w] = field[win.slices] ** 2 + v[win.slices]
        return m, s

    prob, var = _blend(shape, tile, stride, per_window)
    np.testing.assert_allclose(prob, field, atol=2e-6)
    np.testing.assert_allclose(var, v, atol=2e-5)


@pytest.mark.parametrize("shape", [(1, 1), (65, 63), (255, 257), (130, 700)])
def test_streaming_equals_whole_image_accumulation(shape):
    """Windows that disagree (random per-window values): the streamed mixture mean and variance equal a
    whole-image weighted accumulation."""
    tile, stride = 32, 20
    rng = np.random.default_rng(1)
    cache = {}

    def per_window(win):
        if win.index not in cache:
            m = rng.random((tile, tile)).astype(np.float32)
            cache[win.index] = (m, (m**2 + 0.05 * rng.random((tile, tile))).astype(np.float32))
        return cache[win.index]

    prob, var = _blend(shape, tile, stride, per_window)
    ref_m, ref_v = _reference(shape, tile, stride, per_window)
    np.testing.assert_allclose(prob, np.clip(ref_m, 0, 1), atol=1e-5)
    np.testing.assert_allclose(var, np.clip(ref_v, 0, None), atol=1e-5)


def test_mixture_variance_of_two_disagreeing_windows():
    """Two windows over the same pixels with constant outputs a and b (zero within-window variance):
    the blended variance is the variance of the 50/50 mixture, (a - b)^2 / 4."""
    tile = 8
    shape = (8, 8)
    out = {}

    def emit(y0, y1, m, v):
        out["m"], out["v"] = m, v

    from napari_segdiff.tiling import Window

    bl = StreamingBlender(shape, tile, np.ones((tile, tile), np.float32), emit)
    for idx, val in enumerate((0.2, 0.8)):
        bl.add(Window(idx, 0, 0, 8, 8), np.full((8, 8), val, np.float32), np.full((8, 8), val**2, np.float32))
    bl.finish()
    np.testing.assert_allclose(out["m"], 0.5, atol=1e-6)
    np.testing.assert_allclose(out["v"], 0.09, atol=1e-6)


# ---------------------------------------------------------------- reading windows
class _CountingArray:
    """An (H, W, C) array-like that records every read."""

    def __init__(self, data):
        self.data = data
        self.shape = data.shape
        self.dtype = data.dtype
        self.ndim = data.ndim
        self.reads = []

    def __getitem__(self, key):
        out = self.data[key]
        self.reads.append(out.shape)
        return out


@pytest.mark.parametrize("shape", [(1, 1), (70, 90), (40, 300)])
def test_iter_windows_reads_padded_windows(shape):
    H, W = shape
    data = np.arange(H * W * 3, dtype=np.float32).reshape(H, W, 3)
    src = _CountingArray(data)
    tile = 32
    wins = window_grid(shape, tile, 24)
    got = list(iter_windows(src, wins, tile, span=128))
    assert [w.index for w, _ in got] == [w.index for w in wins]
    for win, block in got:
        assert block.shape == (tile, tile, 3)
        np.testing.assert_array_equal(block[: win.h, : win.w], data[win.slices])
    # reads are grouped along rows but never wider than the span (or one tile)
    assert len(src.reads) <= len(wins)
    assert all(r[0] <= tile and r[1] <= max(128, tile) for r in src.reads)


def test_iter_windows_from_dask():
    rng = np.random.default_rng(0)
    data = rng.random((100, 130, 3)).astype(np.float32)
    arr = da.from_array(data, chunks=(40, 40, 3))
    wins = window_grid((100, 130), 64, 48)
    for win, block in iter_windows(arr, wins, 64):
        assert isinstance(block, np.ndarray)
        np.testing.assert_array_equal(block[: win.h, : win.w], data[win.slices])
