"""Patch encoders behind one registry (timm-style): `create_encoder(name, weights, ...)`.

- `resnet50_trunc`: CLAM's encoder (Lu et al. 2021, github.com/mahmoodlab/CLAM): torchvision
  ResNet50 truncated after layer3, global average pooling, 1024-d, ImageNet normalisation,
  224 px input.
- `resnet18`: torchvision ResNet18 with the classifier removed, 512-d.
- the pathology foundation models under TRIDENT's names (`uni_v1`, `uni_v2`, `virchow`,
  `virchow2`, `hoptimus0`, `hoptimus1`, `gigapath`, `conch_v15`, `conch_v1`, `phikon_v2`, `phikon`,
  `ctranspath`, `kaiko-vits16`, `kaiko-vits8`, `kaiko-vitb16`, `kaiko-vitb8`, `kaiko-vitl14`,
  `lunit-vits8`, `gpfm`, `openmidnight`, `hibou_l`, `musk`, `genbio-pathfm`, `keep`, TRIDENT's
  `resnet50`), with their authors' exact architecture, embedding rule, input size, resize
  filter and normalisation (features/foundation_specs.py).
- `timm:<name>` and `hf-hub:<repo>`: any other timm model, pooled features via
  `num_classes=0`, with the model's own input size and normalisation.

Weights: `weights=PATH` (.pth/.pt/.bin/.safetensors, torchvision- or timm-style keys, with or
without `module.`/`model.`/`backbone.`/`encoder.`/`net.` prefixes) loaded strictly: every
tensor must be there with its shape and nothing else may be (only a classifier head the
encoder lacks is dropped, and for `resnet50_trunc` the `layer4`/`fc` a full ResNet50 has:
CLAM's own truncated checkpoint, timm `features_only`, loads as it is). Else the checkpoint
file from the Hugging Face hub (or its cache), loaded by the same strict path; failing that,
one clear error (gated repositories: how to get access) unless `random_weights=True` (tests,
benchmarks, the offline demo).

Checkpoint identity (features/weights.py): a file in another registered encoder's key layout is
refused naming both; the file's sha256 is `EncoderInfo.weights_sha256`, written into every
feature file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..errors import WsiMilError
from .checkpoint_layouts import from_authors_layout
from .compat import import_timm, import_torchvision
from .foundation import FOUNDATION_MODELS, FoundationSpec, build_vit, weights_module
from .foundation_specs import NOT_REGISTERED as PATCH_NOT_REGISTERED
from .weights import file_sha256, hub_file, load_checkpoint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class EncoderInfo:
    name: str
    dim: int
    input_size: int  # px of the images the reader hands over
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: str  # where the weights came from: a path, "hub:<id>" or "random"
    crop_size: int | None = None  # center crop the network sees (None: the whole input)
    mpp: float | None = None  # resolution the encoder was trained at (its default --target-mpp)
    patch_px: int | None = None  # its default --patch-size at that mpp
    interpolation: str = "bilinear"  # the authors' resize filter (antialiased, as on PIL images)
    weights_sha256: str | None = None  # of the checkpoint file loaded (None: random, or unknown)


class Encoder(nn.Module):
    """A patch encoder: float images [B, 3, H, W] normalised -> features [B, dim]."""

    def __init__(self, net: nn.Module, info: EncoderInfo):
        super().__init__()
        self.net = net
        self.info = info

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.info.crop_size
        if c and c < x.shape[-1]:
            o = (x.shape[-1] - c) // 2
            x = x[..., o : o + c, o : o + c]
        return self.net(x)


class ResNetTrunc(nn.Module):
    """ResNet50 up to layer3 + global average pool (CLAM's `resnet50_baseline`)."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3 = resnet.layer1, resnet.layer2, resnet.layer3
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.pool(x), 1)


def _no_weights_error(name: str, exc: Exception) -> WsiMilError:
    return WsiMilError(
        f"encoder {name}: pretrained weights unavailable ({type(exc).__name__}: "
        f"{str(exc)[:120]}); pass --weights PATH to a local checkpoint, or "
        "--random-weights for tests and benchmarks"
    )


def _torchvision_hub_sha256(enum) -> str | None:
    """The sha256 of torchvision's downloaded checkpoint for `enum` (None if not on disk)."""
    try:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)
        return file_sha256(path) if path.exists() else None
    except Exception:
        return None


