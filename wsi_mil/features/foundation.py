"""Pathology foundation models, built exactly as their authors publish them.

Each entry gives the architecture arguments, the embedding rule, the input size (and crop),
the normalisation, the resolution the model was trained at, the Hugging Face repository and
whether access is gated. The facts are taken from the models' own cards and configs as
gathered in TRIDENT's `trident/patch_encoder_models/load.py` (mahmoodlab/TRIDENT, read
2026-11-22), which is cited per model below; names are TRIDENT's so users can switch. The
default patch size at 20x (0.5 um/px) is the `--patch_size` TRIDENT's README gives each model.

Embedding rules:
- "cls": the class token after the final norm (timm `global_pool="token"`), UNI, UNI2-h,
  H-optimus, Prov-GigaPath, Phikon-v2;
- "cls+mean": the class token concatenated with the mean of the patch tokens, skipping the
  class and register tokens (Virchow: `output[:, 1:]`, Virchow2: `output[:, 5:]`);
- "attn_pool": CONCH v1.5's attentional pooler over all tokens, then a LayerNorm (768-d).

Two models are not plain timm ViTs and have their own builders (features/foundation_arch.py):
CONCH v1.5 (TRIDENT `model_zoo/conchv1_5/conchv1_5.py`: a ViT-L/16 trunk, one-query
attentional pooler, 448 px input) and Phikon-v2 (a `transformers` Dinov2Model, ViT-L/16, CLS of
`last_hidden_state`; built here as the equivalent timm ViT from the checkpoint's own keys, tested
against `transformers`).

Resizing follows the authors' transforms: patches are read at the model's resolution and
resized to its input size with its interpolation, antialiased as torchvision's `Resize` does on
the PIL images TRIDENT hands it, within two grey levels (features/reading.py `resize_patch`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .foundation_arch import ConchV15Vision

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))  # H-optimus card


@dataclass(frozen=True)
class FoundationSpec:
    name: str
    arch: str  # timm architecture the weights were saved from
    kwargs: dict  # exact architecture arguments (TRIDENT load.py)
    dim: int
    embedding: str  # "cls", "cls+mean" or "attn_pool"
    prefix_tokens: int  # class + register tokens before the patch tokens
    hub: str  # Hugging Face repository
    gated: bool
    mpp: float = 0.5  # trained at 20x
    patch_px: int = 224  # patch side read at `mpp` (TRIDENT README's `--patch_size` per encoder)
    input_size: int = 224  # network input
    resize_px: int | None = None  # resized to this before a center crop to input_size (GigaPath)
    mean_std: tuple = IMAGENET
    interpolation: str = "bilinear"  # the authors' transform when resizing is needed
    source: str = ""
    act_layer: str | None = None  # "silu" with SwiGLU MLPs
    mlp_layer: str | None = None  # "swiglu_packed"
    builder: str = "timm"  # "timm", "conch_v15" or "dinov2_hf" (features/foundation_arch.py)
    hub_files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")  # tried in order


def _vit_kwargs(spec: FoundationSpec, overrides: dict) -> dict:
    import timm

    kw = {**spec.kwargs, "num_classes": 0, **overrides}
    if spec.mlp_layer == "swiglu_packed":
        kw["mlp_layer"] = timm.layers.SwiGLUPacked
    if spec.act_layer == "silu":
        kw["act_layer"] = nn.SiLU
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
    """The network with the embedding rule applied, random weights (overrides: e.g. depth=1)."""
    from .compat import import_timm

    timm = import_timm()
    kw = _vit_kwargs(spec, overrides)
    net = timm.create_model(spec.arch, pretrained=False, **kw)
    if spec.builder == "conch_v15":
        return ConchV15Vision(net)
    return TokenPool(net, spec.prefix_tokens) if spec.embedding == "cls+mean" else net


def weights_module(net: nn.Module) -> nn.Module:
    """The module whose state dict the authors' checkpoint holds (the ViT inside a TokenPool)."""
    return net.net if isinstance(net, TokenPool) else net


_SRC = "TRIDENT load.py "
FOUNDATION_MODELS: dict[str, FoundationSpec] = {
    s.name: s
    for s in [
        FoundationSpec(
            "uni_v1", "vit_large_patch16_224",
            {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
            1024, "cls", 1, "MahmoodLab/UNI", True, patch_px=256, source=_SRC + "UNIInferenceEncoder",
        ),
        FoundationSpec(
            "uni_v2", "vit_giant_patch14_224",
            {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
             "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8,
             "dynamic_img_size": True},
            1536, "cls", 9, "MahmoodLab/UNI2-h", True, patch_px=256, source=_SRC + "UNIv2InferenceEncoder",
            act_layer="silu", mlp_layer="swiglu_packed",
        ),
        FoundationSpec(
            "virchow", "vit_huge_patch14_224",
            {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "dynamic_img_size": True},
            2560, "cls+mean", 1, "paige-ai/Virchow", True, interpolation="bicubic",
            source=_SRC + "VirchowInferenceEncoder", act_layer="silu", mlp_layer="swiglu_packed",
        ),
        FoundationSpec(
            "virchow2", "vit_huge_patch14_224",
            {"img_size": 224, "init_values": 1e-5, "reg_tokens": 4, "mlp_ratio": 5.3375,
             "dynamic_img_size": True},
            2560, "cls+mean", 5, "paige-ai/Virchow2", True, interpolation="bicubic",
            source=_SRC + "Virchow2InferenceEncoder", act_layer="silu", mlp_layer="swiglu_packed",
        ),
        FoundationSpec(
            "hoptimus0", "vit_giant_patch14_reg4_dinov2",
            {"img_size": 224, "global_pool": "token", "init_values": 1e-5, "dynamic_img_size": True},
            1536, "cls", 5, "bioptimus/H-optimus-0", True, mean_std=HOPTIMUS,
            source=_SRC + "HOptimus0InferenceEncoder",
        ),
        FoundationSpec(
            "hoptimus1", "vit_giant_patch14_reg4_dinov2",
            {"img_size": 224, "global_pool": "token", "init_values": 1e-5, "dynamic_img_size": True},
            1536, "cls", 5, "bioptimus/H-optimus-1", True, mean_std=HOPTIMUS,
            source=_SRC + "HOptimus1InferenceEncoder",
        ),
        FoundationSpec(
            "gigapath", "vit_giant_patch14_dinov2",
            {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40,
             "num_heads": 24, "mlp_ratio": 5.33334, "dynamic_img_size": True},
            1536, "cls", 1, "prov-gigapath/prov-gigapath", True, patch_px=256, resize_px=256,
            interpolation="bicubic", source=_SRC + "GigaPathInferenceEncoder (Resize 256, CenterCrop 224)",
        ),
        FoundationSpec(
            "conch_v15", "vit_large_patch16_224", {"img_size": 448, "init_values": 1.0},
            768, "attn_pool", 1, "MahmoodLab/conchv1_5", True, patch_px=512, input_size=448,
            source=_SRC + "Conchv15InferenceEncoder; model_zoo/conchv1_5 (Resize 448 bilinear)",
            builder="conch_v15", hub_files=("pytorch_model_vision.bin",),
        ),
        FoundationSpec(
            "phikon_v2", "vit_large_patch16_224", {"img_size": 224, "init_values": 1.0},
            1024, "cls", 1, "owkin/phikon-v2", False,
            source=_SRC + "Phikonv2InferenceEncoder (AutoModel, CLS; Resize 224 + CenterCrop 224)",
            builder="dinov2_hf", hub_files=("model.safetensors",),
        ),
    ]
}  # fmt: skip
