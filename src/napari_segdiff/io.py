"""Reading and writing images and results: tiff/png/jpg/zarr in, tiff, zarr or GeoJSON out, atomically,
never over, inside or around the input.

Also what a file says about its pixels: the pixel size (OME-TIFF PhysicalSizeX, ImageJ's calibration,
the GeoTIFF ModelPixelScale, or the TIFF resolution tags in centimetres) and the GeoTIFF georeferencing
(kept in a GeoTIFF output, used for GeoJSON polygons).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import SegDiffError

WRITE_EXT = {".tif", ".tiff", ".zarr", ".geojson"}
READ_EXT = {".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".zarr"}
#: GeoTIFF tags copied from the input to a TIFF output: ModelPixelScale, ModelTiepoint, ModelTransformation,
#: GeoKeyDirectory, GeoDoubleParams, GeoAsciiParams
GEO_TAGS = (33550, 33922, 34264, 34735, 34736, 34737)


def atomic_write_bytes(path: str | os.PathLike, write) -> None:
    """Call ``write(fileobj)`` on a temp file beside ``path``, fsync, then rename over ``path``.
    A failure (disk full, Ctrl-C) leaves any previous file untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions a plain open() would
    try:
        with open(tmp, "wb") as f:  # opened by name: writers such as tifffile need ``f.name`` to be a path
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _pil_mode_image(p: Path) -> np.ndarray:
    """PNG/JPEG/BMP through Pillow, with colour modes made explicit: CMYK and YCbCr become RGB, palette
    images their colours, grey+alpha its grey; anything else unknown is refused by name."""
    from PIL import Image

    with Image.open(p) as im:
        mode = im.mode
        if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            return np.asarray(im.convert("RGB"))
        if mode in ("P", "PA"):
            return np.asarray(im.convert("RGBA" if "transparency" in im.info or mode == "PA" else "RGB"))
        if mode == "LA":
            return np.asarray(im.convert("L"))
        if mode in ("1",):
            return np.asarray(im.convert("L"))
        if mode in ("L", "RGB", "RGBA", "I", "F", "I;16", "I;16B", "I;16L"):
            return np.asarray(im)
    raise SegDiffError(
        f"{str(p)!r} has colour mode {mode!r}, which napari-segdiff does not read; save it as RGB or greyscale"
    )


def is_zarr(p: Path) -> bool:
    """A .zarr folder, or a zarr array or group folder inside one (``data.zarr/0``)."""
    return p.suffix.lower() == ".zarr" or (
        p.is_dir() and any((p / f).exists() for f in (".zarray", ".zgroup", "zarr.json"))
    )


def read_image(path: str | os.PathLike, lazy: bool = False, series: int | None = None):
    """Read an image. ``.zarr`` (and big tiffs when ``lazy``) come back as lazy dask arrays. A TIFF with more
    than one series gives ``series`` (default 0; a warning names the others)."""
    p = Path(path)
    if not p.exists():
        raise SegDiffError(f"input {str(p)!r} does not exist")
    ext = p.suffix.lower()
    try:
        if is_zarr(p):
            import dask.array as da
            import zarr

            z = zarr.open(str(p), mode="r")
            if hasattr(z, "shape"):
                return da.from_zarr(z)
            # a group: take the first array (or level 0 of a multiscale)
            for key in ("0", "image", "data"):
                if key in z:
                    return da.from_zarr(z[key])
            keys = list(z.array_keys())
            if not keys:
                raise SegDiffError(f"zarr group {str(p)!r} holds no array")
            return da.from_zarr(z[keys[0]])
        if ext in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(str(p)) as tf:
                n = len(tf.series)
                if n == 0:
                    raise SegDiffError(f"{str(p)!r} holds no image")
                k = 0 if series is None else int(series)
                if not 0 <= k < n:
                    raise SegDiffError(f"{str(p)!r} has {n} series (0-{n - 1}); series {series} does not exist")
                if n > 1:
                    import warnings

                    shapes = ", ".join(f"{i}: {tuple(s.shape)}" for i, s in enumerate(tf.series[:6]))
                    warnings.warn(
                        f"{p.name} holds {n} image series ({shapes}); segmenting series {k} "
                        f"(choose another with --series)",
                        stacklevel=2,
                    )
                if not lazy:
                    data = tf.series[k].asarray()
                    return data
            if lazy:
                import dask.array as da
                import zarr

                store = tifffile.imread(str(p), aszarr=True, series=k)
                return da.from_zarr(zarr.open(store, mode="r"))
        if ext in (".png", ".jpg", ".jpeg", ".bmp"):
            return _pil_mode_image(p)
    except SegDiffError:
        raise
    except Exception as e:
        raise SegDiffError(f"cannot read {str(p)!r} as an image: {type(e).__name__}: {e}") from None
    raise SegDiffError(f"unknown image format {ext!r} for {str(p)!r}; use one of {sorted(READ_EXT)}")


