"""Sample data: the manifest's File > Open Sample entries, and the licences that travel with them."""

from importlib.resources import files

import numpy as np
import pytest

from napari_segdiff._sample_data import buildings_aerial, buildings_scene, nuclei_he


@pytest.mark.parametrize(
    "fn, shape", [(nuclei_he, (512, 512, 3)), (buildings_aerial, (256, 256, 3)), (buildings_scene, (2048, 2048, 3))]
)
def test_sample_functions_return_image_and_mask(fn, shape):
    (img, img_kw, img_type), (mask, mask_kw, mask_type) = fn()
    assert (img_type, mask_type) == ("image", "labels")
    assert img.shape == shape and img.dtype == np.uint8 and img_kw["rgb"] is True
    assert mask.shape == shape[:2] and set(np.unique(mask)) == {0, 1}
    assert 0.01 < mask.mean() < 0.5
    assert "CC BY" in img_kw["metadata"]["licence"]


def test_licences_ship_next_to_the_images():
    folder = files("napari_segdiff.sample_data")
    readme = (folder / "README.md").read_text()
    for text in (
        "CC BY-NC-SA 4.0",
        "IEEE TMI 36(7), 2017",
        "IEEE TMI 39(5), 2020",
        "CC BY 4.0",
        "ODbL 1.0",
        "OpenStreetMap contributors",
        "hotosm/fAIr-utilities",
        "OpenAerialMap",
    ):
        assert text in readme, text
    for stem in ("nuclei_he", "buildings_aerial"):
        assert (folder / f"{stem}.png").is_file() and (folder / f"{stem}_mask.png").is_file()
        assert f"{stem}.png" in readme


@pytest.mark.gui
@pytest.mark.parametrize("key, shape", [("nuclei_he", (512, 512)), ("buildings_aerial", (256, 256))])
def test_open_sample_in_napari(make_napari_viewer, key, shape):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-segdiff", key)
    assert [layer.name for layer in viewer.layers] == [key, f"{key} ground truth"]
    image, labels = viewer.layers
    assert image.rgb and image.data.shape == shape + (3,)
    assert labels._type_string == "labels" and labels.data.shape == shape and labels.data.max() == 1
