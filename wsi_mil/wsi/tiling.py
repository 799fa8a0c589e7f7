"""Patch tiling: one global grid at a target microns-per-pixel, filtered by tissue fraction.

The grid is anchored at the slide origin in physical units, so the same tissue scanned at
0.25 and 0.5 um/px gives the same physical patches. Tissue fractions come from the polygons
rasterised once at 1/16 of the patch side and summed with an integral image (vectorised),
not from per-patch point-in-polygon tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import shapely.affinity
from shapely.geometry import MultiPolygon

from ..config import TilingConfig
from .slide import Slide
from .tissue import TissueMask, rasterize_polygons

SUBSAMPLE = 16  # raster pixels per patch side for the tissue-fraction estimate


@dataclass
class PatchGrid:
    """Top-left level-0 coordinates of fixed-size patches at a target resolution."""

    coords: np.ndarray  # int64 [N, 2] (x, y)
    patch_size: int  # px at target_mpp
    patch_size_level0: int  # px at level 0
    target_mpp: float
    level0_mpp: float
    tissue_fraction: np.ndarray | None = None
    attrs: dict = field(default_factory=dict)
    # patches quality control took (mode "remove"): coords [M, 2] and each one's reason
    dropped: np.ndarray | None = None
    dropped_reason: np.ndarray | None = None  # str [M], keys of wsi.qc.REASONS

    def __len__(self) -> int:
        return len(self.coords)


def grid_geometry(slide: Slide, cfg: TilingConfig) -> tuple[int, int]:
    """(patch side, stride) in level-0 pixels for the configured target mpp and overlap."""
    size0 = int(round(cfg.patch_size * cfg.target_mpp / slide.mpp))
    stride0 = max(1, int(round(size0 * (1.0 - cfg.overlap))))
    return size0, stride0


def matching_level(slide: Slide, patch_size: int, size0: int) -> int | None:
    """The pyramid level at which `patch_size` px span exactly `size0` level-0 px (within 1%),
    if any: the level CLAM's reader must read the grid's patches from."""
    for level, ds in enumerate(slide.level_downsamples):
        if abs(ds * patch_size - size0) <= 0.01 * size0:
            return level
    return None


def box_fractions(coverage: np.ndarray, x0, y0, x1, y1) -> np.ndarray:
    """Mean of `coverage` over boxes [y0:y1, x0:x1] (raster pixel bounds, broadcastable arrays),
    by one integral image: the vectorised replacement for per-patch geometry."""
    h, w = coverage.shape
    integral = cv2.integral(coverage.astype(np.float32), sdepth=cv2.CV_64F)
    x0, x1 = np.clip(x0, 0, w), np.clip(x1, 0, w)
    y0, y1 = np.clip(y0, 0, h), np.clip(y1, 0, h)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return inside / area


def tissue_fractions(
    mask: TissueMask, xs: np.ndarray, ys: np.ndarray, size0: int, slide_size: tuple[int, int]
) -> np.ndarray:
    """Tissue fraction of every patch at the grid (xs x ys), shape [len(ys), len(xs)]."""
    px = max(size0 / SUBSAMPLE, 1.0)
    w, h = int(np.ceil(slide_size[0] / px)) + 1, int(np.ceil(slide_size[1] / px)) + 1
    coverage = rasterize_polygons(mask.polygons, w, h, px, supersample=4)
    x0, x1 = np.round(xs / px).astype(int), np.round((xs + size0) / px).astype(int)
    y0, y1 = np.round(ys / px).astype(int), np.round((ys + size0) / px).astype(int)
    return box_fractions(coverage, x0[None, :], y0[:, None], x1[None, :], y1[:, None])


def artefact_fractions(artefacts: MultiPolygon, xs: np.ndarray, ys: np.ndarray, size0: int) -> np.ndarray:
    """Artefact fraction of every patch at the grid (xs x ys), like `tissue_fractions` but
    rasterised only over the artefacts' bounding box and without supersampling (QC's
    polygons follow a 16 um grid; a patch is judged by whether artefact outweighs tissue)."""
    out = np.zeros((len(ys), len(xs)))
    if artefacts.is_empty:
        return out
    bx0, by0, bx1, by1 = artefacts.bounds
    ix = np.flatnonzero((xs + size0 > bx0) & (xs < bx1))
    iy = np.flatnonzero((ys + size0 > by0) & (ys < by1))
    if not len(ix) or not len(iy):
        return out
    ox, oy = xs[ix[0]], ys[iy[0]]
    px = max(size0 / SUBSAMPLE, 1.0)
    w = int(np.ceil((xs[ix[-1]] + size0 - ox) / px)) + 1
    h = int(np.ceil((ys[iy[-1]] + size0 - oy) / px)) + 1
    coverage = rasterize_polygons(shapely.affinity.translate(artefacts, -ox, -oy), w, h, px)
    x0, x1 = np.round((xs[ix] - ox) / px).astype(int), np.round((xs[ix] + size0 - ox) / px).astype(int)
    y0, y1 = np.round((ys[iy] - oy) / px).astype(int), np.round((ys[iy] + size0 - oy) / px).astype(int)
    out[np.ix_(iy, ix)] = box_fractions(coverage, x0[None, :], y0[:, None], x1[None, :], y1[:, None])
    return out


def tile(slide: Slide, mask: TissueMask, cfg: TilingConfig | None = None) -> PatchGrid:
    """Patches of `cfg.patch_size` px at `cfg.target_mpp` whose tissue fraction >= min_tissue.

    Only patches that lie wholly inside the slide are kept. Coordinates are row-major (y, then x),
    which lets extraction read whole rows of patches as one region.
    """
    cfg = (cfg or TilingConfig()).with_defaults()
    size0, stride0 = grid_geometry(slide, cfg)
    width, height = slide.dimensions
    empty = np.zeros((0, 2), np.int64)
    grid = PatchGrid(
        empty,
        cfg.patch_size,
        size0,
        cfg.target_mpp,
        slide.mpp,
        np.zeros(0),
        {
            "overlap": float(cfg.overlap),
            "min_tissue": float(cfg.min_tissue),
            "tiling_defaults": cfg.defaults_from,
            "level0_width": int(width),
            "level0_height": int(height),
            "patch_level": matching_level(slide, cfg.patch_size, size0),
        },
    )
    if mask.is_empty or width < size0 or height < size0:
        return grid
    # Only grid positions that can touch the tissue bounding box are scored.
    bx0, by0, bx1, by1 = mask.polygons.bounds
    kx0 = max(0, int(np.floor((bx0 - size0) / stride0)) + 1)
    ky0 = max(0, int(np.floor((by0 - size0) / stride0)) + 1)
    kx1 = min((width - size0) // stride0, int(np.ceil(bx1 / stride0)))
    ky1 = min((height - size0) // stride0, int(np.ceil(by1 / stride0)))
    if kx1 < kx0 or ky1 < ky0:
        return grid
    xs = np.arange(kx0, kx1 + 1, dtype=np.int64) * stride0
    ys = np.arange(ky0, ky1 + 1, dtype=np.int64) * stride0
    frac = tissue_fractions(mask, xs, ys, size0, (width, height))
    threshold = max(cfg.min_tissue, 1e-9)
    keep = frac >= threshold
    if mask.artefacts and (mask.qc or {}).get("mode") == "remove":
        # a patch at a removed artefact's edge goes when it shows more artefact than tissue, or
        # artefact over more than `max_patch_artefact` of it (tissue files written without it:
        # the first rule only): ink on a third of a patch still draws the model's attention
        reasons = list(mask.artefacts)
        per = np.stack([artefact_fractions(mask.artefacts[r], xs, ys, size0) for r in reasons])
        art = per.sum(0)
        before = keep | (frac + art >= threshold)  # kept without QC (artefacts were tissue)
        keep &= (art <= frac) & (art <= mask.qc.get("max_patch_artefact", 1.0))
        dy, dx = np.nonzero(before & ~keep)
        grid.dropped = np.stack([xs[dx], ys[dy]], axis=1).astype(np.int64)
        grid.dropped_reason = np.array(reasons)[per[:, dy, dx].argmax(0)] if len(dy) else np.array([], str)
    iy, ix = np.nonzero(keep)
    grid.coords = np.stack([xs[ix], ys[iy]], axis=1).astype(np.int64)
    grid.tissue_fraction = frac[iy, ix].astype(np.float32)
    return grid
