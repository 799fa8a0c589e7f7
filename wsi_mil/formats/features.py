"""Feature files `features/<encoder>/<slide>.h5` (CLAM/TRIDENT layout), read and written.

`features` float32/float16 [N, D] in ~1k-row chunks and `coords` int64 [N, 2] (level-0
top-left), with the grid's attributes (formats/patches.py) plus encoder, encoder_dim,
encoder_weights, encoder_weights_sha256 (the checkpoint file's sha256; absent for random
weights and in files of older versions), precision and provenance. Every reader goes through
`read_features`, which validates the file once and names the file and the problem in one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..errors import WsiMilError
from ..io import partial_path
from .hdf5 import merged_attrs, plain, set_attrs
from .patches import coords_attrs

CHUNK_ROWS = 1024
log = logging.getLogger("wsi_mil")


class BadFeatureFile(WsiMilError):
    """A feature file that is unreadable, inconsistent or holds non-finite values."""


@dataclass
class FeatureBag:
    """One slide's features [N, D], coords [N, 2] and file attrs."""

    features: np.ndarray
    coords: np.ndarray
    attrs: dict
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.features)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def encoder(self) -> str | None:
        enc = self.attrs.get("encoder")
        return None if enc is None else str(enc)


def _redo(path: Path) -> str:
    return f"re-run 'wsi-mil extract' for this slide with --overwrite (or remove {path.name})"


def validate_bag(bag: FeatureBag) -> FeatureBag:
    """Shapes agree, dtype is floating, every value finite; else one line naming the file."""
    path = bag.path or Path("<features>")
    f, c = bag.features, bag.coords
    if f.ndim != 2 or not np.issubdtype(f.dtype, np.floating):
        raise BadFeatureFile(f"{path}: 'features' must be a float [N, D] array, found {f.dtype} {f.shape}")
    if c.ndim != 2 or c.shape[1] != 2:
        raise BadFeatureFile(f"{path}: 'coords' must be [N, 2], found {c.shape}; {_redo(path)}")
    if len(c) != len(f):
        raise BadFeatureFile(
            f"{path}: {len(f)} feature rows but {len(c)} coords; the file is inconsistent; {_redo(path)}"
        )
    if len(f) == 0:
        raise BadFeatureFile(f"{path}: holds no patches; check the slide's tissue mask and tiling")
    finite = np.isfinite(f)
    if not finite.all():
        rows = int((~finite.all(axis=1)).sum())
        raise BadFeatureFile(
            f"{path}: {rows} of {len(f)} feature rows hold NaN or Inf (first at row "
            f"{int(np.argmin(finite.all(axis=1)))}); {_redo(path)}"
        )
    return bag


def feature_files(folder: str | Path) -> list[Path]:
    """The `<slide>.h5` files of a features folder (extract's `features/<encoder>/`), sorted; one
    line naming the encoder subfolder when the user passed its parent, or the fix when none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WsiMilError(
            f"{folder}: no such features folder; run 'wsi-mil extract' first and pass its "
            "features/<encoder> folder"
        )
    files = sorted(folder.glob("*.h5"))
    if files:
        return files
    held = sorted(d.name for d in folder.iterdir() if d.is_dir() and any(d.glob("*.h5")))
    if held:
        raise WsiMilError(
            f"{folder}: no feature files here, but its subfolder(s) {', '.join(held[:4])} hold them "
            f"(one per encoder): pass {folder / held[0]}"
        )
    raise WsiMilError(
        f"{folder}: no <slide>.h5 feature files; pass the features/<encoder> folder 'wsi-mil extract' wrote"
    )


def read_features(path: str | Path, validate: bool = True) -> FeatureBag:
    """A feature file (wsi-mil, CLAM or TRIDENT) as a FeatureBag, validated unless told not to."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            feats = f["features"][:]
            coords = f["coords"][:] if "coords" in f else None
            attrs = merged_attrs(f)
    except (OSError, KeyError) as exc:
        raise BadFeatureFile(f"{path}: not a readable feature file ({exc}); {_redo(path)}") from exc
    if feats.ndim == 3 and feats.shape[0] == 1:  # CLAM stores [1, N, D] in some versions
        feats = feats[0]
    if feats.ndim == 1:  # TRIDENT's slide embedding files: features [D] beside the patches' coords
        feats, coords = feats[None], None
    if coords is None:  # plain MIL bags without positions
        coords = np.zeros((len(feats), 2), np.int64)
    coords = np.asarray(coords)
    if coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    bag = FeatureBag(np.asarray(feats), coords.astype(np.int64, copy=False), attrs, path)
    return validate_bag(bag) if validate else bag


