"""Tissue quality control: artefacts on the tissue that should not be analysed, each a reason.

Between segmentation and tiling. The rules (`wsi/qc_rules.py`, with their sources) run on a
coarse QC grid (`QCConfig.grid_um`, 16 um/px: the colour rules see an image smoothed by
16 um anyway) and only on its tissue cells; `qc_masks` gives every cell at most one reason
(the first in `REASONS`). Blur needs finer detail: its energy is measured on the
`QCConfig.detail_mpp` image (4 um/px: HistoQC's `image_work_size = 2.5x` for
`BlurDetectionModule`; at 8 um/px a 3 um-sigma defocus is lost) and summed per grid cell.
Artefacts become polygons in level-0 pixels, cut out of the tissue in mode "remove".

With `QCConfig.model` (`--qc-model`), GrandQC's artefact model (`wsi/qc_model.py`) replaces
the rules: its classes on the same grid, the same polygons, fractions and modes.
"""

from __future__ import annotations

import cv2
import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon

from ..config import QCConfig
from .qc_rules import (
    black_mask,
    blur_from_energy,
    blur_mask,
    bubble_mask,
    detail_energy,
    fold_mask,
    greyspace_mask,
    optical_density,
    pen_masks,
    smooth,
    white_mask,
)
from .slide import Slide
from .tissue import TissueMask, mask_to_polygons

__all__ = [
    "REASONS", "RULE_REASONS", "apply_qc", "black_mask", "blur_from_energy", "blur_mask", "bubble_mask",
    "fold_mask", "greyspace_mask", "optical_density", "pen_masks", "qc_masks", "smooth", "white_mask",
]  # fmt: skip

# Reasons in priority order (a pixel gets the first that matches), with QuPath class names
# and colours for the QC GeoJSON layer.
REASONS: dict[str, tuple[str, tuple[int, int, int]]] = {
    "background": ("Background", (200, 200, 200)),
    "pen_black": ("Pen black", (20, 20, 20)),
    "pen_blue": ("Pen blue", (30, 60, 230)),
    "pen_green": ("Pen green", (30, 170, 60)),
    "pen_red": ("Pen red", (230, 30, 30)),
    "pen": ("Pen marking", (200, 0, 120)),  # GrandQC's (--qc-model): one class for every ink
    "dark_spot": ("Dark spot & foreign object", (60, 120, 40)),  # GrandQC's only
    "fold": ("Fold", (120, 40, 90)),
    "bubble": ("Bubble", (90, 200, 230)),
    "blur": ("Blur", (240, 160, 30)),
}
RULE_REASONS = tuple(r for r in REASONS if r not in ("pen", "dark_spot"))  # the rules' own


def _touches_border(mask: np.ndarray) -> np.ndarray:
    """The connected components of `mask` that touch the image border."""
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros(mask.shape, bool)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return np.isin(labels, edge[edge > 0])


def _grow(mask: np.ndarray, grow_px: int) -> np.ndarray:
    """`mask` dilated by a disc of radius `grow_px` (ink and fold fringes)."""
    if grow_px <= 0:
        return mask
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow_px + 1, 2 * grow_px + 1))
    return cv2.dilate(mask.astype(np.uint8), k) > 0


def _large(mask: np.ndarray, min_px: float) -> np.ndarray:
    """The connected regions of `mask` of at least `min_px` pixels."""
    if min_px <= 1 or not mask.any():
        return mask
    x, y, w, h = cv2.boundingRect(mask.astype(np.uint8))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(
        mask[y : y + h, x : x + w].astype(np.uint8), connectivity=8
    )
    keep = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] >= min_px)
    out = np.zeros(mask.shape, bool)
    out[y : y + h, x : x + w] = np.isin(labels, keep[keep > 0])
    return out


def _inside(mask: np.ndarray, tissue: np.ndarray, r: int) -> np.ndarray:
    """The regions of `mask` reaching `r` px into the tissue (grown back by `r`): smoothing
    blends the tissue's rim with the glass, which alone is no bubble."""
    if not mask.any():
        return mask
    k = np.ones((2 * r + 1, 2 * r + 1), np.uint8)
    seed = mask & (cv2.erode(tissue.astype(np.uint8), k) > 0)
    return mask & (cv2.dilate(seed.astype(np.uint8), k) > 0)


