"""Pixel sizes (model vs image), instance labels through segment() and the CLI, GeoTIFF in and out, GeoJSON."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile
from _helpers import disc_image, tiny_model

import napari_segdiff as ns
from napari_segdiff import SegDiffError
from napari_segdiff.cli import main
from napari_segdiff.io import read_image_meta, read_result
from napari_segdiff.models import save_model
from napari_segdiff.pixelsize import scale_factor

FAST = dict(samples=2, steps=2, device="cpu")
NATIVE = {"pixel_size": 0.15, "pixel_unit": "m"}


@pytest.fixture(scope="module")
def aerial(tmp_path_factory):
    """A tiny model that records a native pixel size of 0.15 m, saved as a file, and a GeoTIFF in UTM 37S."""
    d = tmp_path_factory.mktemp("geo")
    path = d / "tiny-aerial.pt"
    save_model(
        tiny_model(seed=0, perturb=0.3),
        path,
        half=False,
        meta={"name": "tiny-aerial", "tiling": {"tile": 32, "overlap": 0.0}, **NATIVE},
    )
    img, mask = disc_image(64, seed=3, n_discs=4)
    keys = [1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32737]
    geo = d / "scene.tif"
    tifffile.imwrite(
        geo,
        img,
        photometric="rgb",
        extratags=[
            (33550, "d", 3, (0.3, 0.3, 0.0)),
            (33922, "d", 6, (0, 0, 0, 530000.0, 9330000.0, 0)),
            (34735, "H", len(keys), keys),
        ],
    )
    nocrs = d / "nocrs.tif"
    tifffile.imwrite(
        nocrs,
        img,
        photometric="rgb",
        extratags=[(33550, "d", 3, (0.3, 0.3, 0.0)), (33922, "d", 6, (0, 0, 0, 530000.0, 9330000.0, 0))],
    )
    return d, path, geo, nocrs, img


def test_scale_factor_and_its_refusals():
    assert scale_factor(None, None, NATIVE) == 1.0
    assert scale_factor(0.3, None, NATIVE) == pytest.approx(2.0)
    assert scale_factor(30, "cm", NATIVE) == pytest.approx(2.0)
    for bad in (0, -1, float("nan"), float("inf"), "abc", True):
        with pytest.raises(SegDiffError, match="pixel_size must be"):
            scale_factor(bad, None, NATIVE)
    with pytest.raises(SegDiffError, match="unit is probably wrong"):
        scale_factor(0.3, "um", NATIVE)  # a microscopy unit for an aerial model
    with pytest.raises(SegDiffError, match="unknown pixel unit 'feet'"):
        scale_factor(0.3, "feet", NATIVE)
    with pytest.raises(SegDiffError, match="does not record the pixel size"):
        scale_factor(0.3, "m", {}, "plain")
    with pytest.raises(SegDiffError, match="without pixel_size"):
        scale_factor(None, "m", NATIVE)


def test_pixel_size_resamples_each_tile_and_returns_the_image_grid(aerial):
    d, path, *_ = aerial
    img, _ = disc_image(64, seed=1)
    native = ns.segment(img, str(path), tile=32, **FAST)
    same = ns.segment(img, str(path), tile=32, pixel_size=0.15, **FAST)
    np.testing.assert_array_equal(native.probability, same.probability)  # factor 1 changes nothing
    coarse = ns.segment(img, str(path), pixel_size=0.3, **FAST)
    assert coarse.probability.shape == (64, 64)
    assert coarse.info["scale_factor"] == 2.0 and coarse.info["pixel_size"] == 0.3
    assert coarse.info["tile"] == 16  # the model's 32-px tile, measured in its own pixels
    assert not np.array_equal(coarse.probability, native.probability)


def test_instances_come_with_the_result(aerial):
    d, path, *_ = aerial
    img, _ = disc_image(64, seed=1)
    r = ns.segment(img, str(path), tile=32, instances=True, **FAST)
    assert r.labels.dtype == np.int32 and r.labels.shape == (64, 64)
    np.testing.assert_array_equal(r.labels > 0, r.mask)
    assert r.info["objects"] == r.labels.max() and r.info["instances"]["method"] == "components"
    assert ns.segment(img, str(path), tile=32, **FAST).labels is None


def test_geotiff_in_keeps_georeferencing_out(aerial, tmp_path, capsys):
    d, path, geo, nocrs, img = aerial
    meta = read_image_meta(geo)
    assert (meta.pixel_size, meta.pixel_unit, meta.source, meta.crs_epsg) == (0.3, "m", "geotiff", 32737)
    out = tmp_path / "out.tif"
    assert (
        main(
            [
                "segment",
                str(geo),
                "-o",
                str(out),
                "--model",
                str(path),
                "--samples",
                "2",
                "--steps",
                "2",
                "--instances",
                "-q",
            ]
        )
        == 0
    )
    back = read_image_meta(out)
    assert (back.pixel_size, back.crs_epsg, back.transform) == (0.3, 32737, meta.transform)
    res = read_result(out)
    assert set(res) == {"probability", "variance", "mask", "labels"}
    # the file's pixel size was used: the same as giving it by hand
    ref = ns.segment(img, str(path), pixel_size=0.3, instances=True, **FAST)
    np.testing.assert_array_equal(res["probability"], ref.probability)
    np.testing.assert_array_equal(res["labels"], ref.labels)


def test_geojson_one_polygon_per_label_in_map_coordinates(aerial, tmp_path):
    d, path, geo, nocrs, img = aerial
    out = tmp_path / "b.geojson"
    assert (
        main(["segment", str(geo), "-o", str(out), "--model", str(path), "--samples", "2", "--steps", "2", "-q"]) == 0
    )
    fc = json.loads(out.read_text())
    ref = ns.segment(img, str(path), pixel_size=0.3, instances=True, **FAST)
    labels = ref.labels
    assert labels.max() > 0 and len(fc["features"]) == labels.max()
    for f in fc["features"]:  # each polygon carries its object's mean variance (the model's uncertainty)
        inside = labels == f["properties"]["id"]
        assert f["properties"]["mean_variance"] == pytest.approx(ref.variance[inside].mean(), abs=2e-6)
    assert fc["crs"]["properties"]["name"].endswith("32737")
    xs = [x for f in fc["features"] for ring in f["geometry"]["coordinates"] for x, _ in ring]
    ys = [y for f in fc["features"] for ring in f["geometry"]["coordinates"] for _, y in ring]
    assert min(xs) >= 530000 and max(xs) <= 530000 + 64 * 0.3
    assert min(ys) >= 9330000 - 64 * 0.3 and max(ys) <= 9330000
    areas = sorted(f["properties"]["area_px"] for f in fc["features"])
    assert areas == sorted(np.bincount(labels.ravel())[1:].tolist())


def test_table_of_buildings_in_square_metres_from_the_geotiff(aerial, tmp_path, capsys):
    d, path, geo, nocrs, img = aerial
    table = tmp_path / "buildings.csv"
    out = tmp_path / "b.tif"
    args = ["segment", str(geo), "-o", str(out), "--model", str(path), "--samples", "2", "--steps", "2", "-q"]
    assert main([*args, "--table", str(table)]) == 0  # --table turns --instances on
    rows = list(csv.DictReader(table.open()))
    labels = read_result(out)["labels"]
    assert len(rows) == labels.max() > 0
    counts = np.bincount(labels.ravel())[1:]
    assert [int(r["area_px"]) for r in rows] == counts.tolist()
    # the GeoTIFF's 0.3 m pixels: areas in square metres
    assert [float(r["area_m2"]) for r in rows] == pytest.approx((counts * 0.09).tolist(), rel=1e-5)
    assert str(table) in capsys.readouterr().out


def test_geojson_refused_up_front_without_georeferencing(aerial, tmp_path, capsys):
    d, path, geo, nocrs, img = aerial
    assert main(["segment", str(nocrs), "-o", str(tmp_path / "x.geojson"), "--model", str(path)]) == 2
    assert "no coordinate reference system" in capsys.readouterr().err
    png = tmp_path / "plain.png"
    from PIL import Image

    Image.fromarray(img).save(png)
    assert main(["segment", str(png), "-o", str(tmp_path / "y.geojson"), "--model", str(path)]) == 2
    assert "needs a georeferenced input" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.geojson"))


def test_cli_pixel_size_refusals(aerial, tmp_path, capsys):
    d, path, geo, nocrs, img = aerial
    out = tmp_path / "o.tif"
    for args, msg in (
        (["--pixel-size", "0"], "pixel_size must be"),
        (["--pixel-size", "nan"], "pixel_size must be"),
        (["--pixel-size", "0.3", "--pixel-unit", "um"], "unit is probably wrong"),
        (["--pixel-unit", "m"], "--pixel-unit needs --pixel-size"),
    ):
        assert main(["segment", str(geo), "-o", str(out), "--model", str(path), *args]) == 2, args
        assert msg in capsys.readouterr().err
    assert not out.exists()


def test_ome_and_imagej_pixel_sizes_are_read(tmp_path):
    img = np.zeros((16, 16), np.uint8)
    ome = tmp_path / "a.ome.tif"
    tifffile.imwrite(ome, img, ome=True, metadata={"PhysicalSizeX": 0.25, "PhysicalSizeXUnit": "µm"})
    m = read_image_meta(ome)
    assert (m.pixel_size, m.pixel_unit, m.source) == (0.25, "µm", "ome")
    ij = tmp_path / "b.tif"
    tifffile.imwrite(ij, img, imagej=True, resolution=(2.0, 2.0), metadata={"unit": "um"})
    m = read_image_meta(ij)
    assert (m.pixel_size, m.pixel_unit, m.source) == (0.5, "um", "imagej")
    assert read_image_meta(tmp_path / "missing.tif").pixel_size is None
