"""A crossval run folder (`crossval --out runs/NAME`): everything needed to re-run or apply it.

  fingerprint.json       what the run was trained on (labels, feature files, encoder, config,
                         code version); a re-run resumes only when it matches
  config.yaml            resolved training config, models, each model's recipe, feature spec
  classes.json, splits.csv
  <model>/fold_<k>/      model.pt (checkpoint), threshold.json (written last: marks the fold
                         done), val_metrics.json, history.csv
  <model>/               predictions.csv, metrics.json, roc.png, training_curves.png
  report.md

crossval writes it; predict and heatmap read it back through `RunFolder`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
import yaml

from ..errors import WsiMilError
from ..io import atomic_path, read_json, write_json, write_text


class RunFolder:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- paths ----------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def classes_path(self) -> Path:
        return self.root / "classes.json"

    @property
    def splits_path(self) -> Path:
        return self.root / "splits.csv"

    @property
    def fingerprint_path(self) -> Path:
        return self.root / "fingerprint.json"

    @property
    def report_path(self) -> Path:
        return self.root / "report.md"

    def read_calibration(self, model: str):
        """The model's Platt scaling (calibration.json, written by crossval), or None for runs
        made before it existed."""
        from ..calibration import PlattScaling

        path = self.model_dir(model) / "calibration.json"
        return PlattScaling.from_dict(read_json(path)) if path.exists() else None

    def read_patch_calibration(self, model: str) -> dict | None:
        """`<model>/patch_calibration.json` as written by crossval (localization/
        patch_calibration.py reads it into maps); None for runs made before it existed."""
        path = self.model_dir(model) / "patch_calibration.json"
        return read_json(path) if path.exists() else None

    def model_dir(self, model: str) -> Path:
        return self.root / model

    def fold_dir(self, model: str, k: int) -> Path:
        return self.root / model / f"fold_{k}"

    # -- state ----------------------------------------------------------------------------
    def is_run(self) -> bool:
        return self.classes_path.exists() and self.config_path.exists()

    def is_empty(self) -> bool:
        return not self.root.exists() or not any(self.root.iterdir())

    def require(self) -> RunFolder:
        if not self.is_run():
            raise WsiMilError(
                f"{self.root}: not a crossval run folder (no classes.json/config.yaml); pass the "
                "--out folder of 'wsi-mil crossval'"
            )
        return self

    def fold_done(self, model: str, k: int) -> bool:
        d = self.fold_dir(model, k)
        return (d / "model.pt").exists() and (d / "threshold.json").exists()

    def trained_models(self) -> list[str]:
        """Models with at least one finished fold, in the order the config lists them."""
        listed = self.read_config().get("models", []) if self.config_path.exists() else []
        found = sorted(d.name for d in self.root.iterdir() if d.is_dir() and list(d.glob("fold_*/model.pt")))
        return [m for m in listed if m in found] + [m for m in found if m not in listed]

    def require_finished(self, model: str) -> None:
        """Refuse a model whose crossval was interrupted: metrics.json is written last, after
        every fold and the calibrations, so without it the ensemble lacks folds or calibration."""
        if not (self.model_dir(model) / "metrics.json").exists():
            raise WsiMilError(
                f"{self.root}: the crossval of {model!r} did not finish ({len(self.fold_dirs(model))} "
                f"fold(s) trained, no metrics.json); re-run the same 'wsi-mil crossval' with --out "
                f"{self.root} to finish it"
            )

    def fold_dirs(self, model: str) -> list[Path]:
        dirs = [d for d in self.model_dir(model).glob("fold_*") if (d / "model.pt").exists()]
        return sorted(dirs, key=lambda d: int(d.name.split("_")[1]))

    # -- read/write -----------------------------------------------------------------------
    def write_config(self, config: dict) -> None:
        write_text(self.config_path, yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict:
        return yaml.safe_load(self.config_path.read_text()) or {}

    def write_classes(self, classes: list[str]) -> None:
        write_json(self.classes_path, classes)

    def read_classes(self) -> list[str]:
        return list(read_json(self.classes_path))

    def write_splits(self, splits: pd.DataFrame) -> None:
        with atomic_path(self.splits_path) as tmp:
            splits.drop(columns=["path"], errors="ignore").to_csv(tmp, index=False)

    def read_splits(self) -> pd.DataFrame:
        return pd.read_csv(self.splits_path, dtype={"slide_id": str, "case_id": str})

    def write_fingerprint(self, fingerprint: dict) -> None:
        write_json(self.fingerprint_path, fingerprint)

    def read_fingerprint(self) -> dict | None:
        return read_json(self.fingerprint_path) if self.fingerprint_path.exists() else None

    def feature_spec(self) -> dict:
        """Encoder, dimension and grid of the features the run was trained on."""
        conf = self.read_config()
        if "features" in conf:
            return conf["features"]
        # runs written by wsi-mil 0.1 keep only the features folder: read one file's attrs
        from .features import read_feature_attrs

        files = sorted(Path(conf.get("features_dir", "")).glob("*.h5"))
        if not files:
            return {}
        attrs, shape = read_feature_attrs(files[0])
        return {**attrs, "encoder_dim": int(shape[-1])}

    def save_fold(
        self,
        model: str,
        k: int,
        checkpoint: dict,
        threshold: float | None,
        val_metrics: dict,
        history: pd.DataFrame,
    ) -> Path:
        d = self.fold_dir(model, k)
        d.mkdir(parents=True, exist_ok=True)
        with atomic_path(d / "history.csv") as tmp:
            history.to_csv(tmp, index=False)
        write_json(d / "val_metrics.json", val_metrics)
        with atomic_path(d / "model.pt") as tmp:
            torch.save({**checkpoint, "threshold": threshold}, tmp)
        write_json(d / "threshold.json", {"threshold": threshold})  # last: marks the fold done
        return d

    def read_fold_metrics(self, model: str, k: int) -> dict:
        return read_json(self.fold_dir(model, k) / "val_metrics.json")

    def read_fold_history(self, model: str, k: int) -> pd.DataFrame:
        return pd.read_csv(self.fold_dir(model, k) / "history.csv")


def load_fold_model(fold_dir: str | Path, device: torch.device | str = "cpu"):
    """(model in eval mode, checkpoint dict) from `fold_dir/model.pt`."""
    from ..models import create_model

    path = Path(fold_dir) / "model.pt"
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
        model = create_model(ckpt["model"], ckpt["in_dim"], ckpt["n_classes"], **ckpt["kwargs"])
        model.load_state_dict(ckpt["state_dict"])
    except (OSError, RuntimeError, KeyError, EOFError) as exc:
        raise WsiMilError(
            f"{path}: not a loadable fold checkpoint ({type(exc).__name__}); re-run crossval with --overwrite"
        ) from exc
    return model.to(device).eval(), ckpt


def load_ensemble(run: RunFolder, model: str | None = None, fold: str = "all", device="cpu"):
    """(model name, fold models, checkpoints) of one model of a run: all folds or one."""
    run.require()
    trained = run.trained_models()
    name = model or (trained[0] if trained else run.read_config().get("models", ["?"])[0])
    all_dirs = run.fold_dirs(name)
    dirs = all_dirs if fold == "all" else [d for d in all_dirs if d.name == f"fold_{fold}"]
    if not dirs and all_dirs:
        folds = ", ".join(d.name.removeprefix("fold_") for d in all_dirs)
        raise WsiMilError(f"{run.root}: model {name!r} has no fold {fold}; pick --fold from {folds} or all")
    if not dirs:
        raise WsiMilError(
            f"{run.root}: no trained fold for model {name!r} (trained: "
            f"{', '.join(trained) or 'none'}); finish 'wsi-mil crossval' or pick --model"
        )
    run.require_finished(name)
    loaded = [load_fold_model(d, device) for d in dirs]
    return name, [m for m, _ in loaded], [c for _, c in loaded]
