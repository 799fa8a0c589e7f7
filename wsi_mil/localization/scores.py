"""Per-patch scores for a slide: model attention, sparse-inversion score, and their combination.

Each score is rank-normalised within the slide (to (0, 1]) so that scores from different
models, folds and scales can be averaged; with a fold ensemble, each fold's ranks are averaged.
The combined score is (1 - w) * attention + w * inversion of those averaged ranks, not ranked
again: patches the folds agree on stay near 1 (or 0), so a slide where the folds disagree does
not light up as brightly as one where they agree, and scores stay comparable across slides.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata

from ..formats.scores import PatchScores
from ..models import MILModel
from .inversion import DEFAULTS, sparse_inversion


def rank_normalise(x: np.ndarray) -> np.ndarray:
    """Ranks scaled to (0, 1] (ties averaged); non-finite input is a model fault, refused."""
    x = np.asarray(x, np.float64)
    if not np.isfinite(x).all():
        raise ValueError("the model produced non-finite instance scores")
    if len(x) == 0:
        return x
    return rankdata(x, method="average") / len(x)


def score_bag(
    models: list[MILModel],
    features: torch.Tensor,
    coords: torch.Tensor,
    inversion_weight: float = 0.5,
    target: int | None = None,
    **inversion_kw,
) -> PatchScores:
    """Attention + inversion scores averaged over `models` (e.g. the folds of a run)."""
    kw = {**DEFAULTS, **inversion_kw}
    with torch.no_grad():
        outputs = [m.eval()(features, coords) for m in models]
    prob = np.mean([torch.softmax(o.logits, -1).cpu().numpy() for o in outputs], axis=0)
    predicted = int(prob.argmax()) if target is None else target
    att = [rank_normalise(o.instance_scores.cpu().numpy()) for o in outputs]
    inv = [
        rank_normalise(sparse_inversion(m, features, coords, predicted, **kw).scores.cpu().numpy())
        for m in models
    ]
    # fold means of within-slide ranks; not ranked again, so patches the folds agree on stay
    # near 0 or 1 and the scores stay comparable across slides (pooled AUC, FROC)
    attention, inversion = np.mean(att, 0), np.mean(inv, 0)
    combined = (1 - inversion_weight) * attention + inversion_weight * inversion
    return PatchScores(coords.cpu().numpy().astype(np.int64), attention, inversion, combined, prob, predicted)
