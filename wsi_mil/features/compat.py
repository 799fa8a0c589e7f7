"""Make `import torchvision` (and so `import timm`) work when its compiled ops cannot load.

The only torchvision on PyPI built against a given CPU-only torch is often a CUDA build; its
`_C` extension then fails to load, and torchvision's `_meta_registrations` aborts the import
with "operator torchvision::nms does not exist" because it registers fake kernels for `nms` and
`qnms` unconditionally. Defining those two operator schemas first lets the import finish. The
encoders only need torchvision's models and transforms, which are pure Python; the detection
ops (nms, roi_align) stay unavailable and raise if anything calls them.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

_LIBRARY = None  # keep the schema fragment alive for the life of the process


def _extension_loads() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # nothing to fix; the import will fail on its own terms
    libs = list(Path(spec.submodule_search_locations[0]).glob("_C*.so")) + list(
        Path(spec.submodule_search_locations[0]).glob("_C*.pyd")
    )
    if not libs:
        return False
    try:
        torch.ops.load_library(str(libs[0]))
        return True
    except (OSError, RuntimeError):
        return False


def ensure_torchvision_importable() -> bool:
    """Register stand-in schemas if torchvision's ops cannot load; True if a fix was applied."""
    global _LIBRARY
    if "torchvision" in sys.modules or _LIBRARY is not None:
        return _LIBRARY is not None
    if _extension_loads():
        return False
    _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        _LIBRARY.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return True


def import_torchvision():
    ensure_torchvision_importable()
    import torchvision

    return torchvision


def import_timm():
    ensure_torchvision_importable()
    import timm

    return timm
