"""GenBio-PathFM's encoder: a DINOv3-style ViT (2-D rotary positions, storage tokens, SwiGLU,
LayerScale) run on each colour channel alone, the three class tokens concatenated.

Settings from TRIDENT's `model_zoo/genbio_pathfm/genbio_pathfm.py` (taken there from
genbio-ai/genbio-pathfm; TRIDENT a91fa84), `GenBioPathFMInference`: patch 16, one input
channel, width 1536, 40 blocks, 24 heads, 4 storage tokens, FFN "swiglu64" (hidden 2/3 of 4 x
width, rounded up to a multiple of 64), LayerScale, no qkv bias, LayerNorm eps 1e-6, RoPE base
100 with coordinates in [-1, 1] per axis ("separate"). Its RoPE runs in the periods' dtype,
bfloat16 in the checkpoint: angles, sine and cosine in bfloat16, and q and k rounded to bfloat16
to be rotated (class and storage tokens too, though not rotated), then cast back. This module
does the same, so the embedding matches theirs, not a float32 RoPE (timm's DINOv3 computes it
in float32). The training-time coordinate jitter and rescaling are not used at inference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def swiglu_hidden(width: int, ratio: float = 4.0, align: int = 64) -> int:
    """The SwiGLU hidden size: 2/3 of ratio x width, rounded up to a multiple of `align`."""
    d = int(int(width * ratio) * 2 / 3)
    return d + (-d % align)


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.w1, self.w2 = nn.Linear(width, hidden), nn.Linear(width, hidden)
        self.w3 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class LayerScale(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((width,), 1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Rope2d(nn.Module):
    """Sine and cosine of the patch grid's rotary angles, in the dtype of `periods`."""

    def __init__(self, head_dim: int, base: float = 100.0, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        n = head_dim // 4
        self.register_buffer("periods", base ** (2 * torch.arange(n, dtype=dtype) / (head_dim // 2)))

    def forward(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        dd = {"dtype": self.periods.dtype, "device": self.periods.device}  # on the model's device
        ys = torch.arange(0.5, h, **dd) / h
        xs = torch.arange(0.5, w, **dd) / w
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).flatten(0, 1) * 2.0 - 1.0
        angles = (2 * math.pi * coords[:, :, None] / self.periods[None, None]).flatten(1).tile(2)
        return angles.sin(), angles.cos()


def _rotate(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotary positions on the last len(sin) tokens of x (the patches), in sin's dtype."""
    x = x.to(sin.dtype)
    n = x.shape[-2] - sin.shape[0]
    p = x[..., n:, :]
    half = torch.cat([-p[..., p.shape[-1] // 2 :], p[..., : p.shape[-1] // 2]], -1)
    return torch.cat([x[..., :n, :], p * cos + half * sin], -2)


class RopeAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k = _rotate(q, *rope).to(x.dtype), _rotate(k, *rope).to(x.dtype)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class RopeBlock(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
        self.attn, self.mlp = RopeAttention(width, heads), SwiGLU(width, hidden)
        self.ls1, self.ls2 = LayerScale(width), LayerScale(width)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class RopeViT(nn.Module):
    """The single-channel encoder; `forward` gives the class token after the final norm."""

    def __init__(self, width=1536, depth=40, heads=24, patch=16, storage=4, in_chans=1):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, width, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.storage_tokens = nn.Parameter(torch.zeros(1, storage, width))
        self.rope_embed = Rope2d(width // heads)
        hidden = swiglu_hidden(width)
        self.blocks = nn.ModuleList(RopeBlock(width, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        b = len(x)
        x = torch.cat([self.cls_token.expand(b, -1, -1), self.storage_tokens.expand(b, -1, -1), x], 1)
        rope = self.rope_embed(h, w)
        for blk in self.blocks:
            x = blk(x, rope)
        return self.norm(x)[:, 0]


class PerChannel(nn.Module):
    """Each colour channel through `net` as a grey image; the class tokens concatenated
    (R, G, B): GenBioPathFMInference.forward."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return self.net(x.reshape(b * c, 1, h, w)).reshape(b, -1)
