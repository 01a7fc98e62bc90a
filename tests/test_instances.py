"""Object metrics (AJI, PQ, F1 at IoU 0.5, count error) against hand-computed cases, and the instance
split methods on shapes whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from napari_segdiff import SegDiffError
from napari_segdiff.instances import label_instances
from napari_segdiff.stacks import split_instances
from napari_segdiff.training.metrics import aji, instance_metrics, object_scores


def _box(shape, y0, y1, x0, x1, value=1, out=None):
    a = np.zeros(shape, np.int32) if out is None else out
    a[y0:y1, x0:x1] = value
    return a


def test_no_object_on_either_side_is_perfect():
    z = np.zeros((8, 8), np.int32)
    m = instance_metrics(z, z)
    assert m["aji"] == 1.0 and m["pq"] == 1.0 and m["f1_50"] == 1.0 and m["count_error"] == 0.0


def test_objects_predicted_where_there_are_none_score_zero():
    z = np.zeros((8, 8), np.int32)
    pred = _box((8, 8), 1, 3, 1, 3)
    m = instance_metrics(z, pred)
    assert m["aji"] == 0.0 and m["dq"] == 0.0 and m["pq"] == 0.0 and m["count_error"] == 1.0
    # and every true object missed
    m = instance_metrics(pred, z)
    assert m["aji"] == 0.0 and m["dq"] == 0.0 and m["count_error"] == -1.0


def test_exact_match_and_relabelled_ids():
    gt = _box((10, 10), 0, 4, 0, 4, 1)
    _box((10, 10), 6, 9, 5, 9, 2, out=gt)
    pred = np.where(gt == 1, 7, np.where(gt == 2, 3, 0))
    m = instance_metrics(gt, pred)
    assert m["aji"] == 1.0 and m["pq"] == 1.0 and m["sq"] == 1.0 and m["n_true"] == 2 == m["n_pred"]


def test_one_object_split_in_two():
    gt = _box((4, 10), 1, 3, 0, 10)  # 20 px
    pred = _box((4, 10), 1, 3, 0, 5, 1)
    _box((4, 10), 1, 3, 5, 10, 2, out=pred)  # two halves of 10 px: IoU 0.5 each, not > 0.5
    # AJI: the best half pairs (10 / 20); the other half is an unpaired prediction: 10 / (20 + 10)
    assert aji(gt, pred) == pytest.approx(10 / 30)
    s = object_scores(gt, pred)
    assert s["dq"] == 0.0 and s["pq"] == 0.0 and s["count_error"] == 1.0


def test_partial_overlap_by_hand():
    gt = _box((6, 6), 0, 4, 0, 4)  # 16 px
    pred = _box((6, 6), 0, 4, 0, 3)  # 12 px inside: IoU 0.75
    s = object_scores(gt, pred)
    assert s["sq"] == pytest.approx(0.75) and s["dq"] == 1.0 and s["pq"] == pytest.approx(0.75)
    assert aji(gt, pred) == pytest.approx(12 / 16)
    # a second, missed true object: DQ = 1 / (1 + 0.5), AJI adds its area to the union
    _box((6, 6), 5, 6, 5, 6, 2, out=gt)
    assert object_scores(gt, pred)["dq"] == pytest.approx(1 / 1.5)
    assert aji(gt, pred) == pytest.approx(12 / 17)


def test_two_touching_discs_split_by_watershed_but_not_by_components():
    yy, xx = np.mgrid[:40, :60]
    mask = ((yy - 20) ** 2 + (xx - 20) ** 2 <= 100) | ((yy - 20) ** 2 + (xx - 37) ** 2 <= 100)
    assert label_instances(mask, method="components").max() == 1
    for method in ("watershed", "hmaxima"):
        lab = label_instances(mask, method=method)
        assert lab.max() == 2, method
        assert lab.dtype == np.int32 and ((lab > 0) == mask).all()


def test_min_area_drops_small_objects_and_relabels():
    mask = np.zeros((20, 20), bool)
    mask[1:3, 1:3] = True  # 4 px
    mask[10:16, 10:16] = True  # 36 px
    lab = label_instances(mask, method="components", min_area=5)
    assert lab.max() == 1 and lab[12, 12] == 1 and lab[1, 1] == 0


def test_unknown_method_and_bad_shape_refused():
    with pytest.raises(SegDiffError, match="unknown instance method 'blobs'"):
        label_instances(np.ones((4, 4), bool), method="blobs")
    with pytest.raises(SegDiffError, match="2-D mask"):
        label_instances(np.ones((2, 4, 4), bool))


def test_split_instances_separates_touching_discs():
    yy, xx = np.mgrid[:40, :60]
    mask = ((yy - 20) ** 2 + (xx - 18) ** 2 < 100) | ((yy - 20) ** 2 + (xx - 38) ** 2 < 100)
    mask[2, 55] = True  # a lone pixel keeps a label of its own
    labels = split_instances(mask, min_distance=5)
    assert labels.dtype == np.int32 and set(np.unique(labels)) == {0, 1, 2, 3}
    assert labels[20, 18] != labels[20, 38] and labels[2, 55] not in (0, labels[20, 18], labels[20, 38])
    np.testing.assert_array_equal(labels > 0, mask)
    assert not split_instances(np.zeros((5, 5), bool)).any()


def test_object_threshold_drops_unsure_objects_and_renumbers():
    from napari_segdiff.instances import drop_unsure

    lab = _box((12, 12), 0, 3, 0, 3, 1)
    _box((12, 12), 5, 8, 5, 8, 2, lab)
    _box((12, 12), 9, 12, 0, 4, 3, lab)
    prob = np.select([lab == 1, lab == 2, lab == 3], [0.9, 0.25, 0.6], 0.0)
    prob[0, 0] = 0.0  # object 1's mean: 8 * 0.9 / 9 = 0.8
    kept, dropped = drop_unsure(lab, prob, 0.5)
    assert dropped == 1 and kept.dtype == np.int32
    assert kept.max() == 2 and (kept[5:8, 5:8] == 0).all()  # object 2 gone, object 3 is now 2
    assert (kept[9:12, 0:4] == 2).all() and (kept[0:3, 0:3] == 1).all()
    same, none = drop_unsure(lab, prob, 0.2)
    assert none == 0 and np.array_equal(same, lab)


def test_segment_object_threshold_keeps_the_confident_objects(tiny_model):
    import napari_segdiff as ns
    from napari_segdiff.objects import object_table

    rng = np.random.default_rng(1)
    img = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    kw = dict(samples=2, steps=2, tile=32, device="cpu", instances=True)
    every = ns.segment(img, tiny_model, **kw)
    means = object_table(every.labels, every.probability)["mean_probability"]
    cut = float(np.median(means))
    some = ns.segment(img, tiny_model, object_threshold=cut, **kw)
    assert some.info["instances"]["dropped"] == int((means < cut).sum()) > 0
    assert some.labels.max() == every.labels.max() - some.info["instances"]["dropped"]
    assert (some.labels > 0).sum() < (every.labels > 0).sum()
    assert ((some.labels > 0) <= (every.labels > 0)).all()  # only whole objects go
    np.testing.assert_array_equal(some.mask, every.mask)  # the mask keeps every pixel above the threshold
    assert object_table(some.labels, some.probability)["mean_probability"].min() >= cut


def _pairs_of_discs(shape=(300, 340), n=40, seed=0):
    """Pairs of touching discs of unequal radius scattered over ``shape`` (some across any block line), a long
    bar across three blocks, and lone discs: a mask whose right split is two objects per pair."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = np.zeros(shape, bool)
    for _ in range(n):
        y, x = rng.uniform(12, shape[0] - 12), rng.uniform(12, shape[1] - 30)
        r1, r2 = rng.uniform(5, 9), rng.uniform(5, 9)
        mask |= (yy - y) ** 2 + (xx - x) ** 2 <= r1**2
        mask |= (yy - y) ** 2 + (xx - x - 0.85 * (r1 + r2)) ** 2 <= r2**2
    mask[150:154, 5:330] = True  # one object on three blocks of 128
    return mask


