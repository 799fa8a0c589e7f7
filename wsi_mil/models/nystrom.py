"""Nystrom self-attention (Xiong et al., AAAI 2021) as used by TransMIL and CAMIL.

Follows the `nystrom-attention` package TransMIL depends on: landmarks are segment means of
queries and keys (the sequence is zero-padded at the front to a multiple of the landmark
count), the landmark kernel is inverted with the iterative Moore-Penrose scheme (6 steps), and
a depthwise residual convolution (kernel 33) over the values is added. Memory is O(N m), never
O(N^2). Deliberate difference: sequences no longer than the landmark count use exact softmax
attention (cheaper than padding them up to 256 landmarks, and exact).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def pinv_iterative(x: torch.Tensor, iters: int = 6) -> torch.Tensor:
    abs_x = x.abs()
    col, row = abs_x.sum(-1), abs_x.sum(-2)
    z = x.transpose(-1, -2) / (col.max() * row.max())
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype).expand_as(x)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dim_head: int | None = None,
        landmarks: int = 256,
        pinv_iters: int = 6,
        residual_kernel: int = 33,
        dropout: float = 0.1,
    ):
        super().__init__()
        dim_head = dim_head or dim // heads
        self.heads, self.dim_head, self.landmarks, self.pinv_iters = heads, dim_head, landmarks, pinv_iters
        self.scale = dim_head**-0.5
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim), nn.Dropout(dropout))
        self.res_conv = nn.Conv2d(
            heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0), groups=heads, bias=False
        )

    def qk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled queries and keys [1, h, n, d] (for reading out one token's exact attention)."""
        q, k, _ = self._qkv(x)
        return q * self.scale, k

    def _qkv(self, x):
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        return [t.view(b, n, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        m = self.landmarks
        if n <= m:  # few tokens: exact softmax attention costs less than the approximation
            q, k, v = self._qkv(x)
            out = torch.softmax(q * self.scale @ k.transpose(-1, -2), dim=-1) @ v
            out = out + self.res_conv(v)
            return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))
        pad = (m - n % m) % m
        if pad:
            x = F.pad(x, (0, 0, pad, 0))
        q, k, v = self._qkv(x)
        q = q * self.scale
        seg = math.ceil((n + pad) / m)
        q_l = q.reshape(b, self.heads, m, seg, self.dim_head).sum(3) / seg
        k_l = k.reshape(b, self.heads, m, seg, self.dim_head).sum(3) / seg
        attn1 = torch.softmax(q @ k_l.transpose(-1, -2), dim=-1)
        attn2 = torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1)
        attn3 = torch.softmax(q_l @ k.transpose(-1, -2), dim=-1)
        out = (attn1 @ pinv_iterative(attn2, self.pinv_iters)) @ (attn3 @ v)
        out = out + self.res_conv(v)
        out = out.transpose(1, 2).reshape(b, n + pad, self.heads * self.dim_head)
        return self.to_out(out)[:, -n:]
