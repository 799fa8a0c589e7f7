"""Slide readers, one small class per backend, and `open_slide` that picks one.

Microns per pixel come from the slide's properties, else the TIFF resolution tags, else the
caller's override; `mpp_source` says which. Aperio and generic tiled TIFF open with tiffslide
first (same pixels, faster region reads: docs/benchmarks.md); every other vendor format
(tile overlaps, vendor metadata) with OpenSlide.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
import weakref
from pathlib import Path

import cv2
import numpy as np

from ..errors import MissingMPPError, SlideOpenError, SlideReadError, WsiMilError
from .slide import PLAIN_IMAGE_SUFFIXES, SLIDE_SUFFIXES, Slide, as_rgb
from .tiff_tiles import tile_levels

BACKENDS = ("auto", "openslide", "tiffslide", "image")
TIFF_LIKE = {".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif"}


class OpenSlideReader(Slide):
    """OpenSlide (openslide-bin wheel): every vendor format it knows, DICOM included."""

    backend = "openslide"

    @classmethod
    def open_handle(cls, path: Path):
        import openslide

        handle = openslide.OpenSlide(str(path))
        return handle, list(handle.level_dimensions), list(handle.level_downsamples), dict(handle.properties)

    def _read(self, x, y, level, w, h):
        return as_rgb(np.asarray(self._handle.read_region((x, y), level, (w, h))))


class TiffSlideReader(Slide):
    """tiffslide: Aperio SVS and generic tiled TIFF through tifffile + imagecodecs. Levels stored
    as plain tiles are decoded tile by tile straight from the file (wsi/tiff_tiles.py: the same
    pixels for 0.5-0.7x the CPU); any other layout goes through tiffslide's zarr reads."""

    backend = "tiffslide"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        direct = tile_levels(self._handle) if self._handle is not None else None
        self._tiles = direct[0] if direct is not None else None
        self._close_tiles = weakref.finalize(self, os.close, direct[1]) if direct is not None else None

    def _close_handle(self) -> None:
        if self._close_tiles is not None:
            self._close_tiles()  # once, here or when the slide is garbage-collected unclosed
            self._tiles = None
        super()._close_handle()

    @classmethod
    def open_handle(cls, path: Path):
        import tiffslide

        handle = tiffslide.TiffSlide(str(path))
        props = {k: v for k, v in handle.properties.items() if v is not None}
        return handle, list(handle.level_dimensions), list(handle.level_downsamples), props

    def _read(self, x, y, level, w, h):
        if self._tiles is not None:
            ds = self.level_downsamples[level]
            try:  # tiffslide's level-0 -> level mapping
                arr = self._tiles[level].read(int(x / ds), int(y / ds), w, h)
            except Exception as exc:
                raise SlideReadError(f"{self.path}: {type(exc).__name__}: {exc}") from None
            return self._whiten_outside(as_rgb(arr), x, y, level)
        failure = None
        try:
            with warnings.catch_warnings():  # it warns when the whole box is outside; white it is
                warnings.simplefilter("ignore", UserWarning)
                arr = self._handle.read_region((x, y), level, (w, h), as_array=True)
        except Exception as exc:
            failure = f"{self.path}: {type(exc).__name__}: {exc}"
        if failure is not None:
            _silence_orphaned_zarr_tasks()
            raise SlideReadError(failure)
        return self._whiten_outside(as_rgb(np.asarray(arr)), x, y, level)

    def _whiten_outside(self, rgb: np.ndarray, x: int, y: int, level: int) -> np.ndarray:
        """tiffslide pads outside the image with black; paint that margin white like OpenSlide."""
        h, w = rgb.shape[:2]
        lw, lh = self.level_dimensions[level]
        ds = self.level_downsamples[level]
        x0, y0 = int(x / ds), int(y / ds)  # tiffslide's own level-0 -> level mapping
        if x0 < 0 or y0 < 0 or x0 + w > lw or y0 + h > lh:
            rgb = rgb if rgb.flags.writeable else rgb.copy()
            rgb[:, : max(0, -x0)] = 255
            rgb[: max(0, -y0)] = 255
            rgb[:, max(0, lw - x0) :] = 255
            rgb[max(0, lh - y0) :] = 255
        return rgb


