"""Synthetic feature bags with known key instances (no slide pixels): the MIL models' and the
localisation's test cohorts (`make_feature_cohort`), re-exported by `wsi_mil.synthetic`."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def grid_coords(n: int, patch: int = 256) -> np.ndarray:
    """Level-0 coordinates [n, 2] of n patches laid out row by row on a square grid."""
    side = int(np.ceil(np.sqrt(n)))
    return np.stack([np.arange(n) % side, np.arange(n) // side], 1).astype(np.int64) * patch


def make_feature_cohort(
    out_dir: str | Path,
    n_bags: int = 40,
    n_instances: tuple[int, int] = (60, 120),
    dim: int = 64,
    n_key: tuple[int, int] = (3, 8),
    strength: float = 3.0,
    graded: bool = False,
    random_labels: bool = False,
    n_cases: int | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Feature bags whose positive members hold a few key instances shifted along one direction.

    Writes `<out_dir>/features/<slide>.h5` (features + grid coords) and `<out_dir>/labels.csv`;
    returns each positive bag's boolean key-instance mask (ground truth for localization).
    `graded=True` gives key instances strengths spread over [0.5, 1.5] x `strength`.
    `random_labels=True` shuffles labels after building the bags (a leakage guard: chance AUC).
    """
    import pandas as pd

    from .formats.features import write_features

    out_dir = Path(out_dir)
    feat_dir = out_dir / "features"
    feat_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(dim)
    direction /= np.linalg.norm(direction)
    labels = np.array([i % 2 for i in range(n_bags)])
    keys, rows = {}, []
    n_cases = n_cases or n_bags
    for i, y in enumerate(labels):
        n = int(rng.integers(*n_instances))
        x = rng.standard_normal((n, dim)).astype(np.float32)
        key = np.zeros(n, bool)
        if y:
            k = int(rng.integers(*n_key))
            idx = rng.choice(n, k, replace=False)
            s = strength * (rng.uniform(0.5, 1.5, k) if graded else np.ones(k))
            x[idx] += (s[:, None] * direction).astype(np.float32)
            key[idx] = True
        coords = grid_coords(n)
        name = f"bag_{i:03d}"
        attrs = {"patch_size": 256, "patch_size_level0": 256, "encoder": "synthetic", "encoder_dim": dim}
        write_features(feat_dir / f"{name}.h5", x, coords, attrs)
        keys[name] = key
        rows.append({"slide_id": name, "label": int(y), "case_id": f"case_{i % n_cases:03d}"})
    table = pd.DataFrame(rows)
    if random_labels:
        table["label"] = rng.permutation(table["label"].values)
    table.to_csv(out_dir / "labels.csv", index=False)
    return keys
