"""k-fold cross-validation with a held-out test set and a majority-vote ensemble.

The protocol: a held-out test split (labels' `split` column, else a stratified fraction drawn
by case), k stratified folds grouped by case over the rest. Fold k is only scored: its model
trains on 75% of the other folds, and the other 25% (an inner split, stratified and grouped by
case) chooses the best epoch (validation AUC) and the Youden threshold (`selection="inner"`,
the default). Fold metrics and the calibration fitted on them are therefore selection-free, as
in the published MIL protocols; `selection="outer"` chooses on fold k itself (optimistic,
marked so).
Then the fold models' majority vote on the test split, and, where patients (`case_id`) have
several slides, the same metrics per patient (mean slide probability).
Results go into a run folder (formats/run.py). A run records a fingerprint of its inputs; a
re-run resumes finished folds only when the fingerprint matches and refuses otherwise.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..calibration import PlattScaling
from ..config import HeatmapConfig, TrainConfig
from ..device import resolve_device
from ..errors import WsiMilError
from ..formats.run import RunFolder, load_fold_model
from ..io import atomic_path, write_json
from ..localization.patch_calibration import load_calibrations
from ..localization.scores import inversion_settings
from ..models import create_model, model_class
from .calibrate import fit_run_calibration, test_reliability
from .data import (
    BagDataset,
    Cohort,
    load_bags,
    load_labels,
    stratified_group_folds,
    validate_bags,
)
from .fit import predict_probs, train_fold
from .metrics import METRICS, bootstrap_ci, compute_metrics, decide, intervals_supported, majority_vote
from .optim import resolve_recipe
from .probe import fit_probe
from .report import qc_table, save_plots, write_report
from .run_inputs import check_recipes, feature_spec, prepare_run

log = logging.getLogger("wsi_mil")


def ensemble(fold_probs: list[np.ndarray], thresholds: list[float | None]):
    """(mean probability, per-fold votes, majority vote) of fold models' predictions."""
    mean_prob = np.mean(fold_probs, axis=0)
    votes = np.stack([decide(p, t) for p, t in zip(fold_probs, thresholds)])
    return mean_prob, votes, majority_vote(votes, mean_prob)


def datasets(df: pd.DataFrame, cfg: TrainConfig, training: bool, loaded: dict | None = None) -> BagDataset:
    """A fold's bags; with `loaded` (the cohort read once) no file is read again."""
    max_instances = cfg.max_instances if training else None
    return BagDataset(df.path.tolist(), df.label.tolist(), cfg.preload, max_instances, cfg.seed, loaded)


