"""Ranking places by mean variance (the review list), on maps whose answer is known."""

import numpy as np
import pytest

from napari_segdiff import SegDiffError
from napari_segdiff.review import rank_objects, rank_tiles


def test_tiles_ranked_by_mean_variance():
    v = np.zeros((100, 130))
    v[50:100, 100:130] = 0.2  # an edge tile (50x30)
    v[0:50, 50:100] = 0.1
    items = rank_tiles(v, tile=50, top=2)
    assert [it.box for it in items] == [(50, 100, 100, 130), (0, 50, 50, 100)]
    assert items[0].score == pytest.approx(0.2) and items[0].center == (75.0, 115.0)


def test_objects_ranked_by_mean_variance_inside_them():
    lab = np.zeros((20, 20), np.int32)
    lab[2:5, 2:5], lab[10:15, 10:15] = 1, 2
    v = np.where(lab == 2, 0.3, np.where(lab == 1, 0.1, 0.9))  # background variance does not count
    items = rank_objects(v, lab, top=5)
    assert [it.label for it in items] == [2, 1] and items[0].box == (10, 10, 15, 15)
    assert rank_objects(v, np.zeros_like(lab)) == []


def test_objects_ranked_by_lowest_mean_probability():
    lab = np.zeros((20, 20), np.int32)
    lab[2:5, 2:5], lab[10:15, 10:15], lab[16:19, 1:4] = 1, 2, 3
    prob = np.select([lab == 1, lab == 2, lab == 3], [0.9, 0.55, 0.7], 0.0)
    var = np.where(lab == 1, 0.3, 0.01)  # the variance alone would put object 1 first
    items = rank_objects(var, lab, top=2, probability=prob)
    assert [it.label for it in items] == [2, 3] and items[0].score == pytest.approx(0.55)
    with pytest.raises(SegDiffError, match="probability"):
        rank_objects(var, lab, probability=np.zeros((3, 3)))


def test_bad_shapes_refused():
    with pytest.raises(SegDiffError, match="2-D variance"):
        rank_tiles(np.zeros((2, 3, 4)))
    with pytest.raises(SegDiffError, match="same 2-D shape"):
        rank_objects(np.zeros((3, 3)), np.zeros((4, 4), int))
