"""Per-patch scores for a slide: model attention, sparse-inversion score, and their combination.

Each score is rank-normalised within the slide (to (0, 1]) so that scores from different
models, folds and scales can be averaged; with a fold ensemble, each fold's ranks are averaged.
The combined score is (1 - w) * attention + w * inversion of those averaged ranks, not ranked
again: patches the folds agree on stay near 1 (or 0), so a slide where the folds disagree does
not light up as brightly as one where they agree, and scores stay comparable across slides.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata

from ..models import MILModel
from .inversion import DEFAULTS, sparse_inversion

SCORE_NAMES = ("attention", "inversion", "score")


def rank_normalise(x: np.ndarray) -> np.ndarray:
    x = np.nan_to_num(np.asarray(x, np.float64), nan=0.0)
    if len(x) == 0:
        return x
    return rankdata(x, method="average") / len(x)


@dataclass
class PatchScores:
    coords: np.ndarray  # [N, 2] level-0 top-left
    attention: np.ndarray
    inversion: np.ndarray
    score: np.ndarray  # combined
    prob: np.ndarray  # [C] slide-level probability (mean over models)
    predicted: int
    size0: float = 256.0  # patch side in level-0 pixels

    def get(self, name: str) -> np.ndarray:
        return {
            "attention": self.attention,
            "inversion": self.inversion,
            "score": self.score,
            "combined": self.score,
        }[name]

    def save(self, path: str | Path) -> None:
        """HDF5 (`.h5`) or CSV, atomically."""
        from ..store import atomic_path

        path = Path(path)
        with atomic_path(path) as tmp:
            if path.suffix == ".csv":
                import pandas as pd

                pd.DataFrame(
                    {
                        "x": self.coords[:, 0],
                        "y": self.coords[:, 1],
                        "attention": self.attention,
                        "inversion": self.inversion,
                        "score": self.score,
                    }
                ).to_csv(tmp, index=False)
            else:
                import h5py

                with h5py.File(tmp, "w") as f:
                    f.create_dataset("coords", data=self.coords)
                    for name in SCORE_NAMES:
                        f.create_dataset(name, data=self.get(name).astype(np.float32))
                    f.attrs["prob"] = self.prob
                    f.attrs["predicted"] = self.predicted
                    f.attrs["patch_size_level0"] = self.size0


def score_bag(
    models: list[MILModel],
    features: torch.Tensor,
    coords: torch.Tensor,
    inversion_weight: float = 0.5,
    target: int | None = None,
    **inversion_kw,
) -> PatchScores:
    """Attention + inversion scores averaged over `models` (e.g. the folds of a run)."""
    kw = {**DEFAULTS, **inversion_kw}
    with torch.no_grad():
        outputs = [m.eval()(features, coords) for m in models]
    prob = np.mean([torch.softmax(o.logits, -1).cpu().numpy() for o in outputs], axis=0)
    predicted = int(prob.argmax()) if target is None else target
    att = [rank_normalise(o.instance_scores.cpu().numpy()) for o in outputs]
    inv = [
        rank_normalise(sparse_inversion(m, features, coords, predicted, **kw).scores.cpu().numpy())
        for m in models
    ]
    # fold means of within-slide ranks; not ranked again, so patches the folds agree on stay
    # near 0 or 1 and the scores stay comparable across slides (pooled AUC, FROC)
    attention, inversion = np.mean(att, 0), np.mean(inv, 0)
    combined = (1 - inversion_weight) * attention + inversion_weight * inversion
    return PatchScores(coords.cpu().numpy().astype(np.int64), attention, inversion, combined, prob, predicted)
