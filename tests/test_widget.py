"""The napari widget in a real napari window (run under ``xvfb-run -a`` with QT_QPA_PLATFORM unset)."""

from __future__ import annotations

import dataclasses

import dask.array as da
import numpy as np
import pytest

from napari_segdiff import (
    SamplingConfig,
    TilingConfig,
    available_devices,
    list_models,
    load_model,
    recommended_config,
    segment,
)
from napari_segdiff._widget import SegDiffWidget, SliceProgress

pytestmark = pytest.mark.gui

FAST = dict(samples=2, steps=2, tile=32, overlap=0.25, seed=3)
TIMEOUT_MS = 180_000


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread: on a small busy CI machine torch's default (one per core) oversubscribes the
    cores and a tiny run gets many times slower. Restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def dock(make_napari_viewer, tiny_model):
    """A viewer with the widget docked from the plugin's manifest, set to the tiny model and fast settings."""

    def make(show: bool = False):
        viewer = make_napari_viewer(show=show)
        _, widget = viewer.window.add_plugin_dock_widget("napari-segdiff", "SegDiff segmentation")
        widget.set_model(tiny_model)
        for name, value in FAST.items():
            getattr(widget, name).value = value
        widget.device.value = "cpu"
        return viewer, widget

    return make


def run_and_wait(qtbot, widget) -> list[SliceProgress]:
    """Click Run and wait until the worker has finished; returns the progress items seen."""
    seen: list[SliceProgress] = []
    widget.progressed.connect(seen.append)
    widget.run_button.clicked.emit()  # same path as a user's click
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)
    widget.progressed.disconnect(seen.append)
    return seen


def rgb_image(h=48, w=40, seed=0):
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 30, np.uint8)
    img[h // 4 : h // 2, w // 4 : w // 2] = 220
    return np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)


def test_docks_from_manifest_with_library_defaults(make_napari_viewer, tiny_model):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-segdiff", "SegDiff segmentation")
    assert isinstance(widget, SegDiffWidget)
    assert list(widget.device.choices) == available_devices()
    assert list(widget.model.choices) == [*list_models(), "model file..."]
    s, t = SamplingConfig(), TilingConfig()
    # the selected shipped model's recommended settings, as segment() uses them
    rec = recommended_config(load_model(widget.model.value))
    assert (widget.samples.value, widget.steps.value) == (rec.sampling.samples, rec.sampling.steps)
    assert (widget.tile.value, widget.overlap.value, widget.threshold.value) == (
        t.tile,
        rec.tiling.overlap,
        rec.sampling.threshold,
    )
    assert widget.seed.value == s.seed and widget.device.value == "auto"
    widget.samples.value, widget.steps.value, widget.overlap.value, widget.threshold.value = 1, 1, 0.5, 0.9
    widget.set_model(tiny_model)  # a model without recommended settings gets the library's defaults
    assert widget.model.value == "tiny (in memory)"
    assert (widget.samples.value, widget.steps.value, widget.steps.max) == (s.samples, s.steps, 20)
    assert widget.overlap.value == t.overlap and widget.threshold.value == s.threshold
    viewer.add_image(rgb_image(), name="a", rgb=True)
    viewer.add_labels(np.zeros((4, 4), np.uint8), name="not an image")
    assert [layer.name for layer in widget.image.choices] == ["a"]


