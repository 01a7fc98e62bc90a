"""Instance labels (int32, 0 = background) from a run's probability map and mask. Pure numpy/scipy/scikit-image.

Three methods, chosen per model (``meta['instances']``) and measured in the model cards:

* ``components``: connected components of the mask, objects smaller than ``min_area`` pixels dropped
  (`buildings-aerial`: the one building of a crop).
* ``watershed``: a watershed of the distance to the background, seeded at its local maxima at least
  ``min_distance`` pixels apart (what the widget did before; splits touching nuclei, but also
  breaks elongated ones).
* ``hmaxima``: the same watershed seeded at the h-maxima of the (smoothed) distance map, so a seed needs a
  ridge at least ``h`` pixels high: a waist between two touching nuclei splits them, a bump on one does not.
* ``interior``: for a 2-channel model, which also generates the interior of each object (objects eroded
  apart): the watershed seeded at the connected parts of ``interior > seed_threshold`` within the mask,
  grown over the distance map to the mask's edge. The model itself says where one object ends and the next
  begins.
* ``interior_peaks``: the same interior map, smoothed (Gaussian, ``sigma`` px), seeded at its h-maxima (a seed
  must rise ``h`` above the saddle to its neighbour, in units of the map) where it exceeds ``seed_threshold``,
  and the watershed floods the interior map itself. Where the interior is a soft posterior mean (one sampling
  step) two touching objects share one blob above any threshold but still show two peaks.

A mask longer than :data:`BLOCK` pixels on a side is labelled a block of connected components at a time
(an object never spans two components), so a whole orthophoto or slide region is split in bounded memory.
"""

from __future__ import annotations

import numpy as np

from ._errors import SegDiffError

METHODS = ("components", "watershed", "hmaxima", "interior", "interior_peaks")
MIN_DISTANCE = 5  # watershed: smallest distance (px) between two instance centres
H_MAXIMA = 1.0  # hmaxima: height (px of distance) a seed must rise above the saddle to its neighbour
H_INTERIOR = 0.15  # interior_peaks: the same height in units of the interior map (measured: nuclei-he card)
BLOCK = 2048  # masks with a longer side are labelled a block of components at a time


def _finish(labels: np.ndarray, mask: np.ndarray, components: np.ndarray, min_area: int) -> np.ndarray:
    from skimage.segmentation import relabel_sequential

    missing = mask & (labels == 0)  # a component without a seed keeps one label of its own
    if missing.any():
        labels[missing] = components[missing] + labels.max()
    if min_area > 1:
        sizes = np.bincount(labels.ravel())
        small = sizes < min_area
        small[0] = False
        labels[small[labels]] = 0
    return relabel_sequential(labels)[0].astype(np.int32)


def object_interior(labels: np.ndarray, width: int = 2) -> np.ndarray:
    """Pixels of an object more than ``width`` - 1 pixels from any pixel that is not of the same object: each
    object eroded on its own, so touching objects come apart (the second mask channel of a 2-channel model)."""
    from scipy import ndimage as ndi
    from skimage.segmentation import find_boundaries

    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise SegDiffError(f"instance labels must be 2-D, got shape {labels.shape}")
    edge = find_boundaries(labels, mode="inner")  # object pixels next to another id or the background
    if width > 1:
        edge = ndi.binary_dilation(edge, iterations=int(width) - 1)
    return (labels > 0) & ~edge


def label_instances(
    mask,
    probability=None,
    *,
    method: str = "components",
    min_area: float = 0,
    min_distance: int = MIN_DISTANCE,
    h: float | None = None,
    interior=None,
    seed_threshold: float = 0.5,
    sigma: float = 1.0,
    block: int | None = BLOCK,
) -> np.ndarray:
    """Instance labels of a binary ``mask`` (``probability`` is accepted for methods that use it; the
    distance methods work on the mask, ``interior`` and ``interior_peaks`` on a 2-channel model's interior
    map). ``min_area`` in pixels: smaller objects are dropped. ``h``: the h-maxima height (``hmaxima``: px of
    distance, default :data:`H_MAXIMA`; ``interior_peaks``: interior units, default :data:`H_INTERIOR`);
    ``sigma``: ``interior_peaks``' smoothing (px).

    A mask with a side longer than ``block`` pixels is split by connected components, a block at a time (see
    :func:`_by_blocks`), so the method's temporaries scale with the block, not the image; ``block=None``
    labels it whole."""
    if method not in METHODS:
        raise SegDiffError(f"unknown instance method {method!r}; choose one of {', '.join(METHODS)}")
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise SegDiffError(f"instance labels need a 2-D mask, got shape {mask.shape}")
    if method in ("interior", "interior_peaks"):
        if interior is None:
            raise SegDiffError(f"the {method!r} method needs the interior map of a 2-channel model (interior=)")
        if not hasattr(interior, "shape"):
            interior = np.asarray(interior, dtype=np.float32)
        if tuple(interior.shape) != mask.shape:  # a zarr interior is read a block at a time
            raise SegDiffError(f"interior map {tuple(interior.shape)} and mask {mask.shape} differ in shape")
    if block is not None and int(block) < 16:
        raise SegDiffError(f"block must be at least 16 pixels (or None), got {block}")
    kw = dict(
        method=method, min_area=min_area, min_distance=min_distance, h=h, seed_threshold=seed_threshold, sigma=sigma
    )
    if block is not None and max(mask.shape) > int(block):
        return _by_blocks(mask, interior, int(block), **kw)
    return _label_whole(mask, None if interior is None else np.asarray(interior[:], np.float32), **kw)


