"""Per-patch score files `<slide>_scores.h5` / `.csv` written by `wsi-mil heatmap`.

HDF5: `coords` int64 [N, 2] (level-0 top-left) and one float32 [N] dataset per layer
(localization/scores.py): `combined` and `patch_alone` (the probability that the patch shows the
target class), `attention` and `inversion` (within-slide ranks). Attrs: `prob` (the slide's
class probabilities), `predicted` (the index of the class whose evidence is scored), `target`
(its name), `scale` ("probability" since wsi-mil 0.3), `calibration` (the patch calibration's
mode: "annotations", "negatives" or "none"), `inversion_steps_kept` (per fold model),
`patch_size_level0`, `mpp` (level-0 um/px), `slide_size` (level-0 width, height) and
`qupath_offset` (what QuPath-frame annotations must be shifted by to meet these coords). The
CSV holds the same columns (instance, x, y and the layers). Older files are read too: wsi-mil
0.2 (`scale` "absolute": slide probability x within-slide min-max, no `patch_alone`) and 0.1
(within-slide ranks, `scale` read as "rank", the combined score called `score`); their
`patch_alone` layer is their combined one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from ..errors import WsiMilError
from ..io import atomic_path

SCORE_NAMES = ("combined", "patch_alone", "attention", "inversion")
PROBABILITY_LAYERS = ("combined", "patch_alone")  # the others are within-slide ranks


@dataclass
class PatchScores:
    coords: np.ndarray  # [N, 2] level-0 top-left
    attention: np.ndarray
    inversion: np.ndarray
    combined: np.ndarray
    prob: np.ndarray  # [C] slide-level probability (mean over models)
    predicted: int  # the class whose evidence the scores map
    size0: float = 256.0  # patch side in level-0 pixels
    qupath_offset: tuple[int, int] = (0, 0)  # our level-0 minus QuPath's (Slide.qupath_offset)
    scale: str = "probability"  # "probability"; "absolute" (wsi-mil 0.2) or "rank" (0.1) in old files
    target: str = ""  # name of the class whose evidence is scored
    mpp: float = 0.0  # level-0 um/px of the slide (0: unknown)
    slide_size: tuple[int, int] = (0, 0)  # level-0 width, height (0: unknown)
    patch_alone: np.ndarray | None = None  # P(class) from the patch alone; None: the combined layer's
    calibrated: str = "none"  # the patch calibration's mode (patch_calibration.MODES) or "none"
    steps_kept: list[int] = field(default_factory=list)  # inversion steps kept, per fold model
    flat_attention: int = 0  # models whose attention was the same on every patch (not stored)
    flat_inversion: int = 0  # models whose inversion left most patches tied (not stored)
    fold_probs: list[np.ndarray] = field(default_factory=list)  # [C] per fold model (not stored)

    def __post_init__(self) -> None:
        n = len(self.coords)
        if self.patch_alone is None:
            self.patch_alone = np.asarray(self.combined)
        for name in SCORE_NAMES:
            values = np.asarray(getattr(self, name))
            if len(values) != n:
                raise ValueError(f"{name} has {len(values)} values for {n} patches")
            if not np.isfinite(values).all():
                raise ValueError(f"{name} holds non-finite values; scores must be numbers in every export")

    @property
    def is_calibrated(self) -> bool:
        """The probability layers carry a patch calibration (legends say "not calibrated" else)."""
        return self.calibrated != "none"

    def get(self, name: str) -> np.ndarray:
        if name not in SCORE_NAMES:
            raise KeyError(f"unknown score {name!r}; one of {', '.join(SCORE_NAMES)}")
        return getattr(self, name)


def write_scores(path: str | Path, scores: PatchScores) -> None:
    """HDF5 (`.h5`) or CSV (`.csv`), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".csv":
            import pandas as pd

            n = len(scores.coords)  # rows in the feature file's instance order
            table = {"instance": np.arange(n), "x": scores.coords[:, 0], "y": scores.coords[:, 1]}
            table.update({n: scores.get(n) for n in SCORE_NAMES})
            pd.DataFrame(table).to_csv(tmp, index=False)
            return
        with h5py.File(tmp, "w") as f:
            f.create_dataset("coords", data=np.asarray(scores.coords, np.int64))
            for name in SCORE_NAMES:
                f.create_dataset(name, data=scores.get(name).astype(np.float32))
            f.attrs["prob"] = scores.prob
            f.attrs["predicted"] = scores.predicted
            f.attrs["patch_size_level0"] = scores.size0
            f.attrs["qupath_offset"] = np.asarray(scores.qupath_offset, np.int64)
            f.attrs["scale"] = scores.scale
            f.attrs["calibration"] = scores.calibrated
            f.attrs["inversion_steps_kept"] = np.asarray(scores.steps_kept, np.int64)
            f.attrs["target"] = scores.target
            f.attrs["mpp"] = float(scores.mpp)
            f.attrs["slide_size"] = np.asarray(scores.slide_size, np.int64)


def read_scores(path: str | Path) -> PatchScores:
    path = Path(path)
    if not path.is_file():
        raise WsiMilError(f"{path}: no such score file; 'wsi-mil heatmap' writes <slide>_scores.h5")
    try:
        with h5py.File(path, "r") as f:
            coords = f["coords"][:]
            combined = f["combined"][:] if "combined" in f else f["score"][:]
            size0 = float(f.attrs.get("patch_size_level0", 0)) or grid_step(coords)
            return PatchScores(
                coords,
                f["attention"][:],
                f["inversion"][:],
                combined,
                np.asarray(f.attrs.get("prob", [])),
                int(f.attrs.get("predicted", 0)),
                size0,
                tuple(int(v) for v in f.attrs.get("qupath_offset", (0, 0))),
                str(f.attrs.get("scale", "rank")),
                str(f.attrs.get("target", "")),
                float(f.attrs.get("mpp", 0.0)),
                tuple(int(v) for v in f.attrs.get("slide_size", (0, 0))),
                f["patch_alone"][:] if "patch_alone" in f else None,
                str(f.attrs.get("calibration", "none")),
                [int(v) for v in f.attrs.get("inversion_steps_kept", [])],
            )
    except (OSError, KeyError, ValueError) as exc:
        raise WsiMilError(f"{path}: not a readable score file ({exc}); re-run 'wsi-mil heatmap'") from exc


def grid_step(coords: np.ndarray, default: float = 256.0) -> float:
    """The patches' grid step along x (their size without overlap; `default` if undecidable)."""
    xs = np.unique(coords[:, 0]) if len(coords) else np.zeros(0)
    steps = np.diff(xs)
    return float(steps[steps > 0].min()) if (steps > 0).any() else float(default)
