"""Training data layouts: folder, MoNuSeg (tif + XML polygons), Vaihingen; validation splits."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from skimage.io import imsave

from napari_segdiff._errors import SegDiffError
from napari_segdiff.training.datasets import (
    Sample,
    load_dataset,
    load_folder,
    load_monuseg,
    load_vaihingen,
    rasterise_monuseg_xml,
    split_samples,
)


def _xml(polygons) -> str:
    regions = []
    for i, pts in enumerate(polygons, 1):
        verts = "".join(f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in pts)
        regions.append(f'<Region Id="{i}" Type="0"><Attributes/><Vertices>{verts}</Vertices></Region>')
    return (
        '<?xml version="1.0" encoding="UTF-8"?><Annotations MicronsPerPixel="0.25">'
        '<Annotation Id="1"><Attributes><Attribute Name="Nucleus" Id="0" Value=""/></Attributes>'
        '<Regions><RegionAttributeHeaders><AttributeHeader Id="9999" Name="Region"/></RegionAttributeHeaders>'
        + "".join(regions)
        + "</Regions><Plots/></Annotation></Annotations>"
    )


RECT = [(2, 3), (10, 3), (10, 8), (2, 8)]  # X (column) 2..10, Y (row) 3..8
TRIANGLE = [(14.5, 12.5), (19.5, 12.5), (14.5, 17.5)]


def test_monuseg_xml_rasteriser(tmp_path):
    p = tmp_path / "a.xml"
    p.write_text(_xml([RECT, TRIANGLE, [(1, 1), (3, 3)]]))  # a 2-vertex region is ignored
    mask = rasterise_monuseg_xml(p, (20, 24))
    assert mask.shape == (20, 24) and mask.dtype == bool
    # X is the column, Y the row: the rectangle is wider than tall
    assert mask[4:8, 3:10].all()  # strictly inside
    outside = np.ones((20, 24), bool)
    outside[2:10, 1:12] = False  # the rectangle with a 1-pixel tolerance ring
    outside[11:19, 13:21] = False  # the triangle's bounding box with a ring
    assert not mask[outside].any()
    rect_area = mask[2:10, 1:12].sum()
    assert 4 * 7 <= rect_area <= 6 * 9
    # triangle: the pixel near the right angle is in, the far corner of its box is out
    assert mask[13, 15] and not mask[17, 19]
    assert 8 <= mask[11:19, 13:21].sum() <= 21


def test_monuseg_polygons_are_clipped_to_the_image(tmp_path):
    p = tmp_path / "b.xml"
    p.write_text(_xml([[(-5, -5), (30, -5), (30, 4), (-5, 4)]]))
    mask = rasterise_monuseg_xml(p, (10, 12))
    assert mask[:4].all() and not mask[5:].any()


def test_load_monuseg_pairs_images_with_annotations(tmp_path):
    (tmp_path / "Tissue Images").mkdir()
    (tmp_path / "Annotations").mkdir()
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (20, 24, 3)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "Tissue Images" / "TCGA-1.tif", img)
    tifffile.imwrite(tmp_path / "Tissue Images" / "unannotated.tif", img)
    (tmp_path / "Annotations" / "TCGA-1.xml").write_text(_xml([RECT]))
    samples = load_monuseg(tmp_path, size=None)
    assert [s.name for s in samples] == ["TCGA-1"]
    np.testing.assert_array_equal(samples[0].image, img)
    np.testing.assert_array_equal(
        samples[0].mask, rasterise_monuseg_xml(tmp_path / "Annotations" / "TCGA-1.xml", (20, 24))
    )
    resized = load_monuseg(tmp_path, size=40)[0]
    assert resized.image.shape == (40, 40, 3) and resized.mask.shape == (40, 40) and resized.mask.any()
    with pytest.raises(SegDiffError, match="MoNuSeg"):
        load_monuseg(tmp_path / "Tissue Images", size=None)


def _write_vaihingen(root, numbers, ext=".tif"):
    out = {}
    rng = np.random.default_rng(1)
    for n in numbers:
        img = rng.integers(0, 255, (12, 10, 3)).astype(np.uint8)
        mask = rng.random((12, 10)) > 0.5
        tifffile.imwrite(root / f"building_{n:03d}{ext}", img)
        tifffile.imwrite(root / f"building_mask_{n:03d}{ext}", mask.astype(np.uint8) * 255)
        out[f"building_{n:03d}"] = (img, mask)
    return out


def test_vaihingen_layout(tmp_path):
    written = _write_vaihingen(tmp_path, [1, 2, 100, 101, 168])
    (tmp_path / "sub").mkdir()
    written.update(_write_vaihingen(tmp_path / "sub", [50], ext=".tiff"))
    train = load_vaihingen(tmp_path, "train")
    test = load_vaihingen(tmp_path, "test")
    assert sorted(s.name for s in train) == ["building_001", "building_002", "building_050", "building_100"]
    assert sorted(s.name for s in test) == ["building_101", "building_168"]
    for s in train + test:
        img, mask = written[s.name]
        np.testing.assert_array_equal(s.image, img)
        np.testing.assert_array_equal(s.mask, mask)
        assert s.mask.dtype == bool
    assert [s.name for s in load_dataset(tmp_path, "vaihingen")] == [s.name for s in train]


def test_vaihingen_missing_mask_and_empty(tmp_path):
    tifffile.imwrite(tmp_path / "building_007.tif", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(SegDiffError, match="building_mask_007"):
        load_vaihingen(tmp_path)
    with pytest.raises(SegDiffError, match="Vaihingen"):
        load_vaihingen(tmp_path, "test")


def test_folder_loader(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 255, (9, 11, 3)).astype(np.uint8)
    grey16 = rng.integers(0, 4000, (9, 11)).astype(np.uint16)
    mask255 = (rng.random((9, 11)) > 0.5).astype(np.uint8) * 255
    labels = rng.integers(0, 4, (9, 11)).astype(np.uint16)
    imsave(tmp_path / "images" / "a.png", rgb, check_contrast=False)
    imsave(tmp_path / "masks" / "a.png", mask255, check_contrast=False)
    tifffile.imwrite(tmp_path / "images" / "b.tif", grey16)
    tifffile.imwrite(tmp_path / "masks" / "b.tif", labels)
    (tmp_path / "images" / "notes.txt").write_text("ignored")
    samples = load_folder(tmp_path)
    assert [s.name for s in samples] == ["a", "b"]
    a, b = samples
    np.testing.assert_array_equal(a.image, rgb)
    np.testing.assert_array_equal(a.mask, mask255 > 0)
    assert b.image.shape == (9, 11, 3) and b.image.dtype == np.uint8
    assert (b.image[..., 0] == b.image[..., 1]).all()
    # 16-bit grey is scaled by its maximum to 0..255, keeping the order of values
    assert b.image[..., 0].max() == 255
    order = np.argsort(grey16.ravel(), kind="stable")
    assert (np.diff(b.image[..., 0].ravel()[order].astype(int)) >= 0).all()
    np.testing.assert_array_equal(b.mask, labels > 0)


def test_folder_loader_errors(tmp_path):
    with pytest.raises(SegDiffError, match="images/ and masks/"):
        load_folder(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(SegDiffError, match="no images"):
        load_folder(tmp_path)
    tifffile.imwrite(tmp_path / "images" / "x.tif", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(SegDiffError, match="no mask"):
        load_folder(tmp_path)
    tifffile.imwrite(tmp_path / "masks" / "x.tif", np.zeros((5, 4), np.uint8))
    with pytest.raises(SegDiffError, match="mask"):
        load_folder(tmp_path)
    with pytest.raises(SegDiffError, match="format"):
        load_dataset(tmp_path, "coco")


def _samples(n):
    return [Sample(f"s{i:02d}", np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2), bool)) for i in range(n)]


@pytest.mark.parametrize("n,frac", [(2, 0.2), (10, 0.2), (37, 0.3)])
def test_split_fraction_is_reproducible_and_disjoint(n, frac):
    s = _samples(n)
    tr, va = split_samples(s, frac, seed=3)
    tr2, va2 = split_samples(s, str(frac), seed=3)
    assert [x.name for x in tr] == [x.name for x in tr2] and [x.name for x in va] == [x.name for x in va2]
    assert not {x.name for x in tr} & {x.name for x in va}
    assert sorted(x.name for x in tr + va) == [x.name for x in s]
    assert len(va) == max(1, round(frac * n)) and tr
    if n >= 10:
        others = {tuple(x.name for x in split_samples(s, frac, seed=k)[1]) for k in range(6)}
        assert len(others) > 1  # the seed matters


def test_split_by_names_and_file(tmp_path):
    s = _samples(5)
    tr, va = split_samples(s, "s01,s03")
    assert [x.name for x in va] == ["s01", "s03"] and [x.name for x in tr] == ["s00", "s02", "s04"]
    assert [x.name for x in split_samples(s, ["s04"])[1]] == ["s04"]
    f = tmp_path / "val.txt"
    f.write_text("# held out\ns02\n\ns00\n")
    assert [x.name for x in split_samples(s, str(f))[1]] == ["s00", "s02"]
    assert split_samples(s, "")[1] == []
    with pytest.raises(SegDiffError, match="s09"):
        split_samples(s, "s09")
    with pytest.raises(SegDiffError, match="no training"):
        split_samples(s, ",".join(x.name for x in s))
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(SegDiffError):
            split_samples(s, bad)
