"""Per-patch scores of a slide: the probability that a patch shows a class, and where the
model looked.

For each fold model m of a run's ensemble and the mapped class c (`mapped_class`), a patch i
carries three pieces of evidence (`model_evidence`):
- instance: the log-odds of c given by the bag model applied to patch i alone, as a bag of one
  (`MILModel.instance_logits`; for ABMIL and PSMIL the classifier on the patch's embedding);
- attention: log(N a_i), the model's attention on the patch relative to a uniform 1/N;
- inversion: the sparse inversion's reading for the patch (inversion.py), towards c, stopped
  before the inverted bag would change the prediction.
The layers a heatmap shows (`score_bag`):
- combined: P(patch i shows c), the three pieces weighed and mapped to a probability by the
  run's patch calibration (patch_calibration.py, fitted out of fold); the fold models' are
  averaged in log-odds;
- patch_alone: the same probability from the instance evidence alone;
- attention, inversion: where the model looked and what the inversion kept, as within-slide
  ranks in (0, 1] (mean over fold models): relative layers, not comparable across slides.
A probability never depends on the slide's other patches through the slide probability: a
micro-metastasis on a slide the model calls negative keeps its patches' probabilities. Runs
without a patch calibration (made before wsi-mil 0.3) get the uncalibrated instance
probability in both probability layers.

The mapped class c (`mapped_class`): `--target` when given; for two classes, the one that is
not named like a negative (normal, negative, benign, non-X, not X, no_X, ...); two classes
neither or both of which are so named (LUAD vs LUSC) need `--target`; with more classes, the
predicted one, or, where some are named like a negative (normal beside LUAD and LUSC), the
likeliest of the others: a background class every slide contains has no patches of its own to
map (its negatives-mode calibration finds none).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy.special import expit
from scipy.stats import rankdata

from ..class_names import is_negative_name, positive_class
from ..config import HeatmapConfig
from ..errors import WsiMilError
from ..formats.scores import PatchScores
from ..models import MILModel
from .inversion import DEFAULTS, sparse_inversion
from .patch_calibration import PatchCalibration, load_calibrations

log = logging.getLogger("wsi_mil")
SCALES = ("absolute", "rank")
LAYER_LEGEND = {
    "combined": "probability that this patch is {target} (instance, attention and inversion, calibrated)",
    "patch_alone": "probability that this patch is {target} (from the patch alone, calibrated)",
    "attention": "where the model looked: rank within this slide (0-1), not comparable across slides",
    "inversion": "what the sparse inversion kept: rank within this slide (0-1), not comparable across slides",
}
RANK_LEGEND = "{name}: rank within this slide (0-1), not comparable across slides"
LOGODDS_CLIP = 30.0  # |log-odds| beyond this carry no more information in float32
FLAT_SHARE = 0.9  # a layer with more of its patches tied at one value is flat
LOG_ATTENTION_FLOOR = 1e-4  # N a_i floor: log(N a) >= -9.2 (softmax can underflow to 0)


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


def mapped_class(classes: list[str], prob: np.ndarray | None = None, target: str | None = None) -> int:
    """The class whose evidence a heatmap shows (see the module docstring)."""
    if target is not None:
        if target not in classes:
            raise WsiMilError(f"--target {target}: not a class of this run ({', '.join(classes)})")
        return classes.index(target)
    if len(classes) == 2:
        positive = positive_class(classes)
        if positive is not None:
            return positive
        raise WsiMilError(
            f"classes {classes[0]!r} and {classes[1]!r}: neither reads as the negative one, so which "
            f"to map is ambiguous; pass --target {classes[0]} or --target {classes[1]}"
        )
    if prob is None:
        raise WsiMilError(f"classes {', '.join(classes)}: pass --target with the class to map")
    named = [i for i, c in enumerate(classes) if not is_negative_name(c)]
    if 0 < len(named) < len(classes):  # normal beside diseases: the likeliest disease
        return max(named, key=lambda i: float(prob[i]))
    return int(np.argmax(prob))


def calibration_targets(classes: list[str]) -> list[int]:
    """The classes a run calibrates patch probabilities for: the positive one of a two-class
    run with a negative-named class, else every class (any may be asked for with --target)."""
    try:
        return [mapped_class(classes)] if len(classes) == 2 else list(range(len(classes)))
    except WsiMilError:
        return list(range(len(classes)))


def display_values(scores: PatchScores, name: str, scale: str = "absolute") -> np.ndarray:
    """The values a map shows: the stored score, or its within-slide rank."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, not {scale!r}")
    values = scores.get(name)
    return rank_normalise(values) if scale == "rank" else values


