"""The per-object table: checked against scikit-image's regionprops and against hand-computed values."""

import csv
import io

import numpy as np
import pytest
from skimage.draw import ellipse
from skimage.measure import regionprops

from napari_segdiff import SegDiffError, objects
from napari_segdiff.engine import SegmentationResult
from napari_segdiff.objects import object_table, result_table, table_csv, tables_csv


def _ellipses(shape=(120, 140)):
    lab = np.zeros(shape, np.int32)
    for i, (r, c, a, b, rot) in enumerate([(30, 30, 12, 5, 0.4), (80, 90, 20, 9, -1.1), (60, 30, 4, 4, 0.0)], 1):
        rr, cc = ellipse(r, c, a, b, shape=shape, rotation=rot)
        lab[rr, cc] = i
    lab[100:103, 120:140] = 7  # a bar at the edge; ids need not be consecutive
    return lab


def test_matches_regionprops():
    lab = _ellipses()
    t = object_table(lab)
    props = regionprops(lab)
    assert t["label"].tolist() == [p.label for p in props]
    for i, p in enumerate(props):
        assert t["area_px"][i] == p.area
        assert (t["y"][i], t["x"][i]) == pytest.approx(p.centroid)
        assert t["major_axis_px"][i] == pytest.approx(p.axis_major_length, rel=1e-6)
        assert t["minor_axis_px"][i] == pytest.approx(p.axis_minor_length, rel=1e-6, abs=1e-6)
        assert t["eccentricity"][i] == pytest.approx(p.eccentricity, rel=1e-6, abs=1e-6)
    assert t["eccentricity"][2] < 0.2 < 0.8 < t["eccentricity"][0]  # the disc is round, the ellipse is not


def test_blocks_of_rows_give_the_same_table(monkeypatch):
    lab = _ellipses()
    whole = object_table(lab, variance=lab / 10.0)
    monkeypatch.setattr(objects, "ROWS_PER_BLOCK", 7)  # objects now cross many blocks
    blocks = object_table(lab, variance=lab / 10.0)
    for k in whole:
        np.testing.assert_allclose(blocks[k], whole[k], rtol=1e-9, atol=1e-9)


def test_physical_units_and_model_confidence_by_hand():
    lab = np.zeros((6, 8), np.int32)
    lab[1:3, 1:4] = 1  # 6 px
    lab[4, 6] = 5  # 1 px
    prob = np.where(lab == 1, 0.9, 0.0)
    prob[1, 1] = 0.6
    var = np.where(lab == 5, 0.2, 0.01)
    t = object_table(lab, prob, var, pixel_size=0.5, unit="um")
    assert t["label"].tolist() == [1, 5]
    assert t["area_px"].tolist() == [6, 1]
    assert t["area_um2"].tolist() == [1.5, 0.25]
    assert (t["y"][0], t["x"][0]) == (1.5, 2.0)
    assert t["mean_probability"][0] == pytest.approx((0.6 + 5 * 0.9) / 6)
    assert t["mean_variance"].tolist() == pytest.approx([0.01, 0.2])
    assert t["equivalent_diameter_um"][1] == pytest.approx(np.sqrt(4 / np.pi) * 0.5)
    assert t["major_axis_um"][0] == pytest.approx(t["major_axis_px"][0] * 0.5)


def test_no_objects_gives_empty_columns():
    t = object_table(np.zeros((5, 5), np.int32), variance=np.ones((5, 5)))
    assert set(t) >= {"label", "area_px", "y", "x", "mean_variance"}
    assert all(len(v) == 0 for v in t.values())
    assert table_csv(t).splitlines() == [",".join(t)]


def test_stack_rows_name_their_slice():
    lab = np.zeros((3, 10, 10), np.int32)
    lab[0, 2:4, 2:4] = 1
    lab[2, 5:9, 5:9] = 2
    lab[2, 0:2, 0:2] = 3
    t = object_table(lab)
    assert t["label"].tolist() == [1, 2, 3] and t["plane_0"].tolist() == [0, 2, 2]
    assert t["area_px"].tolist() == [4, 16, 4]
    assert (t["y"][1], t["x"][1]) == (6.5, 6.5)  # within its slice


def test_csv_round_trip():
    lab = _ellipses()
    t = object_table(lab, variance=np.full(lab.shape, 0.125), pixel_size=0.3, unit="m")
    rows = list(csv.DictReader(io.StringIO(table_csv(t))))
    assert len(rows) == 4 and list(rows[0]) == list(t)
    assert [int(r["label"]) for r in rows] == [1, 2, 3, 7]
    assert float(rows[1]["area_m2"]) == pytest.approx(t["area_m2"][1], rel=1e-5)
    assert float(rows[0]["mean_variance"]) == 0.125


def test_tables_of_several_images_share_one_csv():
    """A batch's one table: the image first, the union of the columns (units only where an image had a pixel
    size), empty cells where an image lacks a column, no row for an image without objects."""
    lab = _ellipses()
    plain = object_table(lab)
    sized = object_table(lab[:, ::-1], variance=np.full(lab.shape, 0.5), pixel_size=0.5, unit="um")
    empty = object_table(np.zeros((4, 4), np.int32))
    rows = list(csv.DictReader(io.StringIO(tables_csv([("a.tif", plain), ("none.tif", empty), ("b.tif", sized)]))))
    assert [r["image"] for r in rows] == ["a.tif"] * 4 + ["b.tif"] * 4
    assert list(rows[0]) == ["image", *plain, *(c for c in sized if c not in plain)]
    assert rows[0]["area_um2"] == "" and rows[0]["mean_variance"] == ""
    assert float(rows[5]["area_um2"]) == pytest.approx(sized["area_um2"][1], rel=1e-5)
    assert [int(r["label"]) for r in rows] == [1, 2, 3, 7] * 2


def test_result_table_uses_the_run_pixel_size():
    lab = _ellipses()
    z = np.zeros(lab.shape, np.float32)
    r = SegmentationResult(z, z, lab > 0, {"pixel_size": 0.25, "pixel_unit": "um"}, lab)
    t = result_table(r)
    assert t["area_um2"][0] == pytest.approx(t["area_px"][0] / 16)
    assert "mean_variance" in t and "area_um2" not in result_table(SegmentationResult(z, z, lab > 0, {}, lab))
    with pytest.raises(SegDiffError, match="instances=True"):
        result_table(SegmentationResult(z, z, lab > 0, {}, None))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": np.zeros((4, 4), np.float32)}, "integer object ids"),
        ({"labels": -np.ones((4, 4), np.int32)}, ">= 0"),
        ({"labels": np.zeros(4, np.int32)}, "an image"),
        ({"variance": np.zeros((3, 4))}, "same shape"),
        ({"pixel_size": 0.5}, "needs its unit"),
        ({"pixel_size": 0.0, "unit": "um"}, "> 0"),
        ({"pixel_size": float("nan"), "unit": "um"}, "> 0"),
    ],
)
def test_bad_input_named(kwargs, message):
    args = {"labels": np.zeros((4, 4), np.int32), **kwargs}
    with pytest.raises(SegDiffError, match=message):
        object_table(**args)
