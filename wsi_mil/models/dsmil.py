"""DSMIL: dual-stream MIL with critical-instance attention (Li, Li & Eliceiri, CVPR 2021).

Max-pooling stream: instance classifier Linear(in, C); the critical instance of each class is
the argmax of its instance logits. Aggregation stream: query network Linear(in, 128) + ReLU +
Linear(128, 128) + Tanh; attention A = softmax_i(q_i . q_crit / sqrt(128)); bag embedding
B = A^T V with V the identity (the authors' default, `passing_v=False`); bag classifier
Conv1d(C, C, kernel_size=in). Loss 0.5 CE(bag) + 0.5 CE(max instance logits).
Deliberate difference: the authors use one sigmoid output per class with BCE; here logits are
C-way with cross-entropy, as for every model in the registry. `instance_scores` is the
attention towards the positive class (class 1) for binary tasks, else the predicted class.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import MILModel, MILOutput


class DSMIL(MILModel):
    def __init__(self, in_dim: int, n_classes: int = 2, q_dim: int = 128, dropout_v: float = 0.0):
        super().__init__()
        self.n_classes = n_classes
        self.instance_classifier = nn.Linear(in_dim, n_classes)
        self.q = nn.Sequential(nn.Linear(in_dim, q_dim), nn.ReLU(), nn.Linear(q_dim, q_dim), nn.Tanh())
        self.v = nn.Dropout(dropout_v)
        self.fcc = nn.Conv1d(n_classes, n_classes, kernel_size=in_dim)
        self.q_dim = q_dim

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        ins_logits = self.instance_classifier(features)  # [N, C]
        crit = ins_logits.argmax(dim=0)  # [C]
        q = self.q(features)  # [N, 128]
        q_crit = self.q(features[crit])  # [C, 128]
        attn = torch.softmax(q @ q_crit.T / math.sqrt(self.q_dim), dim=0)  # [N, C]
        bag = attn.T @ self.v(features)  # [C, in]
        logits = self.fcc(bag.unsqueeze(0)).view(-1)  # [C]
        max_logits = ins_logits.max(dim=0).values
        col = 1 if self.n_classes == 2 else int(logits.argmax())
        return MILOutput(logits, attn[:, col], None, {"max_logits": max_logits, "attention": attn})

    def loss(self, out: MILOutput, label: torch.Tensor) -> torch.Tensor:
        y = label.view(1)
        return 0.5 * F.cross_entropy(out.logits.unsqueeze(0), y) + 0.5 * F.cross_entropy(
            out.extras["max_logits"].unsqueeze(0), y
        )
