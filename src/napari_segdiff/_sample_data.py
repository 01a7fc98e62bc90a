"""napari sample data (File > Open Sample > napari-segdiff): an image and its ground-truth mask.

Both images are held-out validation images of the shipped models; their licences and attributions are
in ``sample_data/README.md`` and are also put in each layer's metadata. No Qt here.
"""

from __future__ import annotations

from importlib.resources import files

import numpy as np

from .io import read_image

_NUCLEI_LICENCE = (
    "MoNuSeg 2018 (TCGA-E2-A1B5-01Z-00-DX1), CC BY-NC-SA 4.0 (MoNuSeg challenge organisers). Cite: "
    "N. Kumar et al., IEEE TMI 36(7), 2017; N. Kumar et al., IEEE TMI 39(5), 2020."
)
_BUILDINGS_LICENCE = (
    "Imagery from OpenAerialMap / Open Imagery Network contributors (CC BY 4.0); building footprints "
    "(c) OpenStreetMap contributors (ODbL 1.0); tiles and labels as packaged in hotosm/fAIr-utilities."
)


def _sample(stem: str, licence: str, ext: str = "png", pixel_size: float | None = None) -> list[tuple]:
    """LayerData tuples: the RGB image, then its mask as a Labels layer (0 background, 1 foreground).
    ``pixel_size`` (metres) becomes both layers' scale, which the segmentation widget reads."""
    folder = files("napari_segdiff.sample_data")
    image = read_image(str(folder / f"{stem}.{ext}"))
    mask = (np.asarray(read_image(str(folder / f"{stem}_mask.png"))) > 0).astype(np.uint8)
    meta = {"source": "napari-segdiff sample data", "licence": licence}
    geo = {"scale": (pixel_size, pixel_size)} if pixel_size else {}
    if pixel_size:
        meta["pixel_size_m"] = pixel_size
    return [
        (image, {"name": stem, "rgb": True, "metadata": meta, **geo}, "image"),
        (mask, {"name": f"{stem} ground truth", "metadata": meta, "opacity": 0.5, **geo}, "labels"),
    ]


def nuclei_he() -> list[tuple]:
    """H&E-stained breast tissue (512x512, MoNuSeg) and its nuclei mask."""
    return _sample("nuclei_he", _NUCLEI_LICENCE)


def buildings_aerial() -> list[tuple]:
    """Aerial drone crop (256x256, about 0.15 m/px, Nairobi) and the mask of its central building."""
    return _sample("buildings_aerial", _BUILDINGS_LICENCE)


def buildings_scene() -> list[tuple]:
    """A whole aerial scene (2048x2048 at 0.1485 m/px, Zanzibar, 89 buildings) and every building's mask;
    the layers' scale is the pixel size in metres."""
    return _sample(
        "buildings_scene",
        _BUILDINGS_LICENCE.replace(
            "hotosm/fAIr-utilities", "hotosm/fAIr-utilities (ramp-data TRAIN/HOTOSM/2, Zanzibar area)"
        ),
        ext="jpg",
        pixel_size=0.1485,
    )
