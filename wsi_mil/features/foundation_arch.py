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
- CONCH v1 (MahmoodLab/CONCH, `pytorch_model.bin`: the whole CoCa model), restated from the
  authors' `conch/open_clip_custom/` (mahmoodlab/CONCH e9c9e5b; TRIDENT `Conchv1InferenceEncoder`
  calls `encode_image(proj_contrast=False, normalize=False)`, i.e. `VisualModel.forward_no_head`):
  `trunk` (timm `VisionTransformer`, ViT-B/16 at 448 px, `forward_features`) ->
  `attn_pool_contrast` (their `AttentionalPooler`: 1 query of 512, `nn.MultiheadAttention(512,
  8, kdim=768, vdim=768)` with biases, LayerNorms eps 1e-5 on queries and keys) -> token 0 ->
  `ln_contrast` (LayerNorm 512). Only `visual.` tensors are loaded; the text tower, the caption
  pooler and the contrastive projection (unused by this embedding) are left out of the file's keys.
- Phikon-v2 (owkin/phikon-v2, `model.safetensors`): a `transformers` Dinov2Model, ViT-L/16,
  embedding = CLS of `last_hidden_state` (TRIDENT `Phikonv2InferenceEncoder`). It is built as
  the equivalent timm ViT and the Dinov2 keys are renamed (query/key/value fused into qkv);
  `embeddings.mask_token` (used only for masked-image pretraining) is dropped. A checkpoint
  whose position grid is not 14x14 is resized once with transformers' rule (bicubic to the
  target size, float32, no antialias). Parity with `transformers` is tested.
- Hibou-L (histai/hibou-L, `model.safetensors`): the hub's `Dinov2ModelWithRegisters`
  (`trust_remote_code`; histai/hibou-b's config.json: 4 registers, `use_swiglu_ffn`, patch 14,
  224 px) at ViT-L size (1024 wide, 24 blocks, 16 heads: HistAI/hibou `vit_large`), embedding =
  `pooler_output`, the CLS after the final norm (TRIDENT `HibouLInferenceEncoder`). Renamed as
  Phikon-v2 (`mlp.weights_in/out` -> `fc1/fc2`: SwiGLU's packed gate and value, as timm's
  `SwiGLUPacked`) into timm's `vit_large_patch14_reg4_dinov2`; registers and the class token's
  position as for OpenMidnight below, a grid other than 16 x 16 resized with transformers'
  rule for the register models (bicubic, antialiased). Parity with transformers'
  `Dinov2WithRegistersModel` is tested; the hub's own modeling file was not read.
- Phikon (owkin/phikon): a `transformers` ViTModel, ViT-B/16, LayerNorm eps 1e-12 (its
  config.json), CLS of `last_hidden_state` (TRIDENT `PhikonInferenceEncoder`, built with
  `add_pooling_layer=False`, so a checkpoint's `pooler.` tensors are dropped). Renamed onto timm's
  ViT the same way (`layernorm_before/after` -> `norm1/2`, `intermediate/output.dense` -> `mlp`).
- OpenMidnight (SophontAI/OpenMidnight `teacher_checkpoint_load.pt`): DINOv2's own ViT-g/14 with
  4 registers (`dinov2_vitg14_reg`, TRIDENT `OpenMidnightInferenceEncoder`). Converted to timm's
  `vit_giant_patch14_reg4_dinov2` as timm's `_convert_dinov2` does (class token + its position,
  registers without position, `mlp.w12/w3` -> `fc1/fc2`, `mask_token` dropped); a position grid
  other than the input's is resized once with DINOv2's rule for these models (bicubic,
  antialiased, to the target size).
- CTransPath (CHIEF_CTransPath.pth): TransPath's Swin-T with a convolutional stem
  (`ConvStem`, TRIDENT `model_zoo/ctranspath/ctran.py`), saved by timm 0.5.4. Current timm's Swin
  computes the same; its checkpoint differs only in where the patch merging sits (end of stage i
  there, start of stage i + 1 here) and in the non-persistent buffers (`relative_position_index`,
  `attn_mask`), as timm's own `swin_transformer.checkpoint_filter_fn` converts.
"""

from __future__ import annotations

import math
import re

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


class MultiheadPooler(nn.Module):
    """CoCa's attentional pooler as CONCH v1 builds it (open_clip_custom/transformer.py
    `AttentionalPooler`): torch's MultiheadAttention (separate q/k/v projections, biases)."""

    def __init__(self, d_model: int = 512, context_dim: int = 768, n_head: int = 8, n_queries: int = 1):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(
            d_model, n_head, kdim=context_dim, vdim=context_dim, batch_first=True
        )
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_k(x)
        q = self.ln_q(self.query).expand(len(x), -1, -1)
        return self.attn(q, x, x, need_weights=False)[0]


