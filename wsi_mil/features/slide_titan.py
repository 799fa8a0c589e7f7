"""TITAN's slide encoder (Ding et al., 2024; MahmoodLab/TITAN), its vision tower as the hub's
remote code builds it: `configuration_titan.py` (`TitanVisionConfig` defaults: 768 wide, 6
blocks, 12 heads, MLP ratio 4, qkv bias, 768-d patch input, ALiBi; `TitanConfig` sets the
CoCa pooling to "parallel", 128 + 1 queries, 8 heads), `vision_transformer.py`
(`preprocess_features`, `VisionTransformer`, `AttentionalPooler`) and `modeling_titan.py`
(`encode_slide_from_patch_features` = `vision_encoder(features, coords, patch_size_lv0,
no_proj=True)`). Read from the copies of those files and of the hub's `config.json` (which
sets the same values) in DIAGNijmegen/unicorn_baseline at dec3809
(`src/unicorn_baseline/vision/pathology/titan/`); tests/test_titan.py restates them and compares.

One slide at a time, as TITAN encodes (batch 1):
- the patches are placed on a grid by `(coords - min) // patch_size_level0` (features at the
  same cell are summed); cells whose features are all zero are background and dropped;
- an MLP patch embedding (Linear + GELU), a class token, 6 pre-norm blocks whose attention
  adds ALiBi's bias -slope_h x (Euclidean grid distance) between patch tokens (none for the
  class token; slopes of 12 heads by ALiBi's rule), LayerNorm (eps 1e-6);
- the slide embedding: the contrastive attentional pooler (one query, LayerNorms eps 1e-5,
  `nn.MultiheadAttention`) over all tokens, without the final projection: [1, 768].
The 128-query pooler and the projection are built because the checkpoint holds them; the
text tower's tensors are dropped by name when loading.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def patch_grid(features: torch.Tensor, coords: torch.Tensor, patch_size_level0: int):
    """(feature grid [D, H, W], background-free mask [H, W]) as TITAN's `preprocess_features`."""
    grid = torch.div(coords - coords.min(0).values, patch_size_level0, rounding_mode="floor").long()
    grid = grid - grid.min(0).values
    h, w = (grid.max(0).values + 1).tolist()
    out = torch.zeros(h * w, features.shape[-1], dtype=features.dtype, device=features.device)
    out.index_add_(0, grid[:, 0] * w + grid[:, 1], features)
    out = out.view(h, w, -1).permute(2, 0, 1)
    return out, (out != 0).any(0)


def alibi_slopes(n: int) -> list[float]:
    """ALiBi's head slopes (Press et al., 2022), its rule for a head count not a power of 2."""
    if math.log2(n).is_integer():
        p = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [p * p**i for i in range(n)]
    base = 2 ** math.floor(math.log2(n))
    return alibi_slopes(base) + alibi_slopes(2 * base)[0::2][: n - base]


def alibi_bias(mask: torch.Tensor, heads: int) -> torch.Tensor:
    """[1, heads, n + 1, n + 1]: -slope x grid distance between the kept cells (row-major), 0 for
    the class token."""
    rows, cols = torch.meshgrid(torch.arange(mask.shape[0]), torch.arange(mask.shape[1]), indexing="ij")
    ij = torch.stack([rows, cols], -1)
    points = ij[mask.cpu()].double()
    # computed directly, not as a matrix product: the exact distances numpy gives
    dists = torch.cdist(points, points, compute_mode="donot_use_mm_for_euclid_dist").float()
    slopes = torch.tensor(alibi_slopes(heads), dtype=torch.float32).view(heads, 1, 1)
    bias = torch.zeros(1, heads, len(points) + 1, len(points) + 1)
    bias[0, :, 1:, 1:] = -dists * slopes
    return bias


class AlibiAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """timm's `Mlp` (fc1, GELU, fc2), the block MLP TITAN imports."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = AlibiAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), bias)
        return x + self.mlp(self.norm2(x))


class Blocks(nn.Module):
    """The blocks under TITAN's `CustomSequential` name (`modules_list`), for its checkpoint."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.modules_list = nn.ModuleList(blocks)


class AttentionalPooler(nn.Module):
    """CoCa's attentional pooler as TITAN's: learned queries attend over the LayerNormed tokens."""

    def __init__(self, dim: int, heads: int, queries: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(queries, dim))
        self.attn = nn.MultiheadAttention(dim, heads, kdim=dim, vdim=dim)
        self.ln_q, self.ln_k = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [1, n, dim] -> [queries, dim]
        k = self.ln_k(x).transpose(0, 1)
        q = self.ln_q(self.query).unsqueeze(1)
        return self.attn(q, k, k, need_weights=False)[0].squeeze(1)


class TitanVision(nn.Module):
    def __init__(self, in_dim=768, dim=768, depth=6, heads=12, mlp_ratio=4.0, pool_queries=128, pool_heads=8):
        super().__init__()
        self.heads = heads
        self.patch_embed = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU())
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = Blocks([Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn_pool = AttentionalPooler(dim, pool_heads, pool_queries)  # "parallel": unused here
        self.attn_pool_contrastive = AttentionalPooler(dim, pool_heads, 1)
        self.proj = nn.Parameter(dim**-0.5 * torch.randn(dim, dim))  # zero-shot only

    def forward(self, grid: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(grid.flatten(1).T[mask.flatten()].unsqueeze(0))
        x = torch.cat([self.cls_token, tokens], dim=1)
        bias = alibi_bias(mask, self.heads).to(x)
        for block in self.blocks.modules_list:
            x = block(x, bias)
        return self.attn_pool_contrastive(self.norm(x))


class Titan(nn.Module):
    """Patch features [N, 768] (CONCH v1.5), level-0 coords [N, 2] and the level-0 patch size ->
    TITAN's slide embedding [1, 768]."""

    takes_patch_size = True

    def __init__(self, **vision):
        super().__init__()
        self.vision_encoder = TitanVision(**vision)

    def forward(self, h: torch.Tensor, coords: torch.Tensor, patch_size_level0: int) -> torch.Tensor:
        grid, mask = patch_grid(h, coords.to(h.device), int(patch_size_level0))
        return self.vision_encoder(grid, mask)
