"""k-fold cross-validation with a held-out test set and a majority-vote ensemble.

Run directory (DESIGN section 3):
  config.yaml, classes.json, splits.csv
  <model>/fold_<k>/model.pt, threshold.json, val_metrics.json, history.csv
  <model>/predictions.csv, metrics.json, roc.png, training_curves.png
  report.md (one comparison table over all models run on these splits)
Finished folds are skipped on re-run, so a killed run resumes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from ..config import TrainConfig
from ..errors import WsiMilError
from ..models import create_model
from ..store import atomic_path
from .data import BagDataset, Cohort, load_labels, make_splits
from .fit import predict_probs, train_fold
from .metrics import METRICS, bootstrap_ci, compute_metrics, decide, majority_vote

log = logging.getLogger("wsi_mil")


def _write_json(path: Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))


def _device(name: str) -> torch.device:
    from ..features.extract import resolve_device

    return resolve_device(name)


def load_fold_model(fold_dir: Path, device: torch.device | str = "cpu"):
    ckpt = torch.load(fold_dir / "model.pt", map_location=device, weights_only=False)
    model = create_model(ckpt["model"], ckpt["in_dim"], ckpt["n_classes"], **ckpt["kwargs"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), ckpt


def _fold_done(fold_dir: Path) -> bool:
    return (fold_dir / "model.pt").exists() and (fold_dir / "threshold.json").exists()


def _ensemble(fold_probs: list[np.ndarray], thresholds: list[float | None]):
    mean_prob = np.mean(fold_probs, axis=0)
    votes = np.stack([decide(p, t) for p, t in zip(fold_probs, thresholds)])
    return mean_prob, votes, majority_vote(votes, mean_prob)


def _plots(
    model_dir: Path,
    y: np.ndarray | None,
    mean_prob: np.ndarray | None,
    histories: list[pd.DataFrame],
    classes: list[str],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for k, h in enumerate(histories):
        axes[0].plot(h.epoch, h.train_loss, label=f"fold {k} train")
        axes[0].plot(h.epoch, h.val_loss, "--", label=f"fold {k} val")
        axes[1].plot(h.epoch, h.val_auc, label=f"fold {k}")
    axes[0].set(xlabel="epoch", ylabel="loss", title="loss")
    axes[1].set(xlabel="epoch", ylabel="AUC", title="validation AUC")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    with atomic_path(model_dir / "training_curves.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    if y is None or len(np.unique(y)) < 2:
        return
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for c in range(mean_prob.shape[1]) if mean_prob.shape[1] > 2 else [1]:
        fpr, tpr, _ = roc_curve(y == c, mean_prob[:, c])
        ax.plot(fpr, tpr, label=classes[c])
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="test ROC (ensemble)")
    ax.legend()
    fig.tight_layout()
    with atomic_path(model_dir / "roc.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _datasets(df: pd.DataFrame, cfg: TrainConfig, training: bool) -> BagDataset:
    return BagDataset(
        df.path.tolist(), df.label.tolist(), cfg.preload, cfg.max_instances if training else None, cfg.seed
    )


def train_one_fold(
    model_name: str,
    splits: pd.DataFrame,
    classes: list[str],
    cfg: TrainConfig,
    out: Path,
    k: int,
    device: torch.device | str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Train fold k of one model and write its folder (skipped when already done)."""
    device = torch.device(device)
    fold_dir = Path(out) / model_name / f"fold_{k}"
    if _fold_done(fold_dir):
        return fold_dir
    train_df = splits[splits.split == "train"]
    n_folds = train_df.fold.nunique()
    if progress:
        progress(f"{model_name} fold {k + 1}/{n_folds}")
    tr, va = train_df[train_df.fold != k], train_df[train_df.fold == k]
    train_ds, val_ds = _datasets(tr, cfg, True), _datasets(va, cfg, False)
    res = train_fold(
        model_name,
        cfg.model_kwargs,
        train_ds,
        val_ds,
        len(classes),
        cfg,
        cfg.seed * 100 + int(k),
        device,
        on_epoch=(
            lambda r: progress(f"{model_name} fold {k + 1} epoch {r['epoch']} val AUC {r['val_auc']:.3f}")
        )
        if progress
        else None,
    )
    fold_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(res.history).to_csv(fold_dir / "history.csv", index=False)
    _write_json(fold_dir / "val_metrics.json", {**res.val_metrics, "best_epoch": res.best_epoch})
    ckpt = {
        "model": model_name,
        "kwargs": cfg.model_kwargs,
        "in_dim": train_ds.in_dim,
        "n_classes": len(classes),
        "classes": classes,
        "state_dict": res.state_dict,
        "threshold": res.threshold,
    }
    with atomic_path(fold_dir / "model.pt") as tmp:
        torch.save(ckpt, tmp)
    _write_json(fold_dir / "threshold.json", {"threshold": res.threshold})  # marks the fold done
    return fold_dir


