"""Regions of a tiled TIFF level decoded tile by tile, straight from the file.

tiffslide reads a region through zarr: an asyncio event loop in a second thread, a task per
tile and zarr's chunk assembly. For the few tiles of a patch that machinery adds 40-90% to the
CPU of decoding them (1.58 vs 1.15 ms per 512 px patch of a synthetic JPEG slide, 1.47 vs
0.79 ms on the real SVS: docs/benchmarks.md, "Reading tiles directly"), and reads of one
process serialise on the loop. `TileLevel` reads each tile's bytes with one `pread` and
decodes them with tifffile's own decoder, with the arguments tifffile's zarr store passes, so
the pixels are those tiffslide returns (tests/test_slide.py checks every level of the real
SVS and a synthetic pyramid, edges, outside and an unwritten tile).
"""

from __future__ import annotations

import os
import threading

import numpy as np


class TileLevel:
    """One pyramid level stored as tiles of one TIFF page, read region by region."""

    def __init__(self, page, fd: int):
        self.page = page
        self.fd = fd
        self.height, self.width = int(page.imagelength), int(page.imagewidth)
        self.tile_h, self.tile_w = int(page.tilelength), int(page.tilewidth)
        self.samples = int(page.samplesperpixel)
        self.tiles_across = -(-self.width // self.tile_w)
        self.decode_args = {"_fullsize": True}
        if page.jpegtables is not None:
            self.decode_args["jpegtables"] = page.jpegtables
        if page.keyframe.jpegheader is not None:
            self.decode_args["jpegheader"] = page.keyframe.jpegheader
        self._decode = page.keyframe.decode

    @classmethod
    def supports(cls, page) -> bool:
        """Pages this reader decodes as tiffslide does: tiled, interleaved 8-bit RGB(A), 2-D."""
        return bool(
            page.is_tiled
            and page.planarconfig == 1
            and page.imagedepth == 1
            and page.samplesperpixel in (3, 4)
            and np.dtype(page.dtype) == np.uint8
            and len(page.dataoffsets)
            == -(-page.imagelength // page.tilelength) * -(-page.imagewidth // page.tilewidth)
        )

    def _tile(self, index: int) -> np.ndarray | None:
        offset, count = self.page.dataoffsets[index], self.page.databytecounts[index]
        if not offset or not count:
            return None  # not written: zarr's fill value (0), as tiffslide returns
        data = _pread(self.fd, count, offset)
        return self._decode(data, index, **self.decode_args)[0][0]

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """uint8 [h, w, samples] of level pixels from (x, y); 0 outside the level, as tiffslide
        pads."""
        out = np.zeros((h, w, self.samples), np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, self.width), min(y + h, self.height)
        if x1 <= x0 or y1 <= y0:
            return out
        for ty in range(y0 // self.tile_h, (y1 - 1) // self.tile_h + 1):
            for tx in range(x0 // self.tile_w, (x1 - 1) // self.tile_w + 1):
                tile = self._tile(ty * self.tiles_across + tx)
                if tile is None:
                    continue
                tx0, ty0 = tx * self.tile_w, ty * self.tile_h
                sx0, sy0 = max(x0, tx0), max(y0, ty0)
                sx1, sy1 = min(x1, tx0 + self.tile_w), min(y1, ty0 + self.tile_h)
                out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = tile[sy0 - ty0 : sy1 - ty0, sx0 - tx0 : sx1 - tx0]
        return out


_SEEK_LOCK = threading.Lock()


def _pread(fd: int, count: int, offset: int) -> bytes:
    """`count` bytes at `offset`, safe to call from several threads on one descriptor."""
    if hasattr(os, "pread"):
        return os.pread(fd, count, offset)
    with _SEEK_LOCK:  # Windows
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, count)


def tile_levels(tiffslide_handle) -> tuple[list[TileLevel], int] | None:
    """A `TileLevel` for every level of a tiffslide slide and the file descriptor they share,
    or None when any level is not one `TileLevel` reads as tiffslide does (then tiffslide
    reads the slide)."""
    try:
        props = tiffslide_handle.properties
        if props.get("tiffslide.series-axes") != "YXS":
            return None
        if tiffslide_handle.zarr_group.attrs.get("tiffslide.series-composition") is not None:
            return None
        tif = tiffslide_handle.ts_tifffile
        series = tif.series[int(props.get("tiffslide.series-index") or 0)]
        pages = []
        for level in series.levels:
            if len(level.pages) != 1 or not TileLevel.supports(level.pages[0]):
                return None
            pages.append(level.pages[0])
        levels = [TileLevel(page, -1) for page in pages]
    except Exception:  # a layout tifffile describes differently (frames, odd tags): tiffslide reads it
        return None
    fd = os.open(tif.filehandle.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    for level in levels:
        level.fd = fd
    return levels, fd
