"""One reader interface over OpenSlide, tiffslide and plain images (after TRIDENT's readers).

`open_slide(path, mpp=None)` returns a `Slide` whose pixel reads are RGB uint8 numpy arrays in
level-0 coordinates. Microns per pixel come from the slide's properties, else the TIFF
resolution tags, else the caller's override; `mpp_source` says which.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .errors import MissingMPPError, SlideOpenError

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
    ".png",
    ".jpg",
    ".jpeg",
}
PLAIN_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
BACKENDS = ("auto", "openslide", "tiffslide", "image")


def slide_id(path: str | Path) -> str:
    """The name used for a slide's outputs: file name without its suffix."""
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


@dataclass
class Slide:
    """An open whole-slide image. Use as a context manager or call `close()`."""

    path: Path
    backend: str
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    mpp: float
    mpp_source: str
    objective_power: float | None
    properties: dict = field(repr=False)
    _handle: object = field(repr=False, default=None)

    @property
    def name(self) -> str:
        return slide_id(self.path)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

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
        """RGB uint8 [h, w, 3] of `size` level-`level` pixels whose top-left is level-0 `location`.

        Areas outside the slide read as white.
        """
        x, y = int(location[0]), int(location[1])
        w, h = int(size[0]), int(size[1])
        if self.backend == "image":
            return _crop_padded(self._handle, x, y, w, h, self.level_downsamples[level], level)
        if self.backend == "tiffslide":
            with warnings.catch_warnings():  # it warns when the whole box is outside; white it is
                warnings.simplefilter("ignore", UserWarning)
                arr = self._handle.read_region((x, y), level, (w, h), as_array=True)
            return self._whiten_outside(_as_rgb(np.asarray(arr)), x, y, level)
        return _as_rgb(np.asarray(self._handle.read_region((x, y), level, (w, h))))

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
        """The whole slide resampled to about `mpp` um/px; returns (image, exact um/px along x)."""
        w0, h0 = self.dimensions
        img = self.read_at_mpp(0, 0, w0, h0, mpp)
        return img, self.mpp * w0 / img.shape[1]

    def close(self) -> None:
        if self._handle is not None and hasattr(self._handle, "close"):
            self._handle.close()
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


def _as_rgb(arr: np.ndarray) -> np.ndarray:
    """Contiguous RGB uint8 from a reader's gray, RGB or RGBA array."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    if arr.shape[2] == 4:
        return _rgba_to_rgb_on_white(arr)
    return np.ascontiguousarray(arr[..., :3])


def _rgba_to_rgb_on_white(arr: np.ndarray) -> np.ndarray:
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


def _crop_padded(pyramid: list[np.ndarray], x, y, w, h, ds, level) -> np.ndarray:
    img = pyramid[level]
    out = np.full((h, w, 3), 255, np.uint8)
    xl, yl = int(round(x / ds)), int(round(y / ds))
    x0, y0 = max(xl, 0), max(yl, 0)
    x1, y1 = min(xl + w, img.shape[1]), min(yl + h, img.shape[0])
    if x1 > x0 and y1 > y0:
        out[y0 - yl : y1 - yl, x0 - xl : x1 - xl] = img[y0:y1, x0:x1]
    return out


def _mpp_from_tiff_tags(path: Path) -> float | None:
    """um/px from TIFF XResolution + ResolutionUnit (centimetre or inch)."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            tags = page.tags
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


def _first_positive(props: dict, keys: tuple[str, ...]) -> float | None:
    """The first of `keys` whose property value parses as a positive number."""
    for key in keys:
        try:
            value = float(props.get(key) or 0)
        except (TypeError, ValueError):
            continue
        if value > 0:
            return value
    return None


def _mpp_from_properties(props: dict) -> float | None:
    return _first_positive(props, ("openslide.mpp-x", "tiffslide.mpp-x", "aperio.MPP"))


def _objective_power(props: dict) -> float | None:
    return _first_positive(props, ("openslide.objective-power", "tiffslide.objective-power", "aperio.AppMag"))


def _auto_backends(path: Path, suffix: str) -> list[str]:
    """Aperio and generic tiled TIFF go to tiffslide first: same pixels, 1.3x (CMU-1 SVS) to
    4.5x (synthetic JPEG TIFF) faster region reads (docs/benchmarks.md). OpenSlide keeps every
    other vendor format (tile overlaps, vendor metadata) that tiffslide does not model."""
    if suffix in PLAIN_IMAGE_SUFFIXES:
        return ["image"]
    try:
        import openslide

        fmt = openslide.OpenSlide.detect_format(str(path))
    except Exception:
        fmt = None
    if fmt in ("aperio", "generic-tiff"):
        return ["tiffslide", "openslide", "image"]
    return ["openslide", "tiffslide", "image"]


def _open_openslide(path: Path):
    import openslide

    handle = openslide.OpenSlide(str(path))
    return (
        handle,
        list(handle.level_dimensions),
        [float(d) for d in handle.level_downsamples],
        dict(handle.properties),
    )


