"""One row per object of an instance label image: size, centroid, shape and the model's own confidence in it.

Pure numpy. Every column is a per-label sum accumulated over blocks of rows (``np.bincount``), so a label
image of any size is measured in memory proportional to its number of objects, and a stack's labels (ids
unique across slices, as ``segment_stack`` makes them) are measured like a 2-D image with the slice index as
extra columns. Shape follows scikit-image's ``regionprops`` (second central moments of the pixel centres):
``major_axis`` and ``minor_axis`` are its ``axis_major_length`` and ``axis_minor_length``.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._errors import SegDiffError

ROWS_PER_BLOCK = 1024  # rows of a 2-D plane measured at a time (bounds the temporary coordinate arrays)


def object_table(
    labels,
    probability=None,
    variance=None,
    pixel_size: float | None = None,
    unit: str | None = None,
) -> dict[str, np.ndarray]:
    """Columns (numpy arrays, one entry per object, in label order) of the objects in ``labels``.

    - ``label``: the object's id; ``plane_0``, ...: its index along each leading axis of a stack;
    - ``area_px``, ``y``, ``x`` (centroid, pixels of this image), ``major_axis_px``, ``minor_axis_px``,
      ``eccentricity`` (0 = a circle);
    - with ``pixel_size`` (and its ``unit``, e.g. ``um`` or ``m``): ``area_<unit>2``, ``major_axis_<unit>``,
      ``minor_axis_<unit>``, ``equivalent_diameter_<unit>``;
    - with ``probability``: ``mean_probability``, the mean of the samples' mean over the object's pixels;
    - with ``variance``: ``mean_variance``, the mean per-pixel variance of the samples over the object: the
      model's uncertainty about this object (to review the doubtful objects first, the lowest
      ``mean_probability`` is the measured better order: :func:`napari_segdiff.review.rank_objects`).
    """
    lab = np.asarray(labels)
    if lab.ndim < 2:
        raise SegDiffError(f"labels must be an image (H, W) or a stack (..., H, W), got shape {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer):
        raise SegDiffError(f"labels must hold integer object ids, got dtype {lab.dtype}")
    if lab.size and lab.min() < 0:
        raise SegDiffError("labels must be >= 0 (0 = background)")
    extra = {}
    for name, arr in (("probability", probability), ("variance", variance)):
        if arr is not None:
            a = arr if hasattr(arr, "shape") and hasattr(arr, "__getitem__") else np.asarray(arr)
            if tuple(a.shape) != lab.shape:
                raise SegDiffError(f"{name} {tuple(a.shape)} and labels {lab.shape} must have the same shape")
            extra[name] = a
    if pixel_size is not None:
        if not (isinstance(pixel_size, (int, float)) and math.isfinite(pixel_size) and pixel_size > 0):
            raise SegDiffError(f"pixel_size must be a number > 0, got {pixel_size!r}")
        if not unit:
            raise SegDiffError("pixel_size needs its unit (e.g. 'um' or 'm')")

    n = int(lab.max()) + 1 if lab.size else 1
    lead = lab.shape[:-2]
    sums = {k: np.zeros(n) for k in ("n", "y", "x", "yy", "xx", "xy", *extra)}
    planes = [np.zeros(n, np.int64) for _ in lead]
    for idx in np.ndindex(*lead) if lead else [()]:
        plane = lab[idx]
        for r0 in range(0, plane.shape[0], ROWS_PER_BLOCK):
            block = plane[r0 : r0 + ROWS_PER_BLOCK].astype(np.int64)
            flat = block.ravel()
            if not flat.any():
                continue
            yy, xx = np.indices(block.shape, dtype=np.float64)
            yy += r0
            y, x = yy.ravel(), xx.ravel()
            sums["n"] += np.bincount(flat, minlength=n)
            for key, w in (("y", y), ("x", x), ("yy", y * y), ("xx", x * x), ("xy", y * x)):
                sums[key] += np.bincount(flat, weights=w, minlength=n)
            for key, a in extra.items():
                # a block at a time: a zarr-backed probability or variance is never read whole
                vals = np.asarray(a[(*idx, slice(r0, r0 + ROWS_PER_BLOCK))], np.float64).ravel()
                sums[key] += np.bincount(flat, weights=vals, minlength=n)
            if lead:
                present = np.unique(flat)
                for p, i in zip(planes, idx):
                    p[present] = i
    ids = np.flatnonzero(sums["n"])
    ids = ids[ids > 0]
    area = sums["n"][ids]
    cy, cx = sums["y"][ids] / area, sums["x"][ids] / area
    # the covariance of the pixel centres (regionprops' inertia tensor) and its eigenvalues
    vyy = sums["yy"][ids] / area - cy * cy
    vxx = sums["xx"][ids] / area - cx * cx
    vxy = sums["xy"][ids] / area - cy * cx
    mid, half = (vyy + vxx) / 2, np.sqrt(((vyy - vxx) / 2) ** 2 + vxy**2)
    l1, l2 = np.maximum(mid + half, 0), np.maximum(mid - half, 0)
    table: dict[str, np.ndarray] = {"label": ids.astype(np.int64)}
    for i, p in enumerate(planes):
        table[f"plane_{i}"] = p[ids]
    table.update(
        area_px=area.astype(np.int64),
        y=cy,
        x=cx,
        major_axis_px=4 * np.sqrt(l1),
        minor_axis_px=4 * np.sqrt(l2),
        eccentricity=np.sqrt(np.divide(l1 - l2, l1, out=np.zeros_like(l1), where=l1 > 0)),
    )
    if pixel_size is not None:
        s = float(pixel_size)
        table[f"area_{unit}2"] = area * s * s
        table[f"major_axis_{unit}"] = table["major_axis_px"] * s
        table[f"minor_axis_{unit}"] = table["minor_axis_px"] * s
        table[f"equivalent_diameter_{unit}"] = np.sqrt(4 * area / np.pi) * s
    for key in extra:
        table[f"mean_{key}"] = sums[key][ids] / area
    return table


def result_table(result) -> dict[str, np.ndarray]:
    """:func:`object_table` of a segmentation result: its labels, probability and variance, in physical
    units where the run was given the image's pixel size (``info['pixel_size']``)."""
    if getattr(result, "labels", None) is None:
        raise SegDiffError("this result has no objects: segment with instances=True (CLI: --instances)")
    info = getattr(result, "info", None) or {}
    return object_table(
        result.labels,
        getattr(result, "probability", None),
        getattr(result, "variance", None),
        pixel_size=info.get("pixel_size"),
        unit=info.get("pixel_unit"),
    )


