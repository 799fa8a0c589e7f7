"""TransMIL's attention read-outs on instance-labelled bags: which reading of "where the model
looked" ranks the key instances (docs/methods.md, TransMIL).

Three read-outs of the same fold models (the model's own `instance_scores` is the rollout):
- second: the class token's exact softmax attention row in the second layer (wsi-mil's
  read-out until 2026-12-03);
- first: the same row in the first layer, where the tokens are still the instances;
- rollout: the second row carried back through the first layer, (A2 + I) / 2 (A1 + I) / 2
  (Abnar & Zuidema, ACL 2020), as `TransMIL.attention_rollout` computes it.
Key AUC per positive test bag, the fold models' within-bag ranks averaged (as the heatmap's
attention layer), mean over the bags. Cohorts as bench_mil_recipes.py (3 folds + 25% test, 50
epochs, patience 10, the model's recipe); `--toy` the test suite's Gaussian toy instead
(tests/test_models.py `fit_toy`, seeds as given).

Usage: python bench/bench_transmil_attention.py --cohorts digits --seeds 1,2,7,8,9 [--toy]
"""

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from bench_mil_recipes import build_cohort
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from wsi_mil.config import TrainConfig
from wsi_mil.formats.features import read_features
from wsi_mil.formats.run import RunFolder, load_fold_model
from wsi_mil.training.crossval import run_crossval

READOUTS = ("second", "first", "rollout")


@torch.no_grad()
def readouts(model, x: torch.Tensor) -> dict[str, np.ndarray]:
    """The three read-outs of one TransMIL on one bag (padding copies credited to their source)."""
    model.eval()
    n = len(x)
    side = math.ceil(math.sqrt(n))
    h = model.fc1(x).unsqueeze(0)
    h = torch.cat([model.cls_token, h, h[:, : side * side - n]], dim=1)

    def class_row(layer, z):
        q, k = layer.attn.qk(layer.norm(z))
        row = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2), dim=-1)[0, :, 0].mean(0)
        s = row[1 : n + 1].clone()
        s[: len(row) - 1 - n] += row[n + 1 :]
        return s.numpy()

    return {
        "second": class_row(model.layer2, model.pos(model.layer1(h), side)),
        "first": class_row(model.layer1, h),
        "rollout": model(x).instance_scores.numpy(),
    }


def key_aucs(models, bags) -> dict[str, float]:
    """Mean per-bag key AUC of each read-out over (features, key mask) bags."""
    aucs = {r: [] for r in READOUTS}
    for x, key in bags:
        if not key.any() or key.all():
            continue
        per = [readouts(m, x) for m in models]
        for r in READOUTS:
            aucs[r].append(roc_auc_score(key, np.mean([rankdata(p[r]) for p in per], 0)))
    return {r: float(np.mean(v)) for r, v in aucs.items()}


def cohort_row(cohort: str, seed: int, root: Path) -> dict[str, float]:
    d = root / f"{cohort}_{seed}"
    d.mkdir()
    build_cohort(d, cohort, seed, 0)
    keys = dict(np.load(d / "keys.npz"))
    cfg = TrainConfig(folds=3, test_frac=0.25, epochs=50, patience=10, bootstrap=50)
    run_crossval(d / "features", d / "labels.csv", d / "run", cfg, ["transmil"])
    sp = RunFolder(d / "run").read_splits()
    test = sp[(sp.split == "test") & (sp.label == 1)].slide_id.tolist()
    models = [load_fold_model(p)[0] for p in sorted((d / "run" / "transmil").glob("fold_*"))]
    feats = {b: torch.from_numpy(read_features(d / "features" / f"{b}.h5").features).float() for b in test}
    bags = [(feats[b], keys[b]) for b in test]
    return key_aucs(models, bags)


def toy_row(seed: int) -> dict[str, float]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_models import D, fit_toy, toy_bags

    from wsi_mil.models import create_model

    torch.manual_seed(seed)
    bags = toy_bags(seed=seed)
    model = create_model("transmil", D, 2)
    fit_toy(model, bags=bags)
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(D, generator=g)
    direction /= direction.norm()
    return key_aucs([model], [(x, ((x @ direction) > 2).numpy()) for x, _, y in bags if int(y)])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cohorts", default="digits")
    ap.add_argument("--seeds", default="1,2,7,8,9")
    ap.add_argument("--toy", action="store_true", help="the test suite's toy instead of the cohorts")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    root = Path(tempfile.mkdtemp())
    rows = [("toy", s, toy_row(s)) for s in seeds] if args.toy else [
        (c, s, cohort_row(c, s, root)) for c in args.cohorts.split(",") for s in seeds
    ]  # fmt: skip
    print("| cohort | seed | " + " | ".join(READOUTS) + " |\n|---|---|" + "---|" * len(READOUTS))
    for c, s, r in rows:
        print(f"| {c} | {s} | " + " | ".join(f"{r[k]:.3f}" for k in READOUTS) + " |", flush=True)
    print("| mean | | " + " | ".join(f"{np.mean([r[k] for *_, r in rows]):.3f}" for k in READOUTS) + " |")


if __name__ == "__main__":
    main()
