"""Training cost at Camelyon16 scale and test AUC per model on two synthetic cohorts.

Part 1: 270 bags of 8,000 x 1024 features (float16 files, preloaded as float16): seconds per
training epoch and the share spent loading bags, for every model (`--full` times whole epochs
for all models; by default ABMIL and PSMIL run whole epochs and the others are timed on 27 bags
and scaled to 270).
Part 2: test AUC (3-fold CV + 25% held-out test, majority vote) on the tests' key-instance
cohort and on a harder one (fewer, weaker key instances).
Usage: python bench/bench_crossval.py [--skip-scale] [--skip-auc]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import CACHE  # noqa: E402

from wsi_mil.config import TrainConfig  # noqa: E402
from wsi_mil.models import create_model, list_models  # noqa: E402
from wsi_mil.synthetic import make_feature_cohort  # noqa: E402
from wsi_mil.training.crossval import run_crossval  # noqa: E402
from wsi_mil.training.data import BagDataset  # noqa: E402


def camelyon_scale_bags(n_bags=270, n=8000, dim=1024):
    d = CACHE / "c16_scale"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n_bags):
        p = d / f"bag_{i:03d}.h5"
        if p.exists():
            continue
        with h5py.File(p, "w") as f:
            f.create_dataset(
                "features",
                data=rng.standard_normal((n, dim), np.float32).astype(np.float16),
                chunks=(1024, dim),
            )
            f.create_dataset("coords", data=np.stack([np.arange(n) % 90, np.arange(n) // 90], 1) * 256)
    return sorted(d.glob("*.h5"))


def epoch_seconds(name, ds, n_bags):
    torch.manual_seed(0)
    model = create_model(name, 1024, 2).train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, weight_decay=1e-4)
    load = total = 0.0
    t_start = time.perf_counter()
    for i in range(n_bags):
        t0 = time.perf_counter()
        x, c, y = ds[i % len(ds)]
        load += time.perf_counter() - t0
        out = model(x, c)
        loss = model.loss(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.on_train_step(out, y)
    total = time.perf_counter() - t_start
    return total, load


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--skip-auc", action="store_true")
    ap.add_argument("--full", action="store_true")
    args = ap.parse_args()
    if not args.skip_scale:
        paths = camelyon_scale_bags()
        labels = [i % 2 for i in range(len(paths))]
        t0 = time.perf_counter()
        ds = BagDataset([str(p) for p in paths], labels, preload=True)
        print(f"preload 270 x 8000 x 1024 as float16: {time.perf_counter() - t0:.1f} s")
        lazy = BagDataset([str(p) for p in paths], labels, preload=False)
        print(f"{'model':10s} {'s/epoch':>9s} {'load share':>11s}  (270 bags; * = scaled from 27)")
        for name in list_models():
            whole = args.full or name in ("abmil", "psmil")
            n = 270 if whole else 27
            total, load = epoch_seconds(name, ds, n)
            scale = 270 / n
            print(f"{name:10s} {total * scale:9.1f} {load / total:10.1%}{'' if whole else ' *'}", flush=True)
        total, load = epoch_seconds("abmil", lazy, 54)
        print(f"abmil, lazy h5 reads (no preload): {total * 5:.1f} s/epoch, load share {load / total:.1%}")
    if not args.skip_auc:
        tmp = Path(tempfile.mkdtemp())
        cohorts = {
            "tests' cohort (3-8 keys, strength 4)": dict(strength=4.0),
            "harder (1-3 keys, strength 2.5)": dict(strength=2.5, n_key=(1, 3)),
        }
        cfg = TrainConfig(folds=3, test_frac=0.25, epochs=30, patience=10, lr=5e-4, bootstrap=200)
        print(f"\n{'model':10s} " + " ".join(f"{k:>38s}" for k in cohorts))
        results = {}
        for key, kw in cohorts.items():
            d = tmp / key.split()[0]
            make_feature_cohort(d, n_bags=64, n_cases=40, seed=1, **kw)
            for r in run_crossval(d / "features", d / "labels.csv", d / "run", cfg, list_models()):
                results.setdefault(r["model"], []).append(r["test"]["auc"])
        for name, aucs in results.items():
            print(f"{name:10s} " + " ".join(f"{a:38.3f}" for a in aucs))


if __name__ == "__main__":
    main()