def summarise_model(
    model_name: str, splits: pd.DataFrame, cohort: Cohort, cfg: TrainConfig, out: Path, device: torch.device
) -> dict:
    """Test-set ensemble, metrics, predictions and plots from a model's finished folds."""
    model_dir = out / model_name
    train_df = splits[splits.split == "train"]
    test_df = splits[splits.split == "test"]
    test_ds = _datasets(test_df, cfg, False) if len(test_df) else None
    fold_probs, thresholds, fold_val, histories = [], [], [], []
    for k in sorted(train_df.fold.unique()):
        fold_dir = model_dir / f"fold_{k}"
        model, ckpt = load_fold_model(fold_dir, device)
        thresholds.append(ckpt["threshold"])
        fold_val.append(json.loads((fold_dir / "val_metrics.json").read_text()))
        histories.append(pd.read_csv(fold_dir / "history.csv"))
        if test_ds is not None:
            fold_probs.append(predict_probs(model, test_ds, device))

    result = {
        "model": model_name,
        "folds": fold_val,
        "val_mean": {m: float(np.nanmean([f[m] for f in fold_val])) for m in METRICS},
        "val_std": {m: float(np.nanstd([f[m] for f in fold_val])) for m in METRICS},
    }
    y = mean_prob = None
    if test_ds is not None:
        y = test_df.label.values
        mean_prob, votes, ensemble = _ensemble(fold_probs, thresholds)
        pred = pd.DataFrame({"slide_id": test_df.slide_id.values, "label": test_df.label_name.values})
        for k, (p, v) in enumerate(zip(fold_probs, votes)):
            for c, name in enumerate(cohort.classes):
                pred[f"fold{k}_p_{name}"] = p[:, c]
            pred[f"fold{k}_vote"] = [cohort.classes[i] for i in v]
        for c, name in enumerate(cohort.classes):
            pred[f"mean_p_{name}"] = mean_prob[:, c]
        pred["ensemble"] = [cohort.classes[i] for i in ensemble]
        with atomic_path(model_dir / "predictions.csv") as tmp:
            pred.to_csv(tmp, index=False)
        result["test"] = compute_metrics(y, mean_prob, ensemble)
        result["test_ci"] = bootstrap_ci(y, mean_prob, ensemble, cfg.bootstrap, cfg.seed)
    _write_json(model_dir / "metrics.json", result)
    _plots(model_dir, y, mean_prob, histories, cohort.classes)
    return result