def _open_tiffslide(path: Path):
    import tiffslide

    handle = tiffslide.TiffSlide(str(path))
    props = {k: v for k, v in handle.properties.items() if v is not None}
    return handle, list(handle.level_dimensions), [float(d) for d in handle.level_downsamples], props


def _open_image(path: Path):
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = 20_000 * 20_000
    with Image.open(path) as im:
        img = np.asarray(im.convert("RGB"))
    pyramid = [img]
    while max(pyramid[-1].shape[:2]) > 512:
        prev = pyramid[-1]
        pyramid.append(
            cv2.resize(
                prev, (max(1, prev.shape[1] // 2), max(1, prev.shape[0] // 2)), interpolation=cv2.INTER_AREA
            )
        )
    dims = [(p.shape[1], p.shape[0]) for p in pyramid]
    return pyramid, dims, [dims[0][0] / d[0] for d in dims], {}


def open_slide(path: str | Path, mpp: float | None = None, backend: str = "auto") -> Slide:
    """Open a whole-slide image (svs, ndpi, mrxs, scn, tiled/OME TIFF) or a small plain image.

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
    if backend == "auto":
        order = _auto_backends(path, suffix)
    else:
        order = [backend]
    openers = {"openslide": _open_openslide, "tiffslide": _open_tiffslide, "image": _open_image}
    errors = []
    for name in order:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                handle, dims, downsamples, props = openers[name](path)
        except Exception as exc:  # each backend raises its own types
            errors.append(f"{name}: {type(exc).__name__}")
            continue
        if name == "image" and suffix in {".tif", ".tiff"} and dims[0][0] * dims[0][1] > 1e8:
            errors.append("image: too large for an untiled read")
            continue
        slide_mpp, source = _mpp_from_properties(props), "properties"
        if slide_mpp is None and suffix in {".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif"}:
            slide_mpp, source = _mpp_from_tiff_tags(path), "tiff-tags"
        if slide_mpp is None and mpp:
            slide_mpp, source = float(mpp), "override"
        if slide_mpp is None:
            if hasattr(handle, "close"):
                handle.close()
            raise MissingMPPError(
                f"{path}: the slide records no microns-per-pixel; pass --mpp (e.g. --mpp 0.25 for "
                "40x, 0.5 for 20x) or add an 'mpp' column to the slide-list CSV"
            )
        return Slide(
            path=path,
            backend=name,
            level_dimensions=[tuple(map(int, d)) for d in dims],
            level_downsamples=downsamples,
            mpp=slide_mpp,
            mpp_source=source,
            objective_power=_objective_power(props),
            properties=props,
            _handle=handle,
        )
    raise SlideOpenError(
        f"{path}: not a readable slide ({'; '.join(errors)}); supported: "
        f"{', '.join(sorted(SLIDE_SUFFIXES))} - check the file is complete and not corrupt"
    )


@dataclass
class SlideEntry:
    """One slide named on the command line or in a slide list, with its optional mpp override."""

    path: Path
    mpp: float | None = None

    @property
    def name(self) -> str:
        return slide_id(self.path)


def collect_slides(inputs: list[str | Path], mpp: float | None = None) -> list[SlideEntry]:
    """Expand files, folders (slides directly inside) and CSV slide lists into slide entries.

    A CSV needs a `path` (or `slide`) column and may carry an `mpp` column.
    """
    import pandas as pd

    from .errors import EmptyInputError

    entries: list[SlideEntry] = []
    for item in inputs:
        p = Path(item)
        if p.suffix.lower() == ".csv" and p.is_file():
            table = pd.read_csv(p)
            col = next((c for c in ("path", "slide_path", "slide") if c in table.columns), None)
            if col is None:
                raise EmptyInputError(f"{p}: a slide list needs a 'path' column (and optional 'mpp')")
            for _, row in table.iterrows():
                sp = Path(str(row[col]))
                if not sp.is_absolute():
                    sp = p.parent / sp
                row_mpp = row.get("mpp") if "mpp" in table.columns else None
                row_mpp = float(row_mpp) if row_mpp is not None and not pd.isna(row_mpp) else mpp
                entries.append(SlideEntry(sp, row_mpp))
        elif p.is_dir() and p.suffix.lower() != ".mrxs":
            found = sorted(
                q
                for q in p.iterdir()
                if q.is_file() and q.suffix.lower() in SLIDE_SUFFIXES and not q.name.startswith(".")
            )
            if not found:
                raise EmptyInputError(
                    f"{p}: no slides found (looked for {', '.join(sorted(SLIDE_SUFFIXES))})"
                )
            entries.extend(SlideEntry(q, mpp) for q in found)
        else:
            entries.append(SlideEntry(p, mpp))
    if not entries:
        raise EmptyInputError("no slides given: name slide files, a folder or a CSV slide list")
    return entries
