"""Encoder weights: checkpoint files read strictly, their sha256, and which registered
encoder's key layout a checkpoint has.

Checkpoint identity (`load_checkpoint`): a file that does not load strictly, or that is not in
the authors' own layout of an encoder whose checkpoint is converted (Phikon-v2, Hibou-L and
Phikon: transformers; OpenMidnight: DINOv2's; CTransPath: timm 0.5.4's Swin; a UNI checkpoint is
timm-layout and would pass the Dinov2 renaming unchanged), has its key layout (key names with
block numbers folded, and tensor shapes) compared with every registered encoder's; one in another encoder's
layout is refused naming both. The file's sha256 is streamed and cached per path, mtime and size.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from ..errors import WsiMilError
from .checkpoint_layouts import NATIVE_LAYOUTS, file_grid, from_authors_layout
from .compat import import_timm, import_torchvision
from .foundation import FOUNDATION_MODELS, build_vit, weights_module

# the registered encoders with a checkpoint layout of their own (encoders.ENCODERS' order)
LAYOUT_ENCODERS = ("resnet50_trunc", "resnet18", *FOUNDATION_MODELS)

WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "net.")


def load_state_dict_file(path: str | Path) -> dict:
    """A state dict from .safetensors or a torch checkpoint (unwrapping state_dict/model keys)."""
    path = Path(path)
    if not path.exists():
        raise WsiMilError(
            f"{path}: weights file not found; pass --weights with an existing .pth, .pt, .bin or "
            ".safetensors file"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WsiMilError(
            f"{path}: cannot read weights ({type(exc).__name__}); expected a "
            "PyTorch state dict (.pth) or .safetensors file"
        ) from exc
    for key in ("state_dict", "model", "teacher"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    # a wrapper's prefix is stripped only when every key carries it (Dinov2's own `encoder.layer.`
    # sits beside `embeddings.` and must stay)
    out = dict(sd)
    stripped = True
    while stripped and out:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                stripped = True
    return out


CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.")  # heads an encoder without one may drop
# what a checkpoint may hold beyond an encoder, per encoder: a full ResNet50's last stage and
# classifier, which CLAM's truncated encoder does not use (its own checkpoint, timm
# `features_only` out_indices=(3,), stops at layer3 under the same key names)
UNUSED_PREFIXES = {"resnet50_trunc": ("layer4.", "fc."), "resnet18": ("fc.",), "resnet50": ("layer4.", "fc.")}


# -- the weights file's sha256 ---------------------------------------------------------------

_SHA256: dict[tuple[str, int, int], str] = {}


def hub_file(repo: str, files: tuple[str, ...], repo_type: str = "model") -> Path:
    """The first of `files` the Hugging Face repository `repo` has (downloaded, or from the
    local cache)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    kw = {"repo_type": repo_type} if repo_type != "model" else {}
    for filename in files[:-1]:
        try:
            return Path(hf_hub_download(repo, filename, **kw))
        except EntryNotFoundError:  # not in this repository (or not cached, offline): the next name
            continue
    return Path(hf_hub_download(repo, files[-1], **kw))


