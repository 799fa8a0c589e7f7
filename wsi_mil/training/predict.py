"""Applying a trained run's fold ensembles to new slides' features (`wsi-mil predict`), and
per-instance key-instance scores for any bags (`wsi-mil predict --scores`)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..config import HeatmapConfig
from ..device import resolve_device
from ..errors import WsiMilError
from ..formats.features import check_compatible, check_grid, feature_files, read_feature_attrs, read_features
from ..formats.run import RunFolder, load_ensemble, load_fold_model
from ..formats.scores import write_scores
from ..io import atomic_path
from ..localization.scores import flat_attention_warning, mapped_class, read_calibrations, score_with_config
from .crossval import ensemble
from .data import BagDataset, load_bags, validate_bags
from .fit import predict_probs

log = logging.getLogger("wsi_mil")


def _checked_bags(run_folder: RunFolder, features_dir: Path, keep: bool = True) -> tuple[list[Path], dict]:
    """The folder's feature files, each read once, validated and checked against the run;
    with `keep` the bags are returned (float16, keyed by path), else only validated."""
    files = feature_files(features_dir)
    paths = [str(p) for p in files]  # every file validated before anything is written
    loaded = load_bags(paths) if keep else (validate_bags(paths) or {})
    spec = run_folder.feature_spec()
    if spec.get("encoder_dim"):
        for p in files:
            attrs, shape = read_feature_attrs(p)
            source = f"run {run_folder.root}"
            check_compatible(
                p, shape[-1], attrs.get("encoder"), int(spec["encoder_dim"]), spec.get("encoder"), source
            )
            check_grid(p, attrs, spec, source)
    return files, loaded


def check_score_options(
    run: RunFolder | str | Path, model: str | None, target: str | None, scores: bool = True
) -> list[str]:
    """The run's classes, once `model` (None: the first) is one it trained and `target` (None:
    the mapped class) one of its classes, and both only given with `scores` (`predict
    --scores`); one line naming the choices otherwise."""
    if not scores and (model or target):
        raise WsiMilError(
            "--model and --target choose what --scores maps: add --scores DIR, or leave them out"
        )
    run = run if isinstance(run, RunFolder) else RunFolder(run)
    classes = run.require().read_classes()
    if target is not None and target not in classes:
        raise WsiMilError(f"--target {target}: not a class of this run ({', '.join(classes)})")
    if scores and target is None and len(classes) == 2:
        mapped_class(classes)  # two classes neither of which reads as the negative: ask for --target now
    trained = run.trained_models()
    if model is not None and model not in trained:
        raise WsiMilError(
            f"--model {model}: not a model this run trained ({', '.join(trained) or 'none yet'})"
        )
    return classes


def score_bags(
    run: str | Path,
    features_dir: str | Path,
    out_dir: str | Path,
    model: str | None = None,
    target: str | None = None,
    cfg: HeatmapConfig | None = None,
    device: str = "auto",
) -> pd.DataFrame:
    """Every layer of every instance of every bag in `features_dir` (combined and instance
    probabilities, attention and inversion ranks), computed as `wsi-mil heatmap` does (the
    model's fold ensemble, patch calibration, mapped class; `score_with_config`). Writes
    `<out_dir>/<bag>_scores.csv` (instance, x, y and the layers) per bag and returns one row
    per bag (probabilities, mapped class, top instance, inversion steps kept per fold)."""
    run_folder = RunFolder(run).require()
    files, _ = _checked_bags(run_folder, Path(features_dir), keep=False)  # scored one by one below
    classes = check_score_options(run_folder, model, target)
    dev = resolve_device(device)
    name, models, _ = load_ensemble(run_folder, model, "all", dev)
    calibrations, inversion = read_calibrations(run_folder, name, cfg or HeatmapConfig())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for p in files:
        bag = read_features(p)  # as stored, as `heatmap` reads it
        x = torch.from_numpy(bag.features).float().to(dev)
        c = torch.from_numpy(bag.coords).to(dev)
        scores = score_with_config(models, x, c, classes, calibrations, inversion, target)
        scores.target = classes[scores.predicted]
        write_scores(out_dir / f"{p.stem}_scores.csv", scores)
        top = int(np.argmax(scores.combined))
        rows.append(
            {
                "slide_id": p.stem,
                "model": name,
                **{f"p_{k}": float(v) for k, v in zip(classes, scores.prob)},
                "scored_class": scores.target,
                "instances": len(scores.combined),
                "top_instance": top,
                "top_combined": float(scores.combined[top]),
                "inversion_steps_kept": ",".join(str(v) for v in scores.steps_kept),
                "flat_attention_models": scores.flat_attention,
                "flat_inversion_models": scores.flat_inversion,
            }
        )
    table = pd.DataFrame(rows)
    flat = table.flat_attention_models  # the folder holds at least one bag (_checked_bags)
    hit = int(flat.gt(0).sum())
    where = f"{out_dir} ({name}), {hit} of {len(table)} bags (bags.csv: flat_attention_models)"
    if warning := flat_attention_warning(int(flat.max()), len(models), where):
        log.warning(warning)
    with atomic_path(out_dir / "bags.csv") as tmp:
        table.to_csv(tmp, index=False)
    return table


def predict_run(
    run: str | Path, features_dir: str | Path, out_csv: str | Path | None = None, device: str = "auto"
) -> pd.DataFrame:
    """Apply every model's fold ensemble in `run` to all feature files in `features_dir`.

    Every file is validated and checked against the run's encoder and dimension first, so a
    bad file stops the command before anything is written."""
    run_folder = RunFolder(run).require()
    classes = run_folder.read_classes()
    for model_name in run_folder.read_config().get("models", []) or run_folder.trained_models():
        run_folder.require_finished(model_name)  # every model the run was asked to train
    files, loaded = _checked_bags(run_folder, Path(features_dir))
    paths = [str(p) for p in files]
    dev = resolve_device(device)
    ds = BagDataset(paths, [0] * len(files), preload=True, loaded=loaded)
    rows = pd.DataFrame({"slide_id": [p.stem for p in files]})
    for model_name in run_folder.trained_models():
        probs, thresholds = [], []
        for fold_dir in run_folder.fold_dirs(model_name):
            model, ckpt = load_fold_model(fold_dir, dev)
            probs.append(predict_probs(model, ds, dev))
            thresholds.append(ckpt["threshold"])
        mean_prob, votes, vote = ensemble(probs, thresholds)
        for c, name in enumerate(classes):
            rows[f"{model_name}_p_{name}"] = mean_prob[:, c]
        rows[f"{model_name}_prediction"] = [classes[i] for i in vote]
        rows[f"{model_name}_votes"] = [int((v == e).sum()) for v, e in zip(votes.T, vote)]
    if out_csv:
        with atomic_path(Path(out_csv)) as tmp:
            rows.to_csv(tmp, index=False)
    return rows
