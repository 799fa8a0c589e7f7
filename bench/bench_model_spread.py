"""Spread of the key-instance toy-problem fit (tests/test_models.py) over seeds and thread counts.

Each model is trained as in the test (15 epochs, Adam 1e-3) with data seed 0 and model seeds
0..N-1, with 1 and 2 torch threads; prints the training-bag AUC min/mean per setting.
Run: python bench/bench_model_spread.py --runs 20
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_models import D, fit_toy  # noqa: E402

from wsi_mil.models import create_model, list_models  # noqa: E402


def fit(name: str, seed: int) -> float:
    torch.manual_seed(seed)
    return fit_toy(create_model(name, D, 2))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--models", default=",".join(list_models()))
    args = ap.parse_args()
    for name in args.models.split(","):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            accs = [fit(name, s) for s in range(args.runs)]
            print(
                f"{name:9s} threads {threads}: min {min(accs):.3f} mean {np.mean(accs):.3f} "
                f"runs below 0.98: {sum(a < 0.98 for a in accs)}/{len(accs)}",
                flush=True,
            )