# ------------------------------------------------------------------ what a file says about its pixels
@dataclass
class ImageMeta:
    """Pixel size (with unit and where it came from) and GeoTIFF georeferencing of an input file."""

    pixel_size: float | None = None
    pixel_unit: str | None = None
    source: str | None = None  # ome | imagej | geotiff | resolution
    geo_tags: list[tuple] = field(default_factory=list)  # (code, dtype, count, value) for tifffile extratags
    crs_epsg: int | None = None
    transform: tuple[float, float, float, float] | None = None  # x0, y0 (top-left corner), sx, sy


def read_image_meta(path: str | os.PathLike) -> ImageMeta:
    """What ``path`` records about its pixels; empty for formats that record nothing we use."""
    p = Path(path)
    meta = ImageMeta()
    if p.suffix.lower() not in (".tif", ".tiff") or not p.is_file():
        return meta
    import tifffile

    try:
        with tifffile.TiffFile(str(p)) as tf:
            page = tf.pages[0]
            tags = page.tags
            for code in GEO_TAGS:
                t = tags.get(code)
                if t is not None:
                    meta.geo_tags.append((code, t.dtype, t.count, t.value))
            if 34735 in tags:
                keys = np.asarray(tags[34735].value).reshape(-1, 4)
                for kid, loc, _count, val in keys[1:]:
                    if kid in (3072, 2048) and loc == 0:  # ProjectedCSType, GeographicType
                        meta.crs_epsg = int(val) if val not in (0, 32767) else meta.crs_epsg
                        if kid == 3072:
                            break
            if 33550 in tags and 33922 in tags:
                sx, sy = (float(v) for v in tags[33550].value[:2])
                tp = tags[33922].value
                i, j, x, y = float(tp[0]), float(tp[1]), float(tp[3]), float(tp[4])
                meta.transform = (x - i * sx, y + j * sy, sx, sy)
            if tf.is_ome and tf.ome_metadata:
                import re

                m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tf.ome_metadata)
                u = re.search(r'PhysicalSizeXUnit="([^"]+)"', tf.ome_metadata)
                if m:
                    meta.pixel_size, meta.pixel_unit, meta.source = (
                        float(m.group(1)),
                        (u.group(1) if u else "um"),
                        "ome",
                    )
                    return meta
            ij = tf.imagej_metadata or {}
            if ij.get("unit") and 282 in tags and ij["unit"] not in ("pixel", "pixels"):
                num, den = tags[282].value
                if num:
                    meta.pixel_size, meta.pixel_unit, meta.source = den / num, str(ij["unit"]), "imagej"
                    return meta
            if meta.transform is not None and meta.crs_epsg is not None and not (4000 <= meta.crs_epsg < 5000):
                meta.pixel_size, meta.pixel_unit, meta.source = meta.transform[2], "m", "geotiff"
                return meta
            if 282 in tags and 296 in tags and int(tags[296].value) == 3:  # resolution in pixels per centimetre
                num, den = tags[282].value
                if num:
                    meta.pixel_size, meta.pixel_unit, meta.source = den / num, "cm", "resolution"
    except Exception:  # unreadable metadata is not an error: the image itself is read (and checked) elsewhere
        return ImageMeta()
    return meta


# ------------------------------------------------------------------ the output guard
def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _within(inner: Path, outer: Path) -> bool:
    try:
        inner.resolve().relative_to(outer.resolve())
        return True
    except ValueError:
        return False


def _input_paths(i) -> list[Path]:
    """The files or stores an input reads: a path, or the store behind a dask/zarr array."""
    if isinstance(i, (str, os.PathLike)):
        return [Path(i)]
    out = []
    for obj in (i, getattr(i, "store", None)):
        for attr in ("path", "root", "dir_path"):
            v = getattr(obj, attr, None)
            if isinstance(v, (str, os.PathLike)) and str(v):
                out.append(Path(v))
    # a dask array built with da.from_zarr: its graph holds the zarr array
    dask_graph = getattr(i, "dask", None)
    if dask_graph is not None:
        try:
            for v in dict(dask_graph).values():
                if hasattr(v, "store") and hasattr(v, "shape"):
                    out.extend(_input_paths(v))
        except Exception:
            pass
    return out


