"""Previews for a quick visual check: tissue contours, QC artefacts and kept patches on a
thumbnail."""

from __future__ import annotations

import cv2
import numpy as np

from .qc import REASONS
from .tiling import PatchGrid
from .tissue import TissueMask


def _line_width(thumb: np.ndarray) -> int:
    return max(1, round(max(thumb.shape[:2]) / 700))


def draw_contours(mask: TissueMask, thumb: np.ndarray, thumb_px_level0: float) -> np.ndarray:
    """The thumbnail with tissue outlines (green) and holes (blue) drawn on it."""
    out = thumb.copy()
    lw = 2 * _line_width(thumb)
    for poly in getattr(mask.polygons, "geoms", []):
        ext = (np.asarray(poly.exterior.coords)[:, :2] / thumb_px_level0).astype(np.int32)
        cv2.polylines(out, [ext], True, (0, 160, 0), lw)
        for hole in poly.interiors:
            ring = (np.asarray(hole.coords)[:, :2] / thumb_px_level0).astype(np.int32)
            cv2.polylines(out, [ring], True, (0, 0, 220), lw)
    for reason, polys in mask.artefacts.items():  # quality control: filled, in its class colour
        color = REASONS[reason][1]
        layer = out.copy()
        for poly in getattr(polys, "geoms", []):
            ext = (np.asarray(poly.exterior.coords)[:, :2] / thumb_px_level0).astype(np.int32)
            holes = [(np.asarray(r.coords)[:, :2] / thumb_px_level0).astype(np.int32) for r in poly.interiors]
            cv2.fillPoly(layer, [ext, *holes], color)
            cv2.polylines(out, [ext], True, color, lw)
        out = cv2.addWeighted(layer, 0.45, out, 0.55, 0)
    return out


def draw_patches(grid: PatchGrid, thumb: np.ndarray, thumb_px_level0: float) -> np.ndarray:
    """The thumbnail with each kept patch outlined."""
    out = thumb.copy()
    s = grid.patch_size_level0 / thumb_px_level0
    lw = _line_width(thumb)
    for x, y in grid.coords:
        p0 = (int(x / thumb_px_level0), int(y / thumb_px_level0))
        p1 = (int(x / thumb_px_level0 + s), int(y / thumb_px_level0 + s))
        cv2.rectangle(out, p0, p1, (30, 30, 200), lw)
    return out