def grid_masks(
    img: np.ndarray, tissue: np.ndarray, px_um: float, cfg: QCConfig, energy: np.ndarray
) -> dict[str, np.ndarray]:
    """Every reason's mask on the QC grid: `img` the RGB image there (`px_um` um/px),
    `tissue` its tissue cells, `energy` the blur detail energy per cell (`detail_energy`);
    disjoint, in `REASONS` order. Colour rules are evaluated on the tissue cells only."""
    idx = np.flatnonzero(tissue)
    smoothed = smooth(img, px_um, cfg)
    px = np.take(smoothed.reshape(-1, 3), idx, axis=0)

    def scatter(values: np.ndarray) -> np.ndarray:
        out = np.zeros(tissue.size, bool)
        out[idx] = values
        return out.reshape(tissue.shape)

    black = black_mask(px, cfg)
    black_2d = scatter(black)
    border_black = _touches_border(black_2d) if black.any() else black_2d
    border_t = border_black.ravel()[idx]
    light = white_mask(px, cfg) | greyspace_mask(px, cfg)
    pens = pen_masks(px, cfg)
    raw = {
        "background": scatter(light | border_t),
        "pen_black": scatter(black & ~border_t),
        **{k: scatter(v) for k, v in pens.items()},
    }
    # fold and blur are judged against the slide's own tissue: without ink and background
    ref_t = ~(light | black | pens["pen_blue"] | pens["pen_green"] | pens["pen_red"])
    raw["fold"] = fold_mask(smoothed, tissue, cfg, scatter(ref_t))
    raw["bubble"] = _inside(scatter(bubble_mask(px, cfg)), tissue, int(np.ceil(2 * cfg.smooth_um / px_um)))
    gray = cv2.cvtColor(smoothed, cv2.COLOR_RGB2GRAY)
    # defocus spans large regions: a small low-energy spot alone (a thin tissue tip) is not blur
    blur = blur_from_energy(energy, tissue, px_um, cfg, scatter(ref_t), gray)
    raw["blur"] = _large(blur, cfg.min_area_um2 / px_um**2)
    grow = int(round(cfg.grow_um / px_um))
    taken = np.zeros(tissue.shape, bool)
    out = {}
    for reason in RULE_REASONS:
        m = raw[reason]
        if m.any():
            m = _grow(m, 0 if reason in ("background", "bubble") else grow) & tissue & ~taken
        out[reason] = m
        taken |= m
    # small regions are ignored; a region is all adjacent artefacts (ink over a fold is one)
    kept = _large(taken, cfg.min_area_um2 / px_um**2)
    return {r: m & kept for r, m in out.items()}


def _grid_shape(shape: tuple[int, ...], px_um: float, cfg: QCConfig) -> tuple[int, int]:
    f = max(1.0, cfg.grid_um / px_um)
    return max(1, round(shape[0] / f)), max(1, round(shape[1] / f))


