"""The fine-tuning and review widgets in a real napari window (run under ``xvfb-run -a``)."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import disc_image, tiny_model

from napari_segdiff.models import register_user_model, save_model, sha256_of

pytestmark = pytest.mark.gui
TIMEOUT_MS = 180_000


@pytest.fixture
def user_base(tmp_path, monkeypatch):
    """A tiny model registered as the user model 'tiny-user' in a temporary user model directory."""
    monkeypatch.setenv("NAPARI_SEGDIFF_MODELS", str(tmp_path / "models"))
    path = tmp_path / "tiny.pt"
    save_model(
        tiny_model(seed=0, perturb=0.3),
        path,
        half=False,
        meta={"name": "tiny-user", "tiling": {"tile": 32, "overlap": 0.0}, "sampling": {"samples": 2, "steps": 2}},
    )
    register_user_model("tiny-user", path, sha256_of(path))
    return "tiny-user"


def test_finetune_widget_trains_registers_and_leaves_layers_alone(make_napari_viewer, qtbot, user_base):
    viewer = make_napari_viewer()
    _, seg = viewer.window.add_plugin_dock_widget("napari-segdiff", "SegDiff segmentation")
    _, ft = viewer.window.add_plugin_dock_widget("napari-segdiff", "SegDiff fine-tuning")
    img, mask = disc_image(48, seed=1)
    il = viewer.add_image(img, name="img", rgb=True)
    ml = viewer.add_labels(mask.astype(np.uint8), name="img mask")
    before_img, before_mask = il.data.copy(), ml.data.copy()
    ft.reset_choices()
    ft.image.value, ft.labels.value = il, ml
    ft.add_pair.clicked.emit()
    assert ft.pairs == [(il, ml)] and "img + img mask" in ft.pair_list.value
    ft.base.value = "nuclei-he"
    assert ft.blend.value == 0.5  # the blend control follows the base model's recommendation
    ft.base.value = user_base
    assert ft.blend.value == 1.0  # a model without one: the fine-tuned weights as they are
    ft.minutes.value = 0.1
    ft.blend.value = 0.5
    ft.name.value = "widget-model"
    assert "widget-model" not in list(seg.model.choices)
    ft.train_button.clicked.emit()
    qtbot.waitUntil(lambda: ft._worker is None, timeout=TIMEOUT_MS)
    assert ft.status.value.startswith("done: model 'widget-model'"), ft.status.value
    assert ft.threshold.value == "keep" and "mask threshold kept the base model's 0.5" in ft.status.value
    assert "widget-model" in list(seg.model.choices)  # offered without a restart
    from napari_segdiff.models import load_model

    assert load_model("widget-model").meta["finetune"]["blend"] == 0.5  # the blend control reached the file
    np.testing.assert_array_equal(il.data, before_img)
    np.testing.assert_array_equal(ml.data, before_mask)
    assert [ly.name for ly in viewer.layers] == ["img", "img mask"]


def test_finetune_widget_cancel_keeps_best_so_far(make_napari_viewer, qtbot, user_base):
    viewer = make_napari_viewer()
    _, ft = viewer.window.add_plugin_dock_widget("napari-segdiff", "SegDiff fine-tuning")
    img, mask = disc_image(48, seed=2)
    ft.reset_choices()
    ft.image.value = viewer.add_image(img, name="a", rgb=True)
    ft.labels.value = viewer.add_labels(mask.astype(np.uint8), name="a mask")
    ft.add_pair.clicked.emit()
    ft.base.value, ft.minutes.value, ft.name.value = user_base, 30.0, "cancelled-model"
    ft.train_button.clicked.emit()
    ft.cancel_button.clicked.emit()
    qtbot.waitUntil(lambda: ft._worker is None, timeout=TIMEOUT_MS)
    assert ft.status.value.startswith("cancelled; kept the best state so far"), ft.status.value


def test_finetune_widget_refuses_without_pairs(make_napari_viewer, user_base):
    viewer = make_napari_viewer()
    _, ft = viewer.window.add_plugin_dock_widget("napari-segdiff", "SegDiff fine-tuning")
    assert ft.run() is None and "add at least one image + mask pair" in ft.status.value


def test_review_lists_most_uncertain_tiles_and_jumps_to_them(make_napari_viewer):
    from napari_segdiff._train_widget import viewer_camera

    viewer = make_napari_viewer()
    _, rv = viewer.window.add_plugin_dock_widget("napari-segdiff", "SegDiff review")
    var = np.zeros((128, 128), np.float32)
    var[64:96, 0:32] = 0.2  # the most uncertain 32-tile
    var[0:32, 96:128] = 0.1  # the second
    vl = viewer.add_image(var, name="x variance", scale=(2.0, 2.0))
    rv.reset_choices()
    rv.variance.value = vl
    rv.tile.value, rv.top.value = 32, 3
    rv.list_button.clicked.emit()
    pts = viewer.layers["x variance review"]
    np.testing.assert_allclose(pts.data[:2], [[80, 16], [16, 112]])
    assert list(pts.features["score"][:2]) == pytest.approx([0.2, 0.1])
    np.testing.assert_allclose(viewer_camera(viewer).center[-2:], (160, 32))  # the first place, in world coordinates
    rv.next_button.clicked.emit()
    np.testing.assert_allclose(viewer_camera(viewer).center[-2:], (32, 224))
    assert rv.status.value.startswith("2/3")


def test_review_ranks_objects_by_lowest_mean_probability_or_by_variance(make_napari_viewer):
    viewer = make_napari_viewer()
    _, rv = viewer.window.add_plugin_dock_widget("napari-segdiff", "SegDiff review")
    lab = np.zeros((64, 64), np.int32)
    lab[4:12, 4:12], lab[30:40, 30:40], lab[50:60, 2:12] = 1, 2, 3
    prob = np.select([lab == 1, lab == 2, lab == 3], [0.95, 0.55, 0.7], 0.0).astype(np.float32)
    var = np.where(lab == 1, 0.2, 0.01).astype(np.float32)
    viewer.add_image(prob, name="x probability")
    vl = viewer.add_image(var, name="x variance", metadata={"input": "x"})
    ll = viewer.add_labels(lab, name="x labels")
    rv.reset_choices()
    rv.variance.value, rv.objects.value, rv.top.value = vl, ll, 3
    assert rv.rank_by.value == "lowest mean probability"  # the default for objects
    rv.list_button.clicked.emit()
    pts = viewer.layers["x variance review"]
    np.testing.assert_allclose(pts.data, [[35, 35], [55, 7], [8, 8]])  # objects 2, 3, 1
    assert list(pts.features["score"]) == pytest.approx([0.55, 0.7, 0.95])
    assert rv.status.value.startswith("1/3: mean probability 0.55")
    rv.rank_by.value = "highest mean variance"
    rv.list_button.clicked.emit()
    np.testing.assert_allclose(viewer.layers["x variance review"].data[0], [8, 8])  # object 1 first
    rv.rank_by.value = "lowest mean probability"
    viewer.layers.remove("x probability")  # no probability layer of that run: a clear error, nothing changed
    rv.list_button.clicked.emit()
    assert "needs the run's probability layer 'x probability'" in rv.status.value
    np.testing.assert_allclose(viewer.layers["x variance review"].data[0], [8, 8])