def file_sha256(path: str | Path) -> str:
    """The file's sha256 (hex), streamed; computed once per process for a path, mtime and size."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _SHA256:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        _SHA256[key] = h.hexdigest()
    return _SHA256[key]


# -- key layouts: which registered encoder a checkpoint belongs to ----------------------------

_BLOCK_INDEX = re.compile(r"\.\d+\.")
_DINOV2_NATIVE = ("embeddings.", "encoder.layer.", "layernorm.")  # transformers Dinov2Model's keys


def _pattern(key: str) -> str:
    """The key with block numbers folded (`blocks.7.attn.qkv.weight` -> `blocks.#.attn.qkv.weight`):
    a depth-reduced model and the full one share a layout."""
    return _BLOCK_INDEX.sub(".#.", _BLOCK_INDEX.sub(".#.", key))


def _shape(key: str, value) -> tuple:
    # a position grid is resized on loading (CONCH v1.5, Phikon-v2): only its width is layout
    shape = tuple(value.shape)
    return shape[-1:] if key.endswith(("pos_embed", "position_embeddings")) else shape


def _signature(sd: dict) -> frozenset:
    return frozenset(
        (_pattern(k), _shape(k, v)) for k, v in sd.items() if not k.endswith("num_batches_tracked")
    )


def _meta(sd: dict) -> dict:
    return {
        k: torch.empty(tuple(v.shape), dtype=v.dtype, device="meta")
        for k, v in sd.items()
        if isinstance(v, torch.Tensor)
    }


def _in_layout(name: str, sd: dict) -> dict | None:
    """`sd` as encoder `name` would load it, shapes only (None: not in that encoder's own layout)."""
    if name in UNUSED_PREFIXES:
        return {k: v for k, v in sd.items() if not k.startswith(UNUSED_PREFIXES[name])}
    spec = FOUNDATION_MODELS.get(name)
    if spec is not None and spec.builder in NATIVE_LAYOUTS:
        if not NATIVE_LAYOUTS[spec.builder][2](sd):
            return None  # timm-layout keys pass the renaming unchanged: not the authors' layout
        try:
            grid = file_grid(sd, spec.builder)
        except ValueError:
            return None
        return from_authors_layout(spec.builder, _meta(sd), None, grid)
    return sd


@lru_cache(maxsize=None)
def _layout_signature(name: str) -> frozenset:
    """The key layout encoder `name` loads (depth 1 is enough: block numbers are folded)."""
    tv, _ = import_torchvision(), import_timm()  # imported outside the meta device
    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        if name in FOUNDATION_MODELS:
            return _signature(weights_module(build_vit(FOUNDATION_MODELS[name], depth=1)).state_dict())
        if name == "resnet50_trunc":  # CLAM's ResNetTrunc: torchvision's ResNet50 up to layer3
            net = tv.models.resnet50(weights=None)
            net.layer4 = nn.Identity()
        else:
            net = tv.models.resnet18(weights=None)
        net.fc = nn.Identity()
        return _signature(net.state_dict())


def layout_owners(sd: dict) -> list[str]:
    """The registered encoders whose checkpoint key layout `sd` has (in registry order)."""
    sd = _meta(sd)
    owners = []
    for name in LAYOUT_ENCODERS:
        mapped = _in_layout(name, sd)
        if mapped is not None and _signature(mapped) == _layout_signature(name):
            owners.append(name)
    return owners


def _examples(sd: dict, own: frozenset | None, encoder: str) -> str:
    """A few of the file's keys that `encoder` does not have (with the shape where only it differs)."""
    sd = _meta(sd)
    if own is None:  # not in the authors' layout: the keys outside transformers' layouts
        keys = [k for k in sd if not k.startswith(_DINOV2_NATIVE)]
        keys = [k for k in keys if "." in k] + [k for k in keys if "." not in k]
        return ", ".join(keys[:2])
    mapped = _in_layout(encoder, sd) or sd
    own_patterns = {p for p, _ in own}
    out = []
    dotted = sorted(mapped, key=lambda k: "." not in k)  # module tensors say more than cls_token
    for k in dotted:
        v = mapped[k]
        if k.endswith("num_batches_tracked") or (_pattern(k), _shape(k, v)) in own:
            continue
        out.append(f"{k} {list(v.shape)}" if _pattern(k) in own_patterns else k)
        if len(out) == 2:
            break
    if not out:
        have = {p for p, _ in _signature(mapped)}
        out = [f"no {p.replace('#', '0')}" for p, _ in sorted(own) if p not in have][:2]
    return ", ".join(out)


def _identity_error(path, sd: dict, encoder: str, net: nn.Module | None) -> WsiMilError | None:
    """The refusal for a checkpoint in another registered encoder's key layout (and not in
    `encoder`'s own), else None. `net`: the module `encoder` loads (None: an encoder whose
    checkpoint layout is its authors', not its module's)."""
    owners = layout_owners(sd)
    others = [o for o in owners if o != encoder]
    if not others or encoder in owners:
        return None
    examples = _examples(sd, None if net is None else _signature(net.state_dict()), encoder)
    other = others[0] + (f" (or {', '.join(others[1:])})" if len(others) > 1 else "")
    eg = f" (e.g. {examples})" if examples else ""
    return WsiMilError(
        f"{path}: these weights have {others[0]}'s key layout{eg}, not {encoder}'s: pass --encoder "
        f"{other}, or the {encoder} checkpoint"
    )


def _load_into(
    net: nn.Module, sd: dict, path: str | Path, encoder: str, drop_heads: bool = False, unused: tuple = ()
) -> None:
    """Load `sd` strictly: every tensor of `net` must come from the file with its shape, and the
    file may hold nothing else (only a classifier head, when `drop_heads` and the encoder has
    none, and the `unused` prefixes). Anything else is one error listing the first keys and the
    encoder expected."""
    own = net.state_dict()
    if drop_heads:
        sd = {k: v for k, v in sd.items() if k in own or not k.startswith(CLASSIFIER_PREFIXES)}
    if unused:
        sd = {k: v for k, v in sd.items() if k in own or not k.startswith(unused)}
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in sd if k in own and tuple(own[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or wrong:
        parts = [
            f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong))
            if keys
        ]
        raise WsiMilError(
            f"{path}: weights do not fit encoder {encoder}: tensors {'; '.join(parts)}; check that "
            "--encoder matches the checkpoint (a prefix module., model., backbone., encoder. or net. on "
            "every key is stripped)"
        )
    full = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **sd}
    net.load_state_dict(full, strict=True)


