"""The two foundation models that are not plain timm ViTs, and their checkpoints' key layouts.

- CONCH v1.5 (MahmoodLab/conchv1_5, `pytorch_model_vision.bin`), restated from TRIDENT's
  `trident/patch_encoder_models/model_zoo/conchv1_5/conchv1_5.py` (read 2026-11-22):
  `CONCHVisionTower` = `trunk` (ViT-L/16, qkv bias, LayerScale init 1.0, LayerNorm eps 1e-6,
  built at 224 px) -> `attn_pool_contrast` (CoCa attentional pooler: 1 query, d_model 768,
  context 1024, 8 heads, no biases, LayerNorms on queries and keys) -> token 0 ->
  `ln_contrast` (LayerNorm 768). At 448 px input the trunk's 14x14 position grid is resized
  on every forward with DINO's rule (`interpolate_pos_encoding`: bicubic, scale factor
  (28 + 0.1) / 14); the checkpoint's grid is first brought to 14x14 with timm's
  `resample_abs_pos_embed` (bilinear, no antialias). Both are deterministic functions of the
  weights, so they are applied once here when the checkpoint is loaded.
- Phikon-v2 (owkin/phikon-v2, `model.safetensors`): a `transformers` Dinov2Model, ViT-L/16,
  embedding = CLS of `last_hidden_state` (TRIDENT `Phikonv2InferenceEncoder`). It is built as
  the equivalent timm ViT and the Dinov2 keys are renamed (query/key/value fused into qkv);
  `embeddings.mask_token` (used only for masked-image pretraining) is dropped. A checkpoint
  whose position grid is not 14x14 is resized once with transformers' rule (bicubic to the
  target size, float32, no antialias). Parity with `transformers` is tested.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class AttentionalPooler(nn.Module):
    """CoCa's attentional pooler as CONCH v1.5 uses it (`AttentionalPooler` in conchv1_5.py)."""

    def __init__(self, d_model: int = 768, context_dim: int = 1024, n_head: int = 8, n_queries: int = 1):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.heads = n_head
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, d_model * 2, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h = x.shape[0], self.heads
        k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)
        q = self.to_q(self.ln_q(self.query)).expand(b, -1, -1)

        def heads(t):  # [B, n, h*d] -> [B, h, n, d]
            return t.reshape(b, t.shape[1], h, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))  # scale d**-0.5
        return self.to_out(out.transpose(1, 2).reshape(b, q.shape[1], -1))


class ConchV15Vision(nn.Module):
    """CONCH v1.5's vision tower: ViT-L trunk tokens -> attentional pooler -> LayerNorm (768-d)."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPooler(768, trunk.embed_dim, 8, 1)
        self.ln_contrast = nn.LayerNorm(768)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)  # class + patch tokens after the final norm
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])


def _grid(pos: torch.Tensor, prefix: int = 1) -> int:
    side = math.isqrt(pos.shape[1] - prefix)
    if side * side != pos.shape[1] - prefix:
        raise ValueError(f"position embedding of {pos.shape[1]} tokens is not a square grid")
    return side


def conch_pos_embed(pos: torch.Tensor, input_grid: int, trained_grid: int = 14) -> torch.Tensor:
    """The position embedding CONCH v1.5's trunk adds at `input_grid` x `input_grid` patches."""
    from timm.layers import resample_abs_pos_embed

    pos = pos.float()
    if _grid(pos) != trained_grid:  # TRIDENT's resize_pos_embed to the 224 px model
        pos = resample_abs_pos_embed(
            pos, new_size=(trained_grid, trained_grid), num_prefix_tokens=1,
            interpolation="bilinear", antialias=False, verbose=False,
        )  # fmt: skip
    if input_grid == trained_grid:
        return pos
    dim, g = pos.shape[-1], trained_grid
    patch = pos[:, 1:].reshape(1, g, g, dim).permute(0, 3, 1, 2)
    scale = (input_grid + 0.1) / g  # DINO's interpolate_pos_encoding
    patch = F.interpolate(patch, scale_factor=(scale, scale), mode="bicubic")
    return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def dinov2_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """transformers' Dinov2 `interpolate_pos_encoding` for a square input of `grid` patches."""
    g = _grid(pos)
    if g == grid:
        return pos
    dim = pos.shape[-1]
    patch = pos[:, 1:].reshape(1, g, g, dim).permute(0, 3, 1, 2).float()
    patch = F.interpolate(patch, size=(grid, grid), mode="bicubic", align_corners=False).to(pos.dtype)
    return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


_DINOV2_RENAMES = (
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
    ("encoder.layer.", "blocks."),
    (".attention.output.dense.", ".attn.proj."),
    (".layer_scale1.lambda1", ".ls1.gamma"),
    (".layer_scale2.lambda1", ".ls2.gamma"),
    ("layernorm.", "norm."),
)


def dinov2_to_timm(sd: dict, grid: int) -> dict:
    """A transformers Dinov2Model state dict in timm's ViT layout (position grid `grid`)."""
    sd = {k: v for k, v in sd.items() if k != "embeddings.mask_token"}
    out = {}
    for key, value in sd.items():
        if ".attention.attention." in key:
            continue  # fused below
        for old, new in _DINOV2_RENAMES:
            key = key.replace(old, new)
        out[key] = value
    layers = {k.split(".")[2] for k in sd if ".attention.attention." in k}
    for i in sorted(layers, key=int):
        for kind in ("weight", "bias"):
            names = ("query", "key", "value")
            parts = [sd.get(f"encoder.layer.{i}.attention.attention.{n}.{kind}") for n in names]
            if all(p is not None for p in parts):
                out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
            else:  # left under their own names: the strict load reports them
                for n, p in zip(names, parts):
                    if p is not None:
                        out[f"encoder.layer.{i}.attention.attention.{n}.{kind}"] = p
    if "pos_embed" in out:
        out["pos_embed"] = dinov2_pos_embed(out["pos_embed"], grid)
    return out


def from_authors_layout(builder: str, sd: dict, net: nn.Module) -> dict:
    """The authors' checkpoint keys mapped onto `net`'s (timm builds are already in them)."""
    if builder == "dinov2_hf":
        return dinov2_to_timm(sd, net.patch_embed.grid_size[0])
    if builder == "conch_v15" and "trunk.pos_embed" in sd:
        grid = net.trunk.patch_embed.grid_size[0]
        return {**sd, "trunk.pos_embed": conch_pos_embed(sd["trunk.pos_embed"], grid)}
    return sd
