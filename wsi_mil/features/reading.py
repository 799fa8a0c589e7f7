"""Reading patches: whole rows of neighbouring patches read as one region and sliced.

Kept free of torch so that reader processes (features/stream.py) start in a fraction of a
second.
"""

from __future__ import annotations

import threading

import numpy as np
from PIL import Image

from ..wsi.readers import open_slide
from ..wsi.slide import Slide

MAX_REGION_PX = 8192  # widest region read at once, in level pixels
_PIL_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def resize_patch_torch(img: np.ndarray, size: int, interpolation: str = "bilinear") -> np.ndarray:
    """torch's antialiased resize (`interpolate(..., antialias=True)`) of a uint8 image: PIL's
    filter, computed by a vectorised uint8 kernel at a fifth of PIL's CPU."""
    import torch  # here, so that reader processes, which resize with PIL, never load it

    hwc = np.ascontiguousarray(img)
    if not hwc.flags.writeable:  # torch.from_numpy warns on read-only arrays
        hwc = hwc.copy()
    chw = torch.from_numpy(hwc).permute(2, 0, 1)[None]
    out = torch.nn.functional.interpolate(chw, size=(size, size), mode=interpolation, antialias=True)
    return out[0].permute(1, 2, 0).contiguous().numpy()


def resize_patch_pil(img: np.ndarray, size: int, interpolation: str = "bilinear") -> np.ndarray:
    """PIL's antialiased resize, what torchvision's `Resize` does to the PIL images CLAM's and
    TRIDENT's transforms receive."""
    pil = Image.fromarray(np.ascontiguousarray(img))
    return np.asarray(pil.resize((size, size), _PIL_FILTERS[interpolation]))


_RESIZE = [resize_patch_torch]


def resize_with_pil() -> None:
    """Resize with PIL in this process: reader processes (GPU machines, features/stream_workers.py)
    stay free of torch, which would add ~1.5 s to each one's start."""
    _RESIZE[0] = resize_patch_pil


def resize_patch(img: np.ndarray, size: int, interpolation: str = "bilinear") -> np.ndarray:
    """`img` resized to size x size with the encoder's filter ("bilinear" or "bicubic"),
    antialiased. torch's kernel, except in reader processes (PIL). The two agree within two grey
    levels on under 1% of pixels (tested), features within cosine 0.99999; torch's costs
    0.33 ms per 512 px patch on one core, PIL's 1.5 ms, which on 2 cores was a tenth of the
    encoder's CPU (docs/benchmarks.md, "Reading tiles directly")."""
    if img.shape[0] == size and img.shape[1] == size:
        return img
    return _RESIZE[0](img, size, interpolation)


def _read_row(
    slide: Slide,
    xs: np.ndarray,
    y: int,
    size0: int,
    patch_size: int,
    out_size: int,
    interpolation: str = "bilinear",
) -> list[np.ndarray]:
    """Patches at (xs[i], y) of side `size0` level-0 px, read as one region, `out_size` px each.

    The region comes from the coarsest level still at least as fine as the target resolution;
    each slice is resized straight to the encoder's input size with the encoder's filter.
    """
    level = slide.best_level_for_downsample(size0 / patch_size)
    lds = slide.level_downsamples[level]
    side = max(1, int(round(size0 / lds)))
    x0 = int(xs[0])
    offsets = np.round((xs - x0) / lds).astype(int)
    region = slide.read_region((x0, int(y)), level, (int(offsets[-1]) + side, side))
    return [resize_patch(region[:, o : o + side], out_size, interpolation) for o in offsets]


read_patch_row = _read_row


def read_patch(
    slide: Slide, x: int, y: int, size0: int, patch_size: int, out_size: int, interpolation: str = "bilinear"
) -> np.ndarray:
    """One patch, read on its own (the reference the batched reader must match)."""
    return _read_row(slide, np.array([x]), y, size0, patch_size, out_size, interpolation)[0]


def row_runs(coords: np.ndarray, size0: int, max_px: int) -> list[tuple[int, int]]:
    """Split row-major coords into [start, end) runs on one row whose union is one region."""
    runs, start = [], 0
    for i in range(1, len(coords) + 1):
        if i == len(coords):
            runs.append((start, i))
            break
        same_row = coords[i, 1] == coords[start, 1]
        step = coords[i, 0] - coords[i - 1, 0]
        width = coords[i, 0] + size0 - coords[start, 0]
        if not (same_row and 0 < step <= size0 and width <= max_px):
            runs.append((start, i))
            start = i
    return runs


def region_limit(slide: Slide, size0: int, patch_size: int) -> int:
    """The widest region (level-0 px) read at once at the level patches are read from."""
    level = slide.best_level_for_downsample(size0 / patch_size)
    return int(MAX_REGION_PX * slide.level_downsamples[level])


def read_patches(
    slide: Slide,
    coords: np.ndarray,
    size0: int,
    patch_size: int,
    out_size: int,
    max_px: int,
    interpolation: str = "bilinear",
) -> tuple[np.ndarray, int]:
    """uint8 [n, S, S, 3] patches at `coords`, whole rows read as one region each.

    A region that fails to read (a corrupt tile) is retried patch by patch; patches that still
    fail come back white and are counted (the second value)."""
    out = np.empty((len(coords), out_size, out_size, 3), np.uint8)
    failed = 0
    for s, e in row_runs(coords, size0, max_px):
        try:
            out[s:e] = read_patch_row(
                slide, coords[s:e, 0], coords[s, 1], size0, patch_size, out_size, interpolation
            )
        except Exception:
            for i in range(s, e):
                try:
                    out[i] = read_patch(slide, *coords[i], size0, patch_size, out_size, interpolation)
                except Exception:
                    out[i] = 255
                    failed += 1
    return out, failed


_OPEN = threading.local()  # per reader thread or process: the slide it read last


def read_piece(
    path, mpp, coords: np.ndarray, size0: int, patch_size: int, out_size: int, interpolation: str = "bilinear"
):
    """`read_patches` for one piece in a reader process (or thread), keeping that reader's slide
    open between pieces."""
    key = (str(path), mpp)
    if getattr(_OPEN, "key", None) != key:
        if getattr(_OPEN, "slide", None) is not None:
            _OPEN.slide.close()
        _OPEN.slide, _OPEN.key = open_slide(path, mpp), key
    slide = _OPEN.slide
    limit = region_limit(slide, size0, patch_size)
    return read_patches(slide, coords, size0, patch_size, out_size, limit, interpolation)
