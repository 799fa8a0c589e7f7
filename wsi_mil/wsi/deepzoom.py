"""Deep Zoom tiles read straight from a slide reader (any `Slide`), as openslide-python's
`DeepZoomGenerator` serves them.

Deep Zoom (Microsoft's DZI format, the one OpenSeadragon reads): level L of
`max_level = ceil(log2(max(width, height)))` is the level-0 image downsampled by
2^(max_level - L), so the top level is level-0 pixels and level 0 is one pixel. Tiles are
`tile` px plus `overlap` px on every side that has a neighbour. Each tile is read from the
coarsest pyramid level still at least as fine as it needs (Slide.read_at_mpp), so an overview
never decodes level 0.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from .slide import Slide


class DeepZoom:
    def __init__(self, width: int, height: int, tile: int = 254, overlap: int = 1):
        self.width, self.height, self.tile, self.overlap = int(width), int(height), tile, overlap
        self.max_level = int(math.ceil(math.log2(max(self.width, self.height, 1))))

    @property
    def level_count(self) -> int:
        return self.max_level + 1

    def downsample(self, level: int) -> int:
        return 2 ** (self.max_level - level)

    def level_size(self, level: int) -> tuple[int, int]:
        ds = self.downsample(level)
        return max(1, math.ceil(self.width / ds)), max(1, math.ceil(self.height / ds))

    def tile_grid(self, level: int) -> tuple[int, int]:
        w, h = self.level_size(level)
        return math.ceil(w / self.tile), math.ceil(h / self.tile)

    def tile_box(self, level: int, col: int, row: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the tile in level-`level` pixels, overlap included.

        Raises KeyError for a tile outside the level (a 404 for a server)."""
        if not 0 <= level <= self.max_level:
            raise KeyError(f"no Deep Zoom level {level}")
        cols, rows = self.tile_grid(level)
        if not (0 <= col < cols and 0 <= row < rows):
            raise KeyError(f"no tile {col}_{row} at level {level}")
        w, h = self.level_size(level)
        x0, y0 = max(col * self.tile - self.overlap, 0), max(row * self.tile - self.overlap, 0)
        x1 = min((col + 1) * self.tile + self.overlap, w)
        y1 = min((row + 1) * self.tile + self.overlap, h)
        return x0, y0, x1, y1

    def dzi(self, fmt: str) -> str:
        return (
            '<?xml version="1.0" encoding="UTF-8"?>'
            f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="{fmt}" '
            f'Overlap="{self.overlap}" TileSize="{self.tile}">'
            f'<Size Width="{self.width}" Height="{self.height}"/></Image>'
        )


class SlideDeepZoom(DeepZoom):
    """Deep Zoom tiles of a slide, read on demand from its pyramid."""

    def __init__(self, slide: Slide, tile: int = 254, overlap: int = 1):
        super().__init__(*slide.dimensions, tile=tile, overlap=overlap)
        self.slide = slide

    def read_tile(self, level: int, col: int, row: int) -> np.ndarray:
        x0, y0, x1, y1 = self.tile_box(level, col, row)
        ds = self.downsample(level)
        w0 = min(x1 * ds, self.width) - x0 * ds
        h0 = min(y1 * ds, self.height) - y0 * ds
        img = self.slide.read_at_mpp(x0 * ds, y0 * ds, w0, h0, self.slide.mpp * ds)
        if img.shape[:2] != (y1 - y0, x1 - x0):
            img = cv2.resize(img, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
        return img
