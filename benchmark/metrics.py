"""Metrics of SPEC section 2. Inputs are numpy arrays; K is the number of known classes.

* ``acc``: top-1 accuracy on ID test images, argmax over the K known classes.
* ``ba_closed``: balanced accuracy over K+1 classes on ID+OOD test images with the closed-set
  prediction (so the unknown class has recall 0): what the paper's tables report.
* ``ba_open``: the same with "unknown" predicted when the known-score falls below a threshold set on
  *labeled ID* data only (keeping ``id_recall`` of them).
* ``auroc`` / ``fpr95``: ID (positive) vs OOD by the known-score (higher = known), on the test set.
* ``h_score``: harmonic mean of known accuracy (ID images, open-set prediction) and unknown recall.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
from sklearn.metrics import balanced_accuracy_score, roc_auc_score, roc_curve


def closed_accuracy(logits: np.ndarray, y_open: np.ndarray, K: int) -> float:
    idm = y_open < K
    if not idm.any():
        return float("nan")
    return float((logits[idm].argmax(1) == y_open[idm]).mean())


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``y_true`` (sklearn's definition)."""
    return float(balanced_accuracy_score(y_true, y_pred))


def threshold_at_recall(id_scores: np.ndarray, recall: float) -> float:
    """Largest threshold t such that at least ``recall`` of ``id_scores`` satisfy score >= t."""
    s = np.sort(np.asarray(id_scores, dtype=np.float64))
    n = len(s)
    k = int(np.floor((1.0 - recall) * n + 1e-9))  # number of ID images allowed below t
    return float(s[min(k, n - 1)])


def open_predictions(logits: np.ndarray, scores: np.ndarray, threshold: float, K: int) -> np.ndarray:
    pred = logits.argmax(1).copy()
    pred[scores < threshold] = K
    return pred


def auroc(scores: np.ndarray, y_open: np.ndarray, K: int) -> float:
    is_id = (y_open < K).astype(int)
    if is_id.min() == is_id.max():
        return float("nan")
    return float(roc_auc_score(is_id, scores))


def fpr_at_tpr(scores: np.ndarray, y_open: np.ndarray, K: int, tpr: float = 0.95) -> float:
    """FPR on OOD at the first ROC point whose TPR on ID reaches ``tpr`` (OpenOOD convention)."""
    is_id = (y_open < K).astype(int)
    if is_id.min() == is_id.max():
        return float("nan")
    fpr, tprs, _ = roc_curve(is_id, scores)
    return float(fpr[np.searchsorted(tprs, tpr, side="left")])


def h_score(y_open: np.ndarray, pred_open: np.ndarray, K: int) -> float:
    idm = y_open < K
    if idm.all() or not idm.any():
        return float("nan")
    acc_known = float((pred_open[idm] == y_open[idm]).mean())
    rec_unknown = float((pred_open[~idm] == K).mean())
    if acc_known + rec_unknown == 0:
        return 0.0
    return 2 * acc_known * rec_unknown / (acc_known + rec_unknown)


def compute_all(logits: np.ndarray, y_open: np.ndarray, K: int, scores: np.ndarray,
                labeled_scores: np.ndarray, id_recall: float = 0.95) -> Dict[str, float]:
    """All metrics, in percent. ``scores``: known-scores of the test images; ``labeled_scores``:
    known-scores of the labeled ID training images (eval transform) that set the open threshold."""
    thr = threshold_at_recall(labeled_scores, id_recall)
    pred_closed = logits.argmax(1)
    pred_open = open_predictions(logits, scores, thr, K)
    out = {
        "acc": closed_accuracy(logits, y_open, K),
        "ba_closed": balanced_accuracy(y_open, pred_closed),
        "ba_open": balanced_accuracy(y_open, pred_open),
        "auroc": auroc(scores, y_open, K),
        "fpr95": fpr_at_tpr(scores, y_open, K),
        "h_score": h_score(y_open, pred_open, K),
    }
    out = {k: 100.0 * v for k, v in out.items()}
    out["open_threshold"] = thr
    return out