def check_output(
    out: str | os.PathLike, inputs: list, overwrite: bool, formats: bool = True, how: str = "pass --overwrite"
) -> Path:
    """The one output guard (CLI, ``segment(out=)``, export, pack, eval --json). Refuses an output that is an
    input, lies inside one or holds one; an existing output without ``overwrite``; and an output that cannot
    be written (checked now, before any work)."""
    out = Path(out)
    for i in inputs:
        for ip in _input_paths(i):
            if _same_file(ip, out) or ip.resolve() == out.resolve():
                raise SegDiffError(
                    f"output {str(out)!r} is the input; choose another output path "
                    "(napari-segdiff never writes over its input)"
                )
            if _within(ip, out):
                raise SegDiffError(
                    f"output {str(out)!r} contains the input {str(ip)!r}: writing it would delete "
                    "the input; choose an output outside it"
                )
            if _within(out, ip):
                raise SegDiffError(
                    f"output {str(out)!r} lies inside the input {str(ip)!r}; choose an output outside it"
                )
    if formats and out.suffix.lower() not in WRITE_EXT:
        raise SegDiffError(f"unknown output format {out.suffix!r} for {str(out)!r}; use .tif/.tiff, .zarr or .geojson")
    if out.exists() and not overwrite:
        raise SegDiffError(f"output {str(out)!r} already exists; choose another path or {how}")
    check_writable(out, dir_ok=out.suffix.lower() == ".zarr" or not formats)
    return out


def check_writable(out: str | os.PathLike, dir_ok: bool = False) -> Path:
    """Refuse before the work what would fail after it: a directory where a file goes, a parent that is a file
    or not writable."""
    out = Path(out)
    if out.is_dir() and not dir_ok:
        raise SegDiffError(f"output {str(out)!r} is a directory; give a file name")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SegDiffError(f"cannot write {str(out)!r}: {str(parent)!r} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SegDiffError(f"cannot write {str(out)!r}: no write permission in {str(parent)!r}")
    return out


def atomic_replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    else:
        os.replace(tmp, final)


# ------------------------------------------------------------------ results
def write_result(
    result, out: str | os.PathLike, *, overwrite: bool = False, inputs: tuple = (), meta: ImageMeta | None = None
) -> Path:
    """Write a result. ``.zarr``: a group of arrays (probability, variance, mask, and labels when present).
    ``.tif``: one page each: probability (float32), variance (float32), mask (uint8 0/1) and labels
    (int32); with a GeoTIFF input (``meta``) every page carries its georeferencing. ``.geojson``: one polygon per
    instance label, in the input's map coordinates. Written to a temp name, then renamed."""
    import tifffile

    out = check_output(out, list(inputs), overwrite)
    ext = out.suffix.lower()
    out.parent.mkdir(parents=True, exist_ok=True)
    names = ["probability", "variance", "mask"] + (["labels"] if getattr(result, "labels", None) is not None else [])
    if ext == ".geojson":
        if getattr(result, "labels", None) is None:
            raise SegDiffError("GeoJSON output holds one polygon per object: run with instances (--instances)")
        from .objects import result_table

        fc = labels_to_geojson(np.asarray(result.labels), meta, result.info, result_table(result))
        atomic_write_bytes(out, lambda f: f.write(json.dumps(fc).encode()))
        return out
    if ext == ".zarr":
        import zarr

        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            g = zarr.open_group(str(tmp), mode="w")
            for name in names:
                arr = np.asarray(getattr(result, name))
                chunks = (1,) * (arr.ndim - 2) + tuple(min(256, s) for s in arr.shape[-2:])
                g.create_array(name, data=arr, chunks=chunks) if hasattr(g, "create_array") else g.create_dataset(
                    name, data=arr, chunks=chunks
                )
            g.attrs.update(_jsonable(result.info))
            atomic_replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out
    if ext in (".tif", ".tiff"):
        pages = [
            np.asarray(result.probability, np.float32),
            np.asarray(result.variance, np.float32),
            np.asarray(result.mask).astype(np.uint8),
        ]
        if "labels" in names:
            pages.append(np.asarray(result.labels).astype(np.int32))
        extratags = list(meta.geo_tags) if meta is not None else []
        info = {k: str(v) for k, v in result.info.items()}

        def write(f):
            with tifffile.TiffWriter(f) as tw:
                for name, page in zip(names, pages):
                    # a shaped series per output (tifffile's JSON description names it): four series on reading
                    tw.write(
                        page,
                        photometric="minisblack",
                        metadata={"name": name, **info},
                        extratags=extratags,
                        contiguous=False,
                    )

        atomic_write_bytes(out, write)
        return out
    raise SegDiffError(f"unknown output format {ext!r}; use .tif/.tiff, .zarr or .geojson")


def labels_to_geojson(
    labels: np.ndarray, meta: ImageMeta | None, info: dict[str, Any] | None = None, table: dict | None = None
) -> dict:
    """One Feature per instance id (its outer boundary, holes as inner rings), in the map coordinates of a
    georeferenced input; the CRS is named as an EPSG code. With ``table`` (:func:`napari_segdiff.objects.
    object_table` of the run) each polygon also carries its object's mean probability and mean variance."""
    from skimage.measure import find_contours, regionprops

    if meta is None or meta.transform is None:
        raise SegDiffError(
            "GeoJSON output needs a georeferenced input (a GeoTIFF with ModelPixelScale and "
            "ModelTiepoint); write .tif or .zarr for this image"
        )
    if meta.crs_epsg is None:
        raise SegDiffError(
            "the input GeoTIFF has no coordinate reference system (no EPSG code in its GeoKeys), so "
            "its polygons could not be placed on a map; write .tif or .zarr, or add the CRS first "
            "(e.g. gdal_edit.py -a_srs EPSG:XXXX)"
        )
    if labels.ndim != 2:
        raise SegDiffError(f"GeoJSON output works on 2-D images; this result has shape {labels.shape}")
    x0, y0, sx, sy = meta.transform
    scores = {}
    for key in ("mean_probability", "mean_variance"):
        if table is not None and key in table:
            scores[key] = dict(zip(np.asarray(table["label"]).tolist(), np.asarray(table[key]).tolist()))
    feats = []
    for rp in regionprops(labels):
        r0, c0, r1, c1 = rp.bbox
        sub = np.pad(rp.image, 1).astype(np.float32)
        rings = []
        for cont in find_contours(sub, 0.5):
            rows, cols = cont[:, 0] - 1 + r0 + 0.5, cont[:, 1] - 1 + c0 + 0.5  # pixel centres -> raster coords
            ring = [[x0 + c * sx, y0 - r * sy] for r, c in zip(rows, cols)]
            if ring[0] != ring[-1]:
                ring.append(ring[0])
            rings.append(ring)
        rings.sort(key=lambda rg: -abs(_ring_area(rg)))
        area_m2 = float(rp.area) * sx * sy
        feats.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": rings},
                "properties": {
                    "id": int(rp.label),
                    "area_px": int(rp.area),
                    "area": round(area_m2, 3),
                    **{k: round(v[rp.label], 6) for k, v in scores.items()},
                },
            }
        )
    return {
        "type": "FeatureCollection",
        "crs": {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{meta.crs_epsg}"}},
        "features": feats,
        "properties": _jsonable(info or {}),
    }


def _ring_area(ring) -> float:
    a = np.asarray(ring)
    return 0.5 * float(np.dot(a[:-1, 0], a[1:, 1]) - np.dot(a[1:, 0], a[:-1, 1]))


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in d.items()}


