"""CAMIL: context-aware MIL (Fourkioti, De Vries & Bakal, ICLR 2024), as the authors built it.

Follows olgarithmics/ICLR_CAMIL (TensorFlow, 5f8ef57): `models/custom_layers.py` (`encoder`,
`NeighborAggregator`, `CustomAttention`, `MILAttentionLayer`, `Last_Sigmoid`), `models/camil.py`,
their Nystrom port `nystromformer/nystrom_attention.py` and the tile graph of
`feature_extractor/compute_feats.py` + `dataset_utils/camelyon_batch_generator.py`:

- T = X + Nystrom(X): 8 heads of 64, 256 landmarks, 6 pseudo-inverse steps, and their port's
  value residual: a Conv2D (33, 1) over the 8 heads of each token (values channels-last
  [heads, n, 64], 8 groups of 8 value channels, "same" zero padding), not the package's
  per-head convolution along the sequence (nystrom.py `residual="heads"`).
- Tile graph: each tile's 16 nearest tiles by Euclidean distance of the coordinates (itself
  first); edge weights are exp(-d) of the cosine distances d of the *input* features to the 15
  others, each row L2-normalised; the self weight is the row's largest; the first 8 columns are
  kept (self + 7 neighbours). Fixed, not learnt; a [N, 8] index table, no N x N matrix.
- Neighbour-summed attention: alpha_i = softmax_i( sum_j w_ij q_i . k_j / sqrt(256) ) over
  the whole bag, q = T Wq, k = T Wk (256-d, no bias).
- Local term L_i = alpha_i * (X_i Wv + b): values from the input features.
- Fusion as `encoder.call`: g = sigmoid(-L)^2, M = 2 L g + 2 T (1 - g).
- Gated attention pooling (128, no biases, as `MILAttentionLayer`) over M, sum of a_i M_i;
  `Last_Sigmoid`: one sigmoid output for two classes (our logits [0, s]: softmax = their
  sigmoid(s), cross-entropy = their BCE), a softmax over n outputs otherwise (`--subtyping`).
`instance_scores` is the pooling attention a (the authors' `k_alpha`, saved for heatmaps).
tests/test_camil_parity.py restates their layers and graph in torch and compares the whole
forward (bag logit, alpha, k_alpha), weights copied, in float64: with `exact_short=False` (their
padding) on a tile grid with ties (192 tiles) and on bags of 100, 256 and 315 tiles, and with
our defaults on the grid; the largest difference is 6e-15.

Deliberate differences, measured (docs/methods.md has the numbers):
- Ties among equidistant tiles are broken in tile order (a stable argsort of the distances;
  KD-tree candidates, widened until the 16th distance's ties are all in). The authors'
  `np.argsort` is numpy's default quicksort over the whole row of N distances, unstable: which
  of several equidistant tiles it keeps depends on the whole row and on the numpy build and
  CPU (the portable introsort, or x86-simd-sort on AVX2 / AVX-512), so their own graph differs
  between machines: on a 40 x 40 grid the kept 8 differ in 74% of tiles between numpy's
  portable introsort and its AVX2 sort. Matching one of them needs the full rows: O(N^2) per
  forward (27 s of CPU for a 10,145-tile bag emulating the portable introsort, 6 s for numpy's
  own argsort of the rows) against 0.07 s here.
- Bags of at most 256 tiles take exact softmax attention in the Nystrom layer (nystrom.py
  `exact_short`; `exact_short=False` is theirs). Their layer zero-pads such a bag at the front
  to 256 tokens, whose zero keys take part in every softmax, and runs the 256 x 256 landmark
  kernel through the 6-step pseudo-inverse. Bags over 256 tiles take the same path in both.
  Measured on bags of 60-120 tiles: the plain toy (Adam 1e-3, seeds 0-2) 0.978 / 0.998
  accuracy / AUC exact against 0.953 / 0.990 padded (0.955 / 0.985 / 0.995 against
  0.945 / 0.955 / 0.960 accuracy); a training step costs 16x less (0.07 s
  against 1.2 s on one core for 60 tiles).
- PyTorch's default initialisation, not Keras' glorot_uniform with zero biases
  (`keras_init=True` restores theirs): with theirs the tests' cohort (recipe, lr 2e-4, seeds
  1-3) scored 0.870 / 0.911 / 0.940 on 400 fresh bags against 0.966 / 0.989 / 0.981, and the
  plain toy (Adam 1e-3, seeds 0-2) 0.938 / 0.977 accuracy / AUC against 0.978 / 0.998.
- Features that are not 512-d first pass a Linear(in, 512) (theirs are 512-d; torchmil does
  the same). A one-tile bag is its own only neighbour, weight 1 (their generator's row maximum
  over no neighbours and their encoder's squeeze fail there).
torchmil's CAMIL agrees on the neighbour-summed softmax (test_models.py) but takes values from T
and fuses with sigmoid(L); we follow the authors there.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import GatedAttention, MILModel, MILOutput
from .nystrom import NystromAttention
from .recipe import Recipe

GRAPH_POOL = 16  # neighbours whose distances are L2-normalised together (compute_feats.py)


def tile_neighbours(coords: torch.Tensor, k: int = GRAPH_POOL) -> torch.Tensor:
    """[N, k] indices of each tile's k nearest tiles by Euclidean distance of the coordinates,
    equal distances in tile order: `np.argsort(distances, axis=1, kind="stable")[:, :k]` without
    the N x N matrix (KD-tree candidates, widened per row until the k-th distance's ties are in)."""
    from scipy.spatial import cKDTree

    pts = coords.detach().cpu().numpy().astype(np.float64)
    n = len(pts)
    k = min(k, n)
    tree = cKDTree(pts)
    out = np.empty((n, k), dtype=np.int64)
    rows, q = np.arange(n), min(n, k + 8)
    while len(rows):
        _, cand = tree.query(pts[rows], k=q)
        cand = np.asarray(cand).reshape(len(rows), q)
        d2 = ((pts[cand] - pts[rows, None]) ** 2).sum(-1)  # exact for integer pixel coordinates
        order = np.lexsort((cand, d2), axis=-1)  # by distance, then tile index
        cand, d2 = np.take_along_axis(cand, order, 1), np.take_along_axis(d2, order, 1)
        done = (q == n) | (d2[:, -1] > d2[:, k - 1])  # every tile tied with the k-th is a candidate
        out[rows[done]] = cand[done, :k]
        rows, q = rows[~done], min(n, 2 * q)
    return torch.as_tensor(out, device=coords.device)


@torch.no_grad()
def camil_graph(features: torch.Tensor, coords: torch.Tensor | None, k: int = 8):
    """(neighbour indices [N, k'], edge weights [N, k']) of the authors' tile graph.

    Without coordinates (or with one tile) each tile is its own only neighbour, weight 1."""
    n = len(features)
    if coords is None or n < 2:
        return torch.arange(n, device=features.device).unsqueeze(1), features.new_ones(n, 1)
    nbr = tile_neighbours(coords, GRAPH_POOL)  # self first unless another tile shares its coordinates
    x = features.double()  # scipy's cdist computes in float64
    norm = x.norm(dim=-1)
    dot = torch.stack([(x * x[nbr[:, j]]).sum(-1) for j in range(nbr.shape[1])], 1)  # no [N, 16, D]
    denom = norm.unsqueeze(1) * norm[nbr]
    # scipy's cosine distance; only a zero vector's nan is zeroed, as the generator's nan_to_num
    # does there: a non-finite feature stays non-finite (it is refused when bags are read)
    cos_dist = torch.where(denom == 0, torch.zeros_like(dot), 1 - dot / denom)
    others = torch.nn.functional.normalize(cos_dist[:, 1:], dim=1)  # sklearn normalize(norm="l2")
    sim = torch.exp(-others)
    weights = torch.cat([sim.max(dim=1, keepdim=True).values, sim], dim=1)
    k = min(k, nbr.shape[1])
    return nbr[:, :k], weights[:, :k].to(features.dtype)


def keras_init_(module: nn.Module) -> None:
    """Keras defaults: glorot_uniform kernels (Dense, Conv2D and the custom layers' add_weight),
    zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


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
        exact_short: bool = True,
        keras_init: bool = False,
    ):
        super().__init__()
        self.n_classes, self.k = n_classes, k
        self.fc = nn.Linear(in_dim, dim) if in_dim != dim else nn.Identity()
        self.global_attn = NystromAttention(
            dim, heads, 64, landmarks, dropout=dropout, residual="heads", exact_short=exact_short
        )
        self.wq = nn.Linear(dim, qk_dim, bias=False)
        self.wk = nn.Linear(dim, qk_dim, bias=False)
        self.wv = nn.Linear(dim, dim)
        self.pool = GatedAttention(dim, attn_dim)  # MILAttentionLayer(128, use_gated=True): no biases
        self.pool.a[0] = nn.Linear(dim, attn_dim, bias=False)
        self.pool.b[0] = nn.Linear(dim, attn_dim, bias=False)
        self.pool.w = nn.Linear(attn_dim, 1, bias=False)
        # Last_Sigmoid: one sigmoid output for two classes (logits [0, s]), a softmax over n otherwise
        self.classifier = nn.Linear(dim, 1 if n_classes == 2 else n_classes)
        self.scale = 1 / math.sqrt(qk_dim)
        if keras_init:
            keras_init_(self)

    def head(self, z: torch.Tensor) -> torch.Tensor:
        """Logits [..., C]; two classes: [0, s], whose softmax is the authors' sigmoid(s)."""
        s = self.classifier(z)
        return torch.cat([torch.zeros_like(s), s], -1) if self.n_classes == 2 else s

    def neighbour_attention(self, t: torch.Tensor, nbr: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Raw scores sum_j w_ij q_i . k_j / sqrt(d) of `NeighborAggregator` (before the softmax)."""
        q, key = self.wq(t), self.wk(t)
        return ((q.unsqueeze(1) * F.embedding(nbr, key)).sum(-1) * weights).sum(1) * self.scale

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        x = self.fc(features)
        t = x + self.global_attn(x.unsqueeze(0))[0]
        nbr, weights = camil_graph(features, coords, self.k)
        raw = self.neighbour_attention(t, nbr, weights)
        local = torch.softmax(raw, dim=0).unsqueeze(1) * self.wv(x)
        g = torch.sigmoid(-local) ** 2
        fused = 2 * local * g + 2 * t * (1 - g)
        z, a = self.pool(fused)
        return MILOutput(self.head(z), a, extras={"neighbour_scores": raw})

    def instance_logits(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
        """Every instance as a bag of one, batched: the global attention of a one-token sequence
        (`NystromAttention.forward_single`), the instance its own only neighbour (weight 1,
        softmax 1), pooling weight 1."""
        x = self.fc(features)
        t = x + self.global_attn.forward_single(x)
        local = self.wv(x)
        g = torch.sigmoid(-local) ** 2
        return self.head(2 * local * g + 2 * t * (1 - g))
