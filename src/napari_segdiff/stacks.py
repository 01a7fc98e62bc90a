"""Stacks (T, Z, ... leading axes) slice by slice, and instance labels from a binary mask. No Qt:
shared by the napari widget and the CLI."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import dask.array as da
import numpy as np

from ._errors import SegDiffError
from .config import SegmentConfig
from .engine import Progress, SegmentationResult, iter_segment, resolve_device
from .models import SegDiffModel, load_model

_SEGMENT = SegmentConfig()
MIN_DISTANCE = 5  # default smallest distance (px) between two instance centres


@dataclass(frozen=True)
class SliceProgress:
    """One finished tile of slice ``index`` (0-based) out of ``slices``."""

    index: int
    slices: int
    tile: Progress

    @property
    def done(self) -> int:
        return self.index * self.tile.total + self.tile.done

    @property
    def total(self) -> int:
        return self.slices * self.tile.total


@dataclass
class StackResult:
    """Outputs with the stack's shape (leading axes + (H, W)); ``info`` as in SegmentationResult.info."""

    probability: np.ndarray
    variance: np.ndarray
    labels: np.ndarray
    info: dict[str, Any]
    model: SegDiffModel


def leading_shape(shape: tuple[int, ...], rgb: bool) -> tuple[int, ...]:
    """The stack axes (T, Z, ...) in front of the 2-D plane (and the channel axis when ``rgb``)."""
    n_plane = 3 if rgb else 2
    if len(shape) < n_plane:
        raise SegDiffError(f"image of shape {shape} is not an {'RGB ' if rgb else ''}image")
    return tuple(shape[: len(shape) - n_plane])


def _lazy(data):
    """numpy and dask pass through; anything else (zarr, tiff stores) becomes a dask view so that a
    slice of a stack stays lazy and the engine reads only its windows."""
    if isinstance(data, (np.ndarray, da.Array)):
        return data
    chunks = getattr(data, "chunks", None)
    ok = isinstance(chunks, tuple) and len(chunks) == data.ndim and all(isinstance(c, int) for c in chunks)
    return da.from_array(data, chunks=chunks if ok else "auto")


def split_instances(mask, min_distance: int = MIN_DISTANCE) -> np.ndarray:
    """Split a binary mask into instance labels by a distance-transform watershed (int32, 0 = background).

    Markers are the maxima of the distance to the background at least ``min_distance`` pixels apart;
    a connected component that gets no marker keeps one label of its own.
    """
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.measure import label
    from skimage.segmentation import relabel_sequential, watershed

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.zeros(mask.shape, np.int32)
    distance = ndi.distance_transform_edt(mask)
    components = label(mask)
    peaks = peak_local_max(distance, min_distance=max(1, int(min_distance)), labels=components,
                           exclude_border=False)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-distance, markers, mask=mask).astype(np.int32)
    missing = mask & (labels == 0)
    labels[missing] = components[missing] + labels.max()
    return relabel_sequential(labels)[0].astype(np.int32)


def segment_stack(data, rgb: bool, model, *, instances: bool = False, min_distance: int = MIN_DISTANCE,
                  **engine_kwargs) -> Iterator[SliceProgress]:
    """Segment every 2-D (grey or RGB) plane of ``data`` with :func:`iter_segment`, yielding a
    :class:`SliceProgress` per tile; the generator *returns* a :class:`StackResult`.

    ``model``: a :class:`SegDiffModel`, shipped name or file path (loaded once for all slices).
    ``engine_kwargs`` go to :func:`iter_segment` unchanged (samples, steps, seed, device, ...).
    """
    device = resolve_device(engine_kwargs.get("device") or _SEGMENT.device)
    mdl = load_model(model, device=device)
    data = _lazy(data)
    lead = leading_shape(tuple(data.shape), rgb)
    n = int(np.prod(lead, dtype=np.int64))
    prob = var = labels = None
    infos: list[dict[str, Any]] = []
    for k, idx in enumerate(np.ndindex(*lead)):
        result = None
        for item in iter_segment(data[idx] if idx else data, mdl, **engine_kwargs):
            if isinstance(item, SegmentationResult):
                result = item
            else:
                yield SliceProgress(k, n, item)
        if prob is None:
            plane = tuple(result.probability.shape)
            prob = np.zeros(lead + plane, np.float32)
            var = np.zeros(lead + plane, np.float32)
            labels = np.zeros(lead + plane, np.int32 if instances else np.uint8)
        prob[idx] = result.probability
        var[idx] = result.variance
        labels[idx] = split_instances(result.mask, min_distance) if instances else result.mask
        infos.append(result.info)
    info = dict(infos[0])
    info.update(seconds=round(sum(i["seconds"] for i in infos), 3), slices=n, instances=bool(instances))
    return StackResult(prob, var, labels, info, mdl)
