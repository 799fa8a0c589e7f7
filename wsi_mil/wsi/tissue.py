"""Tissue segmentation at a fixed physical resolution, and tissue polygons as GeoJSON.

The method follows CLAM's `segmentTissue`: median-blurred HSV saturation, Otsu (or fixed)
threshold, morphological closing, contours with holes filtered by area. Areas and kernels are
given in microns so results do not depend on the scanner's resolution. Polygons are in level-0
pixels; `formats/tissue_geojson.py` stores them as QuPath "Tissue" annotations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon

from ..config import QCConfig, TissueConfig
from .qc_rules import pen_masks
from .slide import Slide


@dataclass
class TissueMask:
    """Tissue polygons in level-0 pixels plus the low-resolution image they came from."""

    polygons: MultiPolygon
    thumbnail: np.ndarray | None = None
    thumb_mpp: float | None = None
    level0_mpp: float | None = None
    # set by quality control (wsi/qc.py): artefact polygons per reason, and the summary
    # (mode, fraction of the segmented tissue per reason, flagged) written with the polygons
    artefacts: dict[str, MultiPolygon] = field(default_factory=dict)
    qc: dict | None = None

    @property
    def is_empty(self) -> bool:
        return self.polygons.is_empty

    @property
    def area_level0(self) -> float:
        return float(self.polygons.area)

    def rasterize(self, width: int, height: int, px_level0: float) -> np.ndarray:
        """Binary mask [height, width] where one pixel spans `px_level0` level-0 pixels."""
        return rasterize_polygons(self.polygons, width, height, px_level0)

    def rasterize_clean(self, width: int, height: int, px_level0: float) -> np.ndarray:
        """`rasterize` without the artefacts quality control found (holes already in mode
        "remove"; in mode "mark" the tissue keeps them, so the artefacts are taken out here):
        where scores may be shown."""
        out = self.rasterize(width, height, px_level0)
        for polys in self.artefacts.values():
            out[rasterize_polygons(polys, width, height, px_level0) > 0] = 0
        return out


def rasterize_polygons(
    polys: MultiPolygon, width: int, height: int, px_level0: float, supersample: int = 1
) -> np.ndarray:
    """Exteriors 1, holes 0, as uint8 [height, width] with pixels of `px_level0` level-0 px.

    With `supersample` s > 1 the polygons are drawn at s x s finer pixels and averaged, giving
    float32 coverage fractions accurate to about 1/(2s) pixel along each edge.
    """
    s = max(1, supersample)
    mask = np.zeros((height * s, width * s), np.uint8)
    shift = 4
    scale = (1 << shift) * s / px_level0

    def ring(coords):  # fixed-point, pixel-centre coordinates for cv2
        return (np.asarray(coords)[:, :2] * scale - (1 << (shift - 1))).round().astype(np.int32)

    for poly in getattr(polys, "geoms", [polys]):
        if poly.is_empty:
            continue
        cv2.fillPoly(mask, [ring(poly.exterior.coords)], 1, lineType=cv2.LINE_8, shift=shift)
        holes = [ring(r.coords) for r in poly.interiors]
        if holes:
            cv2.fillPoly(mask, holes, 0, lineType=cv2.LINE_8, shift=shift)
    if s == 1:
        return mask
    return cv2.resize(mask.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA)


def mask_to_polygons(
    mask: np.ndarray,
    px_level0: float,
    min_area_px: float,
    min_hole_px: float,
    max_holes: int,
    size0: tuple[int, int] | None = None,
) -> MultiPolygon:
    """Contours of a binary mask (with holes) scaled to level-0 pixels and area-filtered, kept
    inside the level-0 `size0` (width, height; default: the mask's own extent, which a
    thumbnail's rounded-up last pixel can carry past the slide's edge)."""
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return MultiPolygon()
    hierarchy = hierarchy[0]
    w, h = size0 or (mask.shape[1] * px_level0, mask.shape[0] * px_level0)
    extent = shapely.box(0, 0, w, h)
    polys = []
    for i, cnt in enumerate(contours):
        if hierarchy[i][3] != -1:  # a hole; handled with its parent
            continue
        area = cv2.contourArea(cnt)
        if area < max(min_area_px, 1) or len(cnt) < 3:
            continue
        holes = []
        child = hierarchy[i][2]
        while child != -1:
            hole = contours[child]
            hole_area = cv2.contourArea(hole)
            if hole_area >= max(min_hole_px, 1) and len(hole) >= 3:
                holes.append((hole_area, hole))
            child = hierarchy[child][0]
        holes = [h for _, h in sorted(holes, key=lambda t: -t[0])[:max_holes]]

        # +0.5 maps pixel centres to their position on the level-0 grid
        def to_level0(c):
            return (c[:, 0, :].astype(np.float64) + 0.5) * px_level0

        poly = Polygon(to_level0(cnt), [to_level0(h) for h in holes])
        if not poly.is_valid:
            poly = shapely.make_valid(poly)
        # Contours run through boundary pixel centres: grow by half a pixel to the true edge.
        # A contour with one-pixel spurs comes out of make_valid with line parts, whose mitre
        # joins make GEOS divide by zero internally (a stray RuntimeWarning; the result is valid
        # and equal to buffering the parts one by one)
        with np.errstate(divide="ignore", invalid="ignore"):
            poly = poly.buffer(0.5 * px_level0, join_style="mitre", mitre_limit=2.0)
        poly = poly.intersection(extent)  # tissue at the border: the half pixel stays on the image
        for part in getattr(poly, "geoms", [poly]):
            if isinstance(part, Polygon) and not part.is_empty:
                polys.append(part)
    return MultiPolygon(polys)


def saturation_mask(rgb: np.ndarray, cfg: TissueConfig, px_um: float) -> np.ndarray:
    """Thresholded, closed saturation mask of an RGB image whose pixels are `px_um` microns."""
    sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    k = max(3, int(round(cfg.blur_um / px_um)) | 1)
    sat = cv2.medianBlur(sat, min(k, 255))
    if cfg.threshold == "otsu":
        # Otsu's threshold from the pixels that are not blue or green ink (QC's pen rule): ink
        # is more saturated than any stain and pulled the threshold up (on the real slide 45 ->
        # 54 with 5% of its thumbnail inked, 108 with 38%: no tissue left); ink itself is still
        # thresholded, and QC cuts it out. A floor keeps glass out (Otsu on a slide that is all
        # glass splits noise).
        pens = pen_masks(rgb, QCConfig())
        ink = pens["pen_blue"] | pens["pen_green"]
        values = sat[~ink] if (~ink).sum() > 0.05 * ink.size else sat.ravel()
        t, _ = cv2.threshold(values.reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        _, mask = cv2.threshold(sat, max(t, 15), 255, cv2.THRESH_BINARY)
    else:
        _, mask = cv2.threshold(sat, int(cfg.threshold), 255, cv2.THRESH_BINARY)
    c = max(1, int(round(cfg.close_um / px_um)))
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((c, c), np.uint8))
    return mask > 0


def segment_tissue(slide: Slide, cfg: TissueConfig | None = None) -> TissueMask:
    """Segment tissue on a low-resolution read of the slide (only the thumbnail is read)."""
    cfg = cfg or TissueConfig()
    thumb, thumb_mpp = slide.thumbnail_at_mpp(cfg.seg_mpp)
    mask = saturation_mask(thumb, cfg, thumb_mpp)
    px_area_um2 = thumb_mpp**2
    polys = mask_to_polygons(
        mask,
        thumb_mpp / slide.mpp,
        cfg.min_tissue_area_um2 / px_area_um2,
        cfg.min_hole_area_um2 / px_area_um2,
        cfg.max_holes,
        slide.dimensions,
    )
    return TissueMask(polys, thumb, thumb_mpp, slide.mpp)
