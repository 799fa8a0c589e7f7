"""Per-patch scores for a slide on one absolute [0, 1] scale: attention, inversion, combined.

For each model m of the ensemble (the folds of a run) and the mapped class c:

    attention_m,i = P_m(c | slide) * relative(a_m)_i
    inversion_m,i = P_m(c | slide) * relative(e_m)_i

where a_m are the model's instance (attention) scores, e_m the sparse-inversion scores,
`relative` min-max scales a slide's values to [0, 1] (its strongest patch 1, its weakest 0),
and P_m(c | slide) is the model's slide probability after the run's Platt scaling
(calibration.py, fitted on out-of-fold validation predictions; the raw probability for runs
made before it). The ensemble's score is the mean over models; combined = (1 - w) attention +
w inversion. So a score reads "the calibrated probability that the slide is c, times how much
of the slide's strongest evidence this patch carries": a slide the model calls negative stays
cold everywhere, the key patches of a confidently positive slide approach 1, and 0.5 means the
same on every slide (pooled patch AUC, FROC and thresholds are meaningful across slides).
Measured on the demo (docs/benchmarks.md): calibration matters, because MIL models trained
briefly on small cohorts give slide probabilities near 0.5 for every slide.
Within-slide ranks (`rank_normalise`) remain a display option, labelled as such.

The mapped class c (`mapped_class`): the one the user names; else, for two classes where one
is named like a negative (normal, negative, benign, ...), the other one; else the predicted
class, so a subtyping map (LUAD vs LUSC) shows the evidence for what the model predicts.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata

from ..calibration import PlattScaling
from ..config import HeatmapConfig
from ..formats.scores import PatchScores
from ..models import MILModel
from .inversion import DEFAULTS, sparse_inversion

SCALES = ("absolute", "rank")
NEGATIVE_NAMES = {"normal", "negative", "benign", "healthy", "control", "0", "false", "no", "neg"}
SCALE_LEGEND = {
    "absolute": "P(slide is {target}) x relative evidence; same 0-1 scale on every slide",
    "rank": "rank within this slide (0-1); not comparable across slides",
}


def _check_finite(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if not np.isfinite(x).all():
        raise ValueError("the model produced non-finite instance scores")
    return x


def rank_normalise(x: np.ndarray) -> np.ndarray:
    """Ranks scaled to (0, 1] (ties averaged); non-finite input is a model fault, refused."""
    x = _check_finite(x)
    if len(x) == 0:
        return x
    return rankdata(x, method="average") / len(x)


def relative(x: np.ndarray) -> np.ndarray:
    """Min-max scaled to [0, 1] within the slide (all 0 when every patch scores the same)."""
    x = _check_finite(x)
    if len(x) == 0:
        return x
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def mapped_class(classes: list[str], prob: np.ndarray, target: str | None = None) -> int:
    """The class whose evidence a heatmap shows (see the module docstring)."""
    if target is not None:
        return classes.index(target)
    if len(classes) == 2:
        negative = [i for i, c in enumerate(classes) if c.strip().lower() in NEGATIVE_NAMES]
        if len(negative) == 1:
            return 1 - negative[0]
    return int(np.argmax(prob))


def display_values(scores: PatchScores, name: str, scale: str = "absolute") -> np.ndarray:
    """The values a map shows: the stored absolute score, or its within-slide rank."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, not {scale!r}")
    values = scores.get(name)
    return rank_normalise(values) if scale == "rank" else values


def score_bag(
    models: list[MILModel],
    features: torch.Tensor,
    coords: torch.Tensor,
    inversion_weight: float = 0.5,
    target: int | None = None,
    classes: list[str] | None = None,
    calibration: PlattScaling | None = None,
    **inversion_kw,
) -> PatchScores:
    """Attention, inversion and combined scores of one bag, averaged over `models`.

    `target` is the class index to map; None picks `mapped_class(classes, prob)`.
    `calibration` maps each model's slide probability before it gates the evidence."""
    kw = {**DEFAULTS, **inversion_kw}
    with torch.no_grad():
        outputs = [m.eval()(features, coords) for m in models]
    probs = np.stack([torch.softmax(o.logits.float(), -1).cpu().numpy() for o in outputs])
    prob = probs.mean(0)
    if target is None:
        names = classes or [str(i) for i in range(len(prob))]
        target = mapped_class(names, prob)
    gate = calibration.apply(probs, target) if calibration is not None else probs[:, target]
    rel = [relative(o.instance_scores.cpu().numpy()) for o in outputs]
    att = [g * r for g, r in zip(gate, rel)]
    inv = [
        g * relative(sparse_inversion(m, features, coords, target, **kw).scores.cpu().numpy())
        for g, m in zip(gate, models)
    ]
    attention, inversion = np.mean(att, 0), np.mean(inv, 0)
    combined = (1 - inversion_weight) * attention + inversion_weight * inversion
    flat = sum(len(r) > 1 and not r.any() for r in rel)
    xy = coords.cpu().numpy().astype(np.int64)
    return PatchScores(xy, attention, inversion, combined, prob, target, flat_attention=flat)


def flat_attention_warning(flat: int, n_models: int, where: str) -> str | None:
    """The warning when `flat` of the ensemble's models had a constant attention, or None.

    A collapsed attention (a model that learned to weigh every instance the same; DSMIL on
    the digit bags, docs/benchmarks.md) is exactly constant, so `relative` maps it to 0 and
    the attention layer is blank: the user should read the inversion layer instead."""
    if not flat:
        return None
    return (
        f"{where}: the attention of {flat} of {n_models} models is the same on every patch "
        "(collapsed attention), so their attention scores are 0; read the inversion layer, or "
        "train another model"
    )


def score_with_config(
    models: list[MILModel],
    features: torch.Tensor,
    coords: torch.Tensor,
    classes: list[str],
    calibration: PlattScaling | None,
    cfg: HeatmapConfig,
    target: str | None = None,
) -> PatchScores:
    """`score_bag` with the heatmap settings of `cfg`: what `wsi-mil heatmap` and
    `wsi-mil predict --scores` both compute."""
    return score_bag(
        models,
        features,
        coords,
        cfg.combine_weight,
        target=classes.index(target) if target is not None else None,
        classes=classes,
        calibration=calibration,
        steps=cfg.inversion_steps,
        lr=cfg.inversion_lr,
        lam=cfg.inversion_lambda,
        score=cfg.inversion_score,
    )
