"""Slide encoders behind one registry: `create_slide_encoder(name, weights, ...)`.

Names are TRIDENT's (`trident/slide_encoder_models/load.py`): `chief`, `feather`,
`feather_uni_v2`, `madeleine`, `titan`, `prism` (settings in features/slide_specs.py, networks
in features/slide_arch.py, slide_titan.py and slide_prism.py) and `mean-<patch encoder>` for
every registered patch encoder (plus TRIDENT's spellings of the Kaiko ones). Each takes the
features of one patch encoder, tiled at one resolution and patch size; `check_features`
refuses any other.

Weights: `weights=PATH`, else the checkpoint from the Hugging Face hub (or its cache), loaded
strictly (features/weights.py `load_plain_checkpoint`); `random_weights=True` for tests and the
offline demo. Random weights are seeded, so every process builds the same encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import WsiMilError
from .slide_arch import BUILDERS, MeanPool
from .slide_specs import NOT_REGISTERED, SLIDE_MODELS, TRIDENT_MEAN_ALIASES, SlideEncoderSpec
from .weights import hub_file, load_plain_checkpoint


@dataclass
class SlideEncoderInfo:
    name: str
    patch_encoder: str
    in_dim: int
    dim: int
    mpp: float | None
    patch_px: int | None
    weights: str  # a path, "hub:<id>", "random" or "none" (mean pooling)
    weights_sha256: str | None = None
    grid: bool = False  # places patches on a grid of patch-size cells (TITAN): no overlap


class SlideEncoder(nn.Module):
    """Patch features [N, D] (+ level-0 coords [N, 2], and the patch size at level 0 for TITAN's
    grid) -> slide embedding [1, dim]."""

    def __init__(self, net: nn.Module, info: SlideEncoderInfo):
        super().__init__()
        self.net, self.info = net, info

    @torch.no_grad()
    def forward(
        self, features: torch.Tensor, coords: torch.Tensor | None = None, patch_size_level0: int | None = None
    ) -> torch.Tensor:
        if not getattr(self.net, "takes_patch_size", False):
            return self.net(features.float(), coords)
        if coords is None or not patch_size_level0:
            raise WsiMilError(
                f"slide encoder {self.info.name} places patches on a grid: it needs their level-0 coords "
                "and patch size (the feature file's patch_size_level0 attribute); re-extract with wsi-mil"
            )
        return self.net(features.float(), coords, patch_size_level0)


def _patch_dims() -> dict[str, int]:
    from .encoders import encoder_table

    return {r["name"]: int(r["dim"]) for r in encoder_table()}


def slide_spec(name: str) -> SlideEncoderSpec:
    """The spec of a registered slide encoder, `mean-<patch encoder>` included."""
    if name in SLIDE_MODELS:
        return SLIDE_MODELS[name]
    if name.startswith("mean-"):
        patch = TRIDENT_MEAN_ALIASES.get(name, name[len("mean-") :])
        dims = _patch_dims()
        if patch in dims:
            return SlideEncoderSpec(
                name, patch, dims[patch], dims[patch], None, None, "mean",
                source="TRIDENT load.py L541-600 (MeanSlideEncoder: features.mean(dim=1))",
            )  # fmt: skip
    why = f" ({NOT_REGISTERED[name]})" if name in NOT_REGISTERED else ""
    raise WsiMilError(
        f"unknown slide encoder {name!r}{why}; choose one of {', '.join(sorted(SLIDE_MODELS))} "
        "or mean-<patch encoder> (see `wsi-mil encoders`)"
    )


def _hub_checkpoint(spec: SlideEncoderSpec) -> tuple[Path, str]:
    if spec.hub is None:
        raise WsiMilError(
            f"slide encoder {spec.name}: its weights are not on the Hugging Face hub "
            f"({spec.weights_note}); pass --weights FILE, or --random-weights for tests"
        )
    try:
        return hub_file(spec.hub, spec.hub_files), f"hub:{spec.hub}"
    except Exception as exc:
        gate = " (gated: request access on its page, then `hf auth login`)" if spec.gated else ""
        raise WsiMilError(
            f"slide encoder {spec.name}: weights at huggingface.co/{spec.hub} unavailable{gate} "
            f"({type(exc).__name__}); pass --weights FILE, or --random-weights for tests"
        ) from exc


def create_slide_encoder(
    name: str, weights: str | Path | None = None, random_weights: bool = False, **arch_overrides
) -> SlideEncoder:
    """Build a slide encoder by name, in eval mode. `arch_overrides` change the authors'
    constructor arguments (tests)."""
    spec = slide_spec(name)
    info = SlideEncoderInfo(
        spec.name,
        spec.patch_encoder,
        spec.in_dim,
        spec.dim,
        spec.mpp,
        spec.patch_px,
        "none",
        grid=getattr(BUILDERS.get(spec.builder), "takes_patch_size", False),
    )
    if spec.builder == "mean":
        return SlideEncoder(MeanPool(), info).eval()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = BUILDERS[spec.builder](**{**spec.kwargs, **arch_overrides})
    info.weights = "random"
    if weights or not random_weights:
        path, info.weights = (Path(weights), str(weights)) if weights else _hub_checkpoint(spec)
        info.weights_sha256 = load_plain_checkpoint(net, path, name, spec.unused)
    return SlideEncoder(net, info).eval()


def list_slide_encoders() -> list[str]:
    return sorted(SLIDE_MODELS) + ["mean-<patch encoder>"]


def slide_encoder_table() -> list[dict]:
    """One row per slide encoder: what `wsi-mil encoders` prints (no model is built)."""
    rows = []
    for s in SLIDE_MODELS.values():
        where = f"hf:{s.hub}" if s.hub else s.weights_note.split(" (")[0] + " (--weights)"
        rows.append(
            {"name": s.name, "dim": s.dim, "input": f"{s.patch_encoder} ({s.in_dim}-d)", "mpp": s.mpp,
             "patch_px": s.patch_px, "weights": where, "gated": s.gated, "extra": s.extra}
        )  # fmt: skip
    for patch, dim in sorted(_patch_dims().items()):
        rows.append(
            {"name": f"mean-{patch}", "dim": dim, "input": f"{patch} ({dim}-d)", "mpp": None,
             "patch_px": None, "weights": "none (mean)", "gated": False, "extra": ""}
        )  # fmt: skip
    return rows


def feature_grid(attrs: dict) -> tuple[float | None, int | None]:
    """(um/px, patch px) a feature file was tiled at: wsi-mil's `target_mpp`, else TRIDENT's
    `target_magnification` (20x = 0.5 um/px, TRIDENT README)."""
    mpp = attrs.get("target_mpp")
    if mpp is None and attrs.get("target_magnification"):
        mpp = 10.0 / float(attrs["target_magnification"])
    size = attrs.get("patch_size")
    return (None if mpp is None else float(mpp)), (None if size is None else int(size))


def check_features(path, attrs: dict, dim: int, info: SlideEncoderInfo) -> None:
    """Refuse features of another patch encoder, dimension, resolution or patch size than the
    slide encoder takes: one line naming the file and the fix."""
    from .encoders import ENCODERS

    enc = attrs.get("encoder")
    fix = (
        f"extract with --encoder {info.patch_encoder}"
        if info.patch_encoder in ENCODERS
        else f"bring TRIDENT's {info.patch_encoder} features ({info.patch_encoder} is not a wsi-mil encoder)"
    )
    if enc is None or str(enc) != info.patch_encoder:
        raise WsiMilError(
            f"{path}: features from patch encoder {enc or 'unknown (no encoder attribute)'}, but slide "
            f"encoder {info.name} takes {info.patch_encoder} features; {fix}"
        )
    if dim != info.in_dim:
        raise WsiMilError(
            f"{path}: {dim}-d features, but {info.name} takes {info.in_dim}-d {info.patch_encoder} "
            f"features; {fix}"
        )
    if info.mpp is None:
        return
    mpp, size = feature_grid(attrs)
    if mpp is None or abs(mpp - info.mpp) > 0.01 * info.mpp:
        seen = (
            "no target_mpp or target_magnification attribute" if mpp is None else f"patches at {mpp:g} um/px"
        )
        raise WsiMilError(
            f"{path}: {seen}, but {info.name} takes patches at {info.mpp:g} um/px ({10 / info.mpp:g}x); "
            f"extract with --target-mpp {info.mpp:g} --patch-size {info.patch_px}"
        )
    if size != info.patch_px:
        raise WsiMilError(
            f"{path}: {size}-px patches, but {info.name} takes {info.patch_px}-px patches at "
            f"{info.mpp:g} um/px; extract with --patch-size {info.patch_px}"
        )
    if info.grid and float(attrs.get("overlap") or 0) > 0:  # overlapping patches would share cells
        raise WsiMilError(
            f"{path}: patches overlap ({float(attrs['overlap']):g}), but {info.name} places each patch "
            "in its own grid cell; extract with --overlap 0"
        )
