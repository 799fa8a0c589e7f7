"""`wsi-mil heatmap`: a crossval run + a slide -> per-patch scores and every review export.

Writes into the output folder: `<slide>_scores.h5` and `.csv`, `<slide>_heatmap.png`,
`<slide>.geojson` (QuPath tiles), `<slide>_heatmap.ome.tiff` and `<slide>.html` (+ viewer
folder). Features come from `--features`, else are extracted with the run's encoder settings
(read from the run's feature files), on a finer grid with `--overlap`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import yaml

from ..config import HeatmapConfig, PipelineConfig, TilingConfig
from ..errors import WsiMilError
from ..pipeline import Layout, segment_one
from ..slide import SlideEntry, open_slide
from ..store import read_features
from ..training.crossval import load_fold_model
from .export import write_geojson, write_ome_tiff, write_viewer
from .render import heatmap_overlay, overlay_figure
from .scores import PatchScores, score_bag

log = logging.getLogger("wsi_mil")


def load_run_models(run: Path, model: str | None = None, fold: str = "all", device="cpu"):
    if not (run / "config.yaml").exists():
        raise WsiMilError(
            f"{run}: not a crossval run folder (no config.yaml); pass --run with "
            "the --out folder of 'wsi-mil crossval'"
        )
    conf = yaml.safe_load((run / "config.yaml").read_text())
    name = model or conf["models"][0]
    fold_dirs = sorted((run / name).glob("fold_*"))
    if fold != "all":
        fold_dirs = [d for d in fold_dirs if d.name == f"fold_{fold}"]
    fold_dirs = [d for d in fold_dirs if (d / "model.pt").exists()]
    if not fold_dirs:
        raise WsiMilError(
            f"{run}: no trained fold for model {name!r} (fold {fold}); finish "
            "'wsi-mil crossval' or pick --model/--fold"
        )
    models = [load_fold_model(d, device)[0] for d in fold_dirs]
    classes = json.loads((run / "classes.json").read_text())
    return name, models, classes, conf


def _run_feature_attrs(conf: dict) -> dict:
    files = sorted(Path(conf["features_dir"]).glob("*.h5"))
    if not files:
        raise WsiMilError(f"{conf['features_dir']}: the run's features are gone; pass --features")
    return read_features(files[0]).attrs


def features_for_slide(
    entry: SlideEntry, out: Path, conf: dict, overlap: float, cfg: PipelineConfig, device: str
) -> Path:
    """Extract features for one slide with the encoder settings the run was trained on."""
    from ..features.extract import runner_for
    from ..pipeline import extract_one

    attrs = _run_feature_attrs(conf)
    weights = str(attrs.get("encoder_weights", ""))
    random_weights = weights == "random"
    if random_weights:
        log.warning("the run's features used random encoder weights; so will this slide's")
    local = weights if weights and Path(weights).exists() else None
    cfg = cfg.model_copy(deep=True)
    cfg.tiling = TilingConfig(
        target_mpp=float(attrs["target_mpp"]),
        patch_size=int(attrs["patch_size"]),
        overlap=overlap,
        min_tissue=float(attrs.get("min_tissue", cfg.tiling.min_tissue)),
    )
    cfg.extract.encoder = str(attrs["encoder"])
    cfg.extract.weights, cfg.extract.random_weights, cfg.extract.device = local, random_weights, device
    layout = Layout(out)
    extract_one(entry, layout, cfg, runner_for(cfg.extract))
    return layout.features(cfg.extract.encoder, entry.name)


def heatmap_slide(
    slide_path: str | Path,
    run: str | Path,
    out: str | Path,
    features: str | Path | None = None,
    model: str | None = None,
    fold: str = "all",
    overlap: float = 0.0,
    score: str = "combined",
    cfg: PipelineConfig | None = None,
    mpp: float | None = None,
    device: str = "cpu",
    viewer: bool = True,
    target: str | None = None,
) -> dict:
    """Score one slide and write every export; `target` is the class whose evidence is mapped
    (a class name; default the ensemble's prediction)."""
    cfg = cfg or PipelineConfig()
    hcfg: HeatmapConfig = cfg.heatmap
    run, out = Path(run), Path(out)
    entry = SlideEntry(Path(slide_path), mpp)
    name, models, classes, conf = load_run_models(run, model, fold, device)
    if features is None:
        features = features_for_slide(entry, out, conf, overlap, cfg, device)
    bag = read_features(features)
    x = torch.from_numpy(bag.features).float().to(device)
    c = torch.from_numpy(bag.coords).to(device)
    if target is not None and target not in classes:
        raise WsiMilError(f"--target {target}: not a class of this run ({', '.join(classes)})")
    target_idx = classes.index(target) if target is not None else None
    scores: PatchScores = score_bag(
        models,
        x,
        c,
        hcfg.combine_weight,
        target=target_idx,
        steps=hcfg.inversion_steps,
        lr=hcfg.inversion_lr,
        lam=hcfg.inversion_lambda,
        score=hcfg.inversion_score,
    )
    sid = entry.name
    out.mkdir(parents=True, exist_ok=True)
    size0 = float(bag.attrs.get("patch_size_level0", 256))
    scores.size0 = size0
    scores.save(out / f"{sid}_scores.h5")
    scores.save(out / f"{sid}_scores.csv")
    stride0 = size0 * (1 - float(bag.attrs.get("overlap", 0.0)))
    predicted = int(scores.prob.argmax())
    label = classes[predicted]
    paths = {
        "scores": out / f"{sid}_scores.h5",
        "geojson": out / f"{sid}.geojson",
        "png": out / f"{sid}_heatmap.png",
        "ome_tiff": out / f"{sid}_heatmap.ome.tiff",
        "html": out / f"{sid}.html",
    }
    write_geojson(paths["geojson"], scores, size0)
    tissue = segment_one(entry, Layout(out), cfg.tissue)
    with open_slide(entry.path, mpp) as slide:
        if tissue.thumbnail is not None and abs(tissue.thumb_mpp / hcfg.thumb_mpp - 1) < 0.05:
            thumb, thumb_mpp = tissue.thumbnail, tissue.thumb_mpp  # already read for segmentation
        else:
            thumb, thumb_mpp = slide.thumbnail_at_mpp(hcfg.thumb_mpp)
        thumb_px = thumb_mpp / slide.mpp
        overlay = heatmap_overlay(thumb, thumb_px, scores.coords, scores.get(score), size0, tissue, hcfg.blur)
        title = (
            f"{sid}: {name} predicts {label} (p = {scores.prob[predicted]:.3f}); {score} "
            f"score for {classes[scores.predicted]}"
        )
        overlay_figure(overlay, title, paths["png"], score)
        write_ome_tiff(
            paths["ome_tiff"],
            scores,
            size0,
            stride0,
            slide.dimensions,
            slide.mpp,
            "score" if score == "combined" else score,
        )
        if viewer:
            view, view_mpp = slide.thumbnail_at_mpp(max(hcfg.viewer_mpp, slide.mpp))
            view_px = view_mpp / slide.mpp
            tmask = tissue.rasterize(view.shape[1], view.shape[0], view_px).astype(bool)
            write_viewer(paths["html"], view, view_px, scores, size0, tmask, sid, label, hcfg.top_k)
    return {
        "slide": sid,
        "model": name,
        "folds": len(models),
        "predicted": label,
        "probability": float(scores.prob[predicted]),
        "target": classes[scores.predicted],
        **{k: str(v) for k, v in paths.items()},
    }
