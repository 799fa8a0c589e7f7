"""Patch-coordinate files `patches/<slide>.h5` (CLAM/TRIDENT layout).

`coords` int64 [N, 2] holds level-0 top-left (x, y); attrs patch_size (px at the target mpp),
patch_size_level0, target_mpp, level0_mpp, overlap, min_tissue plus provenance, on the root
and on `coords`. Reading also accepts CLAM's files (`patch_level` + `downsample`).
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
    return {
        "patch_size": int(grid.patch_size),
        "patch_size_level0": int(grid.patch_size_level0),
        "target_mpp": float(grid.target_mpp),
        "level0_mpp": float(grid.level0_mpp),
        **grid.attrs,
    }


def write_patches(path: str | Path, grid: PatchGrid, **extra_attrs) -> None:
    """Write a patch-coordinate file atomically."""
    attrs = {**grid_attrs(grid), **provenance(**extra_attrs)}
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        ds = f.create_dataset("coords", data=grid.coords.astype(np.int64))
        if grid.tissue_fraction is not None and len(grid.tissue_fraction) == len(grid.coords):
            f.create_dataset("tissue_fraction", data=grid.tissue_fraction.astype(np.float32))
        set_attrs(f, attrs)
        set_attrs(ds, attrs)


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
    except (OSError, KeyError) as exc:
        raise WsiMilError(
            f"{path}: not a readable patch file ({exc}); re-run 'wsi-mil tile' with --overwrite"
        ) from exc
    return grid_from_attrs(coords, attrs, level0_mpp, frac)