def read_feature_attrs(path: str | Path) -> tuple[dict, tuple[int, ...]]:
    """A feature file's attributes and the shape of `features`, without reading the rows."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            return merged_attrs(f), tuple(f["features"].shape)
    except (OSError, KeyError) as exc:
        raise BadFeatureFile(f"{path}: not a readable feature file ({exc}); {_redo(path)}") from exc


def check_compatible(path, dim: int, encoder: str | None, run_dim: int, run_encoder: str | None, source: str):
    """Refuse features (of file `path`: `dim`, `encoder`) unlike those a trained run expects."""
    if dim != run_dim:
        raise WsiMilError(
            f"{path}: {dim}-d features, but {source} was trained on "
            f"{run_encoder or 'unknown-encoder'} features ({run_dim}-d); extract with --encoder {run_encoder}"
        )
    if run_encoder and encoder and str(encoder) != run_encoder:
        raise WsiMilError(
            f"{path}: features from encoder {encoder}, but {source} was trained on {run_encoder} "
            f"features; extract with --encoder {run_encoder}"
        )


def check_grid(path, attrs: dict, spec: dict, source: str) -> None:
    """Refuse features tiled on another grid (microns per pixel, patch size) than the run's:
    a patch of another size or magnification is another input to the models."""
    mpp, run_mpp = attrs.get("target_mpp"), spec.get("target_mpp")
    if mpp is not None and run_mpp is not None and abs(float(mpp) - float(run_mpp)) > 0.01 * float(run_mpp):
        raise WsiMilError(
            f"{path}: patches at {float(mpp):g} um/px, but {source} was trained on {float(run_mpp):g} um/px; "
            f"extract with --target-mpp {float(run_mpp):g}"
        )
    size, run_size = attrs.get("patch_size"), spec.get("patch_size")
    if size is not None and run_size is not None and int(size) != int(run_size):
        raise WsiMilError(
            f"{path}: {int(size)}-px patches, but {source} was trained on {int(run_size)}-px patches; "
            f"extract with --patch-size {int(run_size)}"
        )


def check_slide(bag: FeatureBag, slide_path: str | Path, dimensions: tuple[int, int]) -> None:
    """Refuse another slide's feature file: patches that start outside the slide, or a recorded
    `slide_path` naming another slide (a heatmap painted another slide's lesion onto this one)."""
    width, height = (int(v) for v in dimensions)
    outside = (bag.coords[:, 0] >= width) | (bag.coords[:, 1] >= height) | (bag.coords < 0).any(1)
    if outside.any():
        far = bag.coords[outside].max(0)
        raise WsiMilError(
            f"{bag.path}: {int(outside.sum())} patch(es) start outside {Path(slide_path).name} ({width} x "
            f"{height} px; up to x {int(far[0])}, y {int(far[1])}): these are another slide's features; "
            "pass this slide's feature file, or leave --features out to extract it"
        )
    made_from = bag.attrs.get("slide_path")
    if made_from and Path(str(made_from)).stem != Path(slide_path).stem:
        raise WsiMilError(
            f"{bag.path}: made from {Path(str(made_from)).name}, not {Path(slide_path).name}: pass this "
            "slide's feature file, or leave --features out to extract it (also for a renamed slide)"
        )


def write_features(path: str | Path, features: np.ndarray, coords: np.ndarray, attrs: dict) -> None:
    """Write a whole bag at once (synthetic cohorts, conversions), atomically."""
    dtype = str(np.asarray(features).dtype)
    writer = FeatureWriter(path, coords, features.shape[1], dtype, attrs)
    writer.write(0, features)
    writer.finish()


def _same_weights(partial: dict, attrs: dict) -> bool:
    """A partial file's rows came from the same weights: the same sha256 where both files
    record one, else the same source ("random", a path or a hub id; unknown: assumed)."""
    a, b = partial.get("encoder_weights_sha256"), attrs.get("encoder_weights_sha256")
    if a is not None and b is not None:
        return plain(a) == b
    made, now = partial.get("encoder_weights"), attrs.get("encoder_weights")
    return made is None or now is None or (a is None and b is None and plain(made) == now)


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
                    and _same_weights(dict(self.f.attrs), attrs)
                    and self.f.attrs.get("precision") in (None, attrs.get("precision"))
                    and str(self.f["features"].dtype) == dtype
                )
                if same:
                    self.n_done = int(self.f.attrs.get("n_done", 0))
                    return
                self.f.close()
                log.warning(
                    "%s was begun with other settings (grid, encoder or weights): started again", self.tmp
                )
            except Exception:  # a partial file killed mid-write may be unreadable: restart
                pass
            self.tmp.unlink()
        self.f = h5py.File(self.tmp, "w")
        self.f.create_dataset("coords", data=np.asarray(coords, np.int64))
        chunks = (min(CHUNK_ROWS, max(self.n, 1)), dim) if self.n else None
        self.f.create_dataset("features", shape=(self.n, dim), dtype=dtype, chunks=chunks)
        set_attrs(self.f, attrs)
        set_attrs(self.f["coords"], coords_attrs(attrs))
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
        set_attrs(self.f, attrs)
        del self.f.attrs["n_done"]
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Keep the partial file for resuming (called on errors and interrupts)."""
        with contextlib.suppress(Exception):
            self.checkpoint()
            self.f.close()
