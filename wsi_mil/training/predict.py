"""Applying a trained run's fold ensembles to new slides' features (`wsi-mil predict`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..device import resolve_device
from ..errors import WsiMilError
from ..formats.features import check_compatible, read_feature_attrs
from ..formats.run import RunFolder, load_fold_model
from ..io import atomic_path
from .crossval import ensemble
from .data import BagDataset, load_bags
from .fit import predict_probs


def predict_run(
    run: str | Path, features_dir: str | Path, out_csv: str | Path | None = None, device: str = "auto"
) -> pd.DataFrame:
    """Apply every model's fold ensemble in `run` to all feature files in `features_dir`.

    Every file is validated and checked against the run's encoder and dimension first, so a
    bad file stops the command before anything is written."""
    run_folder = RunFolder(run).require()
    features_dir = Path(features_dir)
    classes = run_folder.read_classes()
    files = sorted(features_dir.glob("*.h5"))
    if not files:
        raise WsiMilError(f"{features_dir}: no .h5 feature files")
    paths = [str(p) for p in files]
    loaded = load_bags(paths)  # every file read once and validated before anything is written
    spec = run_folder.feature_spec()
    if spec.get("encoder_dim"):
        for p in files:
            attrs, shape = read_feature_attrs(p)
            source = f"run {run_folder.root}"
            check_compatible(
                p, shape[-1], attrs.get("encoder"), int(spec["encoder_dim"]), spec.get("encoder"), source
            )
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