def legend(name: str, target: str, scale: str = "absolute", calibrated: bool = True) -> str:
    """The colour bar's label of a layer, saying what its values mean (a run without a patch
    calibration for the class: "not calibrated")."""
    if scale == "rank":
        return RANK_LEGEND.format(name=name)
    text = LAYER_LEGEND[name].format(target=target)
    return f"{name}: " + (text if calibrated else text.replace(", calibrated)", ", not calibrated)"))


def probability_text(prob: np.ndarray, classes: list[str] | None = None) -> str:
    """'p(normal) = 0.44, p(tumor) = 0.56': which class each slide probability is for."""
    names = classes or [str(i) for i in range(len(prob))]
    return ", ".join(f"p({c}) = {float(p):.2f}" for c, p in zip(names, prob))


def log_odds(logits: torch.Tensor, c: int) -> np.ndarray:
    """log p_c - log(1 - p_c) of softmax(logits) per row, clipped to +-LOGODDS_CLIP."""
    lp = torch.log_softmax(logits.double(), -1)
    others = torch.logsumexp(torch.cat([lp[:, :c], lp[:, c + 1 :]], 1), 1)
    return (lp[:, c] - others).clamp(-LOGODDS_CLIP, LOGODDS_CLIP).cpu().numpy()


@dataclass
class ModelEvidence:
    """One fold model's evidence for class `target` on one bag (see the module docstring)."""

    instance: np.ndarray  # [N] log-odds of the class, each patch as a bag of one
    attention: np.ndarray  # [N] attention weights (sum 1 over the bag)
    inversion: np.ndarray  # [N] the inversion's reading
    prob: np.ndarray  # [C] the model's slide probabilities
    steps_kept: int  # inversion steps taken before the prediction would have changed

    def inputs(self) -> np.ndarray:
        """[N, 3] the patch calibration's inputs (patch_calibration.INPUTS)."""
        n = len(self.instance)
        log_att = np.log(np.maximum(n * self.attention, LOG_ATTENTION_FLOOR))
        return np.stack([self.instance, log_att, self.inversion], 1)


def inversion_input(values: np.ndarray, reading: str, n: int) -> np.ndarray:
    """A reading put on a scale comparable across bags of different sizes: attention readings
    as log(N a), evidence scaled by N (a gradient spreads over the bag's N instances)."""
    if reading == "inverted_attention":
        return np.log(np.maximum(n * values, LOG_ATTENTION_FLOOR))
    if reading == "evidence":
        return values * n
    return values


@torch.no_grad()
def slide_probability(
    models: list[MILModel], features: torch.Tensor, coords: torch.Tensor | None
) -> np.ndarray:
    """[C] the ensemble's slide probabilities (mean over models)."""
    return np.mean(
        [torch.softmax(m.eval()(features, coords).logits.float(), -1).cpu().numpy() for m in models], 0
    )


@torch.no_grad()
def _forward(model: MILModel, features: torch.Tensor, coords: torch.Tensor, target: int):
    out = model.eval()(features, coords)
    inst = log_odds(model.instance_logits(features, coords), target)
    return out, inst


def model_evidence(
    model: MILModel, features: torch.Tensor, coords: torch.Tensor | None, target: int, **inversion_kw
) -> ModelEvidence:
    """Instance, attention and inversion evidence of one fold model for class `target`."""
    kw = {**DEFAULTS, **inversion_kw}
    out, inst = _forward(model, features, coords, target)
    attention = _check_finite(out.instance_scores.float().cpu().numpy())
    inv = sparse_inversion(model, features, coords, target, **kw)
    reading = inversion_input(_check_finite(inv.scores.cpu().numpy()), kw["score"], len(features))
    prob = torch.softmax(out.logits.float(), -1).cpu().numpy()
    return ModelEvidence(inst, attention, reading, prob, inv.steps_kept)


def score_bag(
    models: list[MILModel],
    features: torch.Tensor,
    coords: torch.Tensor,
    target: int | None = None,
    classes: list[str] | None = None,
    calibration: PatchCalibration | None = None,
    **inversion_kw,
) -> PatchScores:
    """Every layer of one bag, averaged over `models` (the module docstring says what each is).

    `target` is the class index to map; None picks `mapped_class(classes, prob)`."""
    prob = slide_probability(models, features, coords)
    names = classes or [str(i) for i in range(len(prob))]
    if target is None:
        target = mapped_class(names, prob)
    evidence = [model_evidence(m, features, coords, target, **inversion_kw) for m in models]
    # folds are averaged in log-odds (the geometric mean of their odds): a mean of
    # probabilities lets the most confident fold decide the patches' order
    if calibration is not None:
        inputs = [e.inputs() for e in evidence]
        alone = expit(np.mean([calibration.instance.logit(x) for x in inputs], 0))
        combined = expit(np.mean([calibration.combined.logit(x) for x in inputs], 0))
    else:
        alone = expit(np.mean([e.instance for e in evidence], 0))
        combined = alone
    attention = np.mean([rank_normalise(e.attention) for e in evidence], 0)
    inversion = np.mean([rank_normalise(e.inversion) for e in evidence], 0)
    flat = sum(len(e.attention) > 1 and np.ptp(e.attention) == 0 for e in evidence)
    flat_inversion = sum(is_mostly_tied(e.inversion) for e in evidence)
    xy = coords.cpu().numpy().astype(np.int64)
    return PatchScores(
        xy, attention, inversion, combined, prob, target, patch_alone=alone,
        calibrated=calibration.mode if calibration is not None else "none",
        steps_kept=[e.steps_kept for e in evidence], flat_attention=flat, flat_inversion=flat_inversion,
        fold_probs=[e.prob for e in evidence],
    )  # fmt: skip