def test_run_adds_three_layers_with_input_geometry_and_metadata(qtbot, dock):
    viewer, widget = dock()
    layer = viewer.add_image(rgb_image(), name="cells", rgb=True, scale=(0.5, 2.0), translate=(3.0, -4.0))
    widget.image.value = layer
    seen = run_and_wait(qtbot, widget)
    assert "error" not in widget.status.value, widget.status.value
    names = [layer.name for layer in viewer.layers]
    assert names == ["cells", "cells probability", "cells variance", "cells mask"]
    prob, var, mask = (viewer.layers[f"cells {k}"] for k in ("probability", "variance", "mask"))
    assert (prob._type_string, var._type_string, mask._type_string) == ("image", "image", "labels")
    assert var.colormap.name == "magma"
    for out in (prob, var, mask):
        assert out.data.shape == (48, 40)
        np.testing.assert_allclose(out.scale, (0.5, 2.0))
        np.testing.assert_allclose(out.translate, (3.0, -4.0))
        meta = out.metadata
        assert meta["model"] == "tiny" and meta["sha256"] is None
        assert (meta["samples"], meta["steps"], meta["overlap"], meta["seed"], meta["device"]) == (2, 2, 0.25, 3, "cpu")
        assert meta["seconds"] > 0 and meta["input"] == "cells"
    assert prob.data.min() >= 0.0 and prob.data.max() <= 1.0 and var.data.min() >= 0.0
    np.testing.assert_array_equal(mask.data, prob.data > 0.5)
    # the widget runs exactly what the library runs
    ref = segment(layer.data, widget._models[widget.model.value], **FAST, device="cpu")
    np.testing.assert_allclose(prob.data, ref.probability, atol=1e-6)
    assert seen and seen[-1].done == seen[-1].total == ref.info["tiles"]


def test_rerun_updates_layers_in_place(qtbot, dock, tmp_path, monkeypatch):
    viewer, widget = dock()
    viewer.add_image(rgb_image(), name="img", rgb=True)
    run_and_wait(qtbot, widget)
    assert "img labels" not in viewer.layers
    widget.instances.value = True
    run_and_wait(qtbot, widget)
    labels = viewer.layers["img labels"]
    assert labels.data.dtype == np.int32 and labels.data.max() == labels.metadata["objects"]
    np.testing.assert_array_equal(labels.data > 0, viewer.layers["img mask"].data > 0)
    assert f"{labels.metadata['objects']} objects" in widget.status.value
    # one features row per object, napari's 'index' column mapping it to its label id, measured on the layers
    feats = labels.features
    ids, counts = np.unique(labels.data[labels.data > 0], return_counts=True)
    assert feats["index"].tolist() == feats["label"].tolist() == ids.tolist()
    assert feats["area_px"].tolist() == counts.tolist()
    var = viewer.layers["img variance"].data
    first = labels.data == ids[0]
    assert feats["mean_variance"][0] == pytest.approx(var[first].mean(), rel=1e-5)
    y, x = np.argwhere(first)[0]
    assert f"area_px: {counts[0]}" in labels.get_status((y, x), world=True)["coordinates"]
    # the table saved as CSV, by name or through the file dialog (a path without .csv gets it)
    assert not widget.save_table_button.native.isHidden()
    import csv

    out = widget.save_table(str(tmp_path / "nuclei"))
    assert out == tmp_path / "nuclei.csv" and "saved" in widget.status.value
    rows = list(csv.DictReader(out.open()))
    assert [int(r["area_px"]) for r in rows] == counts.tolist()
    from qtpy.QtWidgets import QFileDialog

    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(tmp_path / "picked.csv"), ""))
    widget.save_table_button.clicked.emit()
    assert (tmp_path / "picked.csv").read_text() == out.read_text()
    assert widget.status.native.wordWrap()  # the long status line wraps instead of widening the dock
    before = {layer.name: layer for layer in viewer.layers}
    widget.seed.value = 11
    run_and_wait(qtbot, widget)
    assert {layer.name: layer for layer in viewer.layers} == before  # same layer objects, none added
    assert viewer.layers["img mask"].metadata["seed"] == 11
    relabelled = viewer.layers["img labels"]
    assert relabelled.features["area_px"].sum() == (relabelled.data > 0).sum()  # the table follows the new run
    assert viewer.layers["img mask"].metadata["instances"] is True
    widget.precision.value = "fp32"  # the precision choice reaches the engine and is recorded
    run_and_wait(qtbot, widget)
    assert viewer.layers["img mask"].metadata["precision"] == "fp32"
    from napari_segdiff import _openvino

    if _openvino.available():  # the runtime choice reaches the engine and is recorded too
        widget.runtime.value = "openvino"
        run_and_wait(qtbot, widget)
        assert viewer.layers["img mask"].metadata["runtime"].startswith("openvino")


