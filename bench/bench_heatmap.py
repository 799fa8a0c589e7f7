"""Inversion cost and instance-level localisation quality.

Part 1: sparse-inversion seconds per slide for N = 10,000 instances (D = 1024), PSMIL and ABMIL,
with the default 50 steps, on this machine (and CUDA when present).
Part 2: instance AUC of attention vs inversion vs combined on synthetic bags with graded key
instances, for PSMIL and ABMIL trained by crossval, and a small grid of inversion settings.
Usage: python bench/bench_heatmap.py
"""

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from wsi_mil.config import TrainConfig
from wsi_mil.localization.inversion import sparse_inversion
from wsi_mil.localization.scores import rank_normalise
from wsi_mil.models import create_model
from wsi_mil.store import read_features
from wsi_mil.synthetic import make_feature_cohort
from wsi_mil.training.crossval import load_fold_model, run_crossval

GRID = [
    dict(steps=50, lr=0.1, lam=0.01),
    dict(steps=50, lr=0.1, lam=0.05),
    dict(steps=50, lr=0.5, lam=0.02),
    dict(steps=100, lr=0.1, lam=0.1),
    dict(steps=50, lr=0.1, lam=0.01, score="change"),
]


def timing():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        for name in ("psmil", "abmil"):
            torch.manual_seed(0)
            model = create_model(name, 1024, 2).to(dev).eval()
            x = torch.randn(10_000, 1024, device=dev)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                sparse_inversion(model, x, None, 1)
                if dev == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            print(
                f"inversion {name:6s} N=10k D=1024 50 steps on {dev}: {statistics.median(times):.2f} s",
                flush=True,
            )


def quality():
    d = Path(tempfile.mkdtemp())
    keys = make_feature_cohort(d, n_bags=48, n_cases=30, seed=2, graded=True, n_key=(4, 12))
    run_crossval(
        d / "features",
        d / "labels.csv",
        d / "run",
        TrainConfig(folds=3, test_frac=0.25, epochs=20, patience=8, lr=5e-4, bootstrap=50),
        ["psmil", "abmil"],
    )
    print(f"\n{'model':6s} {'inversion settings':45s} {'attention':>9s} {'inversion':>9s} {'combined':>9s}")
    for name in ("psmil", "abmil"):
        models = [load_fold_model(p)[0] for p in sorted((d / "run" / name).glob("fold_*"))]
        for params in GRID:
            a_auc, i_auc, c_auc = [], [], []
            for bag, key in keys.items():
                if not key.any():
                    continue
                b = read_features(d / "features" / f"{bag}.h5")
                x, c = torch.from_numpy(b.features), torch.from_numpy(b.coords)
                att = np.mean([rank_normalise(m(x, c).instance_scores.detach().numpy()) for m in models], 0)
                inv = np.mean(
                    [rank_normalise(sparse_inversion(m, x, c, 1, **params).scores.numpy()) for m in models], 0
                )
                a_auc.append(roc_auc_score(key, att))
                i_auc.append(roc_auc_score(key, inv))
                c_auc.append(roc_auc_score(key, 0.5 * rank_normalise(att) + 0.5 * rank_normalise(inv)))
            print(
                f"{name:6s} {str(params):45s} {np.mean(a_auc):9.3f} {np.mean(i_auc):9.3f} "
                f"{np.mean(c_auc):9.3f}",
                flush=True,
            )


if __name__ == "__main__":
    timing()
    quality()
