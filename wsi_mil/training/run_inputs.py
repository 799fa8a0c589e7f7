"""A run folder's inputs: the fingerprint a re-run must match to resume, and starting or
resuming a run (its splits)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pandas as pd

from .. import __version__
from ..config import TrainConfig
from ..errors import WsiMilError
from ..formats.features import read_feature_attrs
from ..formats.run import RunFolder
from .data import Cohort, make_splits


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def input_fingerprint(cohort: Cohort, cfg: TrainConfig) -> dict:
    """What a run's results depend on: labels, feature files (names, sizes, encoder), config."""
    table = cohort.table
    cols = [c for c in ("slide_id", "label_name", "case_id", "split") if c in table.columns]
    labels = table[cols].sort_values("slide_id").astype(str).values.tolist()
    files, weights = [], set()
    for sid, path in sorted(zip(table.slide_id, table.path)):
        attrs, shape = read_feature_attrs(path)
        files.append([sid, os.path.getsize(path), attrs.get("encoder"), shape[-1]])
        if attrs.get("encoder_weights_sha256"):  # files of older versions: unknown
            weights.add(str(attrs["encoder_weights_sha256"]))
    config = cfg.model_dump(exclude={"device"})
    return {
        "labels": _digest(labels),
        "features": _digest(files),
        "encoder": files[0][2] if files else None,
        "encoder_weights_sha256": sorted(weights) or None,
        "config": config,
        "wsi_mil_version": __version__,
    }


def _fingerprint_differences(old: dict, new: dict) -> list[str]:
    diffs = [name for name in ("labels", "features", "wsi_mil_version") if old.get(name) != new.get(name)]
    # the checkpoint the features came from; a run (or feature files) from before it was
    # recorded compares as unchanged
    was_sha, now_sha = old.get("encoder_weights_sha256"), new.get("encoder_weights_sha256")
    if was_sha and now_sha and was_sha != now_sha:
        was_sha, now_sha = ("+".join(s[:12] for s in shas) for shas in (was_sha, now_sha))
        diffs.append(f"encoder weights (sha256 {was_sha} -> {now_sha})")
    # a setting added after the run was made, at its default, changes nothing the run did
    defaults = TrainConfig().model_dump(exclude={"device"})
    was = {**{k: v for k, v in defaults.items() if k not in old.get("config", {})}, **old.get("config", {})}
    changed = [
        f"{k} {was.get(k)!r} -> {new['config'].get(k)!r}"
        for k in sorted(set(was) | set(new["config"]))
        if was.get(k) != new["config"].get(k)
    ]
    if changed:
        diffs.append("config (" + ", ".join(changed[:4]) + ")")
    return diffs


def prepare_run(run: RunFolder, cohort: Cohort, cfg: TrainConfig, overwrite: bool) -> pd.DataFrame:
    """Start a new run, or resume one whose fingerprint matches; return its splits."""
    fingerprint = input_fingerprint(cohort, cfg)
    if overwrite and not run.is_empty():
        if not (run.is_run() or run.splits_path.exists()):
            raise WsiMilError(f"{run.root}: not a run folder; refusing to delete it for --overwrite")
        shutil.rmtree(run.root)
    if run.splits_path.exists():
        old = run.read_fingerprint()
        if old is None:  # a run from wsi-mil 0.1: compare what it recorded
            conf = run.read_config() if run.config_path.exists() else {}
            old = {**fingerprint, "config": conf.get("train", {})}
            old["config"].pop("device", None)
            old_labels = run.read_splits().set_index("slide_id").label_name.astype(str)
            now = cohort.table.set_index("slide_id").label_name.astype(str)
            if not old_labels.sort_index().equals(now.sort_index()):
                old["labels"] = "changed"
        diffs = _fingerprint_differences(old, fingerprint)
        if diffs:
            raise WsiMilError(
                f"{run.root}: this run was trained on other inputs ({'; '.join(diffs)}); pass "
                "--overwrite to retrain from scratch, or choose a new --out"
            )
        splits = run.read_splits()
        splits = splits.drop(columns=["path"], errors="ignore").merge(
            cohort.table[["slide_id", "path"]], on="slide_id"
        )
    else:
        splits = make_splits(cohort, cfg.folds, cfg.test_frac, cfg.seed)
        run.write_splits(splits)
    run.write_fingerprint(fingerprint)
    return splits


def check_recipes(run: RunFolder, recipes: dict[str, dict]) -> None:
    """Refuse to resume a model whose finished folds were trained with another recipe than it
    would get now (a wsi-mil update changed its recipe): its folds would mix two trainings."""
    old = (run.read_config().get("recipes") or {}) if run.config_path.exists() else {}
    changed = []
    for model, now in recipes.items():
        was = old.get(model)
        if was is None or was == now or not run.fold_dirs(model):  # no recipe recorded: unknown
            continue
        fields = [f"{k} {was.get(k)!r} -> {now[k]!r}" for k in now if k != "source" and was.get(k) != now[k]]
        changed.append(f"{model}: {', '.join(fields[:3]) or 'source'}")
    if changed:
        raise WsiMilError(
            f"{run.root}: finished folds were trained with another recipe than this wsi-mil gives "
            f"({'; '.join(changed)}); pass --overwrite to retrain from scratch, or choose a new --out"
        )


def feature_spec(cohort: Cohort) -> dict:
    """Encoder and grid of the run's features: what predict and heatmap check new slides against."""
    attrs, shape = read_feature_attrs(cohort.table.path.iloc[0])
    keep = (
        "encoder", "encoder_weights", "encoder_weights_sha256", "target_mpp", "patch_size", "overlap",
        "min_tissue",
    )  # fmt: skip
    return {**{k: attrs[k] for k in keep if k in attrs}, "encoder_dim": int(shape[-1])}
