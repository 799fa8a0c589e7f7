"""Patch-coordinate files `patches/<slide>.h5`, readable by CLAM's and TRIDENT's tools.

`coords` int64 [N, 2] holds level-0 top-left (x, y). Attributes, on the root and on `coords`:
ours (patch_size = px at the target mpp, patch_size_level0, target_mpp, level0_mpp, overlap as
a fraction, min_tissue, provenance) plus what the other readers require:
- TRIDENT (`WSI.read_coords` users, trident/wsi_objects/WSI.py): `coords` attrs `patch_size`,
  `level0_magnification`, `target_magnification` (10 / mpp, so their ratio is the resampling
  factor), `patch_size_level0`, `overlap` in pixels, `name`, `level0_width/height`;
- CLAM (`Whole_Slide_Bag_FP`: reads `patch_size` px at pyramid level `patch_level`):
  `patch_level`, written only when a pyramid level has exactly the target resolution, since
  CLAM has no notion of a resampled grid; with other target resolutions CLAM cannot read the
  grid and the attribute is left out rather than written wrong.
Reading accepts all three: ours, TRIDENT's (`overlap` in pixels) and CLAM's (`downsample`).
After quality control in mode "remove", `qc_dropped_coords` int64 [M, 2] and `qc_dropped_reason`
(bytes [M], a key of `wsi.qc.REASONS`) list the patches it took (the others' readers ignore them).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from ..errors import WsiMilError
from ..io import atomic_path, provenance
from ..wsi.tiling import PatchGrid
from .hdf5 import merged_attrs, set_attrs

GRID_ATTRS = ("patch_size", "patch_size_level0", "target_mpp", "level0_mpp")


def grid_attrs(grid: PatchGrid) -> dict:
    """The attributes that describe a patch grid in every file that carries its coords."""
    mags = {}
    if grid.level0_mpp and grid.target_mpp:  # TRIDENT's frame: magnification = 10 / mpp
        mags = {
            "level0_magnification": round(10.0 / grid.level0_mpp, 4),
            "target_magnification": round(10.0 / grid.target_mpp, 4),
        }
    return {
        "patch_size": int(grid.patch_size),
        "patch_size_level0": int(grid.patch_size_level0),
        "target_mpp": float(grid.target_mpp),
        "level0_mpp": float(grid.level0_mpp),
        **mags,
        **grid.attrs,
    }


def coords_attrs(attrs: dict) -> dict:
    """The attributes for the `coords` dataset: TRIDENT reads `overlap` there in pixels."""
    frac = float(attrs.get("overlap") or 0.0)
    return {**attrs, "overlap": int(round(frac * int(attrs.get("patch_size", 0))))}


def write_patches(path: str | Path, grid: PatchGrid, **extra_attrs) -> None:
    """Write a patch-coordinate file atomically."""
    attrs = {**grid_attrs(grid), **provenance(**extra_attrs)}
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        ds = f.create_dataset("coords", data=grid.coords.astype(np.int64))
        if grid.tissue_fraction is not None and len(grid.tissue_fraction) == len(grid.coords):
            f.create_dataset("tissue_fraction", data=grid.tissue_fraction.astype(np.float32))
        if grid.dropped is not None:  # what quality control took, each with its reason
            f.create_dataset("qc_dropped_coords", data=grid.dropped.astype(np.int64).reshape(-1, 2))
            f.create_dataset("qc_dropped_reason", data=np.asarray(grid.dropped_reason, dtype="S"))
        set_attrs(f, attrs)
        set_attrs(ds, coords_attrs(attrs))


def grid_from_attrs(coords: np.ndarray, attrs: dict, level0_mpp: float | None = None, frac=None) -> PatchGrid:
    """A PatchGrid from coords and file attrs (wsi-mil, TRIDENT or CLAM names)."""
    size = int(attrs.get("patch_size", 256))
    if "patch_size_level0" in attrs:
        size0 = int(attrs["patch_size_level0"])
    elif "downsample" in attrs:  # CLAM: patch_size is in pixels of level patch_level
        ds = float(np.asarray(attrs["downsample"]).ravel()[0])
        size0 = int(round(size * ds))
    else:
        size0 = size
    overlap = float(attrs.get("overlap") or 0.0)
    if overlap >= 1:  # TRIDENT writes overlap in pixels
        attrs = {**attrs, "overlap": overlap / size}
    l0 = attrs.get("level0_mpp", level0_mpp)
    target = attrs.get("target_mpp", (l0 * size0 / size) if l0 else None)
    return PatchGrid(
        coords,
        size,
        size0,
        float(target or 0.0),
        float(l0 or 0.0),
        frac,
        {k: v for k, v in attrs.items() if k not in GRID_ATTRS},
    )


def read_patches(path: str | Path, level0_mpp: float | None = None) -> PatchGrid:
    """Read a wsi-mil, TRIDENT or CLAM patch file into a PatchGrid."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            coords = np.asarray(f["coords"][:], dtype=np.int64).reshape(-1, 2)
            attrs = merged_attrs(f)
            frac = np.asarray(f["tissue_fraction"][:]) if "tissue_fraction" in f else None
            dropped = None
            if "qc_dropped_coords" in f:
                dropped = (
                    np.asarray(f["qc_dropped_coords"][:], dtype=np.int64).reshape(-1, 2),
                    np.asarray(f["qc_dropped_reason"][:]).astype(str),
                )
    except (OSError, KeyError) as exc:
        raise WsiMilError(
            f"{path}: not a readable patch file ({exc}); re-run 'wsi-mil tile' with --overwrite"
        ) from exc
    grid = grid_from_attrs(coords, attrs, level0_mpp, frac)
    if dropped is not None:
        grid.dropped, grid.dropped_reason = dropped
    return grid