def load_checkpoint(
    net: nn.Module,
    path: str | Path,
    encoder: str,
    convert: Callable[[dict], dict] | None = None,
    drop_heads: bool = False,
    shown: str | None = None,
) -> str:
    """The one strict loading path for a checkpoint file (--weights or the hub's): refuse a file
    in another registered encoder's key layout (naming both), convert the authors' layout onto
    `net`, load strictly (`shown`: the encoder's name in that error, if not `encoder`). Returns
    the file's sha256."""
    raw = load_state_dict_file(path)
    if encoder in FOUNDATION_MODELS and _in_layout(encoder, _meta(raw)) is None:  # converted layouts
        err = _identity_error(path, raw, encoder, None)
        if err is not None:
            raise err
        layout, key, _ = NATIVE_LAYOUTS[FOUNDATION_MODELS[encoder].builder]
        raise WsiMilError(
            f"{path}: these weights are not in {encoder}'s key layout ({layout} keys such "
            f"as {key}; found e.g. {_examples(raw, None, encoder)}): "
            f"pass the {encoder} checkpoint, or the --encoder the file was saved from"
        )
    sd = convert(raw) if convert else raw
    try:
        _load_into(net, sd, path, shown or encoder, drop_heads, UNUSED_PREFIXES.get(encoder, ()))
    except WsiMilError as exc:
        err = _identity_error(path, raw, encoder, net)
        if err is not None:
            raise err from exc
        raise
    return file_sha256(path)


def load_plain_checkpoint(net: nn.Module, path: str | Path, name: str, unused: tuple = ()) -> str:
    """A checkpoint in `net`'s own key layout (a slide encoder's) loaded strictly: a missing,
    extra or reshaped tensor is one error (a classifier head `net` lacks and the `unused`
    prefixes are dropped; `net.checkpoint_names`, if it has one, maps the authors' names of
    shared modules onto its own). Returns the file's sha256."""
    sd = load_state_dict_file(path)
    if hasattr(net, "checkpoint_names"):
        sd = net.checkpoint_names(sd)
    _load_into(net, sd, path, name, drop_heads=True, unused=unused)
    return file_sha256(path)
