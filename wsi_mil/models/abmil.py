"""ABMIL: attention-based deep MIL with gated attention (Ilse, Tomczak & Welling, ICML 2018).

WSI sizes as in CLAM and most benchmarks: Linear(in, 512) + ReLU + Dropout(0.25), gated
attention 512 -> 256 (tanh x sigmoid) -> 1, softmax over instances, classifier Linear(512, C).
`pooling="prob"` swaps the gated attention for PSMIL's probability-space attention (see
psmil.py), the drop-in use the PSMIL paper proposes for attention-based MIL.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import GatedAttention, MILModel, MILOutput
from .recipe import Recipe


class ABMIL(MILModel):
    recipe = Recipe(
        "adam", lr=5e-4, weight_decay=1e-4, betas=(0.9, 0.999),
        source="AMLab-Amsterdam/AttentionDeepMIL main.py: Adam(lr 0.0005, betas (0.9, 0.999), "
        "weight_decay 10e-5)",
    )  # fmt: skip

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 2,
        hidden: int = 512,
        attn_dim: int = 256,
        dropout: float = 0.25,
        pooling: str = "gated",
        **prob_kw,
    ):
        super().__init__()
        self.n_classes = n_classes
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        if pooling == "gated":
            self.pool = GatedAttention(hidden, attn_dim)
        elif pooling == "prob":
            from .psmil import ProbabilityAttention

            self.pool = ProbabilityAttention(hidden, n_classes, **prob_kw)
        else:
            raise ValueError(f"pooling must be 'gated' or 'prob', not {pooling!r}")
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        h = self.fc(features)
        z, a = self.pool(h)
        return MILOutput(self.classifier(z), a, None, {"h": h})

    def instance_logits(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
        """A bag of one pools its instance with weight 1: the classifier on each embedding."""
        return self.classifier(self.fc(features))

    def on_train_step(self, out: MILOutput, label: torch.Tensor) -> None:
        if hasattr(self.pool, "update_prototypes"):
            self.pool.update_prototypes(out.extras["h"], label)
