"""Fit the linear probe (models/linear_probe.py) on one fold: logistic regression per C of a
log grid on the fitting slides, the C with the best selection-split AUC (ties: lower loss),
its Youden threshold there. Same inputs and `FoldResult` as `fit.train_fold`."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from ..config import TrainConfig
from .data import BagDataset
from .fit import FoldResult
from .metrics import auc_score, compute_metrics, decide, youden_threshold

C_GRID = tuple(10.0**k for k in range(-3, 4))  # includes MADELEINE's C = 1


def _matrix(ds: BagDataset) -> tuple[np.ndarray, np.ndarray]:
    rows = [ds[i] for i in range(len(ds))]
    return np.stack([x.float().mean(0).numpy() for x, _, _ in rows]), np.array([int(y) for _, _, y in rows])


def _state(clf: LogisticRegression, n_classes: int, dim: int) -> dict:
    """The fitted regression as `LinearProbe.linear`'s weights: softmax([0, w.x + b]) is the
    binary model's sigmoid; the multinomial model's coefficients are its logits."""
    w, b = torch.zeros(n_classes, dim), torch.zeros(n_classes)
    coef, icpt = torch.from_numpy(clf.coef_).float(), torch.from_numpy(clf.intercept_).float()
    if n_classes == 2:
        w[1], b[1] = coef[0], icpt[0]
    else:
        w[torch.as_tensor(clf.classes_)], b[torch.as_tensor(clf.classes_)] = coef, icpt
    return {"linear.weight": w, "linear.bias": b}


def fit_probe(
    model_name: str,
    model_kwargs: dict,
    train: BagDataset,
    val: BagDataset,
    n_classes: int,
    cfg: TrainConfig,
    seed: int,
    device: torch.device,
    on_epoch: Callable[[dict], None] | None = None,
    recipe=None,
) -> FoldResult:
    x, y = _matrix(train)
    xv, yv = _matrix(val)
    grid = [model_kwargs["C"]] if "C" in model_kwargs else C_GRID
    best, history = None, []
    for i, c in enumerate(grid):
        t0 = time.perf_counter()
        clf = LogisticRegression(C=c, max_iter=10000, random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(x, y)
        prob = np.zeros((len(xv), n_classes))
        prob[:, clf.classes_] = clf.predict_proba(xv)
        val_loss = float(-np.log(prob[np.arange(len(yv)), yv].clip(1e-8)).mean())
        train_p = clf.predict_proba(x)[np.arange(len(y)), np.searchsorted(clf.classes_, y)]
        row = {
            "epoch": i, "C": c, "train_loss": float(-np.log(train_p.clip(1e-8)).mean()), "val_loss": val_loss,
            "val_auc": auc_score(yv, prob), "seconds": time.perf_counter() - t0, "load_seconds": 0.0,
        }  # fmt: skip
        history.append(row)
        if on_epoch:
            on_epoch(row)
        key = (row["val_auc"] if np.isfinite(row["val_auc"]) else -val_loss, -val_loss)
        if best is None or key > best[0]:
            best = (key, i, c, clf, prob)
    _, epoch, c, clf, prob = best
    threshold = youden_threshold(yv, prob[:, 1]) if n_classes == 2 else None
    metrics = compute_metrics(yv, prob, decide(prob, threshold))
    return FoldResult(_state(clf, n_classes, x.shape[1]), epoch, threshold, metrics, history, {"C": c})
