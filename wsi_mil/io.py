"""Writing files safely: atomic replacement, provenance attributes, JSON/text/PNG/figure writers.

Every output of every stage goes through `atomic_path`: it is written to `<name>.partial` and
renamed over the final name only when complete, so an interrupted run never leaves a
half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import __version__


def partial_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".partial")


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def provenance(**extra) -> dict:
    """The attributes every artefact carries: package version, creation time, plus `extra`."""
    return {
        "wsi_mil_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def json_safe(data):
    """`data` with NaN/Inf (undefined metrics, e.g. an AUC on one class) as null: strict JSON."""
    if isinstance(data, dict):
        return {k: json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(v) for v in data]
    if isinstance(data, np.generic):
        data = data.item()
    if isinstance(data, float) and not math.isfinite(data):
        return None
    return data


def write_json(path: str | Path, data) -> None:
    """Strict JSON: non-finite numbers become null instead of the invalid tokens NaN/Infinity."""
    write_text(path, json.dumps(json_safe(data), indent=2, allow_nan=False))


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def save_png(path: str | Path, rgb: np.ndarray) -> None:
    """An RGB or RGBA uint8 image as PNG."""
    import cv2

    code = cv2.COLOR_RGBA2BGRA if rgb.ndim == 3 and rgb.shape[2] == 4 else cv2.COLOR_RGB2BGR
    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb), code))
    if not ok:
        raise ValueError(f"{path}: PNG encoding failed")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.tobytes())


def save_figure(path: str | Path, fig, dpi: int = 100) -> None:
    """A matplotlib figure as PNG, then closed."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
