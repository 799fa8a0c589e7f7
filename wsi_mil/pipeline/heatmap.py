"""The heatmap stage: a trained run + a slide -> per-patch scores and every review export.

Writes into the heatmaps folder only: `<slide>_scores.h5` and `.csv`, `<slide>_heatmap.png`,
`<slide>.geojson` (QuPath tiles), `<slide>_heatmap.ome.tiff` and `<slide>.html` (+ viewer
folder). The slide's tissue, patches and features come from the work folder (by default the
one the run's features live in) and are made there, with the run's encoder settings, when
missing; `--features` names a feature file directly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import PipelineConfig, TilingConfig
from ..errors import WsiMilError
from ..formats.features import check_compatible, check_grid, check_slide, read_features
from ..formats.run import RunFolder, load_ensemble
from ..formats.scores import write_scores
from ..localization.export import write_geojson, write_ome_tiff, write_viewer
from ..localization.render import heatmap_overlay, overlay_figure
from ..localization.scores import (
    SCALES,
    display_values,
    flat_attention_warning,
    flat_inversion_warning,
    is_mostly_tied,
    legend,
    probability_text,
    read_calibrations,
    score_with_config,
)
from ..training.crossval import ensemble
from ..wsi.collect import SlideEntry
from ..wsi.readers import open_slide
from .layout import Layout
from .runner import process_slide
from .stages import ExtractStage

log = logging.getLogger("wsi_mil")


@dataclass
class HeatmapRequest:
    """What to map: which model of the run, which folds, which class, on which grid."""

    model: str | None = None
    fold: str = "all"
    overlap: float = 0.0
    score: str = "combined"
    scale: str = "absolute"  # or "rank": within-slide ranks, for display only
    target: str | None = None  # None: localization.scores.mapped_class
    viewer: bool = True
    device: str = "cpu"


def default_work_folder(run: RunFolder, out: Path, has_features) -> Path:
    """The work folder the run's features came from when `has_features(folder)` says this
    slide's features are already there (a cohort slide: nothing to extract), else `work/`
    inside the heatmaps folder: a new slide never lands among the run's training features,
    where the next `crossval` on that folder would find it without a label."""
    features_dir = run.read_config().get("features_dir")
    if features_dir and Path(features_dir).exists():
        shared = Layout.of_features_dir(features_dir).out
        if has_features(shared):
            return shared
    return out / "work"


def grid_layout(work: Path, overlap: float) -> Layout:
    """The work folder's layout for a grid: a finer (overlapping) grid is a different set of
    patches, kept apart from the run's in `grid-overlap<f>/`."""
    return Layout(work / f"grid-overlap{overlap:g}" if overlap else work)


def extraction_stage(
    run: RunFolder, work: Path, cfg: PipelineConfig, overlap: float, device: str, spec: dict | None = None
) -> ExtractStage:
    """An extract stage with the encoder and grid the run was trained on (finer with overlap);
    `spec` is the run's feature spec when the caller has read it."""
    spec = run.feature_spec() if spec is None else spec
    if "encoder" not in spec or "target_mpp" not in spec:
        raise WsiMilError(
            f"{run.root}: the run does not record its encoder and grid (its features are gone); "
            "pass --features with the slide's feature file"
        )
    weights = str(spec.get("encoder_weights", ""))
    random_weights = weights == "random"
    if random_weights:
        log.warning("the run's features used random encoder weights; so will this slide's")
    cfg = cfg.model_copy(deep=True)
    cfg.tiling = TilingConfig(
        target_mpp=float(spec["target_mpp"]),
        patch_size=int(spec["patch_size"]),
        overlap=overlap,
        min_tissue=float(spec.get("min_tissue", cfg.tiling.min_tissue)),
    )
    cfg.extract.encoder = str(spec["encoder"])
    # the run's own checkpoint file, never silently another: a local file that is gone (or has
    # changed since the run's features were made) stops the slide's extraction with one line;
    # "hub:..." weights come from the hub (or its cache) as they did for the run
    refusal = None
    local = bool(weights) and not random_weights and not weights.startswith("hub:")
    if local and not Path(weights).is_file():
        refusal = (
            f"{run.root}: the run's encoder weights {weights} are missing: restore the file, or pass "
            "--features with the slide's feature file"
        )
    elif local and spec.get("encoder_weights_sha256"):
        from ..features.weights import file_sha256

        want, got = str(spec["encoder_weights_sha256"]), file_sha256(weights)
        if got != want:
            refusal = (
                f"{run.root}: the run's encoder weights {weights} have changed since its features were "
                f"made (sha256 {got[:12]}, the run's {want[:12]}): restore the file, or pass --features "
                "with the slide's feature file"
            )
    cfg.extract.weights = weights if local else None
    cfg.extract.random_weights, cfg.extract.device = random_weights, device
    layout = grid_layout(work, overlap)
    if refusal is not None:  # a slide whose features are already in the work folder needs no weights
        return _RefusedExtraction(layout, cfg, refusal=refusal)
    return ExtractStage(layout, cfg)


