"""Nystrom self-attention (Xiong et al., AAAI 2021) as used by TransMIL and CAMIL.

Follows the `nystrom-attention` package TransMIL depends on: landmarks are segment means of
queries and keys (the sequence is zero-padded at the front to a multiple of the landmark
count), the landmark kernel is inverted with the iterative Moore-Penrose scheme (6 steps), and
a depthwise residual convolution (kernel 33) over the values is added. Memory is O(N m), never
O(N^2). Deliberate difference: sequences no longer than the landmark count use exact softmax
attention (cheaper than padding them up to 256 landmarks, and exact).

Two options restate ICLR_CAMIL's TensorFlow port of that package
(`nystromformer/nystrom_attention.py`, 5f8ef57), which CAMIL sets:
- `residual="heads"`: their `Conv2D(kernel_size=(33, 1), filters=dim_head, groups=heads,
  padding="same")` runs on the values laid out [batch, heads, n, dim_head] channels-last, so
  it slides over the 8 heads (zero-padded "same"), mixes the value channels within 8 groups
  and leaves the sequence alone; the package's residual ("sequence", the default) is a
  per-head convolution along the sequence.
- `exact_short=False`: every sequence takes the padded Nystrom path, as theirs (and the
  package) do: a bag of n < 256 tokens is zero-padded at the front to 256, whose keys (0) take
  part in every softmax, and the 256 x 256 landmark kernel goes through the pseudo-inverse.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BANDED_MAX_TOKENS = 64  # shorter sequences: the residual convolution as a banded matmul (faster on CPU)


def banded_conv(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Each head's "same" convolution along the sequence (`Conv2d((k, 1), groups=heads)` of [b, h,
    n, d] values; `weight` [h, k]) as one banded [h, n, n] matrix times the values: the same
    products and sums, without a convolution kernel's per-call cost on short sequences."""
    n, k = v.shape[2], weight.shape[1]
    i = torch.arange(n, device=v.device)
    tap = i[None, :] - i[:, None] + k // 2  # T[i, j] = weight[j - i + k // 2] (cross-correlation)
    inside = (tap >= 0) & (tap < k)
    return (weight[:, tap.clamp(0, k - 1)] * inside) @ v


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
        residual: str = "sequence",
        exact_short: bool = True,
    ):
        super().__init__()
        dim_head = dim_head or dim // heads
        self.heads, self.dim_head, self.landmarks, self.pinv_iters = heads, dim_head, landmarks, pinv_iters
        self.residual, self.exact_short = residual, exact_short
        self.scale = dim_head**-0.5
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim), nn.Dropout(dropout))
        kernel, pad = (residual_kernel, 1), (residual_kernel // 2, 0)
        if residual == "sequence":  # nystrom-attention: per head, along the sequence
            self.res_conv = nn.Conv2d(heads, heads, kernel, padding=pad, groups=heads, bias=False)
        elif residual == "heads":  # ICLR_CAMIL's Conv2D: across the heads, channel groups, per token
            if residual_kernel % 2 == 0 or dim_head % heads:
                raise ValueError("residual='heads' needs an odd kernel and dim_head divisible by heads")
            self.res_conv = nn.Conv2d(dim_head, dim_head, kernel, padding=pad, groups=heads, bias=False)
        else:
            raise ValueError(f"residual must be 'sequence' or 'heads', not {residual!r}")

    def _residual(self, v: torch.Tensor) -> torch.Tensor:
        """The value residual of [b, h, n, d] values."""
        if self.residual == "sequence":
            if v.shape[2] <= BANDED_MAX_TOKENS:
                return banded_conv(v, self.res_conv.weight[:, 0, :, 0])
            return self.res_conv(v)
        return self.res_conv(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # channels d, height h, width n

    def qk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled queries and keys [1, h, n, d] (for reading out one token's exact attention)."""
        q, k, _ = self._qkv(x)
        return q * self.scale, k

    def _qkv(self, x):
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        return [t.view(b, n, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v)]

    def _factors(self, q: torch.Tensor, k: torch.Tensor):
        """The Nystrom factors (attn1, pinv(attn2), attn3) of unscaled [b, h, n, d] queries and
        keys, n a multiple of the landmark count: attention ~ attn1 @ pinv(attn2) @ attn3."""
        b, _, n, _ = q.shape
        m, seg = self.landmarks, n // self.landmarks
        q = q * self.scale
        q_l = q.reshape(b, self.heads, m, seg, self.dim_head).sum(3) / seg
        k_l = k.reshape(b, self.heads, m, seg, self.dim_head).sum(3) / seg
        attn1 = torch.softmax(q @ k_l.transpose(-1, -2), dim=-1)
        attn2 = torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1)
        attn3 = torch.softmax(q_l @ k.transpose(-1, -2), dim=-1)
        return attn1, pinv_iterative(attn2, self.pinv_iters), attn3

    def weigh(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """[n] r @ A for [1, n, dim] tokens and [n] row weights, A the attention matrix this
        layer applies to them (exact softmax, or its Nystrom factors), averaged over heads: where
        the weight of the rows r lands among the tokens (attention rollout)."""
        n, m = x.shape[1], self.landmarks
        if n <= m and self.exact_short:
            q, k = self.qk(x)
            return (r @ torch.softmax(q @ k.transpose(-1, -2), dim=-1)).mean(1)[0]
        pad = (m - n % m) % m
        q, k, _ = self._qkv(F.pad(x, (0, 0, pad, 0)))
        attn1, attn2_inv, attn3 = self._factors(q, k)
        row = F.pad(r, (pad, 0)).view(1, 1, 1, -1)
        return (((row @ attn1) @ attn2_inv) @ attn3).mean(1)[0, 0, pad:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        m = self.landmarks
        if n <= m and self.exact_short:  # few tokens: exact softmax attention costs less
            q, k, v = self._qkv(x)
            out = torch.softmax(q * self.scale @ k.transpose(-1, -2), dim=-1) @ v
            out = out + self._residual(v)
            return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))
        pad = (m - n % m) % m
        if pad:
            x = F.pad(x, (0, 0, pad, 0))
        q, k, v = self._qkv(x)
        attn1, attn2_inv, attn3 = self._factors(q, k)
        out = (attn1 @ attn2_inv) @ (attn3 @ v)
        out = out + self._residual(v)
        out = out.transpose(1, 2).reshape(b, n + pad, self.heads * self.dim_head)
        return self.to_out(out)[:, -n:]

    def forward_single(self, x: torch.Tensor) -> torch.Tensor:
        """[B, dim] -> [B, dim]: each row as a sequence of its own, i.e. `forward(x[i:i+1, None])`
        for every i, batched in O(B) (the heatmap's one-instance bags).

        With `exact_short=False` a single token is padded with m - 1 zero tokens at the front;
        then attn1 = attn2 = attn3 = A (one landmark a token) and every matrix of the
        pseudo-inverse iteration has the form G C G^T with G = [ones, e_last] (m x 2), so the
        iteration runs on 2 x 2 matrices C (products: C1 (G^T G) C2) instead of m x m ones."""
        b = len(x)
        q, k, v = self._qkv(x.unsqueeze(1))  # [b, h, 1, d]
        res = self._residual(v)
        if self.exact_short or self.landmarks <= 1:
            return self.to_out((v + res).transpose(1, 2).reshape(b, self.heads * self.dim_head))
        m = self.landmarks
        s = ((q * self.scale) * k).sum(-1)[..., 0].double()  # [b, h] the token's own logit
        a_real = torch.sigmoid(s - math.log(m - 1))  # e^s / (m - 1 + e^s): its weight on itself
        a_pad = (1 - a_real) / (m - 1)  # its weight on each padding token; those rows are uniform 1/m
        one = torch.ones_like(s)
        c_a = torch.stack(
            [torch.stack([one / m, 0 * one], -1), torch.stack([a_pad - 1 / m, a_real - a_pad], -1)], -2
        )  # A = (u - e) u^T / m + e (a_pad u + (a_real - a_pad) e)^T
        gram = torch.tensor([[m, 1.0], [1.0, 1.0]], dtype=torch.float64, device=x.device)

        def mul(c1, c2):
            return c1 @ gram @ c2

        # pinv_iterative's scale: max row sum (1: softmax rows) x max column sum, over the heads
        col_sum = (m - 1) / m + torch.maximum(a_real, a_pad)
        row_sum = torch.maximum(torch.ones_like(s), (m - 1) * a_pad + a_real)
        scale = row_sum.amax(-1) * col_sum.amax(-1)  # [b]
        z = c_a.transpose(-1, -2) / scale[:, None, None, None]
        for _ in range(self.pinv_iters):
            xz = mul(c_a, z)
            inner = 7 * xz - mul(xz, xz)  # xz (7I - xz)
            inner = 15 * xz - mul(xz, inner)  # xz (15I - xz (7I - xz))
            z = 0.25 * (13 * z - mul(z, inner))
        c_out = mul(mul(c_a, z), c_a)  # A Z A
        coef = c_out.sum((-1, -2)).to(v.dtype)  # e_last^T G C G^T v = (sum of C) v_token
        out = coef[..., None, None] * v + res  # [b, h, 1, d]
        return self.to_out(out.transpose(1, 2).reshape(b, self.heads * self.dim_head))
