"""The interface every MIL model shares.

`forward(features [N, D], coords [N, 2] | None) -> MILOutput(logits [C], instance_scores [N],
aux_loss)`, one bag per call. `loss(output, label)` is what the trainer minimises (cross-entropy
plus the model's own auxiliary terms); `on_train_step` and `set_epoch` are hooks for models with
training-time state (PSMIL's prototypes and alignment-loss ramp).
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

    def on_train_step(self, out: MILOutput, label: torch.Tensor) -> None:
        """Called by the trainer after each optimiser step, in training only."""

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer at the start of each epoch."""


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
