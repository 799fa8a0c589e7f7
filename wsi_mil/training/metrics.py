"""Slide-level metrics, thresholds, the majority vote, and bootstrap confidence intervals.

Binary tasks: AUC on the positive-class probability, F1 of the positive class, threshold by
Youden's J on validation. Multi-class: one-vs-rest macro AUC, macro F1, argmax decisions.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score, roc_curve

METRICS = ("accuracy", "balanced_accuracy", "auc", "f1")


def auc_score(y: np.ndarray, prob: np.ndarray) -> float:
    """Binary AUC of prob[:, 1] or one-vs-rest macro AUC; NaN when only one class is present."""
    y = np.asarray(y)
    if len(np.unique(y)) < 2:
        return float("nan")
    if prob.shape[1] == 2:
        return float(roc_auc_score(y, prob[:, 1]))
    present = np.unique(y)
    p = prob[:, present] / prob[:, present].sum(1, keepdims=True)
    if len(present) == 2:
        return float(roc_auc_score(y == present[1], p[:, 1]))
    return float(roc_auc_score(y, p, multi_class="ovr", average="macro", labels=present))


def compute_metrics(y: np.ndarray, prob: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy, AUC, F1. A class missing from a small split (a bootstrap
    resample, a validation fold) makes sklearn warn once per call; the value it returns is
    still the defined one, so those warnings are not passed on (hundreds per run otherwise)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return _metrics(np.asarray(y), prob, np.asarray(pred))


def _metrics(y: np.ndarray, prob: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    binary = prob.shape[1] == 2
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred))
        if len(np.unique(y)) > 1
        else float("nan"),
        "auc": auc_score(y, prob),
        "f1": float(
            f1_score(
                y,
                pred,
                average="binary" if binary else "macro",
                zero_division=0,
                labels=None if binary else np.arange(prob.shape[1]),
            )
        ),
    }


def youden_threshold(y: np.ndarray, p_pos: np.ndarray) -> float:
    """The probability threshold maximising sensitivity + specificity - 1 (0.5 if undefined),
    placed halfway between the lowest score it calls positive and the next lower score: the
    same calls on `p_pos`, and a margin on both sides for unseen slides. (roc_curve's own
    threshold is that lowest positive score itself, so on a few validation slides any unseen
    positive a little weaker than the weakest seen one was called negative.)"""
    y, p_pos = np.asarray(y), np.asarray(p_pos, float)
    if len(np.unique(y)) < 2:
        return 0.5
    fpr, tpr, thr = roc_curve(y, p_pos)
    best = int(np.argmax(tpr - fpr))
    lower = p_pos[p_pos < thr[best]]
    t = (thr[best] + lower.max()) / 2 if len(lower) else thr[best]
    return float(min(max(t, 0.0), 1.0))


def decide(prob: np.ndarray, threshold: float | None) -> np.ndarray:
    """Labels from probabilities: thresholded positive class (binary) or argmax."""
    if prob.shape[1] == 2 and threshold is not None:
        return (prob[:, 1] >= threshold).astype(int)
    return prob.argmax(1)


def majority_vote(votes: np.ndarray, mean_prob: np.ndarray) -> np.ndarray:
    """Per slide, the label most fold models voted for; ties go to the highest mean probability.

    votes: [n_folds, n_slides] int labels; mean_prob: [n_slides, C].
    """
    n_classes = mean_prob.shape[1]
    counts = np.stack([(votes == c).sum(0) for c in range(n_classes)], axis=1)  # [n, C]
    top = counts.max(1, keepdims=True)
    tied = counts == top
    return np.where(tied, mean_prob, -np.inf).argmax(1)


# bootstrap intervals only where every class has this many test slides: below it a percentile
# bootstrap of a small, often perfectly separated set gives intervals like [1.000, 1.000] that
# look informative and are not (they are then neither computed nor shown)
MIN_CLASS_FOR_CI = 10


def intervals_supported(y) -> bool:
    """Whether a test set with labels `y` gets bootstrap intervals (MIN_CLASS_FOR_CI a class)."""
    counts = np.unique(np.asarray(y), return_counts=True)[1]
    return len(counts) > 1 and int(counts.min()) >= MIN_CLASS_FOR_CI


def bootstrap_ci(
    y: np.ndarray, prob: np.ndarray, pred: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap (resampling slides) 95% intervals for every metric. Resamples
    with one class only are skipped. Binary tasks compute all resamples at once
    (`_binary_metrics`: the same values as `compute_metrics`, without sklearn's per-call cost)."""
    rng = np.random.default_rng(seed)
    y, pred = np.asarray(y), np.asarray(pred)
    n = len(y)
    draws = np.stack([rng.integers(0, n, n) for _ in range(n_boot)]) if n_boot else np.zeros((0, n), int)
    draws = draws[[len(np.unique(y[idx])) > 1 for idx in draws]] if len(draws) else draws
    if prob.shape[1] == 2 and set(np.unique(y)) <= {0, 1}:
        samples = _binary_metrics(y[draws], prob[:, 1][draws], pred[draws])
    else:
        rows = [compute_metrics(y[idx], prob[idx], pred[idx]) for idx in draws]
        samples = {m: np.array([r[m] for r in rows], float) for m in METRICS}
    out = {}
    for k in METRICS:
        vals = samples[k][np.isfinite(samples[k])]
        out[k] = (
            (float(np.quantile(vals, alpha / 2)), float(np.quantile(vals, 1 - alpha / 2)))
            if len(vals)
            else (float("nan"), float("nan"))
        )
    return out


def _binary_metrics(y: np.ndarray, p_pos: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    """`compute_metrics` of many binary resamples at once (rows of [B, n] labels 0/1, positive
    probabilities, decisions), each holding both classes: accuracy, balanced accuracy (mean
    recall), AUC (Mann-Whitney with tied scores counted half, as the ROC trapezoids count them)
    and F1 of class 1 (0 when undefined, sklearn's zero_division=0)."""
    from scipy.stats import rankdata

    pos, hit = y == 1, pred == y
    n_pos, n_neg = pos.sum(1), (~pos).sum(1)
    tp, tn = (hit & pos).sum(1), (hit & ~pos).sum(1)
    fp, fn = n_neg - tn, n_pos - tp
    ranks = rankdata(p_pos, axis=1)  # average ranks of ties
    auc = ((ranks * pos).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    f1_den = 2 * tp + fp + fn
    return {
        "accuracy": hit.mean(1),
        "balanced_accuracy": (tp / n_pos + tn / n_neg) / 2,
        "auc": auc,
        "f1": np.where(f1_den > 0, 2 * tp / np.maximum(f1_den, 1), 0.0),
    }
