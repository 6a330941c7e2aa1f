"""Metrics against independent computations (scikit-learn, scipy, brute force, hand-made cases)."""
import numpy as np
import pytest
from scipy.stats import mannwhitneyu
from sklearn.metrics import accuracy_score, confusion_matrix, recall_score

from benchmark import metrics as M


def _random_case(seed, n=300, K=5):
    rng = np.random.default_rng(seed)
    y_open = rng.integers(0, K + 1, n)  # K = unknown
    logits = rng.normal(size=(n, K))
    logits[np.arange(n), np.minimum(y_open, K - 1)] += rng.normal(1.0, 1.0, n)  # some signal
    scores = rng.normal(size=n) + (y_open < K) * 0.8
    labeled_scores = rng.normal(size=40) + 0.8
    return y_open, logits, scores, labeled_scores, K


@pytest.mark.parametrize("seed", range(5))
def test_acc_and_ba_closed_match_sklearn(seed):
    y, logits, *_, K = _random_case(seed)
    idm = y < K
    assert M.closed_accuracy(logits, y, K) == pytest.approx(accuracy_score(y[idm], logits[idm].argmax(1)))
    # balanced accuracy = macro recall over the K+1 classes present in y_true (unknown recall is 0)
    pred = logits.argmax(1)
    expected = recall_score(y, pred, labels=np.unique(y), average="macro", zero_division=0)
    assert M.balanced_accuracy(y, pred) == pytest.approx(expected)
    cm = confusion_matrix(y, pred, labels=np.arange(K + 1))
    assert cm[K, K] == 0  # closed-set: the unknown class is never predicted
    assert M.balanced_accuracy(y, pred) == pytest.approx(np.mean(np.diag(cm) / cm.sum(1)))


def test_ba_closed_is_acc_times_k_over_k_plus_1_when_balanced():
    # the paper's relation BA = Acc * K / (K + 1), for equal class sizes
    K, per = 4, 10
    y = np.repeat(np.arange(K + 1), per)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(len(y), K))
    pred = logits.argmax(1)
    acc = M.closed_accuracy(logits, y, K)
    per_class = [np.mean(pred[y == c] == c) for c in range(K)]
    assert M.balanced_accuracy(y, pred) == pytest.approx(np.mean(per_class) * K / (K + 1))
    assert acc == pytest.approx(np.mean(per_class))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_mann_whitney(seed):
    y, _, scores, _, K = _random_case(seed)
    is_id = y < K
    u = mannwhitneyu(scores[is_id], scores[~is_id]).statistic
    assert M.auroc(scores, y, K) == pytest.approx(u / (is_id.sum() * (~is_id).sum()))


@pytest.mark.parametrize("seed", range(5))
def test_fpr95_brute_force(seed):
    y, _, scores, _, K = _random_case(seed)
    is_id = y < K
    # smallest FPR over thresholds whose ID recall is at least 95%
    best = min(np.mean(scores[~is_id] >= t) for t in np.unique(scores)
               if np.mean(scores[is_id] >= t) >= 0.95)
    assert M.fpr_at_tpr(scores, y, K) == pytest.approx(best)


def test_threshold_keeps_requested_recall():
    rng = np.random.default_rng(1)
    for n in (7, 20, 100, 101):
        s = rng.normal(size=n)
        t = M.threshold_at_recall(s, 0.95)
        assert np.mean(s >= t) >= 0.95
        assert np.mean(s >= np.nextafter(t, np.inf)) < 0.95 or t == s.max()


def test_open_metrics_hand_case():
    K = 2
    y = np.array([0, 0, 1, 1, 2, 2])
    logits = np.array([[2, 0], [2, 0], [0, 2], [2, 0], [0, 2], [2, 0]], float)
    scores = np.array([0.9, 0.2, 0.9, 0.9, 0.1, 0.8])
    pred = M.open_predictions(logits, scores, threshold=0.5, K=K)
    assert pred.tolist() == [0, 2, 1, 0, 2, 0]
    # per-class recall: class0 1/2, class1 1/2, unknown 1/2
    assert M.balanced_accuracy(y, pred) == pytest.approx(0.5)
    # known acc = 2/4, unknown recall = 1/2 -> H = 0.5
    assert M.h_score(y, pred, K) == pytest.approx(0.5)
    out = M.compute_all(logits, y, K, scores, labeled_scores=np.array([0.5, 0.9, 0.95, 0.99]), id_recall=0.75)
    assert out["open_threshold"] == pytest.approx(0.9)
    assert out["acc"] == pytest.approx(75.0)