def _torchvision_resnet(arch: str, weights_enum: str, random_weights: bool):
    """torchvision's ResNet with its ImageNet weights (or random): (net, source, sha256)."""
    tv = import_torchvision()
    resnet = getattr(tv.models, arch)(weights=None)
    if random_weights:
        return resnet, "random", None
    try:
        enum = getattr(tv.models, weights_enum).IMAGENET1K_V1
        resnet.load_state_dict(enum.get_state_dict(progress=False))
    except Exception as exc:
        raise _no_weights_error(arch, exc) from exc
    return resnet, f"hub:torchvision/{arch}.IMAGENET1K_V1", _torchvision_hub_sha256(enum)


def _resnet50_trunc(weights=None, random_weights=False) -> Encoder:
    if weights:  # a full ResNet50 checkpoint, or CLAM's truncated one (no layer4, no fc)
        net = ResNetTrunc(import_torchvision().models.resnet50(weights=None))
        sha, source = load_checkpoint(net, weights, "resnet50_trunc"), str(weights)
    else:
        resnet, source, sha = _torchvision_resnet("resnet50", "ResNet50_Weights", random_weights)
        net = ResNetTrunc(resnet)
    # CLAM's default: 256 px patches at 20x, resized to 224 (bilinear: its get_eval_transforms)
    info = EncoderInfo("resnet50_trunc", 1024, 224, IMAGENET_MEAN, IMAGENET_STD, source, None, 0.5, 256)
    info.weights_sha256 = sha
    return Encoder(net, info)


def _resnet18(weights=None, random_weights=False) -> Encoder:
    if weights:
        resnet = import_torchvision().models.resnet18(weights=None)
        resnet.fc = nn.Identity()
        sha, source = load_checkpoint(resnet, weights, "resnet18"), str(weights)
    else:
        resnet, source, sha = _torchvision_resnet("resnet18", "ResNet18_Weights", random_weights)
        resnet.fc = nn.Identity()
    info = EncoderInfo("resnet18", 512, 224, IMAGENET_MEAN, IMAGENET_STD, source, None, 0.5, 224)
    info.weights_sha256 = sha
    return Encoder(resnet, info)


def _timm(model_name: str, weights=None, random_weights=False) -> Encoder:
    timm = import_timm()
    kwargs = {"num_classes": 0}
    sha = None
    name = f"timm:{model_name}" if not model_name.startswith("hf-hub:") else model_name
    if not model_name.startswith("hf-hub:") and not timm.is_model(model_name):
        close = timm.list_models(f"*{model_name.split('.')[0][:6]}*")[:5]
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise WsiMilError(
            f"--encoder {name}: timm has no model {model_name!r}{hint} (timm.list_models() has them all)"
        )
    if weights:
        net = timm.create_model(model_name, pretrained=False, **kwargs)
        sha = load_checkpoint(net, weights, name, drop_heads=True, shown=model_name)
        source = str(weights)
    elif random_weights:
        net = timm.create_model(model_name, pretrained=False, **kwargs)
        source = "random"
    else:
        try:
            net = timm.create_model(model_name, pretrained=True, **kwargs)
        except Exception as exc:
            raise _no_weights_error(model_name, exc) from exc
        source = f"hub:{model_name}"
    cfg = timm.data.resolve_model_data_config(net)
    size = int(cfg["input_size"][-1])
    return Encoder(
        net,
        EncoderInfo(
            name,
            int(net.num_features),
            size,
            tuple(cfg["mean"]),
            tuple(cfg["std"]),
            source,
            interpolation="bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic",
            weights_sha256=sha,
        ),
    )


def _gated_error(spec: FoundationSpec, exc: Exception) -> WsiMilError:
    text = f"{type(exc).__name__}: {exc}"
    gated = type(exc).__name__ == "GatedRepoError" or any(
        k in text for k in ("401", "403", "Gated", "gated", "Unauthorized", "access")
    )
    if spec.gated and gated:
        return WsiMilError(
            f"encoder {spec.name}: the weights at huggingface.co/{spec.hub} are gated; request access "
            "on that page, then log in (`hf auth login` or HF_TOKEN), or download the checkpoint "
            "and pass --weights FILE"
        )
    return _no_weights_error(spec.name, exc)


def hub_checkpoint(spec: FoundationSpec) -> Path:
    """The model's checkpoint file from the Hugging Face hub (or its local cache). Loaded by the
    same strict path as --weights."""
    return hub_file(spec.hub, spec.hub_files, spec.hub_repo_type)


