"""Segmentation metrics of the paper's protocols, per image (then averaged over images).

Dice/F1 and IoU (MoNuSeg, Vaihingen), WCov and BoundF (Vaihingen, as in DARNet), the paper's
calibration score and the expected calibration error. Empty-vs-empty counts as a perfect score.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    pred, gt = pred.astype(bool), gt.astype(bool)
    s = pred.sum() + gt.sum()
    return 1.0 if s == 0 else float(2.0 * np.logical_and(pred, gt).sum() / s)


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    pred, gt = pred.astype(bool), gt.astype(bool)
    u = np.logical_or(pred, gt).sum()
    return 1.0 if u == 0 else float(np.logical_and(pred, gt).sum() / u)


def wcov(pred: np.ndarray, gt: np.ndarray) -> float:
    """Weighted coverage: IoU of each ground-truth region with its best-overlapping predicted region,
    weighted by region size (DARNet's protocol; for one building, the IoU of the matched regions)."""
    gl, ng = ndimage.label(gt.astype(bool))
    pl, npred = ndimage.label(pred.astype(bool))
    if ng == 0:
        return 1.0 if npred == 0 else 0.0
    total = gt.astype(bool).sum()
    score = 0.0
    for g in range(1, ng + 1):
        gm = gl == g
        best = 0.0
        for p in np.unique(pl[gm]):
            if p == 0:
                continue
            pm = pl == p
            best = max(best, np.logical_and(gm, pm).sum() / np.logical_or(gm, pm).sum())
        score += gm.sum() / total * best
    return float(score)


def _boundary(m: np.ndarray) -> np.ndarray:
    m = m.astype(bool)
    return m & ~ndimage.binary_erosion(m, border_value=0)


def boundary_f(pred: np.ndarray, gt: np.ndarray, tolerances=(1, 2, 3, 4, 5)) -> float:
    """Boundary F-score averaged over pixel tolerances 1-5 (DARNet / the paper)."""
    bp, bg = _boundary(pred), _boundary(gt)
    if not bp.any() and not bg.any():
        return 1.0
    if not bp.any() or not bg.any():
        return 0.0
    dg = ndimage.distance_transform_edt(~bg)
    dp = ndimage.distance_transform_edt(~bp)
    scores = []
    for tol in tolerances:
        precision = (dg[bp] <= tol).mean()
        recall = (dp[bg] <= tol).mean()
        scores.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
    return float(np.mean(scores))


def _bins(prob: np.ndarray, gt: np.ndarray, n_bins: int):
    p = np.clip(prob.ravel().astype(np.float64), 0, 1)
    y = gt.ravel().astype(bool)
    idx = np.minimum((p * n_bins).astype(int), n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    conf = np.bincount(idx, weights=p, minlength=n_bins)
    pos = np.bincount(idx, weights=y, minlength=n_bins)
    return count, conf, pos


def calibration_score(prob: np.ndarray, gt: np.ndarray, n_bins: int = 10) -> float:
    """The paper's score: 10 uniform bins; mean over non-empty bins of (mean predicted probability -
    fraction of positives)^2. Lower is better."""
    count, conf, pos = _bins(prob, gt, n_bins)
    nz = count > 0
    return float(np.mean((conf[nz] / count[nz] - pos[nz] / count[nz]) ** 2))


def ece(prob: np.ndarray, gt: np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error: sum over bins of (bin share) * |confidence - accuracy|."""
    count, conf, pos = _bins(prob, gt, n_bins)
    nz = count > 0
    return float(np.sum(count[nz] / count.sum() * np.abs(conf[nz] / count[nz] - pos[nz] / count[nz])))


def all_metrics(prob: np.ndarray, gt: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    pred = prob > threshold
    return {"dice": dice(pred, gt), "iou": iou(pred, gt), "wcov": wcov(pred, gt),
            "boundf": boundary_f(pred, gt), "calibration": calibration_score(prob, gt), "ece": ece(prob, gt)}
