"""Pixel sizes: what a model was trained at, what an image has, and the factor between them.

A model file records its native pixel size in ``meta['pixel_size']`` and ``meta['pixel_unit']``
(nuclei-he: 0.49 um, the MoNuSeg 40x tiles resized 1000 -> 512; the aerial models: metres). When the caller
gives the image's pixel size, the engine resizes each tile by ``factor = image pixel / model pixel`` (on top
of the model's own ``input_scale``), so the network sees objects at the size it learned, and resizes the
probability and variance back: the outputs stay on the image's grid.
"""

from __future__ import annotations

import math
from typing import Any

from ._errors import SegDiffError

#: length units in metres; aliases as napari, OME and GeoTIFF spell them
UNITS: dict[str, float] = {
    "nm": 1e-9,
    "nanometer": 1e-9,
    "nanometre": 1e-9,
    "um": 1e-6,
    "µm": 1e-6,
    "μm": 1e-6,
    "micron": 1e-6,
    "micrometer": 1e-6,
    "micrometre": 1e-6,
    "mm": 1e-3,
    "millimeter": 1e-3,
    "millimetre": 1e-3,
    "cm": 1e-2,
    "centimeter": 1e-2,
    "centimetre": 1e-2,
    "m": 1.0,
    "meter": 1.0,
    "metre": 1.0,
    "metres": 1.0,
    "meters": 1.0,
    "km": 1e3,
    "kilometer": 1e3,
    "kilometre": 1e3,
}
#: the factor between image and model pixels that is accepted; beyond it the unit is almost surely wrong
MAX_FACTOR = 16.0


def unit_metres(unit: str) -> float:
    key = str(unit).strip().lower() if unit is not None else ""
    if key.startswith("micro") and key not in UNITS:
        key = "micron"
    if key not in UNITS:
        raise SegDiffError(f"unknown pixel unit {unit!r}; use one of nm, um, mm, cm, m, km")
    return UNITS[key]


def model_pixel_size(meta: dict[str, Any]) -> tuple[float, str] | None:
    """(size, unit) a model was trained at, or None where its file does not say."""
    size, unit = meta.get("pixel_size"), meta.get("pixel_unit")
    if size is None or unit is None:
        return None
    return float(size), str(unit)


def check_pixel_size(pixel_size) -> float:
    try:
        v = float(pixel_size)
    except (TypeError, ValueError):
        raise SegDiffError(f"pixel_size must be a positive number, got {pixel_size!r}") from None
    if isinstance(pixel_size, bool) or not math.isfinite(v) or v <= 0:
        raise SegDiffError(
            f"pixel_size must be a finite number > 0 (the image's pixel size, e.g. 0.3 for "
            f"0.3 m per pixel), got {pixel_size!r}"
        )
    return v


def scale_factor(pixel_size, pixel_unit: str | None, meta: dict[str, Any], model_name: str = "model") -> float:
    """image pixel / model pixel (> 1: the image's pixels are larger, so tiles are enlarged). 1.0 when
    ``pixel_size`` is None."""
    if pixel_size is None:
        if pixel_unit is not None:
            raise SegDiffError("pixel_unit was given without pixel_size; give both, or neither")
        return 1.0
    size = check_pixel_size(pixel_size)
    native = model_pixel_size(meta)
    if native is None:
        raise SegDiffError(
            f"model {model_name!r} does not record the pixel size it was trained at, so an image "
            f"pixel size cannot be matched to it; leave pixel_size out (the image is then used "
            f"as it is), or export the model with --pixel-size"
        )
    msize, munit = native
    unit = munit if pixel_unit is None else pixel_unit
    factor = size * unit_metres(unit) / (msize * unit_metres(munit))
    if not 1.0 / MAX_FACTOR <= factor <= MAX_FACTOR:
        raise SegDiffError(
            f"pixel size {size:g} {unit} is {factor:.3g} times model {model_name!r}'s native "
            f"{msize:g} {munit}: more than x{MAX_FACTOR:g} apart, so the unit is probably wrong "
            f"(this model works in {munit}); resample the image first if it really is that coarse "
            f"or fine"
        )
    return factor
