"""Platt scaling of slide probabilities, fitted on a run's out-of-fold validation predictions.

Platt (1999), "Probabilistic outputs for support vector machines": P = sigmoid(a * x + b) with
x the model's logit, fitted by maximum likelihood against the smoothed targets
t+ = (N+ + 1) / (N+ + 2) and t- = 1 / (N- + 2), which keeps (a, b) finite when the classes are
separable (as small MIL cohorts often are). Two classes: one (a, b) on x = logit(P(class 1)),
P(class 0) = 1 - P(class 1). More classes: one (a, b) per class, one-vs-rest, on
x = logit(P(class)), then normalised so the classes' probabilities sum to 1. The heatmap and
`predict` report the calibrated slide probability beside the raw one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

EPS = 1e-6


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def fit_platt(x: np.ndarray, positive: np.ndarray) -> tuple[float, float]:
    """(a, b) minimising the cross-entropy of sigmoid(a x + b) to Platt's smoothed targets."""
    x, positive = np.asarray(x, np.float64), np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return 1.0, 0.0  # nothing to calibrate against: identity
    t = np.where(positive, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))

    def nll(ab):
        z = ab[0] * x + ab[1]
        return float(np.sum(np.logaddexp(0, z) - t * z))

    def grad(ab):
        r = 1 / (1 + np.exp(-(ab[0] * x + ab[1]))) - t
        return np.array([np.sum(r * x), np.sum(r)])

    res = minimize(nll, np.array([1.0, 0.0]), jac=grad, method="BFGS")
    return float(res.x[0]), float(res.x[1])


@dataclass
class PlattScaling:
    """Per-class (a, b); `apply(prob, c)` is the calibrated probability of class c."""

    a: list[float]
    b: list[float]
    n: int = 0  # validation slides it was fitted on

    @classmethod
    def fit(cls, prob: np.ndarray, labels: np.ndarray) -> PlattScaling:
        prob, labels = np.asarray(prob, np.float64), np.asarray(labels)
        if prob.shape[1] == 2:
            a, b = fit_platt(logit(prob[:, 1]), labels == 1)
            return cls([-a, a], [-b, b], len(labels))  # class 0 mirrors class 1 (unused by apply)
        ab = [fit_platt(logit(prob[:, c]), labels == c) for c in range(prob.shape[1])]
        return cls([a for a, _ in ab], [b for _, b in ab], len(labels))

    def apply_all(self, prob: np.ndarray) -> np.ndarray:
        """[..., C] calibrated probabilities of every class, summing to 1."""
        prob = np.asarray(prob, np.float64)
        if prob.shape[-1] == 2:
            p1 = 1 / (1 + np.exp(-(self.a[1] * logit(prob[..., 1]) + self.b[1])))
            return np.stack([1 - p1, p1], -1)
        z = np.asarray(self.a) * logit(prob) + np.asarray(self.b)
        p = 1 / (1 + np.exp(-z))
        return p / p.sum(-1, keepdims=True)

    def apply(self, prob: np.ndarray, c: int) -> np.ndarray:
        """The calibrated probability of class c."""
        return self.apply_all(prob)[..., c]

    def to_dict(self) -> dict:
        return {"method": "platt", "a": self.a, "b": self.b, "n": self.n}

    @classmethod
    def from_dict(cls, d: dict) -> PlattScaling:
        return cls(list(d["a"]), list(d["b"]), int(d.get("n", 0)))
