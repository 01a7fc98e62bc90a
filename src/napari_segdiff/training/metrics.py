"""Segmentation metrics of the paper's protocols, per image (then averaged over images).

Dice/F1 and IoU (MoNuSeg, Vaihingen), WCov and BoundF (Vaihingen, as in DARNet), the paper's
calibration score and the expected calibration error; how well the variance map points at the mask's
errors (``error_auroc``). Empty-vs-empty counts as a perfect score.
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


def error_auroc(variance: np.ndarray, pred: np.ndarray, gt: np.ndarray) -> float:
    """Per-pixel AUROC of the variance as a detector of "the mask is wrong here" (pred != gt): the chance that
    a wrong pixel has a higher variance than a right one, ties counting half (Mann-Whitney U / n_pos n_neg).
    NaN where every pixel is right or every pixel is wrong (undefined)."""
    from scipy.stats import rankdata

    wrong = (np.asarray(pred) > 0) != (np.asarray(gt) > 0)
    n_pos = int(wrong.sum())
    n_neg = wrong.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(variance, dtype=np.float64).ravel())  # average ranks for ties
    u = ranks[wrong.ravel()].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def all_metrics(prob: np.ndarray, gt: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    pred = prob > threshold
    return {
        "dice": dice(pred, gt),
        "iou": iou(pred, gt),
        "wcov": wcov(pred, gt),
        "boundf": boundary_f(pred, gt),
        "calibration": calibration_score(prob, gt),
        "ece": ece(prob, gt),
    }


# ------------------------------------------------------------------ objects (instance labels)
def _overlaps(gt: np.ndarray, pred: np.ndarray):
    """Intersections of every (gt id, pred id) pair that overlaps, and each object's area.
    Returns (g ids, p ids, intersections, gt areas by id, pred areas by id)."""
    gt = np.asarray(gt).astype(np.int64).ravel()
    pred = np.asarray(pred).astype(np.int64).ravel()
    if gt.min(initial=0) < 0 or pred.min(initial=0) < 0:
        raise ValueError("instance labels must be >= 0 (0 = background)")
    ga = np.bincount(gt)
    pa = np.bincount(pred)
    both = (gt > 0) & (pred > 0)
    k = int(pred.max(initial=0)) + 1
    pairs, inter = np.unique(gt[both] * k + pred[both], return_counts=True)
    return pairs // k, pairs % k, inter.astype(np.float64), ga, pa


def _ids(areas: np.ndarray) -> np.ndarray:
    ids = np.nonzero(areas)[0]
    return ids[ids > 0]


def aji(gt: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017): each ground-truth object is paired with the predicted
    object of highest IoU; AJI = sum of their intersections / (sum of their unions + the areas of predicted
    objects never paired). No object on either side: 1.0."""
    g, p, inter, ga, pa = _overlaps(gt, pred)
    gids, pids = _ids(ga), _ids(pa)
    if len(gids) == 0:
        return 1.0 if len(pids) == 0 else 0.0
    union = ga[g] + pa[p] - inter
    iou_ = inter / union
    c = u = 0.0
    used = np.zeros(len(pa), bool)
    best: dict[int, int] = {}
    order = np.lexsort((-iou_, g))  # by gt id, then IoU descending: first row per gt id is its best
    for i in order:
        if int(g[i]) not in best:
            best[int(g[i])] = int(i)
    for gid in gids:
        i = best.get(int(gid))
        if i is None:  # no overlap: the whole object counts in the union
            u += ga[gid]
            continue
        c += inter[i]
        u += union[i]
        used[p[i]] = True
    u += pa[pids[~used[pids]]].sum()
    return float(c / u) if u else 1.0


def object_scores(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Objects matched at IoU > 0.5 (a match is then unique): PQ = SQ x DQ (Kirillov et al.), DQ equals the
    object F1 at IoU 0.5; count error = predicted - true objects. No object on either side: all 1.0."""
    g, p, inter, ga, pa = _overlaps(gt, pred)
    n_gt, n_pred = len(_ids(ga)), len(_ids(pa))
    iou_ = inter / (ga[g] + pa[p] - inter) if len(inter) else inter
    tp_iou = iou_[iou_ > 0.5]
    tp = len(tp_iou)
    fp, fn = n_pred - tp, n_gt - tp
    if n_gt == 0 and n_pred == 0:
        dq = sq = 1.0
    else:
        dq = tp / (tp + 0.5 * fp + 0.5 * fn)
        sq = float(tp_iou.mean()) if tp else 0.0
    return {
        "pq": dq * sq,
        "dq": dq,
        "sq": sq,
        "f1_50": dq,
        "count_error": float(n_pred - n_gt),
        "n_true": float(n_gt),
        "n_pred": float(n_pred),
    }


def instance_metrics(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    return {"aji": aji(gt, pred), **object_scores(gt, pred)}