def _by_blocks(mask: np.ndarray, interior: np.ndarray | None, block: int, **kw) -> np.ndarray:
    """:func:`label_instances` of a large mask, a block at a time. Every connected component of the mask
    belongs to the block that holds the top-left corner of its bounding box. Each block labels the mask in the
    bounding box of its components plus a margin of ``pad`` pixels (so the smoothing sees the neighbours it
    sees in the whole image) and keeps the objects of its own components. An object never spans two components
    (the watershed floods within the mask, 4-connected), so each kept object is whole and the split is the
    whole-image one, but for ties: skimage's watershed breaks ties between equal heights by the order of its
    queue, which depends on everything flooded at once (two identical copies of a scene in one image are not
    split identically either; ``benchmarks/run.py --only labels`` measures the agreement). Ids are numbered
    block by block. Peak memory: the mask's components and the output (int32 each) plus one block's
    temporaries; ``interior`` (numpy or zarr) is read a block at a time."""
    from scipy import ndimage as ndi

    pad = int(4 * max(float(kw["sigma"]), 1.0)) + 4  # the Gaussian's reach (truncate 4) and a little more
    comp, n = ndi.label(mask)  # 4-connected, as the methods' own components
    out = np.zeros(mask.shape, np.int32)
    if n == 0:
        return out
    boxes = ndi.find_objects(comp)
    r0 = np.array([b[0].start for b in boxes])
    c0 = np.array([b[1].start for b in boxes])
    r1 = np.array([b[0].stop for b in boxes])
    c1 = np.array([b[1].stop for b in boxes])
    owner = (r0 // block) * (-(-mask.shape[1] // block)) + c0 // block
    order = np.argsort(owner, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(owner[order]) != 0])
    mine = np.zeros(n + 1, bool)
    offset = 0
    for ids in np.split(order, starts[1:]):  # component indices (id - 1) of one block
        y0, x0 = max(int(r0[ids].min()) - pad, 0), max(int(c0[ids].min()) - pad, 0)
        y1, x1 = min(int(r1[ids].max()) + pad, mask.shape[0]), min(int(c1[ids].max()) + pad, mask.shape[1])
        inner = None if interior is None else np.asarray(interior[y0:y1, x0:x1], np.float32)
        lab = _label_whole(mask[y0:y1, x0:x1], inner, **kw)  # with the neighbours in reach, as in the whole
        mine[ids + 1] = True
        hit = (lab > 0) & mine[comp[y0:y1, x0:x1]]
        mine[ids + 1] = False
        kept, lab = np.unique(lab[hit], return_inverse=True)
        out[y0:y1, x0:x1][hit] = lab.astype(np.int32) + offset + 1
        offset += len(kept)
    return out


def _label_whole(
    mask: np.ndarray,
    interior: np.ndarray | None,
    *,
    method: str,
    min_area: float,
    min_distance: int,
    h: float | None,
    seed_threshold: float,
    sigma: float,
) -> np.ndarray:
    from scipy import ndimage as ndi
    from skimage.measure import label

    min_area = int(np.ceil(max(0.0, float(min_area))))
    components = label(mask, connectivity=1).astype(np.int32)
    if not mask.any():
        return np.zeros(mask.shape, np.int32)
    if method == "components":
        return _finish(components, mask, components, min_area)
    from skimage.segmentation import watershed

    if method == "interior_peaks":  # floods the interior map itself: no distance map needed
        from skimage.morphology import h_maxima

        smooth = ndi.gaussian_filter(interior, float(sigma)) if sigma > 0 else interior
        height = H_INTERIOR if h is None else float(h)
        markers = label(h_maxima(smooth, height) & (smooth > float(seed_threshold)) & mask).astype(np.int32)
        labels = watershed(-smooth, markers, mask=mask).astype(np.int32)
        return _finish(labels, mask, components, min_area)
    distance = ndi.distance_transform_edt(mask)
    markers = np.zeros(mask.shape, np.int32)
    if method == "interior":
        markers = label((interior > float(seed_threshold)) & mask, connectivity=1).astype(np.int32)
    elif method == "watershed":
        from skimage.feature import peak_local_max

        peaks = peak_local_max(
            distance, min_distance=max(1, int(min_distance)), labels=components, exclude_border=False
        )
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    else:
        from skimage.morphology import h_maxima

        smooth = ndi.gaussian_filter(distance, 1.0)
        markers = label(h_maxima(smooth, H_MAXIMA if h is None else float(h)) & mask).astype(np.int32)
    labels = watershed(-distance, markers, mask=mask).astype(np.int32)
    return _finish(labels, mask, components, min_area)


def drop_unsure(labels: np.ndarray, probability, min_mean: float) -> tuple[np.ndarray, int]:
    """``labels`` without the objects whose mean ``probability`` is below ``min_mean``, renumbered 1..n (the
    object threshold of StarDist and cellpose, on the mean of the samples); and how many were dropped.
    ``probability`` may be a zarr array: it is read a block of rows at a time."""
    from skimage.segmentation import relabel_sequential

    from .objects import object_table

    t = object_table(labels, probability=probability)
    unsure = t["label"][t["mean_probability"] < float(min_mean)]
    if unsure.size == 0:
        return labels, 0
    lut = np.ones(int(labels.max()) + 1, bool)
    lut[unsure] = False
    lut[0] = False
    kept = np.where(lut[labels], labels, 0)
    return relabel_sequential(kept)[0].astype(np.int32), int(unsure.size)
