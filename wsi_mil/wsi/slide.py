"""The slide interface: one `Slide` protocol over every reader (after TRIDENT's readers).

A `Slide` gives pyramid geometry, microns per pixel (and where it came from) and RGB uint8
region reads in level-0 coordinates; areas outside the slide read as white. Each backend
(OpenSlide, tiffslide, plain images) is one small subclass in `readers.py` that implements
`_read(x, y, level, w, h)`; everything else (level choice, resampling to an mpp, thumbnails)
is shared here.
"""

from __future__ import annotations

import abc
import math
from pathlib import Path

import cv2
import numpy as np

SLIDE_SUFFIXES = {
    ".svs",
    ".ndpi",
    ".mrxs",
    ".scn",
    ".tif",
    ".tiff",
    ".vms",
    ".vmu",
    ".bif",
    ".svslide",
    ".dcm",
    ".png",
    ".jpg",
    ".jpeg",
}
PLAIN_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def slide_id(path: str | Path) -> str:
    """The name used for a slide's outputs: file name without its suffix."""
    path = Path(path)
    if path.suffix.lower() == ".dcm":  # a DICOM slide is a folder of files: name it by the folder
        return path.parent.name
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


class Slide(abc.ABC):
    """An open whole-slide image. Use as a context manager or call `close()`."""

    backend = "base"

    def __init__(
        self,
        path: Path,
        level_dimensions: list[tuple[int, int]],
        level_downsamples: list[float],
        mpp: float,
        mpp_source: str,
        objective_power: float | None,
        properties: dict,
        handle=None,
    ):
        self.path = Path(path)
        self.level_dimensions = [tuple(map(int, d)) for d in level_dimensions]
        self.level_downsamples = [float(d) for d in level_downsamples]
        self.mpp, self.mpp_source = float(mpp), mpp_source
        self.objective_power = objective_power
        self.properties = properties
        self._handle = handle
        self._thumbnail: tuple[np.ndarray, float] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, mpp={self.mpp:.4f})"

    # -- what a backend implements ------------------------------------------------------------
    @abc.abstractmethod
    def _read(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 [h, w, 3]; level-0 top-left (x, y); outside the slide is white."""

    def _close_handle(self) -> None:
        if self._handle is not None and hasattr(self._handle, "close"):
            self._handle.close()

    # -- shared -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return slide_id(self.path)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def qupath_offset(self) -> tuple[int, int]:
        """Level-0 origin of the image QuPath shows: its OpenSlide server crops slides that record
        `openslide.bounds-x/y` (MRXS, some NDPI) to those bounds, so QuPath's coordinates are
        ours minus this offset."""
        return tuple(int(float(self.properties.get(f"openslide.bounds-{a}") or 0)) for a in "xy")

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    def best_level_for_downsample(self, downsample: float) -> int:
        """The lowest-resolution level that is still at least as fine as `downsample`."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * 1.01:
                best = i
        return best

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 [h, w, 3] of `size` level-`level` pixels whose top-left is level-0 `location`."""
        return self._read(int(location[0]), int(location[1]), int(level), int(size[0]), int(size[1]))

    def read_at_mpp(self, x: int, y: int, w0: int, h0: int, mpp: float) -> np.ndarray:
        """Read the level-0 box (x, y, w0, h0) resampled to `mpp`, from the best pyramid level."""
        ds = mpp / self.mpp
        level = self.best_level_for_downsample(ds)
        lds = self.level_downsamples[level]
        wl, hl = max(1, math.ceil(w0 / lds)), max(1, math.ceil(h0 / lds))
        img = self.read_region((x, y), level, (wl, hl))
        out_w, out_h = max(1, round(w0 / ds)), max(1, round(h0 / ds))
        if (wl, hl) != (out_w, out_h):
            interp = cv2.INTER_AREA if out_w < wl else cv2.INTER_LINEAR
            img = cv2.resize(img, (out_w, out_h), interpolation=interp)
        return img

    def thumbnail_at_mpp(self, mpp: float) -> tuple[np.ndarray, float]:
        """The whole slide resampled to about `mpp` um/px; returns (image, exact um/px along x).

        The finest thumbnail read so far is kept: a coarser one (segmentation after a preview,
        say) is resized from it instead of decoding the slide again."""
        w0, h0 = self.dimensions
        cached = self._thumbnail
        if cached is not None and cached[1] <= mpp * 1.01:  # rounding makes the exact mpp a hair coarser
            img, cached_mpp = cached
            out_w, out_h = max(1, round(w0 * self.mpp / mpp)), max(1, round(h0 * self.mpp / mpp))
            if (out_w, out_h) != (img.shape[1], img.shape[0]):
                img = cv2.resize(img, (out_w, out_h), interpolation=cv2.INTER_AREA)
        else:
            img = self.read_at_mpp(0, 0, w0, h0, mpp)
            if cached is None or mpp < cached[1]:
                self._thumbnail = (img, self.mpp * w0 / img.shape[1])
        return img, self.mpp * w0 / img.shape[1]

    def thumbnail_long_side(self, long_side: int) -> tuple[np.ndarray, float]:
        """The whole slide with its longer side about `long_side` px (never finer than level 0)."""
        mpp = max(self.mpp, self.mpp * max(self.dimensions) / max(1, long_side))
        return self.thumbnail_at_mpp(mpp)

    def close(self) -> None:
        self._close_handle()
        self._handle = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def info(self) -> dict:
        return {
            "slide": str(self.path),
            "backend": self.backend,
            "level0_size": f"{self.dimensions[0]} x {self.dimensions[1]}",
            "levels": self.level_count,
            "downsamples": ", ".join(f"{d:g}" for d in self.level_downsamples),
            "mpp": round(self.mpp, 5),
            "mpp_source": self.mpp_source,
            "objective_power": self.objective_power,
        }


def as_rgb(arr: np.ndarray) -> np.ndarray:
    """Contiguous RGB uint8 from a reader's gray, RGB or RGBA array."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    if arr.shape[2] == 4:
        return rgba_to_rgb_on_white(arr)
    return np.ascontiguousarray(arr[..., :3])


def rgba_to_rgb_on_white(arr: np.ndarray) -> np.ndarray:
    """Composite over white: OpenSlide returns transparent (0,0,0,0) outside scanned areas.

    Almost every pixel is opaque, so drop alpha with one fast copy and blend only the rest.
    """
    rgb = cv2.cvtColor(arr, cv2.COLOR_RGBA2RGB)
    alpha = arr[..., 3]
    if alpha.min() < 255:
        clear = alpha < 255
        a = alpha[clear].astype(np.uint16)[:, None]
        rgb[clear] = ((rgb[clear].astype(np.uint16) * a + 255 * (255 - a)) // 255).astype(np.uint8)
    return rgb
