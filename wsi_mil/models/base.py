"""The interface every MIL model shares.

`forward(features [N, D], coords [N, 2] | None) -> MILOutput(logits [C], instance_scores [N],
aux_loss)`, one bag per call. `loss(output, label)` is what the trainer minimises (cross-entropy
plus the model's own auxiliary terms); `on_train_step` and `set_epoch` are hooks for models with
training-time state (PSMIL's prototypes and alignment-loss ramp).
`instance_logits(features, coords) -> [N, C]` is the bag model applied to every instance as a
bag of its own: what the model says of one patch alone, the heatmap's instance probability
(localization/scores.py). The base class loops over the instances; models whose one-instance
forward has a closed form compute it batched (tests check that both agree).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MILOutput:
    logits: torch.Tensor  # [C]
    instance_scores: torch.Tensor  # [N], what the heatmap shows for this model
    aux_loss: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)


class MILModel(nn.Module):
    """Base class: subclasses implement `forward`; override `loss` for multi-term objectives."""

    n_classes: int

    def loss(self, out: MILOutput, label: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(out.logits.unsqueeze(0), label.view(1))
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        return loss

    @classmethod
    def kwargs_for_classes(cls, classes: list[str]) -> dict:
        """Constructor arguments a run derives from its class names (crossval passes them; the
        user's `model_kwargs` win)."""
        return {}

    def on_train_step(self, out: MILOutput, label: torch.Tensor) -> None:
        """Called by the trainer after each optimiser step, in training only."""

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer at the start of each epoch."""

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """Parameter groups whose gradient norms a recipe's `grad_clip` bounds one by one (by
        default one group: the global norm)."""
        return [list(self.parameters())]

    def instance_logits(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
        """[N, C] logits of each instance as a one-instance bag (call in eval mode)."""
        return single_instance_logits(self, features, coords)


def single_instance_logits(
    model: MILModel, features: torch.Tensor, coords: torch.Tensor | None = None
) -> torch.Tensor:
    """[N, C]: `model` run on each instance as a bag of one, one forward per instance (the
    reference the batched `instance_logits` overrides are tested against)."""
    rows = [
        model(features[i : i + 1], None if coords is None else coords[i : i + 1]).logits
        for i in range(len(features))
    ]
    return torch.stack(rows) if rows else features.new_zeros(0, model.n_classes)


# Deliberate difference: patch dropout keeps at least this many instances (all of a smaller
# bag). The authors drop from whole-slide bags of thousands; at p 0.8 a digit bag of 10 kept 2,
# so a positive bag with one nine lost it in 4 of 5 steps and trained as a negative. DSMIL on
# the digit bags (`bench/bench_mil_recipes.py --models dsmil --cohorts digits --seeds S --epochs
# 50 --train '{"patience": 10}'`), floors 1 / 4 / 8 / 16 on choice seeds 0, 3-6: bag AUC 0.785 /
# 0.838 / 0.865 / 0.860, attention key AUC 0.812 / 0.880 / 0.894 / 0.808; held out (seeds 1, 2,
# 7-9) 1 -> 8: bag AUC 0.803 -> 0.941, attention 0.815 -> 0.914 (seed 8 0.547 -> 0.953). Bags
# of 40 and more are unchanged at p 0.8 (the tests' cohort, digits50, whole slides).
DROP_KEEP_AT_LEAST = 8


def drop_instances(features: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """In training, a random (1 - p) of the bag's instances, at least DROP_KEEP_AT_LEAST (dsmil-wsi's
    `--dropout_patch`: train_tcga.py `dropout_patches`); otherwise the whole bag."""
    if not training or p <= 0:
        return features
    keep = max(min(DROP_KEEP_AT_LEAST, len(features)), int(len(features) * (1 - p)))
    return features[torch.randperm(len(features), device=features.device)[:keep]]


def gated_attention_scores(h: torch.Tensor, a: nn.Linear, b: nn.Linear, w: nn.Linear) -> torch.Tensor:
    """Ilse et al. 2018 gated attention logits: w^T (tanh(A h) * sigmoid(B h)), shape [N]."""
    return w(torch.tanh(a(h)) * torch.sigmoid(b(h))).squeeze(-1)


class GatedAttention(nn.Module):
    """Gated attention pooling: softmax over instances of gated scores; returns (z, a)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.b = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid(), nn.Dropout(dropout))
        self.w = nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.w(self.a(h) * self.b(h)).squeeze(-1)
        a = torch.softmax(logits, dim=0)
        return a @ h, a