class CoCaVision(nn.Module):
    """CONCH's vision tower: trunk tokens (after the final norm) -> attentional pooler -> its
    token 0 -> LayerNorm. v1.5: ViT-L trunk, `AttentionalPooler`, 768-d; v1: ViT-B trunk,
    `MultiheadPooler`, 512-d (`conch_vision`)."""

    def __init__(self, trunk: nn.Module, pooler: nn.Module, dim: int):
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = pooler
        self.ln_contrast = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.trunk.forward_features(x))[:, 0])


def conch_vision(trunk: nn.Module, version: str) -> CoCaVision:
    """CONCH v1.5's (`"conch_v15"`) or v1's (`"conch_v1"`) vision tower around `trunk`."""
    if version == "conch_v15":
        return CoCaVision(trunk, AttentionalPooler(768, trunk.embed_dim, 8, 1), 768)
    return CoCaVision(trunk, MultiheadPooler(512, trunk.embed_dim, 8, 1), 512)


class ConvStem(nn.Module):
    """TransPath's convolutional patch embedding (TRIDENT model_zoo/ctranspath/ctran.py `ConvStem`):
    two 3x3 stride-2 conv-BN-ReLU, a 1x1 conv, the norm; NHWC out, as timm's Swin takes it."""

    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=768, norm_layer=None, **_):
        super().__init__()
        assert patch_size == 4 and embed_dim % 8 == 0
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (self.img_size[0] // 4, self.img_size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        stem, input_dim, output_dim = [], 3, embed_dim // 8
        for _ in range(2):
            stem += [nn.Conv2d(input_dim, output_dim, 3, stride=2, padding=1, bias=False),
                     nn.BatchNorm2d(output_dim), nn.ReLU(inplace=True)]  # fmt: skip
            input_dim, output_dim = output_dim, output_dim * 2
        stem.append(nn.Conv2d(input_dim, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*stem)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class FeaturePool(nn.Module):
    """A timm `features_only` network's one feature map, average pooled (TRIDENT's `resnet50`)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        out = out[0] if isinstance(out, (list, tuple)) else out
        return self.pool(out).flatten(1)


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
    (".mlp.weights_in.", ".mlp.fc1."),  # use_swiglu_ffn: packed (gate, value), silu(gate) * value
    (".mlp.weights_out.", ".mlp.fc2."),
)


def _fuse_qkv(sd: dict) -> dict:
    """transformers' per-layer query/key/value fused into timm's qkv (left under their own
    names when one is missing, so the strict load reports them)."""
    out = {}
    layers = {k.split(".")[2] for k in sd if ".attention.attention." in k}
    for i in sorted(layers, key=int):
        for kind in ("weight", "bias"):
            names = ("query", "key", "value")
            parts = [sd.get(f"encoder.layer.{i}.attention.attention.{n}.{kind}") for n in names]
            if all(p is not None for p in parts):
                out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
            else:
                for n, p in zip(names, parts):
                    if p is not None:
                        out[f"encoder.layer.{i}.attention.attention.{n}.{kind}"] = p
    return out


def _renamed(sd: dict, renames: tuple) -> dict:
    """A transformers ViT-family state dict in timm's layout: q, k, v fused, the rest renamed."""
    out = _fuse_qkv(sd)
    for key, value in sd.items():
        if ".attention.attention." not in key:
            for old, new in renames:
                key = key.replace(old, new)
            out[key] = value
    return out


def dinov2_to_timm(sd: dict, grid: int) -> dict:
    """A transformers Dinov2Model state dict in timm's ViT layout (position grid `grid`). With
    `embeddings.register_tokens` (Dinov2WithRegisters: the registers join after the positions
    are added) it is timm's reg4 DINOv2 layout, as `dinov2_meta_to_timm`."""
    sd = {k: v for k, v in sd.items() if k != "embeddings.mask_token"}
    registers = sd.pop("embeddings.register_tokens", None)
    out = _renamed(sd, _DINOV2_RENAMES)
    if registers is None:
        if "pos_embed" in out:
            out["pos_embed"] = dinov2_pos_embed(out["pos_embed"], grid)
        return out
    out["reg_token"] = registers
    if "cls_token" in out and "pos_embed" in out:
        pos = out["pos_embed"]
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = _dinov2_reg_grid(pos[:, 1:], grid)  # transformers: bicubic, antialiased
    return out


_VIT_RENAMES = (
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
    ("encoder.layer.", "blocks."),
    (".attention.output.dense.", ".attn.proj."),
    (".intermediate.dense.", ".mlp.fc1."),
    (".output.dense.", ".mlp.fc2."),
    (".layernorm_before.", ".norm1."),
    (".layernorm_after.", ".norm2."),
    ("layernorm.", "norm."),
)


def vit_hf_to_timm(sd: dict) -> dict:
    """A transformers ViTModel state dict (Phikon) in timm's ViT layout."""
    return _renamed({k: v for k, v in sd.items() if not k.startswith("pooler.")}, _VIT_RENAMES)


def dinov2_meta_to_timm(sd: dict, grid: int) -> dict:
    """A DINOv2 (facebookresearch) state dict with registers in timm's reg4 ViT layout."""
    out = {}
    for key, value in sd.items():
        if key in ("mask_token", "register_tokens", "cls_token", "pos_embed"):
            continue
        out[re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", key))] = value
    if "register_tokens" in sd:
        out["reg_token"] = sd["register_tokens"]
    if "cls_token" in sd and "pos_embed" in sd:
        pos = sd["pos_embed"]
        out["cls_token"] = sd["cls_token"] + pos[:, :1]
        out["pos_embed"] = _dinov2_reg_grid(pos[:, 1:], grid)
    return out


def _dinov2_reg_grid(patch_pos: torch.Tensor, grid: int) -> torch.Tensor:
    """DINOv2's `interpolate_pos_encoding` for the register models (antialias, no offset)."""
    side = math.isqrt(patch_pos.shape[1])
    if side == grid:
        return patch_pos
    dim = patch_pos.shape[-1]
    patch = patch_pos.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=(grid, grid), mode="bicubic", antialias=True)
    return patch.permute(0, 2, 3, 1).reshape(1, -1, dim).to(patch_pos.dtype)


# a CONCH v1 checkpoint's tensors that its image embedding does not use
_CONCH_V1_UNUSED = ("text.", "text_decoder.", "logit_scale", "visual.attn_pool_caption.",
                    "visual.ln_caption.", "visual.proj_contrast")  # fmt: skip


def conch_v1_image_tower(sd: dict, grid: int | None = None) -> dict:
    """A CONCH v1 CoCa checkpoint's image tower (`visual.` keys, prefix dropped); a position
    grid other than `grid` is resized as the authors' `resize_pos_embed` does (timm
    `resample_abs_pos_embed`, bilinear, no antialias)."""
    out = {k[len("visual.") :] if k.startswith("visual.") else k: v
           for k, v in sd.items() if not k.startswith(_CONCH_V1_UNUSED)}  # fmt: skip
    pos = out.get("trunk.pos_embed")
    if grid is not None and pos is not None:  # v1.5's first resize is v1's rule; no second step
        out["trunk.pos_embed"] = conch_pos_embed(pos, grid, trained_grid=grid)
    return out


def ctranspath_to_timm(sd: dict) -> dict:
    """TransPath's timm 0.5.4 Swin checkpoint in current timm's Swin layout."""
    old = "layers.0.downsample.reduction.weight" in sd
    out = {}
    for key, value in sd.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            continue  # buffers timm recomputes
        if old:
            key = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) + 1}.downsample", key)
        out[key] = value
    return out