def train_one_fold(
    model_name: str,
    splits: pd.DataFrame,
    classes: list[str],
    cfg: TrainConfig,
    out: Path,
    k: int,
    device: torch.device | str = "cpu",
    progress: Callable[[str], None] | None = None,
    loaded: dict | None = None,
) -> Path:
    """Train fold k of one model and write its folder (skipped when already done)."""
    run = RunFolder(out)
    if run.fold_done(model_name, k):
        return run.fold_dir(model_name, k)
    device = torch.device(device)
    train_df = splits[splits.split == "train"]
    n_folds = train_df.fold.nunique()
    if progress:
        progress(f"{model_name} fold {k} ({k + 1} of {n_folds})")
    tr, va = train_df[train_df.fold != k], train_df[train_df.fold == k]
    inner = inner_split(tr, cfg.selection, cfg.seed * 100 + int(k), cfg.selection_fallback, k)
    fit_df, select_df = (tr[~inner], tr[inner]) if inner is not None else (tr, va)
    train_ds, select_ds = datasets(fit_df, cfg, True, loaded), datasets(select_df, cfg, False, loaded)
    on_epoch = None
    if progress:

        def on_epoch(r):  # one line per epoch only with debug logging; the fold's outcome below
            step = f"C {r['C']:g}" if "C" in r else f"epoch {r['epoch']}"  # the linear probe walks C
            log.debug("%s fold %d %s val AUC %.3f", model_name, k, step, r["val_auc"])

    cls = model_class(model_name)
    slide_level = getattr(cls, "slide_level", False)  # the linear probe
    from_classes = cls.kwargs_for_classes(classes)  # e.g. PSMIL's attention start
    res = (fit_probe if slide_level else train_fold)(
        model_name,
        {**from_classes, **cfg.model_kwargs},
        train_ds,
        select_ds,
        len(classes),
        cfg,
        cfg.seed * 100 + int(k),
        device,
        on_epoch=on_epoch,
        recipe=resolve_recipe(model_name, cfg, n_bags=len(splits)),
    )
    metrics = {**res.val_metrics, "selection": "outer", "selected_on": "outer fold (optimistic)"}
    if inner is None and cfg.selection == "inner":
        metrics["selected_on"] = (
            "outer fold (optimistic): too few cases for an inner split (--selection-fallback)"
        )
    if inner is not None:  # score the outer fold with the model and threshold chosen on the inner one
        model = create_model(model_name, train_ds.in_dim, len(classes), **res.model_kwargs).to(device)
        model.load_state_dict(res.state_dict)
        prob = predict_probs(model, datasets(va, cfg, False, loaded), device)
        metrics = compute_metrics(va.label.values, prob, decide(prob, res.threshold))
        metrics["selection"] = "inner"
        metrics["selected_on"] = f"inner split of {int(inner.sum())} training slides (selection-free)"
    if progress:
        chosen = f"C {res.model_kwargs['C']:g}" if slide_level else f"epoch {res.best_epoch} of {cfg.epochs}"
        progress(
            f"{model_name} fold {k} ({k + 1} of {n_folds}): {chosen} chosen ({metrics['selected_on']}); "
            f"fold AUC {metrics['auc']:.3f}, accuracy {metrics['accuracy']:.3f}"
        )
    ckpt = {
        "model": model_name,
        "kwargs": res.model_kwargs,
        "in_dim": train_ds.in_dim,
        "n_classes": len(classes),
        "classes": classes,
        "state_dict": res.state_dict,
    }
    return run.save_fold(
        model_name,
        k,
        ckpt,
        res.threshold,
        {**metrics, "best_epoch": res.best_epoch},
        pd.DataFrame(res.history),
    )


INNER_PARTS = 4  # the inner split is 1/4 of the training folds


def inner_split(
    train: pd.DataFrame, selection: str, seed: int, fallback: bool = False, fold: int = 0
) -> np.ndarray | None:
    """Boolean mask of the training folds' slides that choose epoch and threshold (1/4,
    stratified by label, grouped by case); None (choose on the outer fold, reported as
    optimistic) for `selection="outer"`. When a class has fewer than 4 cases in the training
    folds (the split would leave a class with no case on one side) that is an error, unless
    `fallback` allows choosing on the outer fold for that fold (marked in its metrics)."""
    if selection != "inner":
        return None
    cases = train.groupby("label_name" if "label_name" in train else "label").case_id.nunique()
    if cases.min() < INNER_PARTS:
        if fallback:
            return None
        raise WsiMilError(
            f"fold {fold}: class {cases.idxmin()} has {int(cases.min())} case(s) in the training folds, "
            f"too few for the inner selection split (needs {INNER_PARTS}); add cases, use fewer --folds, "
            "or pass --selection-fallback to choose on the outer fold there (optimistic, marked in the "
            "report)"
        )
    with warnings.catch_warnings():  # fewer cases than parts: fewer parts, which is fine here
        warnings.simplefilter("ignore")
        part = stratified_group_folds(train.label.values, train.case_id.values, INNER_PARTS, seed)
    return part == 0


def patient_level(case_ids, y, fold_probs: list[np.ndarray], thresholds: list):
    """(patient labels, mean probabilities, majority votes): each fold model's slide
    probabilities averaged per patient, then voted as for slides. None when every patient has
    one slide, or a patient's slides carry different labels."""
    table = pd.DataFrame({"case": np.asarray(case_ids), "y": np.asarray(y)})
    if table.case.nunique() == len(table) or (table.groupby("case").y.nunique() > 1).any():
        return None
    order = table.groupby("case", sort=True).indices
    cases = sorted(order)
    y_p = np.array([table.y.values[order[c][0]] for c in cases])
    probs = [np.stack([p[order[c]].mean(0) for c in cases]) for p in fold_probs]
    mean_prob, _, vote = ensemble(probs, thresholds)
    return y_p, mean_prob, vote


