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
"""

from __future__ import annotations

import numpy as np

from ._errors import SegDiffError

METHODS = ("components", "watershed", "hmaxima", "interior", "interior_peaks")
MIN_DISTANCE = 5  # watershed: smallest distance (px) between two instance centres
H_MAXIMA = 1.0  # hmaxima: height (px of distance) a seed must rise above the saddle to its neighbour
H_INTERIOR = 0.15  # interior_peaks: the same height in units of the interior map (measured: nuclei-he card)


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
) -> np.ndarray:
    """Instance labels of a binary ``mask`` (``probability`` is accepted for methods that use it; the
    distance methods work on the mask, ``interior`` and ``interior_peaks`` on a 2-channel model's interior
    map). ``min_area`` in pixels: smaller objects are dropped. ``h``: the h-maxima height (``hmaxima``: px of
    distance, default :data:`H_MAXIMA`; ``interior_peaks``: interior units, default :data:`H_INTERIOR`);
    ``sigma``: ``interior_peaks``' smoothing (px)."""
    from scipy import ndimage as ndi
    from skimage.measure import label

    if method not in METHODS:
        raise SegDiffError(f"unknown instance method {method!r}; choose one of {', '.join(METHODS)}")
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise SegDiffError(f"instance labels need a 2-D mask, got shape {mask.shape}")
    min_area = int(np.ceil(max(0.0, float(min_area))))
    components = label(mask, connectivity=1).astype(np.int32)
    if not mask.any():
        return np.zeros(mask.shape, np.int32)
    if method == "components":
        return _finish(components, mask, components, min_area)
    from skimage.segmentation import watershed

    distance = ndi.distance_transform_edt(mask)
    markers = np.zeros(mask.shape, np.int32)
    if method in ("interior", "interior_peaks"):
        if interior is None:
            raise SegDiffError(f"the {method!r} method needs the interior map of a 2-channel model (interior=)")
        interior = np.asarray(interior, dtype=np.float32)
        if interior.shape != mask.shape:
            raise SegDiffError(f"interior map {interior.shape} and mask {mask.shape} differ in shape")
    if method == "interior_peaks":
        from skimage.morphology import h_maxima

        smooth = ndi.gaussian_filter(interior, float(sigma)) if sigma > 0 else interior
        height = H_INTERIOR if h is None else float(h)
        markers = label(h_maxima(smooth, height) & (smooth > float(seed_threshold)) & mask).astype(np.int32)
        labels = watershed(-smooth, markers, mask=mask).astype(np.int32)
        return _finish(labels, mask, components, min_area)
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