class ImageReader(Slide):
    """A plain PNG/JPEG (or small untiled TIFF) held in memory with a 2x pyramid."""

    backend = "image"

    @classmethod
    def open_handle(cls, path: Path):
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = 20_000 * 20_000
        with Image.open(path) as im:
            img = np.asarray(im.convert("RGB"))
        pyramid = [img]
        while max(pyramid[-1].shape[:2]) > 512:
            prev = pyramid[-1]
            size = (max(1, prev.shape[1] // 2), max(1, prev.shape[0] // 2))
            pyramid.append(cv2.resize(prev, size, interpolation=cv2.INTER_AREA))
        dims = [(p.shape[1], p.shape[0]) for p in pyramid]
        return pyramid, dims, [dims[0][0] / d[0] for d in dims], {}

    def _read(self, x, y, level, w, h):
        img = self._handle[level]
        ds = self.level_downsamples[level]
        out = np.full((h, w, 3), 255, np.uint8)
        xl, yl = int(round(x / ds)), int(round(y / ds))
        x0, y0 = max(xl, 0), max(yl, 0)
        x1, y1 = min(xl + w, img.shape[1]), min(yl + h, img.shape[0])
        if x1 > x0 and y1 > y0:
            out[y0 - yl : y1 - yl, x0 - xl : x1 - xl] = img[y0:y1, x0:x1]
        return out

    def _close_handle(self) -> None:
        pass


def _silence_orphaned_zarr_tasks() -> None:
    """After a failed tile decode, zarr (under tiffslide) leaves the region's other decode tasks
    pending on its event loop; Python reports each at exit as "Exception ignored ... Event loop
    is closed", "coroutine was never awaited" or, through asyncio's logger, "Task was destroyed
    but it is pending!" (hundreds of lines). The failure itself is
    reported once by the caller, so only these orphan reports are dropped."""
    if getattr(sys.unraisablehook, "_wsi_mil", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        text = f"{unraisable.exc_value!r} {unraisable.object!r}"
        if "Event loop is closed" in text or "concurrent_map" in text or "zarr" in text:
            return
        previous(unraisable)

    hook._wsi_mil = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # "Task was destroyed but it is pending!"
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)


READERS: dict[str, type[Slide]] = {
    "openslide": OpenSlideReader,
    "tiffslide": TiffSlideReader,
    "image": ImageReader,
}


def mpp_from_tiff_tags(path: Path) -> float | None:
    """um/px from TIFF XResolution + ResolutionUnit (centimetre or inch)."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            if "XResolution" not in tags or "ResolutionUnit" not in tags:
                return None
            num, den = tags["XResolution"].value
            unit = int(tags["ResolutionUnit"].value)
            if not num or not den:
                return None
            px_per_unit = num / den
            um_per_unit = {2: 25400.0, 3: 10000.0}.get(unit)
            if um_per_unit is None or px_per_unit <= 1:
                return None
            return um_per_unit / px_per_unit
    except Exception:
        return None


def first_positive(props: dict, keys: tuple[str, ...]) -> float | None:
    """The first of `keys` whose property value parses as a positive number."""
    for key in keys:
        try:
            value = float(props.get(key) or 0)
        except (TypeError, ValueError):
            continue
        if value > 0:
            return value
    return None


def mpp_from_properties(props: dict) -> float | None:
    return first_positive(props, ("openslide.mpp-x", "tiffslide.mpp-x", "aperio.MPP"))


def objective_power(props: dict) -> float | None:
    return first_positive(props, ("openslide.objective-power", "tiffslide.objective-power", "aperio.AppMag"))


def auto_backends(path: Path) -> list[str]:
    """Reader order for a file: tiffslide first for Aperio and generic tiled TIFF, else OpenSlide."""
    if path.suffix.lower() in PLAIN_IMAGE_SUFFIXES:
        return ["image"]
    try:
        import openslide

        fmt = openslide.OpenSlide.detect_format(str(path))
    except Exception:
        fmt = None
    if fmt in ("aperio", "generic-tiff"):
        return ["tiffslide", "openslide", "image"]
    return ["openslide", "tiffslide", "image"]


log = logging.getLogger("wsi_mil")
_TOLD: set = set()  # (path, mpp) pairs already warned about a recorded mpp that wins


def open_slide(path: str | Path, mpp: float | None = None, backend: str = "auto") -> Slide:
    """Open a whole-slide image (svs, ndpi, mrxs, scn, DICOM, tiled/OME TIFF) or a small image.

    `mpp` is used only when the file itself carries none (properties, then TIFF tags).
    Raises SlideOpenError or MissingMPPError with a message naming the file and the fix.
    """
    path = Path(path)
    if not path.exists():
        raise SlideOpenError(f"{path}: no such file")
    if path.is_dir() and path.suffix.lower() != ".mrxs":
        raise SlideOpenError(f"{path}: is a directory, not a slide file")
    if backend not in BACKENDS:
        raise SlideOpenError(f"{path}: unknown backend {backend!r}; choose one of {BACKENDS}")
    suffix = path.suffix.lower()
    errors = []
    for name in auto_backends(path) if backend == "auto" else [backend]:
        reader = READERS[name]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                handle, dims, downsamples, props = quiet_call(reader.open_handle, path)
        except Exception as exc:  # each backend raises its own types
            errors.append(f"{name}: {type(exc).__name__}")
            continue
        if name == "image" and suffix in {".tif", ".tiff"} and dims[0][0] * dims[0][1] > 1e8:
            errors.append("image: too large for an untiled read")
            continue
        slide_mpp, source = mpp_from_properties(props), "properties"
        if slide_mpp is None and suffix in TIFF_LIKE:
            slide_mpp, source = mpp_from_tiff_tags(path), "tiff-tags"
        if slide_mpp is None and mpp:
            slide_mpp, source = float(mpp), "override"
        elif mpp and abs(float(mpp) - slide_mpp) > 0.01 * slide_mpp and (path, mpp) not in _TOLD:
            _TOLD.add((path, mpp))  # once per slide, however often it is opened
            log.warning(
                "%s records %.4g um/px (%s); the given mpp %g applies only to slides that record none",
                path, slide_mpp, source, float(mpp),
            )  # fmt: skip
        if slide_mpp is None:
            if hasattr(handle, "close"):
                handle.close()
            raise MissingMPPError(
                f"{path}: the slide records no microns-per-pixel; pass --mpp (e.g. --mpp 0.25 for "
                "40x, 0.5 for 20x) or add an 'mpp' column to the slide-list CSV"
            )
        return reader(path, dims, downsamples, slide_mpp, source, objective_power(props), props, handle)
    raise SlideOpenError(
        f"{path}: not a readable slide ({'; '.join(errors)}); supported: "
        f"{', '.join(sorted(SLIDE_SUFFIXES))} - check the file is complete and not corrupt"
    )


def quiet_call(fn, *args):
    """Call `fn` with tifffile's logger silenced: its ERROR lines about a damaged file are
    turned into one reported error per slide by the caller, not printed mid-progress."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        return fn(*args)
    finally:
        logger.setLevel(level)


def slide_infos(entries, backend: str = "auto") -> tuple[list[dict], list[str]]:
    """(`Slide.info()` of every slide that opens, one error line per slide that does not):
    `wsi-mil info` is where a user looks for the slides that lack an mpp or are damaged."""
    infos, errors = [], []
    for entry in entries:
        try:
            with open_slide(entry.path, entry.mpp, backend) as s:
                infos.append(s.info())
        except WsiMilError as exc:
            errors.append(str(exc))
    return infos, errors