# builder -> (the authors' checkpoint layout, one key it has, test that a state dict is in it)
NATIVE_LAYOUTS = {
    "dinov2_hf": ("transformers Dinov2Model", "embeddings.patch_embeddings.projection.weight",
                  lambda sd: any(k.startswith("embeddings.") for k in sd)),
    "vit_hf": ("transformers ViTModel", "encoder.layer.0.layernorm_before.weight",
               lambda sd: any(".layernorm_before." in k for k in sd)),
    "dinov2_meta": ("DINOv2 (facebookresearch/dinov2)", "register_tokens",
                    lambda sd: "register_tokens" in sd),
    "ctranspath": ("TransPath's timm 0.5.4 Swin", "layers.0.downsample.reduction.weight",
                   lambda sd: "layers.0.downsample.reduction.weight" in sd),
    "conch_v1": ("CONCH v1's CoCa model", "visual.trunk.patch_embed.proj.weight",
                 lambda sd: any(k.startswith("visual.trunk.") for k in sd)),
}  # fmt: skip


def file_grid(sd: dict, builder: str) -> int:
    """The position grid side of a checkpoint in `builder`'s native layout (14 if none)."""
    key = {"dinov2_hf": "embeddings.position_embeddings", "dinov2_meta": "pos_embed"}.get(builder)
    pos = sd.get(key) if key else None
    return _grid(pos) if pos is not None and pos.ndim == 3 else 14


def from_authors_layout(builder: str, sd: dict, net: nn.Module | None, grid: int | None = None) -> dict:
    """The authors' checkpoint keys mapped onto `net`'s (timm builds are already in them);
    `grid`: the position grid to bring the checkpoint to (default: `net`'s)."""
    if builder in ("dinov2_hf", "dinov2_meta"):
        grid = grid or net.patch_embed.grid_size[0]
        return dinov2_to_timm(sd, grid) if builder == "dinov2_hf" else dinov2_meta_to_timm(sd, grid)
    if builder == "vit_hf":
        return vit_hf_to_timm(sd)
    if builder == "ctranspath":
        return ctranspath_to_timm(sd)
    if builder == "conch_v1":
        return conch_v1_image_tower(sd, None if net is None else net.trunk.patch_embed.grid_size[0])
    if builder == "conch_v15" and "trunk.pos_embed" in sd and net is not None:
        grid = net.trunk.patch_embed.grid_size[0]
        return {**sd, "trunk.pos_embed": conch_pos_embed(sd["trunk.pos_embed"], grid)}
    return sd