def qc_masks(
    thumb: np.ndarray,
    tissue: np.ndarray,
    px_um: float,
    cfg: QCConfig | None = None,
    detail: np.ndarray | None = None,
    detail_px_um: float | None = None,
) -> dict[str, np.ndarray]:
    """Every reason's mask on the thumbnail grid (`tissue` is the segmented tissue there),
    disjoint, in `REASONS` order: `grid_masks` on the QC grid, brought back. Blur's energy
    comes from `detail` (same field of view, finer pixels) when given, else the thumbnail."""
    cfg = cfg or QCConfig()
    tissue = tissue.astype(bool)
    h, w = _grid_shape(tissue.shape, px_um, cfg)
    grid_px = px_um * tissue.shape[1] / w
    img = cv2.resize(thumb, (w, h), interpolation=cv2.INTER_AREA)
    small = cv2.resize(tissue.astype(np.uint8), (w, h), interpolation=cv2.INTER_AREA) > 0
    energy = detail_energy(thumb if detail is None else detail, (h, w), 1 if detail is None else 2)
    masks = grid_masks(img, small, grid_px, cfg, energy)
    size = tissue.shape[::-1]
    return {
        r: tissue & (cv2.resize(m.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0)
        for r, m in masks.items()
    }


def _polygons(mask: np.ndarray, px_level0: float):
    """The mask's regions as one valid geometry (each contour is grown by half a pixel, so
    neighbours overlap: a plain MultiPolygon of them would be invalid)."""
    parts = mask_to_polygons(mask, px_level0, min_area_px=1, min_hole_px=1, max_holes=10_000)
    return shapely.union_all(list(parts.geoms))


def _parts(geom) -> MultiPolygon:
    return MultiPolygon(
        [p for p in getattr(geom, "geoms", [geom]) if isinstance(p, Polygon) and not p.is_empty]
    )


def apply_qc(slide: Slide, mask: TissueMask, cfg: QCConfig | None = None) -> TissueMask:
    """The tissue mask with artefacts found (cut out as holes when `cfg.mode == "remove"`):
    `artefacts` holds each reason's polygons within the tissue (level-0 px), `qc` the mode, the
    fraction of the segmented tissue each reason takes, the total and whether the slide is
    flagged (total > `flag_fraction`; flagged slides are kept). Mode "off" returns `mask`."""
    cfg = cfg or QCConfig()
    if cfg.mode == "off" or mask.is_empty:
        return mask
    # first: the thumbnail reuses it (GrandQC reads its own tiles)
    detail = None if cfg.model is not None else slide.thumbnail_at_mpp(cfg.detail_mpp)[0]
    if mask.thumbnail is not None and mask.thumb_mpp is not None:
        thumb, thumb_mpp = mask.thumbnail, mask.thumb_mpp
    else:
        from ..config import TissueConfig

        thumb, thumb_mpp = slide.thumbnail_at_mpp(TissueConfig().seg_mpp)
    h, w = _grid_shape(thumb.shape, thumb_mpp, cfg)
    px_level0 = slide.dimensions[0] / w
    grid_px = px_level0 * slide.mpp
    tissue = mask.rasterize(w, h, px_level0) > 0
    img = cv2.resize(thumb, (w, h), interpolation=cv2.INTER_AREA)
    energy = None if detail is None else detail_energy(detail, (h, w))
    # the rules see the tissue's bounding box only (with a margin for the windows)
    x, y, bw, bh = cv2.boundingRect(tissue.astype(np.uint8))
    m = 4
    x0, y0, x1, y1 = max(0, x - m), max(0, y - m), min(w, x + bw + m), min(h, y + bh + m)
    box = (slice(y0, y1), slice(x0, x1))
    masks = {}
    if cfg.model is not None:
        from .qc_model import GRANDQC_CLASSES, grandqc_masks, load_grandqc_cached

        found = grandqc_masks(slide, tissue, px_level0, load_grandqc_cached(str(cfg.model)), cfg.model_mpp)
        kept = _large(np.any(list(found.values()), axis=0), cfg.min_area_um2 / grid_px**2)
        ours = [r for r in REASONS if r in GRANDQC_CLASSES.values()]
        masks = {r: found[r] & kept if r in found else np.zeros((h, w), bool) for r in ours}
    else:
        for r, sub in grid_masks(img[box], tissue[box], grid_px, cfg, energy[box]).items():
            masks[r] = np.zeros((h, w), bool)
            masks[r][box] = sub
    polys = shapely.make_valid(mask.polygons) if any(m.any() for m in masks.values()) else mask.polygons
    area = max(polys.area, 1e-9)
    artefacts, fractions = {}, {}
    for reason, m in masks.items():
        fractions[reason] = 0.0
        if not m.any():
            continue
        cut = _parts(shapely.intersection(_polygons(m, px_level0), polys))
        if not cut.is_empty:
            artefacts[reason] = cut
            fractions[reason] = round(float(cut.area / area), 5)
    removed = shapely.union_all(list(artefacts.values())) if artefacts else MultiPolygon()
    total = round(float(removed.area / area), 5) if artefacts else 0.0
    kept = mask.polygons
    if cfg.mode == "remove" and artefacts:
        kept = _parts(shapely.make_valid(shapely.difference(polys, removed)))
    summary = {
        "mode": cfg.mode,
        "removed_fraction": fractions,
        "removed_total": total,
        "flagged": bool(total > cfg.flag_fraction),
        "max_patch_artefact": cfg.max_patch_artefact,  # tiling's per-patch limit (remove mode)
    }
    return TissueMask(kept, mask.thumbnail, mask.thumb_mpp, mask.level0_mpp, artefacts, summary)