def test_cancel_adds_and_changes_nothing(qtbot, dock):
    viewer, widget = dock()
    viewer.add_image(rgb_image(), name="small", rgb=True)
    run_and_wait(qtbot, widget)  # existing outputs for "small"
    big = viewer.add_image(rgb_image(256, 256, seed=1), name="big", rgb=True)
    widget.image.value = big
    widget.overlap.value = 0.0  # 64 tiles
    names = [layer.name for layer in viewer.layers]
    snapshot = {layer.name: (layer, np.array(layer.data, copy=True), dict(layer.metadata)) for layer in viewer.layers}
    seen: list[SliceProgress] = []

    def on_tile(p):
        seen.append(p)
        widget.cancel_button.clicked.emit()

    widget.progressed.connect(on_tile)
    widget.run_button.clicked.emit()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)
    assert seen and seen[-1].done < seen[-1].total, "the run was not stopped early"
    assert "cancelled" in widget.status.value
    assert [layer.name for layer in viewer.layers] == names
    for layer in viewer.layers:
        obj, data, meta = snapshot[layer.name]
        assert layer is obj and dict(layer.metadata) == meta
        np.testing.assert_array_equal(layer.data, data)
    assert widget.run_button.enabled and not widget.cancel_button.enabled


def test_stack_is_segmented_slice_by_slice(qtbot, dock, tiny_model):
    viewer, widget = dock()
    rng = np.random.default_rng(0)
    stack = (rng.random((3, 40, 36)) * 60000).astype(np.uint16)
    stack[1, 10:30, 5:20] = 65535
    viewer.add_image(stack, name="stack", scale=(5.0, 1.0, 1.0))
    seen = run_and_wait(qtbot, widget)
    assert sorted({p.index for p in seen}) == [0, 1, 2] and all(p.slices == 3 for p in seen)
    assert [p.done for p in seen] == list(range(1, seen[0].total + 1))  # progress counts every tile once
    for kind in ("probability", "variance", "mask"):
        out = viewer.layers[f"stack {kind}"]
        assert out.data.shape == (3, 40, 36)
        np.testing.assert_allclose(out.scale, (5.0, 1.0, 1.0))
    prob = viewer.layers["stack probability"].data
    for k in range(3):
        ref = segment(stack[k], tiny_model, **FAST, device="cpu")
        np.testing.assert_allclose(prob[k], ref.probability, atol=1e-6)


def test_lazy_multiscale_layer_uses_level_0(qtbot, dock):
    viewer, widget = dock()
    level0 = da.from_array(rgb_image(64, 64), chunks=(32, 32, 3))
    viewer.add_image([level0, level0[::2, ::2]], name="pyramid", rgb=True, multiscale=True)
    run_and_wait(qtbot, widget)
    assert "error" not in widget.status.value, widget.status.value
    assert viewer.layers["pyramid probability"].data.shape == (64, 64)
    assert isinstance(viewer.layers["pyramid mask"].data, np.ndarray)


def test_zarr_backed_stack(qtbot, dock):
    import zarr

    viewer, widget = dock()
    z = zarr.create_array(store={}, shape=(2, 32, 40), chunks=(1, 16, 16), dtype="f4")
    z[:] = np.random.default_rng(2).random((2, 32, 40), dtype=np.float32)
    viewer.add_image(z, name="z")
    seen = run_and_wait(qtbot, widget)
    assert {p.index for p in seen} == {0, 1}
    assert viewer.layers["z mask"].data.shape == (2, 32, 40)


