"""Tissue quality control: artefacts on the tissue that should not be analysed, each a reason.

Between segmentation and tiling. Every detector is a small pure function of an RGB image
(uint8, OpenCV HSV conventions: hue 0-180, saturation and value 0-255) returning a boolean
mask of the same size; `qc_masks` runs them all and gives every pixel at most one reason (the
first in `REASONS`). Colour rules run on the segmentation thumbnail (8 um/px by default); blur
runs on a finer image (`QCConfig.detail_mpp`, 4 um/px: HistoQC's `image_work_size = 2.5x` for
`BlurDetectionModule`; finer would decode the next pyramid level, ~16x the pixels).

Sources of the rules and thresholds:
- background (white, greyspace, scanner black): HistoQC `LightDarkModule.
  getIntensityThresholdPercent` (`tissue`: gray > 0.9 is bright, RGB std < 10 is greyspace;
  `darktissue`: gray < 0.15); hs2p drops the same black/white/grey tiles.
- pen ink: the hue boxes of deephistopath's `filter_blue_pen` / `filter_green_pen` /
  `filter_red_pen` (python-wsi-preprocessing, histolab), written in HSV: H&E hues lie between
  purple and pink (OpenCV hue >= 130 or <= 10), so blue (95-130) and green (35-95) are ink;
  red ink shares eosin's hue and is told apart by its saturation.
- fold: a double layer of tissue roughly doubles its optical density and raises saturation
  (Kothari et al. 2013 and Bautista & Yagi 2010 use saturation and intensity); rule: optical
  density above `fold_od_ratio` x the slide's tissue median and saturation above
  `fold_saturation`, both on the smoothed image.
- bubble: HistoQC `getIntensityThresholdPercent:bubble` (gray 0.82-0.94, RGB std < 11):
  washed-out, colourless patches inside the tissue.
- blur: HistoQC `BlurDetectionModule.identifyBlurryRegions` (Gaussian-smoothed |Laplacian|
  of the gray image), made relative: blurred where the energy is below `blur_ratio` x the
  median over the slide's own tissue (stains and scanners differ in contrast), and normalised
  by the tissue inside the window so tissue edges are not called blurred.

GrandQC's segmentation model is not here yet (`--qc-model`).
"""

from __future__ import annotations

import cv2
import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon

from ..config import QCConfig
from .slide import Slide
from .tissue import TissueMask, mask_to_polygons

# Reasons in priority order (a pixel gets the first that matches), with QuPath class names
# and colours for the QC GeoJSON layer.
REASONS: dict[str, tuple[str, tuple[int, int, int]]] = {
    "background": ("Background", (200, 200, 200)),
    "pen_black": ("Pen black", (20, 20, 20)),
    "pen_blue": ("Pen blue", (30, 60, 230)),
    "pen_green": ("Pen green", (30, 170, 60)),
    "pen_red": ("Pen red", (230, 30, 30)),
    "fold": ("Fold", (120, 40, 90)),
    "bubble": ("Bubble", (90, 200, 230)),
    "blur": ("Blur", (240, 160, 30)),
}


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    return hsv[..., 0], hsv[..., 1], hsv[..., 2]