def fold_task(item: tuple[str, int], splits, classes, cfg_json: str, out: str) -> str:
    """One (model, fold) on a cluster worker, with the worker's own thread count."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    cfg = TrainConfig.model_validate_json(cfg_json)
    model_name, k = item
    dev = resolve_device(cfg.device)
    return str(train_one_fold(model_name, splits, classes, cfg, Path(out), k, dev))


def summarise_model(
    model_name: str,
    splits: pd.DataFrame,
    cohort: Cohort,
    cfg: TrainConfig,
    out: Path,
    device: torch.device,
    loaded: dict | None = None,
    inversion: dict | None = None,
    annotations: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Test-set ensemble, metrics, predictions and plots from a model's finished folds, and the
    slide (Platt) and patch calibrations fitted on their out-of-fold slides."""
    run = RunFolder(out)
    model_dir = run.model_dir(model_name)
    train_df = splits[splits.split == "train"]
    test_df = splits[splits.split == "test"]
    test_ds = datasets(test_df, cfg, False, loaded) if len(test_df) else None
    fold_probs, thresholds, fold_val, histories = [], [], [], []
    oof_probs, oof_labels = [], []  # out-of-fold validation predictions, for calibration
    for k in sorted(train_df.fold.unique()):
        model, ckpt = load_fold_model(run.fold_dir(model_name, k), device)
        thresholds.append(ckpt["threshold"])
        val_df = train_df[train_df.fold == k]
        oof_probs.append(predict_probs(model, datasets(val_df, cfg, False, loaded), device))
        oof_labels.append(val_df.label.values)
        fold_val.append(run.read_fold_metrics(model_name, k))
        histories.append(run.read_fold_history(model_name, k))
        if test_ds is not None:
            fold_probs.append(predict_probs(model, test_ds, device))

    def stat(fn, m):
        values = [np.nan if f[m] is None else f[m] for f in fold_val]
        return float(fn(values)) if np.isfinite(values).any() else float("nan")

    fallback = [k for k, f in enumerate(fold_val) if "--selection-fallback" in str(f.get("selected_on"))]
    result = {
        "model": model_name,
        "selection": "inner" if all(f.get("selection") == "inner" for f in fold_val) else "outer",
        "selection_fallback_folds": fallback,
        "folds": fold_val,
        "val_mean": {m: stat(np.nanmean, m) for m in METRICS},
        "val_std": {m: stat(np.nanstd, m) for m in METRICS},
        "val_folds": {m: sum(f[m] is not None and np.isfinite(f[m]) for f in fold_val) for m in METRICS},
    }
    y = mean_prob = None
    if test_ds is not None:
        y = test_df.label.values
        mean_prob, votes, vote = ensemble(fold_probs, thresholds)
        pred = pd.DataFrame({"slide_id": test_df.slide_id.values, "label": test_df.label_name.values})
        for k, (p, v) in enumerate(zip(fold_probs, votes)):
            for c, name in enumerate(cohort.classes):
                pred[f"fold{k}_p_{name}"] = p[:, c]
            pred[f"fold{k}_vote"] = [cohort.classes[i] for i in v]
        for c, name in enumerate(cohort.classes):
            pred[f"mean_p_{name}"] = mean_prob[:, c]
        pred["ensemble"] = [cohort.classes[i] for i in vote]
        with atomic_path(model_dir / "predictions.csv") as tmp:
            pred.to_csv(tmp, index=False)
        result["test"] = compute_metrics(y, mean_prob, vote)
        supported = intervals_supported(y)  # else too few test slides a class for an interval
        result["test_ci"] = bootstrap_ci(y, mean_prob, vote, cfg.bootstrap, cfg.seed) if supported else None
        patients = patient_level(test_df.case_id.values, y, fold_probs, thresholds)
        if patients is not None:
            y_p, prob_p, vote_p = patients
            result["test_patient"] = {**compute_metrics(y_p, prob_p, vote_p), "patients": len(y_p)}
        elif mixed := int((test_df.groupby("case_id").label.nunique() > 1).sum()):
            result["test_patient_skipped"] = f"{mixed} test patient(s) have slides of different labels"
    calibration = PlattScaling.fit(np.concatenate(oof_probs), np.concatenate(oof_labels))
    fitted_on = {"fitted_on": "out-of-fold predictions of the fold models", "selection": result["selection"]}
    write_json(model_dir / "calibration.json", {**calibration.to_dict(), **fitted_on})
    inversion = inversion or inversion_settings(HeatmapConfig())
    if getattr(model_class(model_name), "slide_level", False):  # no patches to calibrate
        write_json(model_dir / "metrics.json", result)
        save_plots(model_dir, model_name, y, mean_prob, histories, cohort.classes)
        return result
    result["patch_calibration"] = fit_run_calibration(
        run, model_name, splits, cohort.classes, inversion, device, loaded, annotations,
        result["selection"], cfg.seed, progress,
    )  # fmt: skip
    if annotations is not None:
        maps = load_calibrations(run.read_patch_calibration(model_name))[0]
        rel = test_reliability(
            run, model_name, splits, cohort.classes, maps, inversion, device, annotations, loaded
        )
        if rel is not None:
            result["patch_reliability"] = rel
    write_json(model_dir / "metrics.json", result)
    save_plots(model_dir, model_name, y, mean_prob, histories, cohort.classes)
    return result