def test_bad_settings_report_and_add_nothing(qtbot, dock):
    viewer, widget = dock()
    viewer.add_image(rgb_image(), name="img", rgb=True)
    widget.model.value = "model file..."
    assert not widget.model_file.native.isHidden()
    assert widget.run() is None and "choose a model file" in widget.status.value
    widget.model_file.value = "/nonexistent/model.pt"
    run_and_wait(qtbot, widget)
    assert widget.status.value.startswith("error:") and "does not exist" in widget.status.value
    assert [layer.name for layer in viewer.layers] == ["img"]


def test_window_screenshot_with_results_is_not_blank(qtbot, dock):
    viewer, widget = dock(show=True)
    viewer.open_sample("napari-segdiff", "buildings_aerial")
    widget.image.value = viewer.layers["buildings_aerial"]
    widget.tile.value = 64
    run_and_wait(qtbot, widget)
    assert "buildings_aerial mask" in viewer.layers
    qtbot.wait(50)  # let the canvas draw once
    grab = viewer.window._qt_window.grab().toImage()
    w, h = grab.width(), grab.height()
    ptr = grab.constBits()
    ptr.setsize(grab.sizeInBytes())
    pixels = np.frombuffer(ptr, np.uint8).reshape(h, grab.bytesPerLine())[:, : w * 4].reshape(h, w, 4)
    assert w > 400 and h > 300
    assert pixels[..., :3].std() > 20, "window grab is blank"
    canvas = viewer.screenshot(canvas_only=True)
    assert canvas[..., :3].std() > 20, "canvas is blank"


def test_empty_tiles_skipped_and_reported_unless_switched_off(qtbot, dock):
    viewer, widget = dock()
    img = rgb_image(64, 64)
    img[:, 32:] = 0  # nodata on the right
    widget.image.value = viewer.add_image(img, name="ortho", rgb=True)
    widget.tile.value, widget.overlap.value = 32, 0.0
    run_and_wait(qtbot, widget)
    assert viewer.layers["ortho probability"].metadata["skipped_tiles"] == 2
    assert "2 of 4 tiles empty" in widget.status.value
    assert not viewer.layers["ortho probability"].data[:, 32:].any()
    widget.skip_empty.value = False
    run_and_wait(qtbot, widget)
    assert viewer.layers["ortho probability"].metadata["skipped_tiles"] == 0
    assert viewer.layers["ortho probability"].data[:, 32:].any()


def test_widget_ranges_and_tile_step_follow_table_and_model(make_napari_viewer):
    from napari_segdiff.config import widget_options
    from napari_segdiff.models import SegDiffModel

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-segdiff", "SegDiff segmentation")
    from napari_segdiff.config import SamplingConfig, TilingConfig, get_preset

    for name, cls in (("samples", SamplingConfig), ("overlap", TilingConfig), ("batch_size", TilingConfig)):
        want = widget_options(cls, name)
        control = getattr(widget, name)
        assert (control.min, control.max) == pytest.approx((want["min"], want["max"])), name
    half = SegDiffModel.from_config(dataclasses.replace(get_preset("tiny"), input_scale=0.5), name="half")
    widget.set_model(half)
    assert widget.tile.step == 2 * half.config.downsample_factor  # a tile reaches the network at half size
    assert widget.eta.native.isHidden()  # eta only means something for DDIM
    widget.sampler.value = "ddim"
    assert not widget.eta.native.isHidden()
    assert widget.engine_kwargs()["sampler"] == "ddim"
    assert widget.engine_kwargs()["tta"] is False
    assert widget.object_threshold.native.isHidden()  # only with instances
    widget.instances.value = True
    assert not widget.object_threshold.native.isHidden()
    widget.object_threshold.value = 0.3
    assert widget.engine_kwargs()["object_threshold"] == pytest.approx(0.3)
    widget.tta.value = True  # the table's TTA switch reaches segment()
    assert widget.engine_kwargs()["tta"] is True