def _gray(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def smooth(rgb: np.ndarray, px_um: float, cfg: QCConfig) -> np.ndarray:
    """The image the colour rules see: Gaussian-smoothed by `smooth_um` (averages single dark
    nuclei away, so dense tissue is judged by its mean colour)."""
    sigma = cfg.smooth_um / px_um
    return cv2.GaussianBlur(rgb, (0, 0), sigma) if sigma >= 0.3 else rgb


def white_mask(rgb: np.ndarray, cfg: QCConfig) -> np.ndarray:
    """Near-white glass: gray > `white_gray` (HistoQC `tissue` upper_threshold 0.9 -> 230)."""
    return _gray(rgb) > cfg.white_gray


def greyspace_mask(rgb: np.ndarray, cfg: QCConfig) -> np.ndarray:
    """Colourless grey (debris, shadows): RGB std across channels < `grey_std` (HistoQC
    `tissue` lower_std 10), above the black rule's value (dark neutral is ink or border)."""
    std = rgb.astype(np.float32).std(axis=2)
    return (std < cfg.grey_std) & (_hsv(rgb)[2] >= cfg.black_value)


def black_mask(rgb: np.ndarray, cfg: QCConfig) -> np.ndarray:
    """Dark and neutral: HSV value < `black_value` and max-min of RGB < `black_chroma`.
    HistoQC's `darktissue` is gray < 0.15 (38); H&E's darkest purple (epidermis, dense
    nuclei) keeps its chroma, black ink and scanner borders do not. HSV saturation is not
    used: on noisy near-black pixels it is high (why black borders pass tissue segmentation)."""
    v = rgb.max(axis=2)
    chroma = v.astype(np.int16) - rgb.min(axis=2)
    return (v < cfg.black_value) & (chroma < cfg.black_chroma)


def pen_masks(rgb: np.ndarray, cfg: QCConfig) -> dict[str, np.ndarray]:
    """Coloured ink by hue: blue 95-130 (190-260 deg) and green 35-95 (70-190 deg) with
    saturation > `pen_saturation`; red at hue <= 8 or >= 172 (+-16 deg) with saturation >
    `red_saturation` (eosin is pink, hue 150-175, and below ~160 saturation on the thumbnail);
    black ink is `black_mask` (split from scanner borders in `qc_masks`)."""
    h, s, v = _hsv(rgb)
    lit = v >= 40  # hue is noise on near-black pixels
    return {
        "pen_blue": lit & (h >= 95) & (h < 130) & (s > cfg.pen_saturation),
        "pen_green": lit & (h >= 35) & (h < 95) & (s > cfg.pen_saturation),
        "pen_red": lit & ((h <= 8) | (h >= 172)) & (s > cfg.red_saturation),
    }


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Mean optical density -log(I / 255) over the three channels (Beer-Lambert)."""
    return -np.log(np.maximum(rgb.astype(np.float32), 1.0) / 255.0).mean(axis=2)


def fold_mask(
    rgb: np.ndarray, tissue: np.ndarray, cfg: QCConfig, reference: np.ndarray | None = None
) -> np.ndarray:
    """Folded tissue: optical density > `fold_od_ratio` x its median over the `reference`
    tissue (default `tissue`; `qc_masks` leaves ink and background out of it) and HSV
    saturation > `fold_saturation_ratio` x the reference median. A double layer is darker and
    more saturated than the slide's own tissue; absolute darkness alone also takes dense nuclei
    and epidermis."""
    ref_px = tissue if reference is None or not reference.any() else reference
    if not ref_px.any():
        return np.zeros(tissue.shape, bool)
    od = optical_density(rgb)
    sat = _hsv(rgb)[1]
    od_ref = max(float(np.median(od[ref_px])), 0.05)
    sat_ref = max(float(np.median(sat[ref_px])), 20.0)
    return (od > cfg.fold_od_ratio * od_ref) & (sat > cfg.fold_saturation_ratio * sat_ref)


def bubble_mask(rgb: np.ndarray, cfg: QCConfig) -> np.ndarray:
    """Air bubbles and coverslip-edge washes: gray within `bubble_gray` and RGB std <
    `bubble_std` (HistoQC `bubble`: 0.82-0.94, upper_variance 11)."""
    g = _gray(rgb)
    std = rgb.astype(np.float32).std(axis=2)
    lo, hi = cfg.bubble_gray
    return (g >= lo) & (g <= hi) & (std < cfg.bubble_std)


def blur_mask(
    rgb: np.ndarray, tissue: np.ndarray, px_um: float, cfg: QCConfig, reference: np.ndarray | None = None
) -> np.ndarray:
    """Out of focus: local |Laplacian| energy of the gray image (Gaussian window
    `blur_window_um`, computed over tissue pixels only) below `blur_ratio` x its median over
    the `reference` tissue (default `tissue`; `qc_masks` leaves ink and background out).
    `rgb` should be at about 4 um/px (a 3 um-sigma defocus is found there; 1.5 um is not)."""
    ref_px = tissue if reference is None or not reference.any() else reference
    if not ref_px.any():
        return np.zeros(tissue.shape, bool)
    g = _gray(rgb).astype(np.float32)
    lap = np.abs(cv2.Laplacian(g, cv2.CV_32F, ksize=1))
    t = tissue.astype(np.float32)
    sigma = max(cfg.blur_window_um / px_um, 1.0)
    energy = cv2.GaussianBlur(lap * t, (0, 0), sigma) / np.maximum(cv2.GaussianBlur(t, (0, 0), sigma), 1e-3)
    ref = float(np.median(energy[ref_px]))
    return tissue & (energy < cfg.blur_ratio * ref)


def _touches_border(mask: np.ndarray) -> np.ndarray:
    """The connected components of `mask` that touch the image border."""
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros(mask.shape, bool)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return np.isin(labels, edge[edge > 0])


def _clean(mask: np.ndarray, tissue: np.ndarray, grow_px: int, min_px: float) -> np.ndarray:
    """Grown by `grow_px` (ink and fold fringes), cut to the tissue, regions < min_px dropped."""
    if grow_px > 0 and mask.any():
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow_px + 1, 2 * grow_px + 1))
        mask = cv2.dilate(mask.astype(np.uint8), k) > 0
    mask &= tissue
    if min_px > 1 and mask.any():
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        keep = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] >= min_px)
        mask = np.isin(labels, keep[keep > 0])
    return mask


def qc_masks(
    thumb: np.ndarray,
    tissue: np.ndarray,
    px_um: float,
    cfg: QCConfig | None = None,
    detail: np.ndarray | None = None,
    detail_px_um: float | None = None,
) -> dict[str, np.ndarray]:
    """Every reason's mask on the thumbnail grid (`tissue` is the segmented tissue there),
    disjoint, in `REASONS` order. Blur runs on `detail` (same field of view, finer pixels)
    when given, else on the thumbnail."""
    cfg = cfg or QCConfig()
    tissue = tissue.astype(bool)
    img = smooth(thumb, px_um, cfg)
    black = black_mask(img, cfg)
    border_black = _touches_border(black)
    raw = {
        "background": white_mask(img, cfg) | greyspace_mask(img, cfg) | border_black,
        "pen_black": black & ~border_black,
        **pen_masks(img, cfg),
    }
    # fold and blur are judged against the slide's own tissue: without ink and background
    reference = tissue.copy()
    for m in raw.values():
        reference &= ~m
    raw["fold"] = fold_mask(img, tissue, cfg, reference)
    raw["bubble"] = bubble_mask(img, cfg)
    if detail is None:
        raw["blur"] = blur_mask(thumb, tissue, px_um, cfg, reference)
    else:
        h, w = detail.shape[:2]

        def fine(m):
            return cv2.resize(m.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0

        blur = blur_mask(detail, fine(tissue), detail_px_um or px_um, cfg, fine(reference))
        raw["blur"] = cv2.resize(blur.astype(np.uint8), tissue.shape[::-1], interpolation=cv2.INTER_AREA) > 0
    grow = int(round(cfg.grow_um / px_um))
    min_px = cfg.min_area_um2 / px_um**2
    taken = np.zeros(tissue.shape, bool)
    out = {}
    for reason in REASONS:
        grow_r = 0 if reason in ("background", "blur", "bubble") else grow
        m = _clean(raw[reason] & tissue, tissue, grow_r, min_px) & ~taken
        out[reason] = m
        taken |= m
    return out


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
    detail, detail_mpp = slide.thumbnail_at_mpp(cfg.detail_mpp)  # first: the thumbnail reuses it
    if mask.thumbnail is not None and mask.thumb_mpp is not None:
        thumb, thumb_mpp = mask.thumbnail, mask.thumb_mpp
    else:
        from ..config import TissueConfig

        thumb, thumb_mpp = slide.thumbnail_at_mpp(TissueConfig().seg_mpp)
    px_level0 = thumb_mpp / slide.mpp
    tissue = mask.rasterize(thumb.shape[1], thumb.shape[0], px_level0) > 0
    masks = qc_masks(thumb, tissue, thumb_mpp, cfg, detail, detail_mpp)
    polys = mask.polygons
    area = max(polys.area, 1e-9)
    artefacts, fractions = {}, {}
    for reason, m in masks.items():
        if not m.any():
            fractions[reason] = 0.0
            continue
        cut = _parts(shapely.intersection(_polygons(m, px_level0), shapely.make_valid(polys)))
        if cut.is_empty:
            fractions[reason] = 0.0
            continue
        artefacts[reason] = cut
        fractions[reason] = round(float(cut.area / area), 5)
    removed = shapely.union_all(list(artefacts.values())) if artefacts else MultiPolygon()
    total = round(float(removed.area / area), 5) if artefacts else 0.0
    kept = polys
    if cfg.mode == "remove" and artefacts:
        kept = _parts(shapely.make_valid(shapely.difference(shapely.make_valid(polys), removed)))
    summary = {
        "mode": cfg.mode,
        "removed_fraction": fractions,
        "removed_total": total,
        "flagged": bool(total > cfg.flag_fraction),
    }
    return TissueMask(kept, mask.thumbnail, mask.thumb_mpp, mask.level0_mpp, artefacts, summary)