@dataclass
class _RefusedExtraction(ExtractStage):
    """The run's extract stage when its weights file cannot be used: extracting raises `refusal`."""

    refusal: str = ""

    def run(self, entry: SlideEntry, on_batch=None) -> dict:
        raise WsiMilError(self.refusal)

    def plan(self, entry: SlideEntry, grid=None):
        raise WsiMilError(self.refusal)


def heatmap_slide(
    slide_path: str | Path,
    run: str | Path,
    out: str | Path,
    *,
    features: str | Path | None = None,
    work: str | Path | None = None,
    request: HeatmapRequest | None = None,
    cfg: PipelineConfig | None = None,
    mpp: float | None = None,
) -> dict:
    """Score one slide with a run's fold ensemble and write every export into `out`."""
    cfg = cfg or PipelineConfig()
    req = request or HeatmapRequest()
    hcfg = cfg.heatmap
    run_folder, out = RunFolder(run).require(), Path(out)
    if not Path(slide_path).is_file():
        raise WsiMilError(f"{slide_path}: no such slide file; give the path of a slide (e.g. .svs, .tif)")
    entry = SlideEntry(Path(slide_path), mpp)
    name, models, ckpts = load_ensemble(run_folder, req.model, req.fold, req.device)
    classes = run_folder.read_classes()
    if req.target is not None and req.target not in classes:
        raise WsiMilError(f"--target {req.target}: not a class of this run ({', '.join(classes)})")
    if req.scale not in SCALES:
        raise WsiMilError(f"--scale {req.scale}: use one of {', '.join(SCALES)}")
    calibrations, inversion = read_calibrations(run_folder, name, cfg.heatmap)
    spec = run_folder.feature_spec()  # the run's encoder and grid (read once: old runs open a feature file)
    if features is None:
        if work is None:
            encoder = spec.get("encoder", "")
            work = default_work_folder(
                run_folder, out, lambda w: grid_layout(w, req.overlap).features(encoder, entry.name).exists()
            )
        stage = extraction_stage(run_folder, Path(work), cfg, req.overlap, req.device, spec)
        features = stage.output(entry)
        if not features.exists():
            outcome = process_slide(stage, entry, blocking=True)
            if outcome.status == "failed":
                raise WsiMilError(outcome.error)
    else:  # for the slide's tissue mask only
        if not Path(features).is_file():
            raise WsiMilError(f"--features {features}: no such file; check the path, or leave --features out")
        work = work or default_work_folder(run_folder, out, lambda w: Layout(w).tissue(entry.name).exists())
        stage = ExtractStage(Layout(work), cfg)
    bag = read_features(features)
    run_encoder = spec.get("encoder")
    check_compatible(
        bag.path, bag.dim, bag.encoder, int(ckpts[0]["in_dim"]), run_encoder, f"run {run_folder.root}"
    )
    check_grid(bag.path, bag.attrs, spec, f"run {run_folder.root}")
    x = torch.from_numpy(bag.features).float().to(req.device)
    c = torch.from_numpy(bag.coords).to(req.device)
    scores = score_with_config(models, x, c, classes, calibrations, inversion, req.target)
    where = f"{entry.path} ({name})"
    if warning := flat_attention_warning(scores.flat_attention, len(models), where):
        log.warning(warning)
    scores.target = target = classes[scores.predicted]
    scores.size0 = size0 = float(bag.attrs.get("patch_size_level0", 256))
    stride0 = size0 * (1 - float(bag.attrs.get("overlap", 0.0)))
    sid = entry.name
    paths = {
        "scores": out / f"{sid}_scores.h5",
        "csv": out / f"{sid}_scores.csv",
        "geojson": out / f"{sid}.geojson",
        "png": out / f"{sid}_heatmap.png",
        "ome_tiff": out / f"{sid}_heatmap.ome.tiff",
        "html": out / f"{sid}.html",
    }
    # the slide's call as crossval and `predict` make it: each fold model's own threshold, then
    # the folds' majority vote (ties to the higher mean probability), not the mean's argmax
    fold_probs = [p[None] for p in scores.fold_probs]
    _, votes, vote = ensemble(fold_probs, [ck.get("threshold") for ck in ckpts])
    predicted = int(vote[0])
    label = classes[predicted]
    n_votes = int((votes[:, 0] == predicted).sum())
    # a flat inversion layer (the folds' mean, as drawn) is expected on a slide not called the
    # mapped class (the summary says so); on a slide called it, it is a surprise worth a warning
    inversion_flat = bool(scores.flat_inversion) and is_mostly_tied(scores.inversion)
    if inversion_flat and label == target:
        log.warning(flat_inversion_warning(scores.flat_inversion, len(models), where, target))
    slide_calibration = run_folder.read_calibration(name)
    calibrated = slide_calibration.apply_all(scores.prob) if slide_calibration is not None else None
    with open_slide(entry.path, mpp) as slide:
        scores.qupath_offset, scores.mpp = slide.qupath_offset, slide.mpp
        scores.slide_size = tuple(int(v) for v in slide.dimensions)
        check_slide(bag, entry.path, slide.dimensions)  # before anything is written
        tissue = stage.tissue_for(slide, entry)
        write_scores(paths["scores"], scores)
        write_scores(paths["csv"], scores)
        write_geojson(paths["geojson"], scores, size0, slide.qupath_offset)
        thumb, thumb_mpp = slide.thumbnail_at_mpp(hcfg.thumb_mpp)
        thumb_px = thumb_mpp / slide.mpp
        values = display_values(scores, req.score, req.scale)
        overlay = heatmap_overlay(thumb, thumb_px, scores.coords, values, size0, tissue, hcfg.blur)
        title = (
            f"{sid}: {name} predicts {label} ({n_votes} of {len(models)} folds at their thresholds; mean "
            f"{probability_text(scores.prob, classes)}"
            + (f"; calibrated {probability_text(calibrated, classes)})" if calibrated is not None else ")")
        )
        overlay_figure(
            overlay, title, paths["png"], legend(req.score, target, req.scale, scores.is_calibrated)
        )
        write_ome_tiff(
            paths["ome_tiff"], scores, size0, stride0, slide.dimensions, slide.mpp, req.score, req.scale
        )
        if req.viewer:
            view, view_mpp = slide.thumbnail_at_mpp(max(hcfg.viewer_mpp, slide.mpp))
            view_px = view_mpp / slide.mpp
            tmask = tissue.rasterize_clean(view.shape[1], view.shape[0], view_px).astype(bool)
            write_viewer(
                paths["html"], view, view_px, scores, size0, tmask, sid, label, hcfg.top_k, req.scale,
                classes, calibrated,
            )  # fmt: skip
        else:
            paths.pop("html")
    return {
        "slide": sid,
        "model": name,
        "folds": len(models),
        "predicted": label,
        "votes": n_votes,
        "probability": float(scores.prob[predicted]),
        "probabilities": probability_text(scores.prob, classes),
        "calibrated_probabilities": probability_text(calibrated, classes) if calibrated is not None else None,
        "patch_calibration": scores.calibrated,
        "inversion_steps_kept": scores.steps_kept,
        "inversion_layer_flat": inversion_flat,
        "flat_inversion_models": scores.flat_inversion,
        "target": target,
        "scale": req.scale,
        **{k: str(v) for k, v in paths.items()},
    }