def run_crossval(
    features_dir: str | Path,
    labels_csv: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    models: list[str],
    allow_missing: bool = False,
    progress: Callable[[str], None] | None = None,
    map_fn=None,
    *,
    overwrite: bool = False,
    annotations: str | Path | None = None,
    inversion: dict | None = None,
) -> list[dict]:
    """The whole protocol for each model on the same splits; returns per-model results.

    With a `map_fn` (cluster.dask_map) every unfinished (model, fold) trains as one task.
    `annotations`: a folder of patch annotations the patch calibration is fitted on (else the
    negative slides); `inversion`: the sparse-inversion settings heatmaps of this run use."""
    if annotations is not None and not Path(annotations).is_dir():
        raise WsiMilError(f"--annotations {annotations}: no such folder of <slide>.xml/.geojson annotations")
    run = RunFolder(out)
    for m in models:
        create_model(m, 8, 2, **cfg.model_kwargs)  # unknown names fail before anything is written
    cohort = load_labels(labels_csv, features_dir, allow_missing)
    paths = cohort.table.path.tolist()
    loaded = load_bags(paths) if cfg.preload else validate_bags(paths)  # bad files stop us here
    created = run.is_empty()
    try:
        extra = (Path(annotations) if annotations is not None else None, inversion)
        return _run(
            run, cohort, cfg, models, features_dir, labels_csv, progress, map_fn, overwrite, loaded, extra
        )
    except BaseException:
        if created and run.root.exists() and not list(run.root.glob("*/fold_*/model.pt")):
            shutil.rmtree(run.root, ignore_errors=True)  # nothing worth keeping: leave no husk
        raise


def _run(
    run, cohort, cfg, models, features_dir, labels_csv, progress, map_fn, overwrite, loaded, extra
) -> list[dict]:
    annotations, inversion = extra
    inversion = inversion or inversion_settings(HeatmapConfig())
    splits = prepare_run(run, cohort, cfg, overwrite)
    recipes = {m: resolve_recipe(m, cfg, n_bags=len(splits)).to_dict() for m in models}
    check_recipes(run, recipes)
    folds = sorted(int(k) for k in splits[splits.split == "train"].fold.unique())
    run.write_config(
        {
            "train": cfg.model_dump(),
            "folds_used": len(folds),  # fewer than train.folds where a class has fewer cases
            "models": models,
            "recipes": recipes,
            "features_dir": str(Path(features_dir).resolve()),
            "labels": str(Path(labels_csv).resolve()),
            "features": feature_spec(cohort),
            "annotations": str(annotations.resolve()) if annotations is not None else None,
            "inversion": inversion,
        }
    )
    run.write_classes(cohort.classes)
    device = resolve_device(cfg.device)
    if map_fn is not None:
        todo = [(m, k) for m in models for k in folds if not run.fold_done(m, k)]
        task = functools.partial(
            fold_task,
            splits=splits,
            classes=cohort.classes,
            cfg_json=cfg.model_dump_json(),
            out=str(run.root),
        )
        for (m, k), result in map_fn(task, todo):
            if isinstance(result, Exception):
                raise WsiMilError(f"{m} fold {k}: failed on the cluster ({type(result).__name__}: {result})")
            if progress:
                progress(f"{m} fold {k} ({k + 1} of {len(folds)}) done on the cluster")
    results = []
    for m in models:
        for k in folds:
            train_one_fold(m, splits, cohort.classes, cfg, run.root, k, device, progress, loaded)
        results.append(
            summarise_model(
                m, splits, cohort, cfg, run.root, device, loaded, inversion, annotations, progress
            )
        )
    write_report(run.root, results, splits, cfg, qc_table(cohort.table))
    return results