@pytest.mark.parametrize("method", ["components", "watershed", "hmaxima", "interior", "interior_peaks"])
def test_labelling_by_blocks_gives_the_whole_image_split(method):
    from scipy import ndimage as ndi

    mask = _pairs_of_discs()
    whole_comp = label_instances(mask, method="components", block=None)
    interior = None
    if method.startswith("interior"):  # the mask eroded apart at the waists, as a 2-channel model draws it
        interior = ndi.gaussian_filter(ndi.distance_transform_edt(mask), 1.0).astype(np.float32) / 4
    kw = {"interior": interior, "min_area": 10} if interior is not None else {"min_area": 10}
    whole = label_instances(mask, method=method, block=None, **kw)
    for block in (128, 64):
        parts = label_instances(mask, method=method, block=block, **kw)
        assert parts.dtype == np.int32
        assert set(np.unique(parts)) == set(range(parts.max() + 1))  # numbered 1..n without gaps
        np.testing.assert_array_equal(parts > 0, whole > 0)
        m = instance_metrics(whole, parts)
        assert m["n_pred"] == m["n_true"] and m["aji"] > 0.98, (method, block, m)
        if method == "components":
            assert m["aji"] == 1.0 and parts.max() == whole_comp.max()
        # the bar across three blocks is split as in the whole image (one object by its components)
        bar = (slice(150, 154), slice(5, 330))
        assert len(np.unique(parts[bar])) == len(np.unique(whole[bar]))
        assert method != "components" or len(np.unique(parts[bar])) == 1
    assert whole.max() > whole_comp.max() or method == "components"  # the test's pairs really are split


def test_a_bad_block_is_refused():
    with pytest.raises(SegDiffError, match="block must be at least 16"):
        label_instances(np.ones((40, 40), bool), block=8)


def test_a_zarr_interior_is_read_by_blocks_with_the_same_result():
    import zarr
    from scipy import ndimage as ndi

    mask = _pairs_of_discs(n=20)
    interior = (ndi.distance_transform_edt(mask) / 4).astype(np.float32)
    z = zarr.zeros(mask.shape, chunks=(64, 64), dtype="f4")
    z[:] = interior
    kw = {"method": "interior_peaks", "h": 0.1, "seed_threshold": 0.3}
    np.testing.assert_array_equal(
        label_instances(mask, interior=z, block=96, **kw), label_instances(mask, interior=interior, block=96, **kw)
    )
    with pytest.raises(SegDiffError, match="differ in shape"):
        label_instances(mask, interior=z[:100], block=96, **kw)
