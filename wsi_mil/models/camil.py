"""CAMIL: context-aware MIL (Fourkioti, De Vries & Bakal, ICLR 2024).

Linear(in, 512) + ReLU; a Nystrom transformer layer gives each tile global context T. The tile
graph links each tile to its k = 8 nearest tiles by coordinates (itself included), with edge
weights exp(-cosine distance) of the embeddings. Neighbour-constrained attention: tile i
attends only to its neighbours, with scores (q_i . k_j / sqrt(d)) * w_ij softmax-normalised
over j, giving the local term L. Fusion by sigmoid gating, F = sigmoid(L) * L + (1 -
sigmoid(L)) * T, then gated attention pooling (512 -> 128) and a linear classifier.
The graph is a [N, k] index table (sparse): no N x N matrix is formed. Without coords the
neighbourhood is the tile itself.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import GatedAttention, MILModel, MILOutput
from .nystrom import NystromAttention


def knn_from_coords(coords: torch.Tensor, k: int) -> torch.Tensor:
    """[N, k] indices of each tile's k nearest tiles (itself first), by a KD-tree."""
    from scipy.spatial import cKDTree

    n = len(coords)
    k = min(k, n)
    pts = coords.detach().cpu().numpy().astype(np.float64)
    _, idx = cKDTree(pts).query(pts, k=k)
    idx = np.asarray(idx).reshape(n, k)
    return torch.as_tensor(idx, dtype=torch.long, device=coords.device)


class CAMIL(MILModel):
    def __init__(
        self,
        in_dim: int,
        n_classes: int = 2,
        dim: int = 512,
        heads: int = 8,
        landmarks: int = 256,
        k: int = 8,
        attn_dim: int = 128,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.n_classes, self.k = n_classes, k
        self.fc = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.norm = nn.LayerNorm(dim)
        self.global_attn = NystromAttention(dim, heads, dim // heads, landmarks, dropout=dropout)
        self.wq, self.wk, self.wv = (nn.Linear(dim, dim) for _ in range(3))
        self.pool = GatedAttention(dim, attn_dim)
        self.classifier = nn.Linear(dim, n_classes)
        self.scale = 1 / math.sqrt(dim)

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        h = self.fc(features)
        t = h + self.global_attn(self.norm(h).unsqueeze(0))[0]
        if coords is None:
            nbr = torch.arange(len(h), device=h.device).unsqueeze(1)
        else:
            nbr = knn_from_coords(coords, self.k)
        hn = F.normalize(h, dim=-1)
        sim = torch.exp(-(1 - (hn.unsqueeze(1) * hn[nbr]).sum(-1)))  # [N, k]
        q, key, v = self.wq(t), self.wk(t), self.wv(t)
        scores = (q.unsqueeze(1) * key[nbr]).sum(-1) * self.scale * sim
        local = (torch.softmax(scores, dim=1).unsqueeze(-1) * v[nbr]).sum(1)
        gate = torch.sigmoid(local)
        fused = gate * local + (1 - gate) * t
        z, a = self.pool(fused)
        return MILOutput(self.classifier(z), a)
