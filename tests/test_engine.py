"""The segmentation engine: tiles, batching, seeds, stitching, streaming (the issue's requirements)."""

from __future__ import annotations

import tracemalloc

import dask
import dask.array as da
import numpy as np
import pytest
import torch
from _helpers import sigmoid, tiny_model
from torch import nn

from napari_segdiff import engine
from napari_segdiff._errors import SegDiffError
from napari_segdiff.engine import Progress, SegmentationResult, iter_segment, segment, tile_seed
from napari_segdiff.tiling import window_grid

KW = dict(device="cpu", tile=32, overlap=0.25)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0, perturb=0.05)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:70, :90]
    base = 127 + 100 * np.sin(yy / 9.0) * np.cos(xx / 11.0)
    return np.clip(base[..., None] + rng.normal(0, 10, (70, 90, 3)), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- G once per tile, samples batched
class _CountingModule(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.batches: list[int] = []

    def forward(self, x):
        self.batches.append(int(x.shape[0]))
        return self.inner(x)


def test_encoder_runs_once_per_tile_and_samples_run_as_one_batch(image):
    m = tiny_model(seed=0, perturb=0.05)
    counter = _CountingModule(m.net.G)
    m.net.G = counter
    f_batches = []
    m.net.F.register_forward_hook(lambda mod, inp, out: f_batches.append(int(inp[0].shape[0])))
    n_tiles = len(window_grid(image.shape[:2], 32, 24))
    assert n_tiles == 12
    # contiguous: the sampler then runs this very network (channels-last runs a copy), so the hooks see it
    r = segment(image, m, samples=4, steps=3, batch_size=5, seed=0, channels_last=False, **KW)
    assert counter.batches == [5, 5, 2]  # G: once per batch of tiles, i.e. once per tile
    assert sum(counter.batches) == n_tiles == r.info["encoder_evaluations"] == r.info["tiles"]
    # every network evaluation carries all samples of all tiles of the batch: 3 steps per batch
    assert f_batches == [20] * 3 + [20] * 3 + [8] * 3
    assert r.info["network_evaluations"] == 9


# ---------------------------------------------------------------- seeds and batching
def test_seeded_runs_repeat_and_different_seeds_differ(model, image):
    a = segment(image, model, samples=3, steps=3, seed=11, **KW)
    b = segment(image, model, samples=3, steps=3, seed=11, **KW)
    c = segment(image, model, samples=3, steps=3, seed=12, **KW)
    assert np.array_equal(a.probability, b.probability) and np.array_equal(a.variance, b.variance)
    assert not np.allclose(a.probability, c.probability, atol=1e-3)
    assert a.variance.max() > 1e-3  # the samples really differ from one another
    assert a.info["seed"] == 11
    r = segment(image, model, samples=1, steps=1, seed=None, **KW)
    assert isinstance(r.info["seed"], int)


def test_batching_tiles_does_not_change_the_result(model, image):
    one = segment(image, model, samples=3, steps=3, seed=5, batch_size=1, **KW)
    three = segment(image, model, samples=3, steps=3, seed=5, batch_size=3, **KW)
    np.testing.assert_allclose(one.probability, three.probability, rtol=0, atol=1e-5)
    np.testing.assert_allclose(one.variance, three.variance, rtol=0, atol=1e-5)


def test_tile_seeds_are_distinct():
    seeds = {tile_seed(s, i) for s in range(5) for i in range(200)}
    assert len(seeds) == 1000


def test_segment_by_name_loads_the_model_once(model, image, tmp_path, monkeypatch):
    """A script segmenting image after image by name reads the file once, and gets what a loaded model gives."""
    from napari_segdiff import models

    sha = models.save_model(model, tmp_path / "m.pt", half=False)
    monkeypatch.setattr(models, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setattr(models, "_registry", lambda: {"m": {"file": "m.pt", "sha256": sha}})
    monkeypatch.setattr(models, "_SHARED", models.OrderedDict())
    reads = []
    real = models.load_model_file
    monkeypatch.setattr(models, "load_model_file", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    runs = [segment(image, "m", samples=2, steps=2, seed=0, **KW) for _ in range(3)]
    assert len(reads) == 1
    ref = segment(image, model, samples=2, steps=2, seed=0, **KW)
    for r in runs:
        assert np.array_equal(r.probability, ref.probability)


def test_result_ranges_and_mask(model, image):
    r = segment(image, model, samples=4, steps=4, seed=0, threshold=0.45, **KW)
    assert isinstance(r, SegmentationResult)
    for a in (r.probability, r.variance, r.mask):
        assert a.shape == image.shape[:2]
    assert r.probability.dtype == np.float32 and r.mask.dtype == bool
    assert r.probability.min() >= 0.0 and r.probability.max() <= 1.0
    assert r.variance.min() >= 0.0 and r.variance.max() <= 0.25
    assert np.array_equal(r.mask, r.probability > 0.45)
    # the variance of N values in [0, 1] around their mean p is at most p (1 - p)
    assert (r.variance <= r.probability * (1 - r.probability) + 1e-5).all()


def test_progress_is_reported_per_tile(model, image):
    items = list(iter_segment(image, model, samples=1, steps=1, batch_size=4, **KW))
    progress = [i for i in items if isinstance(i, Progress)]
    assert isinstance(items[-1], SegmentationResult) and len(items) == len(progress) + 1
    assert [p.done for p in progress] == list(range(1, 13)) and all(p.total == 12 for p in progress)
    assert progress[-1].fraction == 1.0


def test_zarr_output_matches_numpy(model, image, tmp_path):
    import zarr

    a = segment(image, model, samples=2, steps=2, seed=3, **KW)
    b = segment(image, model, samples=2, steps=2, seed=3, out=str(tmp_path / "r.zarr"), **KW)
    g = zarr.open_group(str(tmp_path / "r.zarr"), mode="r")
    for name in ("probability", "variance", "mask"):
        np.testing.assert_array_equal(np.asarray(g[name][:]), getattr(a, name))
        np.testing.assert_array_equal(np.asarray(getattr(b, name)[:]), getattr(a, name))


def test_grey_and_channel_first_inputs(model, image):
    grey = image[..., 0]
    a = segment(grey, model, samples=2, steps=2, seed=1, **KW)
    b = segment(np.repeat(grey[..., None], 3, axis=-1), model, samples=2, steps=2, seed=1, **KW)
    np.testing.assert_array_equal(a.probability, b.probability)
    c = segment(np.moveaxis(image, -1, 0), model, samples=2, steps=2, seed=1, **KW)
    d = segment(image, model, samples=2, steps=2, seed=1, **KW)
    np.testing.assert_array_equal(c.probability, d.probability)


def test_input_scale_runs_the_network_on_resized_tiles(image):
    m = tiny_model(seed=0, perturb=0.05, input_scale=0.5)
    counter = _CountingModule(m.net.G)
    m.net.G = counter
    sizes = []
    m.net.F.register_forward_hook(lambda mod, inp, out: sizes.append(tuple(inp[0].shape[-2:])))
    r = segment(image, m, samples=2, steps=2, seed=0, **KW)
    assert set(sizes) == {(16, 16)}
    assert r.probability.shape == image.shape[:2]
    assert r.variance.min() >= 0 and r.variance.max() <= 0.25
    with pytest.raises(SegDiffError, match="17 px"):  # 34 px tiles would reach the network as 17 px
        segment(image, m, tile=34, device="cpu")


@pytest.mark.parametrize(
    "scale,tile,ok",
    [(0.75, 40, True), (0.75, 36, False), (0.75, 33, False), (1.5, 36, True), (1.5, 34, False), (0.5, 36, True)],
)
def test_tile_size_is_checked_at_the_networks_scale(image, scale, tile, ok):
    """Refused with a clear error exactly when the resized tile would not fit the U-Net."""
    m = tiny_model(seed=0, perturb=0.05, input_scale=scale)
    if ok:
        r = segment(image, m, samples=1, steps=1, tile=tile, device="cpu")
        assert r.probability.shape == image.shape[:2]
    else:
        with pytest.raises(SegDiffError, match="multiple of 2") as e:
            segment(image, m, samples=1, steps=1, tile=tile, device="cpu")
        good = int(str(e.value).rsplit("tile=", 1)[1])  # and the suggested tile works
        assert segment(image, m, samples=1, steps=1, tile=good, device="cpu").probability.shape == image.shape[:2]


def test_explicit_absent_device_is_refused(model, image):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(SegDiffError, match="cuda"):
        segment(image, model, device="cuda", tile=32)


# ---------------------------------------------------------------- stand-in samplers: stitching, variance, streaming
def _mean_fn(x):
    """A smooth per-pixel function of the network input (C, ...) in [-1, 1]."""
    return sigmoid(1.5 * x[0] - 0.7 * x[1] + 0.4 * x[2] + 0.2)


def _var_fn(m):
    return 0.05 * m * (1 - m) + 0.002


class _StandIn:
    """Replaces TileSampler: per-pixel mean m(x) and second moment m^2 + v(x) of the tile it is given."""

    instances: list[_StandIn] = []

    def __init__(self, *args, **kwargs):
        self.network_evaluations = 0
        self.encoder_evaluations = 0
        self.batch_shapes = []
        _StandIn.instances.append(self)

    def __call__(self, images, indices, seed):
        self.batch_shapes.append(images.shape)
        m = np.stack([_mean_fn(im) for im in images]).astype(np.float32)
        return m, (m * m + _var_fn(m)).astype(np.float32)


@pytest.fixture
def stand_in(monkeypatch):
    _StandIn.instances.clear()
    monkeypatch.setattr(engine, "TileSampler", _StandIn)
    return _StandIn


@pytest.mark.parametrize("shape", [(1, 1), (5, 70), (255, 257), (257, 3000)])
@pytest.mark.parametrize("tile,overlap", [(64, 0.25), (32, 0.0)])
def test_stitching_is_seamless(stand_in, model, shape, tile, overlap):
    rng = np.random.default_rng(sum(shape))
    H, W = shape
    yy, xx = np.mgrid[:H, :W]
    img = np.stack([0.5 + 0.4 * np.sin(yy / 13.0 + c) * np.cos(xx / 7.0 - c) for c in range(3)], -1)
    img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1).astype(np.float32)
    r = segment(img, model, tile=tile, overlap=overlap, batch_size=3, device="cpu", skip_empty=False)
    whole = _mean_fn(np.moveaxis(img * 2.0 - 1.0, -1, 0))  # the stand-in applied to the whole image
    np.testing.assert_allclose(r.probability, whole, atol=2e-5)
    np.testing.assert_allclose(r.variance, _var_fn(whole), atol=2e-5)
    assert r.variance.min() >= 0 and r.variance.max() <= 0.25
    n_windows = len(window_grid(shape, tile, max(1, int(round(tile * (1 - overlap))))))
    assert sum(s[0] for s in stand_in.instances[0].batch_shapes) == n_windows
    assert all(s[1:] == (3, tile, tile) for s in stand_in.instances[0].batch_shapes)


def _recording_dask(n: int, chunk: tuple[int, int], record: list):
    def gen(block_info=None):
        (y0, y1), (x0, x1), (c0, c1) = block_info[None]["array-location"]
        record.append((y1 - y0) * (x1 - x0) * (c1 - c0))
        y = np.arange(y0, y1, dtype=np.float32)[:, None, None]
        x = np.arange(x0, x1, dtype=np.float32)[None, :, None]
        c = np.arange(c0, c1, dtype=np.float32)[None, None, :]
        return (0.5 + 0.45 * np.sin(y / 37.0 + c) * np.cos(x / 53.0 - c)).astype(np.float32)

    chunks = ((chunk[0],) * (n // chunk[0]), (chunk[1],) * (n // chunk[1]), (3,))
    return da.map_blocks(gen, dtype=np.float32, chunks=chunks)


def _source_value(y, x):
    c = np.arange(3, dtype=np.float32)
    return 0.5 + 0.45 * np.sin(np.float32(y) / 37.0 + c) * np.cos(np.float32(x) / 53.0 - c)


class _SpotSink:
    """A zarr-group stand-in for ``out=``: its arrays keep only a few spot pixels of what is written
    (so the test measures the engine's own memory) and record which rows were written."""

    SPOTS = [(0, 0), (4095, 4095), (1000, 3000), (2049, 17), (63, 64), (64, 63)]

    class _Array:
        def __init__(self, shape):
            self.shape = shape
            self.rows = np.zeros(shape[0], np.int32)
            self.spots = {}

        def __setitem__(self, key, value):
            assert isinstance(key, slice) and value.shape == (key.stop - key.start, self.shape[1])
            self.rows[key] += 1
            for y, x in _SpotSink.SPOTS:
                if key.start <= y < key.stop:
                    self.spots[(y, x)] = float(value[y - key.start, x])

    def __init__(self):
        self.arrays = {}

    def create_array(self, name, shape, chunks, dtype):
        self.arrays[name] = self._Array(shape)
        return self.arrays[name]


def test_4096_dask_input_is_never_materialised(stand_in, model):
    record: list[int] = []
    arr = _recording_dask(4096, (128, 512), record)
    full_bytes = 4096 * 4096 * 3 * 4  # 201 MB as float32
    sink = _SpotSink()
    tracemalloc.start()
    try:
        with dask.config.set(scheduler="synchronous"):  # one thread: no scheduler overhead per read
            r = segment(arr, model, samples=1, steps=1, tile=64, overlap=0.0, batch_size=64, device="cpu", out=sink)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.info["tiles"] == 64 * 64
    assert max(record) <= 128 * 512 * 3  # only chunks were ever computed ...
    assert peak < full_bytes / 2  # ... and never assembled into the whole image
    prob = sink.arrays["probability"]
    assert (prob.rows == 1).all()  # every row streamed out exactly once
    for (y, x), v in prob.spots.items():  # and right: the stand-in applied to the source pixel
        assert v == pytest.approx(float(_mean_fn(_source_value(y, x) * 2.0 - 1.0)), abs=2e-5)
    assert len(prob.spots) == len(_SpotSink.SPOTS)


def test_dask_input_with_the_real_model_reads_chunks_only(model):
    record: list[int] = []
    arr = _recording_dask(256, (64, 64), record)
    r = segment(arr, model, samples=1, steps=1, tile=32, overlap=0.0, batch_size=64, device="cpu")
    assert max(record) <= 64 * 64 * 3
    assert r.probability.shape == (256, 256) and r.probability.min() >= 0 and r.probability.max() <= 1
    np_r = segment(np.asarray(arr), model, samples=1, steps=1, tile=32, overlap=0.0, batch_size=64, device="cpu")
    np.testing.assert_array_equal(r.probability, np_r.probability)


# ---------------------------------------------------------------- tiles that need no model
def _textured(H, W, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((H, W, 3)).astype(np.float32)


def test_uniform_tiles_are_skipped_with_zero_output_and_the_rest_unchanged(stand_in, model):
    img = _textured(96, 128)
    img[:, 64:] = 0.0  # right half: nodata fill, its two tile columns are uniform
    full = segment(img, model, tile=32, overlap=0.0, batch_size=3, device="cpu", skip_empty=False)
    n_all = sum(s[0] for s in stand_in.instances[-1].batch_shapes)
    part = segment(img, model, tile=32, overlap=0.0, batch_size=3, device="cpu")
    n_sampled = sum(s[0] for s in stand_in.instances[-1].batch_shapes)
    assert n_all == full.info["tiles"] == 12 and full.info["skipped_tiles"] == 0
    assert part.info["skipped_tiles"] == 6 and part.info["skipped"] == {"uniform": 6} and n_sampled == 6
    np.testing.assert_allclose(part.probability[:, :64], full.probability[:, :64], atol=1e-6)
    assert not part.probability[:, 64:].any() and not part.variance[:, 64:].any()
    assert full.probability[:, 64:].min() > 0.05  # the stand-in would have said something there


def test_skipped_tiles_keep_raster_order_and_the_last_batch(stand_in, model):
    """Skipped tiles between and after sampled ones (the last batch only partly full) come out in order."""
    img = _textured(64, 160)
    img[:, 32:96] = 0.5  # columns 1-2 of 5 uniform
    img[32:, 128:] = 1.0  # the very last tile uniform
    got = segment(img, model, tile=32, overlap=0.25, batch_size=4, device="cpu")
    ref = segment(img, model, tile=32, overlap=0.25, batch_size=4, device="cpu", skip_empty=False)
    assert got.info["skipped_tiles"] > 0
    sampled = np.abs(got.probability - ref.probability) < 1e-6
    assert sampled[:, :20].all() and sampled[:, 104:124].all()  # far from any skipped tile: identical


def test_transparent_tiles_are_skipped(stand_in, model):
    img = np.concatenate([_textured(64, 64), np.ones((64, 64, 1), np.float32)], axis=-1)
    img[:32, :, 3] = 0.0  # top row of tiles fully transparent (their RGB is noise)
    r = segment(img, model, tile=32, overlap=0.0, device="cpu")
    assert r.info["skipped"] == {"transparent": 2}
    assert not r.probability[:32].any() and r.probability[32:].min() > 0


def test_glass_is_skipped_only_for_a_bright_background_model(stand_in, model):
    rng = np.random.default_rng(1)
    glass = np.clip(0.93 + rng.normal(0, 0.02, (64, 64, 3)), 0, 1).astype(np.float32)
    glass[40:48, 40:48] = (0.35, 0.2, 0.5)  # one small hematoxylin-dark nucleus in the lower right tile
    r = segment(glass, model, tile=32, overlap=0.0, device="cpu")
    assert r.info["skipped_tiles"] == 0  # the model does not declare a bright background
    model.meta["background"] = "bright"
    try:
        r = segment(glass, model, tile=32, overlap=0.0, device="cpu")
    finally:
        del model.meta["background"]
    assert r.info["skipped"] == {"background": 3}
    assert r.probability[32:, 32:].min() > 0 and not r.probability[:32].any()


def test_empty_tile_rules():
    from napari_segdiff.transforms import UNIFORM_SPAN, empty_tile

    flat = np.full((16, 16, 3), 0.2, np.float32)
    assert empty_tile(flat) == "uniform"
    nearly = flat.copy()
    nearly[3, 4, 1] += UNIFORM_SPAN * 0.9
    assert empty_tile(nearly) == "uniform"
    nearly[3, 4, 1] += UNIFORM_SPAN * 0.2
    assert empty_tile(nearly) is None
    assert empty_tile(nearly, alpha=np.zeros((16, 16))) == "transparent"
    assert empty_tile(nearly, alpha=np.eye(16)) is None
    # bright, grey glass with a few dark specks (fewer than 1 in 1000 pixels) vs one nucleus
    rng = np.random.default_rng(0)
    glass = (np.clip(0.92 + rng.normal(0, 0.02, (256, 256, 3)), 0, 1) * 2 - 1).astype(np.float32)
    specks = glass.copy()
    specks[rng.integers(0, 256, 40), rng.integers(0, 256, 40)] = -0.5
    assert empty_tile(specks, bright_background=True) == "background"
    assert empty_tile(specks) is None  # without the model's say-so only uniform tiles count
    yy, xx = np.mgrid[:256, :256]
    nucleus = glass.copy()
    nucleus[(yy - 100) ** 2 + (xx - 60) ** 2 <= 16] = (-0.3, -0.6, 0.0)
    assert empty_tile(nucleus, bright_background=True) is None
    dark_grey = np.full((64, 64, 3), -0.2, np.float32) + rng.normal(0, 0.05, (64, 64, 1)).astype(np.float32)
    assert empty_tile(dark_grey, bright_background=True) is None  # grey but dark: tissue-like, sampled


def test_cli_no_skip_empty(tmp_path):
    from napari_segdiff.cli import build_parser

    args = build_parser().parse_args(["segment", "x.png", "-o", "y.tif", "--no-skip-empty"])
    assert args.skip_empty is False
    assert build_parser().parse_args(["segment", "x.png", "-o", "y.tif"]).skip_empty is None


# ---------------------------------------------------------------- one generator protocol
def test_segment_has_iter_segments_signature_and_drain_needs_a_result():
    import inspect

    from napari_segdiff.engine import drain, iter_segment

    a, b = inspect.signature(segment), inspect.signature(iter_segment)
    assert list(a.parameters) == list(b.parameters) and "pixel_size" in a.parameters
    assert segment.__name__ == "segment" and "pixel_size" in segment.__doc__
    seen = []
    assert drain(iter([1, 2, "done"]), str, on_progress=seen.append) == "done" and seen == [1, 2]
    with pytest.raises(RuntimeError, match="ended without a str"):
        drain(iter([1, 2]), str)


def test_stack_iterator_yields_progress_then_its_result(model):
    from napari_segdiff.stacks import SliceProgress, StackResult, iter_segment_stack, segment_stack

    stack = np.random.default_rng(0).random((2, 40, 40)).astype(np.float32)
    items = list(iter_segment_stack(stack, False, model, samples=1, steps=1, tile=32, seed=0, device="cpu"))
    assert all(isinstance(i, SliceProgress) for i in items[:-1]) and isinstance(items[-1], StackResult)
    assert items[-2].done == items[-2].total == 2 * 4
    again = segment_stack(stack, False, model, samples=1, steps=1, tile=32, seed=0, device="cpu")
    np.testing.assert_array_equal(again.probability, items[-1].probability)
