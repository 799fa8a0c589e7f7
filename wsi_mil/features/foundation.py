"""Pathology foundation models, built exactly as their authors publish them.

The settings of every model (architecture arguments, embedding rule, input size and crop,
normalisation, resolution, Hugging Face repository, gate) are in features/foundation_specs.py,
each cited to TRIDENT's `trident/patch_encoder_models/load.py` (mahmoodlab/TRIDENT) by line;
names are TRIDENT's so users can switch. docs/encoders.md tabulates them.

Embedding rules:
- "cls": the class token after the final norm (timm `global_pool="token"`; transformers
  `last_hidden_state[:, 0]`), UNI, UNI2-h, H-optimus, Prov-GigaPath, Phikon(-v2), Kaiko, Lunit,
  GPFM, OpenMidnight, Hibou-L (`pooler_output`), MUSK (`return_global`, no head);
- "cls+mean": the class token concatenated with the mean of the patch tokens, skipping the
  class and register tokens (Virchow: `output[:, 1:]`, Virchow2: `output[:, 5:]`);
- "attn_pool": CONCH's attentional pooler over all tokens, then a LayerNorm (v1.5: 768-d,
  v1: 512-d);
- "proj": KEEP's: the class token through its projection head, L2-normalised;
- "avg": the mean of the final feature map (CTransPath's Swin after its norm; TRIDENT's
  `resnet50`, layer3 then `AdaptiveAvgPool2d`).

Builders other than a plain timm ViT (features/foundation_arch.py; checkpoint conversions in
features/checkpoint_layouts.py): CONCH v1.5's and v1's vision towers; Phikon-v2 (transformers
Dinov2Model), Hibou-L (Dinov2 with registers), Phikon (transformers ViTModel), OpenMidnight
(DINOv2's own layout) and MUSK (BEiT-3's image branch) built as the equivalent timm ViT from
their checkpoints' keys; CTransPath (timm's Swin-T with TransPath's ConvStem, checkpoint in timm
0.5.4's layout); TRIDENT's `resnet50` (timm `features_only` up to layer3); GenBio-PathFM
(features/rope_vit.py: a DINOv3-style ViT with a bfloat16 RoPE, per colour channel).

Resizing follows the authors' transforms: patches are read at the model's resolution and
resized to its input size with its interpolation, antialiased as torchvision's `Resize` does on
the PIL images TRIDENT hands it, within two grey levels (features/reading.py `resize_patch`).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from .foundation_arch import ConvStem, FeaturePool, ProjectedViT, conch_vision
from .foundation_specs import FOUNDATION_MODELS, HOPTIMUS, IMAGENET, FoundationSpec
from .rope_vit import PerChannel, RopeViT

__all__ = ["FOUNDATION_MODELS", "HOPTIMUS", "IMAGENET", "FoundationSpec", "build_vit", "weights_module"]


def _vit_kwargs(spec: FoundationSpec, overrides: dict) -> dict:
    import timm

    kw = {**spec.kwargs, "num_classes": 0, **overrides}
    if spec.mlp_layer == "swiglu_packed":
        kw["mlp_layer"] = timm.layers.SwiGLUPacked
    if spec.act_layer == "silu":
        kw["act_layer"] = nn.SiLU
    if spec.norm_eps is not None:
        kw["norm_layer"] = partial(nn.LayerNorm, eps=spec.norm_eps)
    if spec.embedding == "cls+mean":
        kw["global_pool"] = ""  # all tokens out; the rule below pools them
    return kw


class TokenPool(nn.Module):
    """Class token ++ mean of the patch tokens (Virchow's embedding)."""

    def __init__(self, net: nn.Module, prefix_tokens: int):
        super().__init__()
        self.net, self.prefix_tokens = net, prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.net(x)
        return torch.cat([tokens[:, 0], tokens[:, self.prefix_tokens :].mean(1)], dim=-1)


def build_vit(spec: FoundationSpec, **overrides) -> nn.Module:
    """The network with the embedding rule applied, random weights (overrides: e.g. depth=1;
    for CTransPath's Swin `depth=d` means d blocks per stage, a ResNet ignores it)."""
    from .compat import import_timm

    timm = import_timm()
    if spec.builder == "timm_features":  # TRIDENT's resnet50: layer3 + average pool
        overrides.pop("depth", None)
        return FeaturePool(timm.create_model(spec.arch, pretrained=False, **{**spec.kwargs, **overrides}))
    if spec.builder == "genbio":  # not a timm model: features/rope_vit.py
        return PerChannel(RopeViT(**{**spec.kwargs, "depth": overrides.get("depth", spec.kwargs["depth"])}))
    if spec.builder == "ctranspath":
        if "depth" in overrides:
            overrides["depths"] = (overrides.pop("depth"),) * 4
        kw = {**spec.kwargs, "embed_layer": ConvStem, "num_classes": 0, **overrides}
        return timm.create_model(spec.arch, pretrained=False, **kw)
    kw = _vit_kwargs(spec, overrides)
    net = timm.create_model(spec.arch, pretrained=False, **kw)
    if spec.builder in ("conch_v15", "conch_v1"):
        return conch_vision(net, spec.builder)
    if spec.builder == "keep":
        return ProjectedViT(net, spec.dim)
    return TokenPool(net, spec.prefix_tokens) if spec.embedding == "cls+mean" else net


def weights_module(net: nn.Module) -> nn.Module:
    """The module whose state dict the authors' checkpoint holds (the ViT inside a TokenPool)."""
    if isinstance(net, (TokenPool, PerChannel)):
        return net.net
    return net.body if isinstance(net, FeaturePool) else net
