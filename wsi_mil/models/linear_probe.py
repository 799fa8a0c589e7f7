"""Linear probe: logistic regression on slide embeddings (`wsi-mil slide-embed`).

The bag is one slide embedding (a feature file with one row); a bag of several rows (patch
features) is mean-pooled first, which makes the probe a mean-pooling baseline. The model is a
`Linear(in_dim, n_classes)` whose softmax is the logistic regression's probabilities, so fold
checkpoints, the ensemble, predict and the report work as for the MIL models.

It is fitted in closed form, not by the MIL trainer (training/probe.py): scikit-learn's
`LogisticRegression(C, max_iter=10000, random_state=0)` (L2, lbfgs) as in MADELEINE's
`bin/run_linear_probing.py` (mahmoodlab/MADELEINE), which fixes C = 1; here C is chosen on the
fold's selection split from a log grid that includes 1 (where the MIL models choose an epoch).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import MILModel, MILOutput
from .recipe import Recipe


class LinearProbe(MILModel):
    slide_level = True  # fitted by training/probe.py; no patch calibration or heatmap
    recipe = Recipe(
        optimizer="lbfgs", lr=0.0, weight_decay=0.0,
        source="logistic regression, scikit-learn LogisticRegression(C, max_iter=10000, random_state=0) "
        "as in MADELEINE bin/run_linear_probing.py; C from 1e-3..1e3 by selection-split AUC",
    )  # fmt: skip

    def __init__(self, in_dim: int, n_classes: int = 2, C: float = 1.0):
        super().__init__()
        self.n_classes, self.C = n_classes, C
        self.linear = nn.Linear(in_dim, n_classes)

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        logits = self.linear(features.float().mean(0))
        scores = self.linear(features.float())[:, -1]  # each row's last-class logit
        return MILOutput(logits, scores)

    def instance_logits(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(features.float())
