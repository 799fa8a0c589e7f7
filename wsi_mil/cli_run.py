"""`wsi-mil run EXPERIMENT.yaml`: a whole experiment from one file, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .console import run_stage_with_progress, say, user_errors


def register(app: typer.Typer) -> None:
    @app.command("run")
    @user_errors
    def run_cmd(
        experiment: Annotated[
            Path,
            typer.Argument(
                help="Experiment file: configs/<experiment>.yaml or your own", metavar="EXPERIMENT"
            ),
        ],
    ):
        """Extract -> crossval -> heatmaps (-> localisation) from one experiment file; rerun to resume."""
        from .config import load_experiment
        from .pipeline.experiment import run_experiment

        exp, cfg = load_experiment(experiment)
        summary = run_experiment(
            exp, cfg, log=lambda m: say(f"[cyan]run[/cyan] {m}"), extract_fn=run_stage_with_progress
        )
        for model, test in summary["test"].items():
            text = (
                "no held-out test split"
                if not test
                else f"test AUC {test['auc']:.3f}, accuracy {test['accuracy']:.3f}"
            )
            say(f"{model}: {text}")
        loc = summary["localization"]
        if loc:
            aucs = ", ".join(f"{k} {v:.3f}" for k, v in loc["mean_slide_patch_auc"].items() if v is not None)
            say(f"localisation, per-slide patch AUC over the tumour slides: {aucs}")
        say(
            f"report: {summary['run']}/report.md; heatmaps of {len(summary['heatmaps']['slides'])} slide(s): "
            f"{summary['heatmaps']['folder']}"
        )
