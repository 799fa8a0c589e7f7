"""DTFD-MIL: double-tier feature distillation MIL (Zhang et al., CVPR 2022).

Linear(in, 512, bias=False) + ReLU; the bag is split at random into `n_groups` pseudo-bags
(default 4). Tier 1, per pseudo-bag: gated attention (512, 128) and a Linear(512, C)
classifier on the attention-pooled feature, trained with the bag label (the pseudo-bags run as
one padded batch, each softmax over its own instances: the authors' per-pseudo-bag loop, in
fewer operations). Instance probabilities
come from that classifier on attention-weighted instance features (the paper's Grad-CAM form).
Distillation (`distill`): AFS (default, the attention-pooled feature), MaxS (the instance with
the highest positive-class probability) or MaxMinS (highest and lowest). Tier 2: gated
attention + classifier on the distilled set gives the bag logits.
Gradient clipping (the recipe's 5) bounds each module's norm separately, as the authors do
(`clip_groups`). Deliberate difference: the authors update both tiers with two optimisers and
`retain_graph=True`, which raises an in-place-modification error on current PyTorch. Here the
tier-2 input is detached, the two losses are summed and one backward pass is made, which gives
each tier the same gradients as the authors' scheme. In eval the split is seeded over a canonical instance
order, so predictions are deterministic and permutation invariant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import GatedAttention, MILModel, MILOutput
from .recipe import Recipe


class DTFDMIL(MILModel):
    recipe = Recipe(
        "adam", lr=1e-4, weight_decay=1e-4, schedule="step", step_at=(0.5,), step_gamma=0.2, grad_clip=5.0,
        source="hrzhang1123/DTFD-MIL Main_DTFD_MIL.py (10964f4): Adam(lr 1e-4, weight_decay 1e-4), "
        "MultiStepLR([100] of 200 epochs, gamma 0.2), clip_grad_norm_ 5",
    )  # fmt: skip

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 2,
        hidden: int = 512,
        attn_dim: int = 128,
        n_groups: int = 4,
        distill: str = "AFS",
        dropout: float = 0.0,
        eval_seed: int = 0,
    ):
        super().__init__()
        if distill not in ("AFS", "MaxS", "MaxMinS"):
            raise ValueError("distill must be AFS, MaxS or MaxMinS")
        self.n_classes, self.n_groups, self.distill, self.eval_seed = n_classes, n_groups, distill, eval_seed
        self.reduce = nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.ReLU())
        self.attention = GatedAttention(hidden, attn_dim)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, n_classes))
        self.attention2 = GatedAttention(hidden, attn_dim)
        self.classifier2 = nn.Linear(hidden, n_classes)

    def _split(self, features: torch.Tensor) -> list[torch.Tensor]:
        n = len(features)
        if self.training:
            perm = torch.randperm(n, device=features.device)
        else:
            # Seeded split over a canonical instance order (by a fixed random projection), so
            # eval output is deterministic and invariant to the order instances arrive in.
            g = torch.Generator().manual_seed(self.eval_seed)
            proj = torch.randn(features.shape[1], generator=g).to(features)
            order = torch.argsort(features.detach() @ proj, stable=True)
            perm = order[torch.randperm(n, generator=g).to(features.device)]
        # np.array_split in the authors' code: exactly min(n_groups, n) pseudo-bags (torch.chunk
        # would give 3 for 9 instances and 4 groups)
        return list(torch.tensor_split(perm, min(self.n_groups, n)))

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        h_all = self.reduce(features)
        groups = self._split(features)
        # tier 1 on all pseudo-bags at once: [G, L] padded rows (sizes differ by at most one),
        # each row's softmax over its own instances only (padding at -inf weighs 0)
        size = max(len(idx) for idx in groups)
        pad = torch.stack([F.pad(idx, (0, size - len(idx)), value=-1) for idx in groups])  # [G, L]
        valid = pad >= 0
        h = h_all[pad.clamp(min=0)]  # [G, L, hidden]
        att = self.attention
        logits = att.w(att.a(h) * att.b(h)).squeeze(-1).masked_fill(~valid, float("-inf"))
        a = torch.softmax(logits, dim=1)  # [G, L]
        z = torch.bmm(a.unsqueeze(1), h).squeeze(1)  # [G, hidden]
        sub_logits = self.classifier(z)
        if self.distill == "AFS":
            tier2_in = z
        else:
            # instance probabilities as the authors' get_cam_1d: the classifier's weights
            # (no bias) on each attention-weighted instance feature a_i h_i
            cam = (h * a.unsqueeze(-1)) @ self.classifier[1].weight.T  # [G, L, C]
            pos = torch.softmax(cam, dim=-1)[..., -1]
            picks = [pos.masked_fill(~valid, -float("inf")).argmax(1)]
            if self.distill == "MaxMinS":
                picks.append(pos.masked_fill(~valid, float("inf")).argmin(1))
            rows = torch.arange(len(groups), device=features.device)
            tier2_in = torch.stack([h[rows, p] for p in picks], dim=1).flatten(0, 1)  # max, min per group
        if self.training:  # tier-2's loss trains tier 2 only; in eval the input keeps its
            tier2_in = tier2_in.detach()  # gradient, which sparse inversion needs
        z2, a2 = self.attention2(tier2_in)
        logits2 = self.classifier2(z2)
        per_group = a2 if self.distill == "AFS" else a2.view(len(groups), -1).sum(1)
        scores = torch.empty(len(features), device=features.device)
        scores[pad[valid]] = (a * per_group.unsqueeze(1))[valid]
        return MILOutput(logits2, scores, None, {"sub_logits": sub_logits})

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """The authors clip each module's gradient norm on its own (Main_DTFD_MIL.py (10964f4):
        dimReduction, attention, classifier, then the tier-2 attCls), not one global norm."""
        groups = (self.reduce, self.attention, self.classifier, (self.attention2, self.classifier2))
        return [[p for m in (g if isinstance(g, tuple) else (g,)) for p in m.parameters()] for g in groups]

    def instance_logits(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
        """A bag of one is one pseudo-bag whose distilled feature (AFS, MaxS or MaxMinS: the
        instance itself, once or twice) tier 2 pools with weight 1: classifier2 on the embedding."""
        return self.classifier2(self.reduce(features))

    def loss(self, out: MILOutput, label: torch.Tensor) -> torch.Tensor:
        sub = out.extras["sub_logits"]
        tier1 = F.cross_entropy(sub, label.view(1).expand(len(sub)))
        return tier1 + F.cross_entropy(out.logits.unsqueeze(0), label.view(1))