def is_mostly_tied(x: np.ndarray, share: float = FLAT_SHARE) -> bool:
    """More than `share` of a bag's (two or more) readings are one value: no order to show."""
    if len(x) < 2:
        return False
    return int(np.unique(x, return_counts=True)[1].max()) > share * len(x)


def flat_inversion_warning(flat: int, n_models: int, where: str, target: str) -> str | None:
    """The warning when the inversion of `flat` of the ensemble's models left most patches tied.

    Towards a class the slide is not called (a normal slide's tumour heatmap) the inversion may
    remove nearly the whole bag, since an emptier bag looks less like the other class: its
    layer then ranks a few survivors and ties the rest, which the PNG shows as one colour."""
    if not flat:
        return None
    return (
        f"{where}: the inversion towards {target} of {flat} of {n_models} models removed nearly "
        f"every patch (over {FLAT_SHARE:.0%} tied), so the inversion layer is flat: no patch here "
        "carries evidence the inversion could keep; read the combined or patch_alone layer"
    )


def flat_attention_warning(flat: int, n_models: int, where: str) -> str | None:
    """The warning when `flat` of the ensemble's models had a constant attention, or None.

    A collapsed attention (a model that learned to weigh every instance the same; DSMIL on
    the digit bags, docs/benchmarks.md) is exactly constant, so its attention layer is one
    flat colour: the user should read the probability layers instead."""
    if not flat:
        return None
    return (
        f"{where}: the attention of {flat} of {n_models} models is the same on every patch "
        "(collapsed attention), so their attention layer is flat; read the combined or instance "
        "layer, or train another model"
    )


def inversion_settings(cfg: HeatmapConfig) -> dict:
    """The sparse-inversion keyword arguments of a heatmap config."""
    return {
        "steps": cfg.inversion_steps,
        "lr": cfg.inversion_lr,
        "lam": cfg.inversion_lambda,
        "score": cfg.inversion_score,
    }


def read_calibrations(run, model: str, cfg: HeatmapConfig) -> tuple[dict, dict]:
    """(the model's patch calibrations by class, the inversion settings to score with): the
    ones the calibration was fitted with, since the combined layer's map expects them."""
    calibrations, inversion = load_calibrations(run.read_patch_calibration(model))
    if not calibrations:
        log.warning(
            "%s: no patch_calibration.json for %s (a run from before wsi-mil 0.3): the probability "
            "layers are uncalibrated instance probabilities; re-run 'wsi-mil crossval' to calibrate",
            run.root,
            model,
        )
    return calibrations, inversion or inversion_settings(cfg)


def score_with_config(
    models: list[MILModel],
    features: torch.Tensor,
    coords: torch.Tensor,
    classes: list[str],
    calibrations: dict[str, PatchCalibration],
    inversion: dict,
    target: str | None = None,
) -> PatchScores:
    """`score_bag` as `wsi-mil heatmap` and `wsi-mil predict --scores` both compute it: the
    mapped class, its patch calibration and the inversion settings it was fitted with."""
    t = mapped_class(classes, slide_probability(models, features, coords), target)
    if classes[t] in calibrations or len(classes) != 2 or classes[1 - t] not in calibrations:
        return score_bag(models, features, coords, t, classes, calibrations.get(classes[t]), **inversion)
    # two classes, calibrated for the other one only (the class not named like a negative): a
    # patch is this class when it is not the other, P = 1 - P(other); attention and inversion
    # are this class's own
    other = score_bag(models, features, coords, 1 - t, classes, calibrations[classes[1 - t]], **inversion)
    mine = score_bag(models, features, coords, t, classes, None, **inversion)
    return replace(
        mine, combined=1 - other.combined, patch_alone=1 - other.patch_alone,
        calibrated=f"{other.calibrated} (1 - p({classes[1 - t]}))",
    )  # fmt: skip