def _checkpoint(spec: FoundationSpec, weights) -> tuple[Path, str]:
    """The checkpoint to load and where it came from: --weights, else the hub's file."""
    if weights:
        return Path(weights), str(weights)
    try:
        return hub_checkpoint(spec), f"hub:{spec.hub}"
    except Exception as exc:
        raise _gated_error(spec, exc) from exc


def _foundation(spec: FoundationSpec, weights=None, random_weights=False, **overrides) -> Encoder:
    loading = bool(weights or not random_weights)
    if loading and spec.builder != "timm_features":  # every ViT/Swin build takes weight_init
        overrides = {"weight_init": "skip", **overrides}  # the strict load overwrites every tensor
    net = build_vit(spec, **overrides)
    source, sha = "random", None
    if loading:
        path, source = _checkpoint(spec, weights)
        target = weights_module(net)
        sha = load_checkpoint(target, path, spec.name, partial(from_authors_layout, spec.builder, net=target))
    mean, std = spec.mean_std
    resize = spec.resize_px or spec.input_size
    crop = spec.input_size if resize != spec.input_size else None
    info = EncoderInfo(
        spec.name, spec.dim, resize, mean, std, source, crop, spec.mpp, spec.patch_px, spec.interpolation, sha
    )
    return Encoder(net, info)


ENCODERS: dict[str, Callable[..., Encoder]] = {
    "resnet50_trunc": _resnet50_trunc,
    "resnet18": _resnet18,
    **{name: partial(_foundation, spec) for name, spec in FOUNDATION_MODELS.items()},
}


def list_encoders() -> list[str]:
    return sorted(ENCODERS) + ["timm:<model name>", "hf-hub:<repo>"]


def encoder_table() -> list[dict]:
    """One row per registered encoder: what `wsi-mil encoders` prints (no model is built)."""
    rows = [
        {"name": "resnet50_trunc", "dim": 1024, "input_px": 224, "mpp": 0.5, "patch_px": 256,
         "interpolation": "bilinear", "weights": "torchvision IMAGENET1K_V1", "gated": False, "extra": ""},
        {"name": "resnet18", "dim": 512, "input_px": 224, "mpp": 0.5, "patch_px": 224,
         "interpolation": "bilinear", "weights": "torchvision IMAGENET1K_V1", "gated": False, "extra": ""},
    ]  # fmt: skip
    for s in FOUNDATION_MODELS.values():
        px = f"{s.resize_px}->{s.input_size}" if s.resize_px else str(s.input_size)
        hub = f"hf:{s.hub}" if s.hub_repo_type == "model" else f"hf-{s.hub_repo_type}:{s.hub}"
        rows.append(
            {"name": s.name, "dim": s.dim, "input_px": px, "mpp": s.mpp, "patch_px": s.patch_px,
             "interpolation": s.interpolation, "weights": hub, "gated": s.gated, "extra": s.extra}
        )  # fmt: skip
    return rows


def recommended_tiling(name: str) -> tuple[float, int] | None:
    """(mpp, patch px) the encoder was trained with, without building it; None if unknown."""
    row = next((r for r in encoder_table() if r["name"] == name), None)
    return (row["mpp"], row["patch_px"]) if row else None


def create_encoder(
    name: str, weights: str | Path | None = None, random_weights: bool = False, **arch_overrides
) -> Encoder:
    """Build an encoder by registry name, `timm:<name>` or `hf-hub:<repo>`, in eval mode.

    `arch_overrides` (e.g. `depth=1`) change a foundation model's architecture: for tests."""
    if weights and random_weights:  # the file used to win without a word
        raise WsiMilError(f"encoder {name}: --weights {weights} and --random-weights both given; pass one")
    if name in ENCODERS:
        build = partial(ENCODERS[name], **arch_overrides) if arch_overrides else ENCODERS[name]
    elif name.startswith("timm:"):

        def build(**kw):
            return _timm(name[len("timm:") :], **kw)
    elif name.startswith("hf-hub:"):

        def build(**kw):
            return _timm(name, **kw)
    else:
        why = f" ({PATCH_NOT_REGISTERED[name]})" if name in PATCH_NOT_REGISTERED else ""
        raise WsiMilError(f"unknown encoder {name!r}{why}; choose one of {', '.join(list_encoders())}")
    # Random weights are seeded, so every process (cluster workers, a later heatmap run)
    # builds the same encoder and features stay comparable.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        enc = build(weights=weights, random_weights=random_weights)
    return enc.eval()
