"""Segmentation metrics against small hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from napari_segdiff.training.metrics import (
    all_metrics,
    boundary_f,
    calibration_score,
    dice,
    ece,
    error_auroc,
    iou,
    wcov,
)


def _m(rows):
    return np.array([[c == "#" for c in r] for r in rows])


EMPTY = np.zeros((6, 8), bool)


def test_dice_and_iou_by_hand():
    pred = _m(["##.", "..."])
    gt = _m(["#..", "#.."])
    assert dice(pred, gt) == pytest.approx(2 * 1 / (2 + 2))
    assert iou(pred, gt) == pytest.approx(1 / 3)
    assert dice(gt, gt) == 1.0 and iou(gt, gt) == 1.0
    assert dice(pred, ~pred) == 0.0 and iou(pred, ~pred) == 0.0
    # integer and probability-derived inputs are treated as masks
    assert dice(pred.astype(np.uint8) * 255, gt.astype(int)) == pytest.approx(0.5)


def test_empty_masks():
    full = EMPTY.copy()
    full[2, 3] = True
    assert dice(EMPTY, EMPTY) == 1.0 and iou(EMPTY, EMPTY) == 1.0
    assert wcov(EMPTY, EMPTY) == 1.0 and boundary_f(EMPTY, EMPTY) == 1.0
    for a, b in ((EMPTY, full), (full, EMPTY)):
        assert dice(a, b) == 0.0 and iou(a, b) == 0.0 and wcov(a, b) == 0.0 and boundary_f(a, b) == 0.0


def test_wcov_weights_each_region_by_size():
    gt = _m(["##......", "##......", "........", "........", ".....##.", "........"])
    pred = _m(["###.....", "###.....", "........", "........", "........", "........"])
    # region A (4 px) is covered with IoU 4/6, region B (2 px) not at all
    assert wcov(pred, gt) == pytest.approx(4 / 6 * 4 / 6 + 2 / 6 * 0.0)


def test_wcov_takes_the_best_overlapping_prediction():
    gt = _m(["######"])
    pred = _m(["##.###"])
    assert wcov(pred, gt) == pytest.approx(0.5)  # max(2/6, 3/6)
    assert wcov(gt, gt) == 1.0


@pytest.mark.parametrize("dy,dx,expected", [(0, 2, 0.8), (2, 2, 0.6), (0, 6, 0.0), (0, 0, 1.0)])
def test_boundary_f_of_single_pixels(dy, dx, expected):
    # one-pixel objects are their own boundary; F at tolerance d is 1 if the distance <= d, else 0
    pred = np.zeros((20, 20), bool)
    gt = np.zeros((20, 20), bool)
    gt[5, 5] = True
    pred[5 + dy, 5 + dx] = True
    assert boundary_f(pred, gt) == pytest.approx(expected)


def _brute_boundary_f(pred, gt, tolerances=(1, 2, 3, 4, 5)):
    def boundary(m):
        H, W = m.shape
        pts = []
        for y, x in zip(*np.nonzero(m)):
            nbrs = [(y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)]
            if any(not (0 <= a < H and 0 <= b < W) or not m[a, b] for a, b in nbrs):
                pts.append((y, x))
        return np.array(pts, float)

    bp, bg = boundary(pred), boundary(gt)
    d = np.sqrt(((bp[:, None, :] - bg[None, :, :]) ** 2).sum(-1))
    out = []
    for t in tolerances:
        p = (d.min(axis=1) <= t).mean()
        r = (d.min(axis=0) <= t).mean()
        out.append(0.0 if p + r == 0 else 2 * p * r / (p + r))
    return float(np.mean(out))


@pytest.mark.parametrize("shift", [0, 1, 3, 7])
def test_boundary_f_against_brute_force(shift):
    gt = np.zeros((30, 30), bool)
    gt[5:15, 5:15] = True
    gt[20:28, 2:6] = True
    pred = np.zeros_like(gt)
    pred[5 + shift // 2 : 15 + shift // 2, 5 + shift : 15 + shift] = True
    pred[0:3, 27:30] = True  # touches the image border
    assert boundary_f(pred, gt) == pytest.approx(_brute_boundary_f(pred, gt), abs=1e-12)


def test_calibration_score_and_ece_by_hand():
    prob = np.array([0.05, 0.05, 0.95, 0.95, 0.55])
    gt = np.array([0, 1, 1, 1, 0], bool)
    # bins: [0, .1): conf .05 vs 1/2 positive; [.9, 1]: .95 vs 1; [.5, .6): .55 vs 0
    expected_cal = ((0.05 - 0.5) ** 2 + (0.95 - 1.0) ** 2 + (0.55 - 0.0) ** 2) / 3
    expected_ece = 2 / 5 * 0.45 + 2 / 5 * 0.05 + 1 / 5 * 0.55
    assert calibration_score(prob, gt) == pytest.approx(expected_cal)
    assert ece(prob, gt) == pytest.approx(expected_ece)


def test_calibration_perfect_and_worst():
    gt = np.array([1, 0, 0, 0] * 25, bool).reshape(10, 10)
    prob = np.full((10, 10), 0.25)
    assert calibration_score(prob, gt) == pytest.approx(0.0) and ece(prob, gt) == pytest.approx(0.0)
    # confidently wrong everywhere
    gt = np.eye(4, dtype=bool)
    prob = np.where(gt, 0.0, 1.0)
    assert calibration_score(prob, gt) == pytest.approx(1.0) and ece(prob, gt) == pytest.approx(1.0)
    # p = 1.0 exactly lands in the last bin, not outside
    assert ece(np.ones(4), np.ones(4, bool)) == pytest.approx(0.0)


def test_all_metrics_thresholds_probabilities():
    gt = np.zeros((10, 10), bool)
    gt[2:6, 2:6] = True
    prob = np.where(gt, 0.7, 0.2)
    m = all_metrics(prob, gt)
    assert set(m) == {"dice", "iou", "wcov", "boundf", "calibration", "ece"}
    assert m["dice"] == 1.0 and m["iou"] == 1.0 and m["wcov"] == 1.0 and m["boundf"] == 1.0
    assert m["ece"] == pytest.approx(16 / 100 * 0.3 + 84 / 100 * 0.2)
    assert all_metrics(prob, gt, threshold=0.8)["dice"] == 0.0


def test_error_auroc_by_hand():
    pred = np.array([1, 0, 0, 1])
    gt = np.array([1, 1, 0, 0])  # wrong at 1 and 3
    var = np.array([0.1, 0.3, 0.2, 0.2])
    # wrong 0.3 beats right 0.1 and 0.2; wrong 0.2 beats right 0.1 and ties right 0.2: 3.5 of 4 pairs
    assert error_auroc(var, pred, gt) == pytest.approx(0.875)
    assert error_auroc(-var, pred, gt) == pytest.approx(0.125)


def test_error_auroc_perfect_blind_and_undefined():
    rng = np.random.default_rng(0)
    gt = rng.random((16, 16)) > 0.5
    pred = gt.copy()
    pred[:4] = ~pred[:4]  # the top rows wrong
    var = np.zeros((16, 16))
    var[:4] = 0.2
    assert error_auroc(var, pred, gt) == 1.0  # the variance marks exactly the wrong pixels
    assert error_auroc(np.full((16, 16), 0.1), pred, gt) == 0.5  # a flat map tells nothing
    assert np.isnan(error_auroc(var, gt, gt))  # no wrong pixel: undefined
    assert np.isnan(error_auroc(var, ~gt, gt))  # every pixel wrong: undefined
