"""CAMIL: context-aware MIL (Fourkioti, De Vries & Bakal, ICLR 2024), as the authors built it.

Follows olgarithmics/ICLR_CAMIL (TensorFlow): `models/custom_layers.py` (`encoder`,
`NeighborAggregator`, `CustomAttention`, `MILAttentionLayer`), `models/camil.py` and the tile
graph of `feature_extractor/compute_feats.py` + `dataset_utils/camelyon_batch_generator.py`:

- T = X + Nystrom(X): 8 heads of 64, 256 landmarks, 6 pseudo-inverse steps.
- Tile graph: each tile's 16 nearest tiles by coordinates (itself first); edge weights are
  exp(-d) of the cosine distances d of the *input* features to the 15 others, each row
  L2-normalised; the self weight is the row's largest; the first 8 columns are kept (self +
  7 neighbours). Fixed, not learnt; a [N, 8] index table, no N x N matrix.
- Neighbour-summed attention: alpha_i = softmax_i( sum_j w_ij q_i . k_j / sqrt(256) ) over
  the whole bag, q = T Wq, k = T Wk (256-d, no bias).
- Local term L_i = alpha_i * (X_i Wv + b): values from the input features.
- Fusion as `encoder.call`: g = sigmoid(-L)^2, M = 2 L g + 2 T (1 - g).
- Gated attention pooling (128) over M, sum of a_i M_i, linear classifier.
`instance_scores` is the pooling attention a (the authors' `k_alpha`, saved for heatmaps).

Deliberate differences: features that are not 512-d first pass a Linear(in, 512) (the
authors' features are 512-d; torchmil does the same); two classes use a 2-way softmax head
(equivalent to the authors' one sigmoid); the pooling layers carry biases.
torchmil's CAMIL agrees on the neighbour-summed softmax (parity test) but takes values from T
and fuses with sigmoid(L); we follow the authors there.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .base import GatedAttention, MILModel, MILOutput
from .nystrom import NystromAttention
from .recipe import Recipe

GRAPH_POOL = 16  # neighbours whose distances are L2-normalised together (compute_feats.py)


def knn_from_coords(coords: torch.Tensor, k: int) -> torch.Tensor:
    """[N, k] indices of each tile's k nearest tiles (itself first), by a KD-tree."""
    from scipy.spatial import cKDTree

    n = len(coords)
    k = min(k, n)
    pts = coords.detach().cpu().numpy().astype(np.float64)
    _, idx = cKDTree(pts).query(pts, k=k)
    idx = np.asarray(idx).reshape(n, k)
    return torch.as_tensor(idx, dtype=torch.long, device=coords.device)


@torch.no_grad()
def camil_graph(features: torch.Tensor, coords: torch.Tensor | None, k: int = 8):
    """(neighbour indices [N, k'], edge weights [N, k']) of the authors' tile graph.

    Without coordinates (or with one tile) each tile is its own only neighbour, weight 1."""
    n = len(features)
    if coords is None or n < 2:
        return torch.arange(n, device=features.device).unsqueeze(1), features.new_ones(n, 1)
    nbr = knn_from_coords(coords, GRAPH_POOL)  # self first
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    cos_dist = 1 - (x.unsqueeze(1) * x[nbr]).sum(-1)  # [N, pool]
    others = torch.nn.functional.normalize(cos_dist[:, 1:], dim=1)  # sklearn normalize(norm="l2")
    sim = torch.exp(-others)
    weights = torch.cat([sim.max(dim=1, keepdim=True).values, sim], dim=1)
    k = min(k, nbr.shape[1])
    return nbr[:, :k], weights[:, :k].to(features.dtype)


class CAMIL(MILModel):
    recipe = Recipe(
        "adam", lr=2e-4, weight_decay=0.0, schedule="plateau", plateau_patience=10, plateau_factor=0.2,
        source="olgarithmics/ICLR_CAMIL args.py (init_lr 0.0002) and models/camil.py (a65184c): "
        "Adam(beta_1 0.9, beta_2 0.999) without weight decay (args.py's decay is never passed to the "
        "optimiser, and the layers' l2(1e-5) regularisers never reach the loss of their custom "
        "train_step), CustomReduceLRoP(patience 10, factor 0.2) on validation loss",
    )  # fmt: skip

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 2,
        dim: int = 512,
        heads: int = 8,
        landmarks: int = 256,
        k: int = 8,
        qk_dim: int = 256,
        attn_dim: int = 128,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.n_classes, self.k = n_classes, k
        self.fc = nn.Linear(in_dim, dim) if in_dim != dim else nn.Identity()
        self.global_attn = NystromAttention(dim, heads, 64, landmarks, dropout=dropout)
        self.wq = nn.Linear(dim, qk_dim, bias=False)
        self.wk = nn.Linear(dim, qk_dim, bias=False)
        self.wv = nn.Linear(dim, dim)
        self.pool = GatedAttention(dim, attn_dim)
        self.classifier = nn.Linear(dim, n_classes)
        self.scale = 1 / math.sqrt(qk_dim)

    def neighbour_attention(self, t: torch.Tensor, nbr: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Raw scores sum_j w_ij q_i . k_j / sqrt(d) of `NeighborAggregator` (before the softmax)."""
        q, key = self.wq(t), self.wk(t)
        return ((q.unsqueeze(1) * key[nbr]).sum(-1) * weights).sum(1) * self.scale

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        x = self.fc(features)
        t = x + self.global_attn(x.unsqueeze(0))[0]
        nbr, weights = camil_graph(features, coords, self.k)
        raw = self.neighbour_attention(t, nbr, weights)
        local = torch.softmax(raw, dim=0).unsqueeze(1) * self.wv(x)
        g = torch.sigmoid(-local) ** 2
        fused = 2 * local * g + 2 * t * (1 - g)
        z, a = self.pool(fused)
        return MILOutput(self.classifier(z), a, extras={"neighbour_scores": raw})

    def instance_logits(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
        """Every instance as a bag of one, batched: global attention over one token, the
        instance its own only neighbour (weight 1, softmax 1), pooling weight 1."""
        x = self.fc(features)
        t = x + self.global_attn(x.unsqueeze(1))[:, 0]
        local = self.wv(x)
        g = torch.sigmoid(-local) ** 2
        return self.classifier(2 * local * g + 2 * t * (1 - g))
