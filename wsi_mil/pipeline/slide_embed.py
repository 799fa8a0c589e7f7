"""`slide-embed`: one slide embedding per feature file, with a slide encoder.

Input: a folder of patch feature files (`features/<encoder>/<slide>.h5`, wsi-mil's or
TRIDENT's). Every file is checked against the slide encoder (patch encoder, dimension,
resolution, patch size) before anything is written. Output: `<out>/<slide>.h5` in the feature
file layout with one row (formats/features.py: `features` float32 [1, D], `coords` [1, 2]
zeros), so `crossval --features <out>` reads it as a bag of one; attributes `encoder` (the slide
encoder), `slide_encoder`, `patch_encoder`, `target_mpp`, `patch_size`, `n_patches`, the
weights' source and sha256 (slide and patch encoder) and provenance. Files are written
atomically; a re-run skips finished slides unless `overwrite`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import torch

from ..errors import WsiMilError
from ..features.slide_encoders import SlideEncoder, check_features, feature_grid
from ..formats.features import feature_files, read_feature_attrs, read_features, write_features
from ..formats.hdf5 import plain
from ..io import provenance


def source_attrs(path: Path) -> tuple[dict, int]:
    """A feature file's attributes (TRIDENT keeps `encoder` on the `features` dataset) and its
    feature dimension."""
    attrs, shape = read_feature_attrs(path)
    if "encoder" not in attrs:
        with h5py.File(path, "r") as f:
            attrs.update({k: plain(v) for k, v in f["features"].attrs.items() if k not in attrs})
    return attrs, int(shape[-1])


def embed_slides(
    features_dir: str | Path,
    encoder: SlideEncoder,
    out_dir: str | Path,
    overwrite: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict:
    """Write `<out_dir>/<slide>.h5` for every `<features_dir>/<slide>.h5`; returns counts."""
    features_dir, out_dir, info = Path(features_dir), Path(out_dir), encoder.info
    files = feature_files(features_dir)
    if out_dir.resolve() == features_dir.resolve():
        raise WsiMilError(f"--out {out_dir} is the features folder; choose another folder for the embeddings")
    sources = {}
    for path in files:  # refuse the wrong features before anything is written
        attrs, dim = source_attrs(path)
        check_features(path, attrs, dim, info)
        sources[path] = attrs
    written = skipped = 0
    for i, path in enumerate(files):
        out = out_dir / path.name
        if out.exists() and not overwrite:
            have = read_feature_attrs(out)[0].get("encoder")
            if have != info.name:
                raise WsiMilError(
                    f"{out}: holds {have} embeddings, not {info.name}; pass --overwrite, or another --out"
                )
            skipped += 1
        else:
            bag = read_features(path)
            size0 = sources[path].get("patch_size_level0")
            z = encoder(torch.from_numpy(bag.features), torch.from_numpy(bag.coords), size0)
            z = z.float().cpu().numpy().reshape(1, -1)
            if not np.isfinite(z).all():
                raise WsiMilError(f"{path}: the {info.name} embedding is not finite; check the feature file")
            mpp, size = feature_grid(sources[path])
            attrs = provenance(
                encoder=info.name, encoder_dim=int(z.shape[1]), slide_encoder=info.name,
                patch_encoder=info.patch_encoder, encoder_weights=info.weights,
                encoder_weights_sha256=info.weights_sha256,
                patch_encoder_weights_sha256=sources[path].get("encoder_weights_sha256"),
                target_mpp=mpp, patch_size=size, patch_size_level0=size0,
                n_patches=len(bag), embedding="slide", source_features=str(path.resolve()),
            )  # fmt: skip
            write_features(out, z.astype(np.float32), np.zeros((1, 2), np.int64), attrs)
            written += 1
        if progress:
            progress(i + 1, len(files), path.stem)
    return {"slides": len(files), "written": written, "skipped": skipped, "out": str(out_dir)}
