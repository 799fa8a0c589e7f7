"""HDF5 patch and feature files (CLAM/TRIDENT layout), atomic writes, and the run manifest.

Layout (DESIGN section 3): `coords` int64 [N, 2] level-0 top-left, `features` [N, D] in
~1k-row chunks, and attrs patch_size, patch_size_level0, target_mpp, level0_mpp plus
provenance. Attributes are written on the file root and on `coords` (where CLAM and TRIDENT
keep them); readers accept either, and CLAM's `patch_level`/`downsample` attrs.
"""

from __future__ import annotations

import contextlib
import csv
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from . import __version__
from .errors import WsiMilError
from .tiling import PatchGrid

CHUNK_ROWS = 1024


def partial_path(path: Path) -> Path:
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
    return {
        "wsi_mil_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def _set_attrs(obj, attrs: dict) -> None:
    for key, value in attrs.items():
        if value is None:
            continue
        obj.attrs[key] = value


def write_patches(path: str | Path, grid: PatchGrid, **extra_attrs) -> None:
    """Write a patch-coordinate file atomically."""
    attrs = {**grid.file_attrs, **provenance(**extra_attrs)}
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        ds = f.create_dataset("coords", data=grid.coords.astype(np.int64))
        if grid.tissue_fraction is not None and len(grid.tissue_fraction) == len(grid.coords):
            f.create_dataset("tissue_fraction", data=grid.tissue_fraction.astype(np.float32))
        _set_attrs(f, attrs)
        _set_attrs(ds, attrs)


def _merged_attrs(f: h5py.File) -> dict:
    attrs = {k: _plain(v) for k, v in f.attrs.items()}
    if "coords" in f:
        attrs.update({k: _plain(v) for k, v in f["coords"].attrs.items() if k not in attrs})
    return attrs


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.size == 1:
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_patches(path: str | Path, level0_mpp: float | None = None) -> PatchGrid:
    """Read a wsi-mil, TRIDENT or CLAM patch file into a PatchGrid."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            coords = np.asarray(f["coords"][:], dtype=np.int64).reshape(-1, 2)
            attrs = _merged_attrs(f)
            frac = np.asarray(f["tissue_fraction"][:]) if "tissue_fraction" in f else None
    except (OSError, KeyError) as exc:
        raise WsiMilError(
            f"{path}: not a readable patch file ({exc}); re-run 'wsi-mil tile' with --overwrite"
        ) from exc
    size = int(attrs.get("patch_size", 256))
    if "patch_size_level0" in attrs:
        size0 = int(attrs["patch_size_level0"])
    elif "downsample" in attrs:  # CLAM: patch_size is in pixels of level patch_level
        ds = attrs["downsample"]
        ds = float(np.asarray(ds).ravel()[0])
        size0 = int(round(size * ds))
    else:
        size0 = size
    l0 = attrs.get("level0_mpp", level0_mpp)
    target = attrs.get("target_mpp", (l0 * size0 / size) if l0 else None)
    known = {"patch_size", "patch_size_level0", "target_mpp", "level0_mpp"}
    return PatchGrid(
        coords,
        size,
        size0,
        float(target or 0.0),
        float(l0 or 0.0),
        frac,
        {k: v for k, v in attrs.items() if k not in known},
    )


@dataclass
class FeatureBag:
    """One slide's features [N, D], coords [N, 2] and file attrs."""

    features: np.ndarray
    coords: np.ndarray
    attrs: dict

    def __len__(self) -> int:
        return len(self.features)


def read_features(path: str | Path) -> FeatureBag:
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            feats = f["features"][:]
            coords = f["coords"][:] if "coords" in f else np.zeros((len(feats), 2), np.int64)
            attrs = _merged_attrs(f)
    except (OSError, KeyError) as exc:
        raise WsiMilError(
            f"{path}: not a readable feature file ({exc}); re-run 'wsi-mil "
            "extract' for this slide with --overwrite"
        ) from exc
    if feats.ndim == 3 and feats.shape[0] == 1:  # CLAM stores [1, N, D] in some versions
        feats = feats[0]
    return FeatureBag(np.asarray(feats), np.asarray(coords, np.int64).reshape(-1, 2), attrs)


class FeatureWriter:
    """Streams feature rows into `<path>.partial`, resumable, renamed to `path` on close.

    The file is pre-sized to N rows; `n_done` (an attribute, flushed with the data) records the
    written prefix so an interrupted run resumes where it stopped.
    """

    def __init__(self, path: str | Path, coords: np.ndarray, dim: int, dtype: str, attrs: dict):
        self.path = Path(path)
        self.tmp = partial_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.n = len(coords)
        self.n_done = 0
        self._last_flush = time.monotonic()
        if self.tmp.exists():
            try:
                self.f = h5py.File(self.tmp, "a")
                same = (
                    self.f["features"].shape == (self.n, dim)
                    and np.array_equal(self.f["coords"][:], coords)
                    and self.f.attrs.get("encoder") == attrs.get("encoder")
                    and str(self.f["features"].dtype) == dtype
                )
                if same:
                    self.n_done = int(self.f.attrs.get("n_done", 0))
                    return
                self.f.close()
            except Exception:  # a partial file killed mid-write may be unreadable: restart
                pass
            self.tmp.unlink()
        self.f = h5py.File(self.tmp, "w")
        self.f.create_dataset("coords", data=coords.astype(np.int64))
        chunks = (min(CHUNK_ROWS, max(self.n, 1)), dim) if self.n else None
        self.f.create_dataset("features", shape=(self.n, dim), dtype=dtype, chunks=chunks)
        _set_attrs(self.f, attrs)
        _set_attrs(self.f["coords"], attrs)
        self.f.attrs["n_done"] = 0
        self.f.flush()

    def write(self, start: int, rows: np.ndarray) -> None:
        if start != self.n_done:
            raise RuntimeError(f"feature rows out of order: got {start}, expected {self.n_done}")
        self.f["features"][start : start + len(rows)] = rows
        self.n_done = start + len(rows)
        if time.monotonic() - self._last_flush > 5:
            self.checkpoint()

    def checkpoint(self) -> None:
        self.f.attrs["n_done"] = self.n_done
        self.f.flush()
        self._last_flush = time.monotonic()

    def finish(self, **attrs) -> None:
        if self.n_done != self.n:
            raise RuntimeError(f"{self.path}: only {self.n_done}/{self.n} rows written")
        _set_attrs(self.f, attrs)
        del self.f.attrs["n_done"]
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Keep the partial file for resuming (called on errors and interrupts)."""
        with contextlib.suppress(Exception):
            self.checkpoint()
            self.f.close()


MANIFEST_FIELDS = ["slide", "status", "patches", "seconds", "patches_per_s", "error"]


class Manifest:
    """Per-run CSV of slide outcomes; rows for the same slide are replaced, written atomically."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: dict[str, dict] = {}
        if self.path.exists():
            with open(self.path, newline="") as fh:
                for row in csv.DictReader(fh):
                    self.rows[row["slide"]] = row

    def record(
        self,
        slide: str,
        status: str,
        patches: int | None = None,
        seconds: float | None = None,
        error: str = "",
    ) -> None:
        pps = (patches / seconds) if patches and seconds else None
        self.rows[slide] = {
            "slide": slide,
            "status": status,
            "patches": "" if patches is None else patches,
            "seconds": "" if seconds is None else f"{seconds:.2f}",
            "patches_per_s": "" if pps is None else f"{pps:.1f}",
            "error": error,
        }
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, MANIFEST_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows.values())
