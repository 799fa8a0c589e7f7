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


TISSUE_COLOUR, HOLE_COLOUR = (0, 160, 0), (0, 0, 220)


def with_legend(img: np.ndarray, entries: list[tuple[str, tuple[int, int, int]]]) -> np.ndarray:
    """`img` with a white band below it naming each colour of `entries` (label, RGB)."""
    scale = max(0.4, min(1.0, img.shape[1] / 1400))
    row_h, sw = int(26 * scale) + 6, int(18 * scale) + 4
    rows, x = [[]], 8
    for label, colour in entries:  # lay the entries out in rows that fit the width
        width = sw + 8 + int(cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale, 1)[0][0]) + 20
        if x + width > img.shape[1] and rows[-1]:
            rows.append([])
            x = 8
        rows[-1].append((x, label, colour))
        x += width
    band = np.full((row_h * len(rows) + 6, img.shape[1], 3), 255, np.uint8)
    for r, row in enumerate(rows):
        y = 4 + r * row_h
        for x, label, colour in row:
            cv2.rectangle(band, (x, y + 3), (x + sw, y + 3 + sw), tuple(int(c) for c in colour), -1)
            font = cv2.FONT_HERSHEY_SIMPLEX
            cv2.putText(band, label, (x + sw + 8, y + sw), font, 0.6 * scale, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([img, band], 0)


def draw_contours(mask: TissueMask, thumb: np.ndarray, thumb_px_level0: float) -> np.ndarray:
    """The thumbnail with tissue outlines (green), holes (blue) and each QC reason's regions
    (filled, in its colour) drawn on it, and a legend of those colours below."""
    out = thumb.copy()
    lw = 2 * _line_width(thumb)
    for poly in getattr(mask.polygons, "geoms", []):
        ext = (np.asarray(poly.exterior.coords)[:, :2] / thumb_px_level0).astype(np.int32)
        cv2.polylines(out, [ext], True, TISSUE_COLOUR, lw)
        for hole in poly.interiors:
            ring = (np.asarray(hole.coords)[:, :2] / thumb_px_level0).astype(np.int32)
            cv2.polylines(out, [ring], True, HOLE_COLOUR, lw)
    for reason, polys in mask.artefacts.items():  # quality control: filled, in its class colour
        color = REASONS[reason][1]
        layer = out.copy()
        for poly in getattr(polys, "geoms", []):
            ext = (np.asarray(poly.exterior.coords)[:, :2] / thumb_px_level0).astype(np.int32)
            holes = [(np.asarray(r.coords)[:, :2] / thumb_px_level0).astype(np.int32) for r in poly.interiors]
            cv2.fillPoly(layer, [ext, *holes], color)
            cv2.polylines(out, [ext], True, color, lw)
        out = cv2.addWeighted(layer, 0.45, out, 0.55, 0)
    entries = [("tissue outline", TISSUE_COLOUR), ("hole", HOLE_COLOUR)]
    entries += [(f"QC: {REASONS[r][0]}", REASONS[r][1]) for r in mask.artefacts]
    return with_legend(out, entries)


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