def run_model(
    model_name: str,
    splits: pd.DataFrame,
    cohort: Cohort,
    cfg: TrainConfig,
    out: Path,
    device: torch.device,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """All folds of one model (resuming finished ones), then the test ensemble and metrics."""
    for k in sorted(splits[splits.split == "train"].fold.unique()):
        train_one_fold(model_name, splits, cohort.classes, cfg, out, int(k), device, progress)
    return summarise_model(model_name, splits, cohort, cfg, out, device)


def _fmt(v, ci=None) -> str:
    if v is None or not np.isfinite(v):
        return "n/a"
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{v:.3f}"


def write_report(out: Path, results: list[dict], splits: pd.DataFrame, cfg: TrainConfig) -> str:
    n_test = int((splits.split == "test").sum())
    n_train = int((splits.split == "train").sum())
    lines = [
        "# wsi-mil cross-validation report",
        "",
        f"{n_train} training slides in {splits[splits.split == 'train'].fold.nunique()} "
        f"folds (grouped by case), {n_test} held-out test slides; seed {cfg.seed}.",
        "",
    ]
    header = ["| model | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    if n_test:
        lines += [
            "## Test set: majority vote of the fold models (AUC from mean probability), 95% bootstrap CI",
            "",
            *header,
        ]
        for r in results:
            lines.append(
                f"| {r['model']} | " + " | ".join(_fmt(r["test"][m], r["test_ci"][m]) for m in METRICS) + " |"
            )
        lines.append("")
    lines += [
        "## Validation folds: mean +/- std",
        "",
        "Validation metrics are taken at the epoch chosen on that same fold, so they are "
        "optimistic; the held-out test set is the unbiased estimate.",
        "",
        *header,
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | "
            + " | ".join(f"{r['val_mean'][m]:.3f} +/- {r['val_std'][m]:.3f}" for m in METRICS)
            + " |"
        )
    lines += [
        "",
        "Per model: `<model>/metrics.json`, `predictions.csv`, `roc.png`, "
        "`training_curves.png`; per fold: `model.pt`, `threshold.json`, `history.csv`.",
    ]
    text = "\n".join(lines) + "\n"
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(text)
    return text


def run_crossval(
    features_dir: str | Path,
    labels_csv: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    models: list[str],
    allow_missing: bool = False,
    progress: Callable[[str], None] | None = None,
    client=None,
) -> list[dict]:
    """The whole protocol for each model on the same splits; returns per-model results.

    With a Dask `client`, folds (and models) train in parallel on its workers."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cohort = load_labels(labels_csv, features_dir, allow_missing)
    splits_path = out / "splits.csv"
    if splits_path.exists():  # resuming: keep the splits the finished folds were trained on
        splits = pd.read_csv(splits_path, dtype={"slide_id": str, "case_id": str})
        if set(splits.slide_id) != set(cohort.table.slide_id):
            raise WsiMilError(f"{out}: this run was started with other slides; use a new --out")
        splits = splits.drop(columns=["path"], errors="ignore").merge(
            cohort.table[["slide_id", "path"]], on="slide_id"
        )
    else:
        splits = make_splits(cohort, cfg.folds, cfg.test_frac, cfg.seed)
        with atomic_path(splits_path) as tmp:
            splits.drop(columns=["path"]).to_csv(tmp, index=False)
    with atomic_path(out / "config.yaml") as tmp:
        tmp.write_text(
            yaml.safe_dump(
                {
                    "train": cfg.model_dump(),
                    "models": models,
                    "features_dir": str(Path(features_dir).resolve()),
                    "labels": str(Path(labels_csv).resolve()),
                }
            )
        )
    _write_json(out / "classes.json", cohort.classes)
    for m in models:
        create_model(m, 8, len(cohort.classes), **cfg.model_kwargs)  # fail fast on bad names
    device = _device(cfg.device)
    if client is not None:  # every (model, fold) as one task; the summary is computed here
        from ..cluster import run_folds_on_cluster

        run_folds_on_cluster(client, models, splits, cohort.classes, cfg, out, progress)
    results = [run_model(m, splits, cohort, cfg, out, device, progress) for m in models]
    write_report(out, results, splits, cfg)
    return results


def predict_run(
    run: str | Path, features_dir: str | Path, out_csv: str | Path | None = None, device: str = "auto"
) -> pd.DataFrame:
    """Apply every model's fold ensemble in `run` to all feature files in `features_dir`."""
    run, features_dir = Path(run), Path(features_dir)
    if not (run / "classes.json").exists():
        raise WsiMilError(
            f"{run}: not a crossval run folder (no classes.json); pass the --out folder of 'wsi-mil crossval'"
        )
    classes = json.loads((run / "classes.json").read_text())
    files = sorted(features_dir.glob("*.h5"))
    if not files:
        raise WsiMilError(f"{features_dir}: no .h5 feature files")
    dev = _device(device)
    ds = BagDataset([str(p) for p in files], [0] * len(files), preload=False)
    rows = pd.DataFrame({"slide_id": [p.stem for p in files]})
    for model_dir in sorted(d for d in run.iterdir() if d.is_dir() and list(d.glob("fold_*/model.pt"))):
        probs, thresholds = [], []
        for fold_dir in sorted(model_dir.glob("fold_*")):
            model, ckpt = load_fold_model(fold_dir, dev)
            probs.append(predict_probs(model, ds, dev))
            thresholds.append(ckpt["threshold"])
        mean_prob, votes, ensemble = _ensemble(probs, thresholds)
        for c, name in enumerate(classes):
            rows[f"{model_dir.name}_p_{name}"] = mean_prob[:, c]
        rows[f"{model_dir.name}_prediction"] = [classes[i] for i in ensemble]
        rows[f"{model_dir.name}_votes"] = [int((v == e).sum()) for v, e in zip(votes.T, ensemble)]
    if out_csv:
        with atomic_path(Path(out_csv)) as tmp:
            rows.to_csv(tmp, index=False)
    return rows
