"""A run's patch calibration, fitted on out-of-fold slides (localization/patch_calibration.py).

Each fold model scores the slides of the fold it never trained on (`model_evidence`: instance,
attention and inversion evidence towards each calibrated class); the patches of all folds
together fit one map per class. With `annotations` (a folder of `<slide>.xml`, `.geojson` or
masks, as `evaluate-localization` reads them) the annotated slides give patch labels; without,
the negative slides do (the MIL assumption). With annotations the held-out test slides are
scored as `wsi-mil heatmap` scores them and the calibration is checked there: a reliability
diagram and its expected calibration error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..formats.run import RunFolder, load_fold_model
from ..io import write_json
from ..localization.evaluate import find_annotation, patch_tumor_fraction, read_annotation
from ..localization.patch_calibration import PatchCalibration, fit_patch_calibration, reliability
from ..localization.render import plot_reliability
from ..localization.scores import calibration_targets, model_evidence, score_bag

log = logging.getLogger("wsi_mil")
MAX_PATCHES_PER_SLIDE = 4000  # a seeded sample of larger slides' patches enters the fit
POSITIVE_FRACTION = 0.5  # a patch at least this much inside the annotation is of the class


def patch_labels(
    annotations: Path | None, slide_id: str, coords: np.ndarray, size0: float
) -> np.ndarray | None:
    """1 / 0 / -1 (in between: left out) per patch from the slide's annotation; None without one."""
    if annotations is None:
        return None
    path = find_annotation(annotations, slide_id)
    if path is None or path.suffix.lower() not in (".xml", ".geojson", ".json"):
        return None
    frac = patch_tumor_fraction(coords, size0, read_annotation(path))
    return np.where(frac >= POSITIVE_FRACTION, 1, np.where(frac <= 0, 0, -1))


def _bag(loaded: dict | None, path: str):
    from ..formats.features import read_features

    if loaded is not None and path in loaded:
        x, c = loaded[path]
        return x.float(), c
    bag = read_features(path)
    return torch.from_numpy(bag.features).float(), torch.from_numpy(bag.coords)


def _size0(path: str) -> float:
    from ..formats.features import read_feature_attrs

    attrs, _ = read_feature_attrs(path)
    return float(attrs.get("patch_size_level0", attrs.get("patch_size", 256)))


def fit_run_calibration(
    run: RunFolder,
    model_name: str,
    splits: pd.DataFrame,
    classes: list[str],
    inversion: dict,
    device: torch.device,
    loaded: dict | None = None,
    annotations: Path | None = None,
    selection: str = "inner",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Fit, write `<model>/patch_calibration.json` and return a summary for the report."""
    train = splits[splits.split == "train"]
    targets = calibration_targets(classes)
    rng = np.random.default_rng(seed)
    rows = {t: [] for t in targets}  # per target: (inputs, slide positive, patch labels)
    for k in sorted(train.fold.unique()):
        model, _ = load_fold_model(run.fold_dir(model_name, k), device)
        for sid, path, label in train[train.fold == k][["slide_id", "path", "label"]].itertuples(index=False):
            x, c = _bag(loaded, path)
            x, c = x.to(device), c.to(device)
            keep = (
                np.sort(rng.choice(len(x), MAX_PATCHES_PER_SLIDE, replace=False))
                if len(x) > MAX_PATCHES_PER_SLIDE
                else slice(None)
            )
            labels = patch_labels(annotations, sid, c.cpu().numpy(), _size0(path))
            for t in targets:
                inputs = model_evidence(model, x, c, t, **inversion).inputs()[keep]
                if label != t:
                    lab = np.zeros(len(inputs), int)  # another class's slide: every patch is not t
                elif labels is not None:
                    lab = labels[keep]
                else:
                    lab = np.full(len(inputs), -1)  # t's slide without annotation: unknown patches
                rows[t].append((inputs, np.full(len(inputs), label == t), lab, labels is not None))
        if progress:
            progress(f"{model_name} patch calibration: fold {k} scored")
    annotated = annotations is not None and any(r[3] for t in targets for r in rows[t])
    maps, summary = {}, {}
    for t in targets:
        inputs = np.concatenate([r[0] for r in rows[t]])
        positive = np.concatenate([r[1] for r in rows[t]])
        labels = np.concatenate([r[2] for r in rows[t]]) if annotated else None
        data = {
            "slides": int(len(train)),
            "annotated_slides": int(sum(r[3] for r in rows[t])),
            "selection": selection,
            "selected_on": "an inner split of each fold's training slides"
            if selection == "inner"
            else "each scored fold itself (the fold models' epochs were chosen on the slides the "
            "calibration is fitted on: optimistic)",
        }
        if labels is not None and not (labels == 1).any():
            log.warning(
                "%s: no annotated patch of class %s; calibrating from negative slides", run.root, classes[t]
            )
            labels = None
        cal = fit_patch_calibration(classes[t], inputs, positive, labels, data)
        maps[classes[t]] = cal.to_dict()
        summary[classes[t]] = {"mode": cal.mode, "prior": cal.prior, **cal.data}
    write_json(
        run.model_dir(model_name) / "patch_calibration.json", {"inversion": inversion, "classes": maps}
    )
    return summary


def test_reliability(
    run: RunFolder,
    model_name: str,
    splits: pd.DataFrame,
    classes: list[str],
    calibrations: dict[str, PatchCalibration],
    inversion: dict,
    device: torch.device,
    annotations: Path,
    loaded: dict | None = None,
) -> dict | None:
    """Reliability of the combined and instance layers on the annotated held-out test slides
    (and the test slides of other classes, all negative), scored as `wsi-mil heatmap` does;
    writes `<model>/patch_reliability.png`. None when no test slide can be labelled."""
    test = splits[splits.split == "test"]
    if test.empty:
        return None
    models = [load_fold_model(d, device)[0] for d in run.fold_dirs(model_name)]
    out = {}
    for name, cal in calibrations.items():
        t = classes.index(name)
        probs = {"combined": [], "patch_alone": []}
        truth = []
        for sid, path, label in test[["slide_id", "path", "label"]].itertuples(index=False):
            x, c = _bag(loaded, path)
            labels = patch_labels(annotations, sid, c.numpy(), _size0(path))
            if label != t:
                labels = np.zeros(len(x), int)  # another class's slide: every patch is not t
            elif labels is None:
                continue  # a slide of the class without annotation: its patches are unknown
            s = score_bag(models, x.to(device), c.to(device), t, classes, cal, **inversion)
            known = labels >= 0
            probs["combined"].append(s.combined[known])
            probs["patch_alone"].append(s.patch_alone[known])
            truth.append(labels[known] == 1)
        if not truth or not np.concatenate(truth).any():
            continue
        y = np.concatenate(truth)
        out[name] = {layer: reliability(np.concatenate(v), y) for layer, v in probs.items()}
    if out:
        title = f"{model_name}: patch calibration on held-out test slides"
        plot_reliability(out, run.model_dir(model_name) / "patch_reliability.png", title)
    return out or None
