"""Reading and writing images and results: tiff/png/jpg/zarr in, tiff or zarr out, atomically,
never over the input."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import SegDiffError

WRITE_EXT = {".tif", ".tiff", ".zarr"}
READ_EXT = {".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".zarr"}


def read_image(path: str | os.PathLike, lazy: bool = False):
    """Read an image. ``.zarr`` (and big tiffs when ``lazy``) come back as lazy dask arrays."""
    p = Path(path)
    if not p.exists():
        raise SegDiffError(f"input {str(p)!r} does not exist")
    ext = p.suffix.lower()
    try:
        if ext == ".zarr" or (p.is_dir() and ((p / ".zarray").exists() or (p / "zarr.json").exists())):
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

            if lazy:
                import dask.array as da
                import zarr

                store = tifffile.imread(str(p), aszarr=True)
                return da.from_zarr(zarr.open(store, mode="r"))
            return tifffile.imread(str(p))
        if ext in (".png", ".jpg", ".jpeg", ".bmp"):
            from skimage.io import imread

            return imread(str(p))
    except SegDiffError:
        raise
    except Exception as e:
        raise SegDiffError(f"cannot read {str(p)!r} as an image: {type(e).__name__}: {e}") from None
    raise SegDiffError(f"unknown image format {ext!r} for {str(p)!r}; use one of {sorted(READ_EXT)}")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_output(out: str | os.PathLike, inputs: list[str | os.PathLike], overwrite: bool) -> Path:
    out = Path(out)
    for i in inputs:
        if _same_file(Path(i), out):
            raise SegDiffError(f"output {str(out)!r} is the input file; choose another output path "
                               "(napari-segdiff never writes over its input)")
    if out.suffix.lower() not in WRITE_EXT:
        raise SegDiffError(f"unknown output format {out.suffix!r} for {str(out)!r}; use .tif/.tiff or .zarr")
    if out.exists() and not overwrite:
        raise SegDiffError(f"output {str(out)!r} already exists; choose another path or pass --overwrite")
    return out


def atomic_replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def write_result(result, out: str | os.PathLike, *, overwrite: bool = False, inputs: tuple = ()) -> Path:
    """Write probability, variance and mask: ``.zarr`` as a group of three arrays, ``.tif`` as a
    3-page float32 tiff (probability, variance, mask). Written to a temp name, then renamed."""
    import tifffile

    out = check_output(out, list(inputs), overwrite)
    ext = out.suffix.lower()
    out.parent.mkdir(parents=True, exist_ok=True)
    if ext == ".zarr":
        import zarr

        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            g = zarr.open_group(str(tmp), mode="w")
            for name in ("probability", "variance", "mask"):
                arr = np.asarray(getattr(result, name))
                chunks = (1,) * (arr.ndim - 2) + tuple(min(256, s) for s in arr.shape[-2:])
                g.create_array(name, data=arr, chunks=chunks) if hasattr(g, "create_array") \
                    else g.create_dataset(name, data=arr, chunks=chunks)
            g.attrs.update(_jsonable(result.info))
            atomic_replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out
    if ext in (".tif", ".tiff"):
        stack = np.stack([np.asarray(result.probability, np.float32), np.asarray(result.variance, np.float32),
                          np.asarray(result.mask, np.float32)])
        from .models import atomic_write_bytes

        atomic_write_bytes(out, lambda f: tifffile.imwrite(
            f, stack, metadata={"axes": "CYX", "channels": "probability,variance,mask",
                                **{k: str(v) for k, v in result.info.items()}}))
        return out
    raise SegDiffError(f"unknown output format {ext!r}; use .tif/.tiff or .zarr")


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in d.items()}
