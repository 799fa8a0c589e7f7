"""The foundation models that are not plain timm ViTs, and how their checkpoints map onto our builds
(the key conversions themselves: features/checkpoint_layouts.py).

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
- MUSK (xiangjx/musk `model.safetensors`), restated from lilab-stanford/MUSK 714b666
  (`modeling.py` `MUSK`, `_get_large_config`; its vendored torchscale BEiT-3; TRIDENT
  `MuskInferenceEncoder`: `with_head=False, out_norm=False, return_global=True`): an image goes
  through the multiway modules' `A` (vision) branch only, which is a pre-norm ViT-L/16 at 384 px
  with torchscale's sub-LayerNorms (`subln`: a LayerNorm on the attention output before its
  projection and on the FFN's hidden layer before fc2), LayerNorm eps 1e-5, exact GELU, learned
  positions for the class token and patches (rows 2 on of the table: fairseq's offset), a final
  LayerNorm, the class token out. That is timm's `vit_large_patch16_384` with `scale_attn_norm`
  and `scale_mlp_norm`; the language branch, text embedding, heads and mask token are dropped.
- KEEP (Astaxanthin/KEEP, whole CLIP model: `visual.`, `visual_head.`, a BERT `text.`,
  `logit_scale`), restated from MAGIC-AI4Med/KEEP a346a70 `quick_start/keep_inference.py`
  (`KEEPModel`, the hub's `trust_remote_code` class; TRIDENT `KeepInferenceEncoder` returns
  `encode_image`): timm `vit_large_patch16_224` (UNI's arguments: init_values 1e-5), its class
  token through Linear(1024, 768), GELU, Linear(768, 768), L2-normalised. The text tower and
  logit scale are dropped by name.
- CTransPath (CHIEF_CTransPath.pth): TransPath's Swin-T with a convolutional stem
  (`ConvStem`, TRIDENT `model_zoo/ctranspath/ctran.py`), saved by timm 0.5.4. Current timm's Swin
  computes the same; its checkpoint differs only in where the patch merging sits (end of stage i
  there, start of stage i + 1 here) and in the non-persistent buffers (`relative_position_index`,
  `attn_mask`), as timm's own `swin_transformer.checkpoint_filter_fn` converts.
"""

from __future__ import annotations

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


class ProjectedViT(nn.Module):
    """KEEP's image embedding (`KEEPModel.encode_image`, MAGIC-AI4Med/KEEP
    quick_start/keep_inference.py): the ViT's class token through `visual_head` (Linear, GELU,
    Linear), L2-normalised."""

    def __init__(self, visual: nn.Module, dim: int):
        super().__init__()
        self.visual = visual
        width = visual.num_features
        self.visual_head = nn.Sequential(nn.Linear(width, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual_head(self.visual(x)), dim=-1)


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