def read_result(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A written result back as {name: array} (probability, variance, mask, labels when present)."""
    p = Path(path)
    if p.suffix.lower() == ".zarr":
        import zarr

        g = zarr.open_group(str(p), mode="r")
        return {k: np.asarray(g[k]) for k in ("probability", "variance", "mask", "labels") if k in g}
    import tifffile

    out = {}
    with tifffile.TiffFile(str(p)) as tf:
        for k, s in enumerate(tf.series):
            try:
                name = tf.shaped_metadata[k]["name"]
            except (ValueError, KeyError, TypeError, IndexError):
                name = ("probability", "variance", "mask", "labels")[k]
            out[name] = s.asarray()
    return out


def check_file_output(out: str | os.PathLike, inputs: list, overwrite: bool, suffixes: tuple[str, ...] = ()) -> Path:
    """The output guard for single files that are not segmentation results (model files, packed checkpoints,
    reports): never an input, never a training run's own ``last.pt``/``best.pt``, an existing file only with
    ``overwrite``, and writable (checked before the work)."""
    out = Path(out)
    if suffixes and out.suffix.lower() not in suffixes:
        raise SegDiffError(f"output {str(out)!r} must end in {' or '.join(suffixes)}")
    for i in inputs:
        for ip in _input_paths(i):
            if _same_file(ip, out) or ip.resolve() == out.resolve():
                raise SegDiffError(f"output {str(out)!r} is the input; choose another output path")
    if out.name in ("last.pt", "best.pt") and (out.parent / "config.json").exists():
        raise SegDiffError(
            f"{str(out)!r} is a training run's own checkpoint (beside its config.json): writing "
            f"there would replace it; choose another output path"
        )
    if out.exists() and not overwrite:
        raise SegDiffError(f"output {str(out)!r} already exists; choose another path or pass --overwrite")
    return check_writable(out)
