"""A model's training recipe: how its authors trained it, registered with the model class.

`crossval` uses the recipe of each model unless the user overrides a field (`--lr`, ...), and
the run's config.yaml records the recipe each model was trained with. Epoch counts are the
run's (`--epochs`, with early stopping); schedules are stretched to them.

A recipe may carry a `small_cohort` variant, used instead for runs of fewer than
`SMALL_COHORT_BAGS` labelled bags (`TrainConfig.small_cohort`, on by default): the authors
tuned theirs on hundreds to a thousand slides, and some fail on tens (DSMIL, docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

SMALL_COHORT_BAGS = 300  # runs with fewer labelled bags use a recipe's `small_cohort` variant


@dataclass(frozen=True)
class Recipe:
    optimizer: str = "adam"  # adam | adamw | sgd | radam_lookahead
    lr: float = 2e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9  # sgd only
    schedule: str = "none"  # none | cosine | step | plateau
    cosine_min_lr: float = 0.0
    step_at: tuple[float, ...] = ()  # step: fractions of the run's epochs where lr *= step_gamma
    step_gamma: float = 0.1
    plateau_patience: int = 10  # plateau: epochs without a lower validation loss
    plateau_factor: float = 0.2
    grad_clip: float = 0.0  # max gradient norm; 0 = none
    init: str = "default"  # default | orthogonal (Linear/Conv weights, zero biases)
    source: str = ""  # the authors' code this follows
    model_kwargs: tuple[tuple[str, Any], ...] = ()  # model settings of the recipe; the user's win
    small_cohort: Recipe | None = None  # the variant for runs of fewer than SMALL_COHORT_BAGS bags

    def override(self, **fields) -> Recipe:
        """A copy with the fields that are not None replaced."""
        return replace(self, **{k: v for k, v in fields.items() if v is not None})

    def kwargs(self, user: dict) -> dict:
        """The model's constructor arguments: the recipe's, then the user's on top."""
        return {**dict(self.model_kwargs), **user}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"], d["step_at"] = list(self.betas), list(self.step_at)
        d["model_kwargs"] = dict(self.model_kwargs)
        d["small_cohort"] = self.small_cohort.to_dict() if self.small_cohort else None
        return d


# The recipe every model shared before per-model recipes: the CLAM-style default.
SHARED = Recipe(source="wsi-mil <= 0.1: one recipe for every model (Adam 2e-4, wd 1e-4, no schedule)")