def table_csv(table: Mapping[str, Any]) -> str:
    """The table as CSV text: a header row, then one row per object (floats to 6 significant digits)."""
    cols = list(table)
    arrays = [np.asarray(table[c]) for c in cols]
    return _csv(cols, ([_cell(v) for v in row] for row in zip(*arrays)))


def tables_csv(tables: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """Several images' tables as one CSV: an ``image`` column first (the name each table comes with), then
    the union of their columns in order of first appearance; a column one image lacks (physical units where
    only some files recorded a pixel size, the plane of a stack) is left empty in its rows. An image with no
    objects adds no row."""
    cols: list[str] = []
    for _, t in tables:
        cols += [c for c in t if c not in cols]

    def rows():
        for name, t in tables:
            arrays = {c: np.asarray(v) for c, v in t.items()}
            for i in range(len(next(iter(arrays.values()))) if arrays else 0):
                yield [name, *(_cell(arrays[c][i]) if c in arrays else "" for c in cols)]

    return _csv(["image", *cols], rows())


def _csv(header: list[str], rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _cell(v) -> str | int:
    return f"{v:.6g}" if isinstance(v, (float, np.floating)) else int(v)


def write_csv(path, table: Mapping[str, Any] | Sequence[tuple[str, Mapping[str, Any]]]) -> None:
    """:func:`table_csv` of one table, or :func:`tables_csv` of (image name, table) pairs, written to a temp
    name beside ``path``, then renamed."""
    from .io import atomic_write_bytes

    text = table_csv(table) if isinstance(table, Mapping) else tables_csv(table)
    atomic_write_bytes(path, lambda f: f.write(text.encode()))
