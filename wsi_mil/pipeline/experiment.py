"""`wsi-mil run`: one experiment file through extract -> crossval -> heatmaps -> localisation.

The same functions the separate commands call, on the folders they would use:
`<out>/work` (tissue, patches, features/<encoder>), `<out>/run` (the crossval run folder),
`<out>/heatmaps` (scores and exports of the chosen slides). Every step skips what is done
(extraction per slide, training per fold, heatmaps per slide), so a rerun after an interruption
resumes where it stopped; a run folder trained with other settings is refused, as by `crossval`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from ..config import ExperimentConfig, PipelineConfig
from ..errors import WsiMilError
from ..io import write_json
from ..wsi.collect import collect_slides
from .layout import Layout
from .runner import run_stage
from .stages import ExtractStage

_log = logging.getLogger("wsi_mil")


def experiment_folders(exp: ExperimentConfig) -> dict[str, Path]:
    out = Path(exp.out)
    return {"work": out / "work", "run": out / "run", "heatmaps": out / "heatmaps"}


def heatmap_slides(exp: ExperimentConfig, run_dir: Path, slide_paths: dict[str, Path]) -> list[str]:
    """The slide ids `exp.heatmaps` asks for: the run's test split, every labelled slide, or none."""
    if exp.heatmaps == "none":
        return []
    splits = pd.read_csv(run_dir / "splits.csv", dtype={"slide_id": str})
    chosen = splits[splits.split == "test"] if exp.heatmaps == "test" else splits
    missing = [s for s in chosen.slide_id if s not in slide_paths]
    if missing:
        raise WsiMilError(
            f"{exp.labels}: {len(missing)} slide(s) to map have no slide file among the experiment's "
            f"slides ({', '.join(missing[:5])}): add their folder to experiment.slides"
        )
    return chosen.slide_id.tolist()


def labelled_entries(entries: list, exp: ExperimentConfig) -> list:
    """The slides to extract: all of them once every slide has a label and every label a
    slide; with `allow_missing`, the labelled ones (the others skipped with a warning). Checked
    before any extraction, so a mismatch costs no encoder time."""
    from ..training.data import read_label_table

    labelled = set(read_label_table(exp.labels).slide_id)
    names = {e.name for e in entries}
    no_label, no_slide = sorted(names - labelled), sorted(labelled - names)
    if not (no_label or no_slide):
        return entries
    parts = [f"{len(no_label)} slide(s) have no label in {exp.labels}: {', '.join(no_label[:8])}"] * bool(
        no_label
    )
    parts += [
        f"{len(no_slide)} labelled slide(s) are not among the slides: {', '.join(no_slide[:8])}"
    ] * bool(no_slide)
    msg = "; ".join(parts)
    if not exp.allow_missing:
        raise WsiMilError(f"{msg} (fix the CSV or the slides, or set experiment.allow_missing: true)")
    _log.warning("%s (skipped)", msg)
    return [e for e in entries if e.name in labelled]


def run_experiment(
    exp: ExperimentConfig,
    cfg: PipelineConfig,
    log: Callable[[str], None] = print,
    extract_fn: Callable | None = None,
) -> dict:
    """Run the experiment; returns its summary (also written to `<out>/summary.json`).

    `extract_fn(stage, entries)` runs the extraction stage (default `run_stage`; the CLI passes
    one with progress bars) and returns its `StageResult`."""
    from ..localization.evaluate import evaluate_folder
    from ..localization.scores import inversion_settings
    from ..training.crossval import run_crossval
    from .heatmap import HeatmapRequest, heatmap_slide

    folders = experiment_folders(exp)
    for name, p in (("labels", exp.labels), ("annotations", exp.annotations)):
        if p is not None and not Path(p).exists():
            raise WsiMilError(f"experiment.{name}: {p} does not exist")
    entries = labelled_entries(collect_slides(exp.slides, exp.mpp), exp)
    slide_paths = {e.name: e.path for e in entries}

    layout = Layout(folders["work"])
    stage = ExtractStage(layout, cfg)
    log(f"extract: {len(entries)} slide(s)")  # the runner says how many were already done
    result = (extract_fn or run_stage)(stage, entries)
    if result.failed:
        raise WsiMilError(
            f"extract failed for {len(result.failed)} slide(s) ({', '.join(result.failed[:5])}); "
            f"see {layout.manifest('extract')}, fix or remove them and rerun"
        )
    encoder = stage.cfg.extract.encoder
    features_dir = layout.features_dir(encoder)

    log(f"crossval: {', '.join(exp.models)} -> {folders['run']}")
    results = run_crossval(
        features_dir, exp.labels, folders["run"], cfg.train, exp.models, exp.allow_missing,
        progress=lambda m: log(f"crossval {m}"),
        annotations=exp.annotations, inversion=inversion_settings(cfg.heatmap),
    )  # fmt: skip

    heat_dir = folders["heatmaps"]
    mapped = heatmap_slides(exp, folders["run"], slide_paths)
    request = HeatmapRequest(exp.heatmap_model or exp.models[0], target=exp.target)
    made = 0
    for i, sid in enumerate(mapped):
        if (heat_dir / f"{sid}_scores.h5").exists() and (heat_dir / f"{sid}.html").exists():
            continue
        features = layout.features(encoder, sid)
        heatmap_slide(
            slide_paths[sid], folders["run"], heat_dir, features=features, work=folders["work"],
            request=request, cfg=cfg,
        )  # fmt: skip
        made += 1
        log(f"heatmap [{i + 1}/{len(mapped)}] {sid}")
    if mapped and made < len(mapped):
        log(f"heatmaps: {len(mapped) - made} of {len(mapped)} already done")

    localization = None
    if exp.annotations is not None and mapped:
        localization = evaluate_folder(heat_dir, exp.annotations)
        write_json(heat_dir / "localization.json", localization)

    summary = {
        "features": str(features_dir),
        "run": str(folders["run"]),
        "test": {r["model"]: r.get("test") for r in results},
        "heatmaps": {"folder": str(heat_dir), "slides": mapped, "model": request.model},
        "localization": None
        if localization is None
        else {k: localization[k] for k in ("mean_slide_patch_auc", "pooled_patch_auc", "slide_auc")},
    }
    write_json(Path(exp.out) / "summary.json", summary)
    return summary
