"""Stacks (T, Z, ... leading axes) slice by slice, and instance labels from a binary mask. No Qt:
shared by the napari widget and the CLI."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np

from ._errors import SegDiffError
from .config import SegmentConfig
from .engine import Progress, SegmentationResult, drain, iter_segment, resolve_device
from .models import SegDiffModel, shared_model

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
    mask: np.ndarray  # uint8 0/1
    labels: np.ndarray | None  # int32 instance ids when instances were asked for
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
    """Split a binary mask into instance labels by a distance-transform watershed (int32, 0 = background);
    see :mod:`napari_segdiff.instances` for the methods the models use."""
    from .instances import label_instances

    return label_instances(mask, method="watershed", min_distance=min_distance)


def segment_stack(data, rgb: bool, model, *, instances: bool = False, **engine_kwargs) -> StackResult:
    """Segment every 2-D plane of ``data`` and return the :class:`StackResult` (drains
    :func:`iter_segment_stack`, which takes the same arguments)."""
    return drain(iter_segment_stack(data, rgb, model, instances=instances, **engine_kwargs), StackResult)


def iter_segment_stack(
    data, rgb: bool, model, *, instances: bool = False, **engine_kwargs
) -> Iterator[SliceProgress | StackResult]:
    """Segment every 2-D (grey or RGB) plane of ``data`` with :func:`iter_segment`, yielding a
    :class:`SliceProgress` per tile and, last, the :class:`StackResult`.

    ``model``: a :class:`SegDiffModel`, shipped name or file path (loaded once for all slices).
    ``engine_kwargs`` go to :func:`iter_segment` unchanged (samples, steps, seed, device, ...).
    """
    device = resolve_device(engine_kwargs.get("device") or _SEGMENT.device)
    mdl = shared_model(model, device=device)
    data = _lazy(data)
    lead = leading_shape(tuple(data.shape), rgb)
    n = int(np.prod(lead, dtype=np.int64))
    prob = var = labels = None
    infos: list[dict[str, Any]] = []
    for k, idx in enumerate(np.ndindex(*lead)):
        result = None
        for item in iter_segment(data[idx] if idx else data, mdl, instances=instances, **engine_kwargs):
            if isinstance(item, SegmentationResult):
                result = item
            else:
                yield SliceProgress(k, n, item)
        if prob is None:
            plane = tuple(result.probability.shape)
            prob = np.zeros(lead + plane, np.float32)
            var = np.zeros(lead + plane, np.float32)
            mask = np.zeros(lead + plane, np.uint8)
            labels = np.zeros(lead + plane, np.int32) if instances else None
        prob[idx] = result.probability
        var[idx] = result.variance
        mask[idx] = result.mask
        if instances:  # ids stay unique across the stack
            lab = np.asarray(result.labels)
            labels[idx] = np.where(lab > 0, lab + (labels.max() if labels.size else 0), 0)
        infos.append(result.info)
    info = dict(infos[0])
    info.update(
        seconds=round(sum(i["seconds"] for i in infos), 3),
        slices=n,
        instances=bool(instances),
        tiles=sum(i["tiles"] for i in infos),
        skipped_tiles=sum(i.get("skipped_tiles", 0) for i in infos),
    )
    if instances:
        info["objects"] = int(labels.max())
    yield StackResult(prob, var, mask, labels, info, mdl)
