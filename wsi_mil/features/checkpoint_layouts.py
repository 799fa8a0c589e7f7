"""The authors' checkpoint key layouts mapped onto wsi-mil's builds (features/foundation_arch.py
describes each model and where its settings come from): transformers Dinov2 (Phikon-v2,
Hibou-L) and ViT (Phikon), DINOv2's own layout (OpenMidnight), TransPath's timm 0.5.4 Swin
(CTransPath), CONCH v1's whole CoCa model, CONCH v1.5's position grid, MUSK's BEiT-3 and KEEP's
CLIP model. Each
is a deterministic function of the weights, applied once when a checkpoint is loaded;
`NATIVE_LAYOUTS` names the layout each builder expects, so a checkpoint in another layout is
refused (features/weights.py).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn


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


_HF_QKV = ("encoder.layer.{i}.attention.attention.{n}.{kind}", ("query", "key", "value"))


def _fuse_qkv(sd: dict, template: str = _HF_QKV[0], names: tuple = _HF_QKV[1]) -> dict:
    """Per-layer query, key and value tensors (keys `template` with {i}, {n} in `names`, {kind})
    fused into timm's qkv; left under their own names when one is missing, so the strict load
    reports them. Default: transformers' layout."""
    out = {}
    prefix = template.split("{i}")[0]
    layers = {k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)}
    layers = {i for i in layers if i.isdigit()}
    for i in sorted(layers, key=int):
        for kind in ("weight", "bias"):
            keys = [template.format(i=i, n=n, kind=kind) for n in names]
            parts = [sd.get(k) for k in keys]
            if all(p is not None for p in parts):
                out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
            else:
                out.update({k: p for k, p in zip(keys, parts) if p is not None})
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


def dinov2_swiglu_to_timm(sd: dict) -> dict:
    """DINOv2's SwiGLUFFN names (`mlp.w12`, `mlp.w3`; silu of the first half times the second)
    as timm's SwiGLUPacked ones (`mlp.fc1`, `mlp.fc2`, the same order), as timm's `_convert_dinov2`."""
    renamed = (re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", k)) for k in sd)
    return dict(zip(renamed, sd.values()))


def dinov2_meta_to_timm(sd: dict, grid: int) -> dict:
    """A DINOv2 (facebookresearch) state dict with registers in timm's reg4 ViT layout."""
    skip = ("mask_token", "register_tokens", "cls_token", "pos_embed")
    out = dinov2_swiglu_to_timm({k: v for k, v in sd.items() if k not in skip})
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


# MUSK's checkpoint beyond the image embedding TRIDENT takes (`with_head=False`, `out_norm=False`)
_MUSK_UNUSED = ("beit3.text_embed.", "beit3.encoder.embed_positions.B.", "beit3.vision_embed.mask_token",
                "language_head.", "vision_head.", "logit_scale")  # fmt: skip
_MUSK_RENAMES = (
    ("beit3.vision_embed.proj.", "patch_embed.proj."),
    ("beit3.vision_embed.cls_token", "cls_token"),
    ("beit3.encoder.layers.", "blocks."),
    (".self_attn.out_proj.A.", ".attn.proj."),
    (".self_attn.inner_attn_ln.A.", ".attn.norm."),
    (".self_attn_layer_norm.A.", ".norm1."),
    (".final_layer_norm.A.", ".norm2."),
    (".ffn.A.ffn_layernorm.", ".mlp.norm."),
    (".ffn.A.", ".mlp."),
    ("beit3.encoder.layer_norm.A.", "norm."),
)
_MUSK_POS = "beit3.encoder.embed_positions.A.weight"
_MUSK_QKV = "beit3.encoder.layers.{i}.self_attn.{n}_proj.A.{kind}"


def musk_to_timm(sd: dict, grid: int) -> dict:
    """MUSK's BEiT-3 checkpoint in timm's ViT layout: the vision branch (`A` of every multiway
    module; an image-only forward has split position -1), q, k and v fused into qkv, the
    positions from row 2 of the table on (fairseq's offset: rows 0 and 1 are never used), a grid
    other than `grid` resized as MUSK's `load_model_and_may_interpolate` does (bicubic, no
    antialias). The language branch (`.B.`), the text embedding, both heads, the logit scale and
    the mask token are left out by name."""
    vision = {k: v for k, v in sd.items() if not (k.startswith(_MUSK_UNUSED) or ".B." in k)}
    out = _fuse_qkv(vision, _MUSK_QKV, ("q", "k", "v"))
    for key, value in vision.items():
        if key == _MUSK_POS:
            out["pos_embed"] = dinov2_pos_embed(value[2:].unsqueeze(0), grid)
        elif not any(f".self_attn.{n}_proj." in key for n in "qkv"):  # fused above
            for old, new in _MUSK_RENAMES:
                key = key.replace(old, new)
            out[key] = value
    return out


# a KEEP checkpoint's tensors that its image embedding does not use (the BERT text tower)
_KEEP_UNUSED = ("text.", "logit_scale")


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
    "musk": ("MUSK's BEiT-3 model", "beit3.vision_embed.proj.weight",
             lambda sd: any(k.startswith("beit3.") for k in sd)),
    "keep": ("KEEP's CLIP model", "visual_head.0.weight", lambda sd: "visual_head.0.weight" in sd),
}  # fmt: skip


def file_grid(sd: dict, builder: str) -> int:
    """The position grid side of a checkpoint in `builder`'s native layout (14 if none)."""
    if builder == "musk" and _MUSK_POS in sd:
        return _grid(sd[_MUSK_POS][2:].unsqueeze(0))
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
    if builder == "musk":
        return musk_to_timm(sd, grid or net.patch_embed.grid_size[0])
    if builder == "ctranspath":
        return ctranspath_to_timm(sd)
    if builder == "keep":
        return {k: v for k, v in sd.items() if not k.startswith(_KEEP_UNUSED)}
    if builder == "conch_v1":
        return conch_v1_image_tower(sd, None if net is None else net.trunk.patch_embed.grid_size[0])
    if builder == "timm":  # a SwiGLU ViT saved from DINOv2's code (H0-mini in plism-benchmark)
        return dinov2_swiglu_to_timm(sd)
    if builder == "conch_v15" and "trunk.pos_embed" in sd and net is not None:
        grid = net.trunk.patch_embed.grid_size[0]
        return {**sd, "trunk.pos_embed": conch_pos_embed(sd["trunk.pos_embed"], grid)}
    return sd
