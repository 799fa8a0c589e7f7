"""The `wsi-mil` command line: parse options, load the config, call the stage runner.

Exit status: 0 all done, 1 some slide or bag failed (named in the summary), 2 bad input.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import console as opt
from .console import (
    App,
    cluster_map,
    print_slide_info,
    run_slides,
    say,
    stdout,
    tiling_options,
    user_errors,
)
from .errors import WsiMilError

train_opt = functools.partial(opt.config_option, "train")  # crossval's options that --config may set
app = App(
    add_completion=False,
    no_args_is_help=True,
    help="Whole-slide images to MIL diagnoses and reviewed heatmaps.",
)


@app.command()
@user_errors
def info(
    slides: opt.Slides,
    mpp: opt.Mpp = None,
    backend: Annotated[str, typer.Option(help="auto, openslide, tiffslide or image")] = "auto",
):
    """Show backend, size, pyramid levels, mpp (and its source) and objective power."""
    from .wsi.collect import collect_slides
    from .wsi.readers import slide_infos

    infos, errors = slide_infos(collect_slides(slides, mpp), backend)
    print_slide_info(infos)
    if errors:  # every readable slide is shown first; exit 1 as when slides fail in a stage
        opt.fail(f"{len(errors)} slide(s) could not be read: " + " | ".join(errors), 1)


@app.command()
@user_errors
def segment(
    slides: opt.Slides,
    out: opt.Out,
    mpp: opt.Mpp = None,
    config: opt.Config = None,
    threshold: Annotated[
        Optional[str], opt.config_option("tissue", "threshold", "'otsu' or a saturation value 0-255")
    ] = None,
    qc: opt.QC = None,
    qc_model: opt.QCModel = None,
    tissue_geojson: opt.TissueGeo = None,
    overwrite: opt.Overwrite = False,
):
    """Segment tissue: writes tissue/<slide>.geojson (QuPath) and a contour preview."""
    from .config import load_config

    if threshold is not None and threshold != "otsu" and not threshold.isdigit():
        raise WsiMilError(f"--threshold {threshold}: write 'otsu' or a saturation value 0-255")
    tissue = {} if threshold is None else {"threshold": threshold if threshold == "otsu" else int(threshold)}
    cfg = load_config(config, tissue=tissue, qc={"mode": qc, "model": qc_model})
    run_slides("segment", slides, mpp, out, cfg, overwrite, tissue_geojson)


@app.command("tile")
@user_errors
def tile_cmd(
    slides: opt.Slides,
    out: opt.Out,
    mpp: opt.Mpp = None,
    config: opt.Config = None,
    target_mpp: opt.TargetMpp = None,
    patch_size: opt.PatchSize = None,
    overlap: opt.Overlap = None,
    min_tissue: opt.MinTissue = None,
    qc: opt.QC = None,
    qc_model: opt.QCModel = None,
    tissue_geojson: opt.TissueGeo = None,
    overwrite: opt.Overwrite = False,
):
    """Tile tissue into patches at a target mpp: writes patches/<slide>.h5 (coords) + preview."""
    from .config import load_config

    tiling = tiling_options(target_mpp, patch_size, overlap, min_tissue)
    cfg = load_config(config, tiling=tiling, qc={"mode": qc, "model": qc_model})
    run_slides("tile", slides, mpp, out, cfg, overwrite, tissue_geojson)


@app.command()
@user_errors
def extract(
    slides: opt.Slides,
    out: opt.Out,
    mpp: opt.Mpp = None,
    config: opt.Config = None,
    encoder: opt.Encoder = None,
    weights: opt.Weights = None,
    random_weights: opt.RandomWeights = False,
    target_mpp: opt.EncoderMpp = None,
    patch_size: opt.EncoderPatchSize = None,
    overlap: opt.Overlap = None,
    min_tissue: opt.MinTissue = None,
    qc: opt.QC = None,
    qc_model: opt.QCModel = None,
    device: opt.Device = None,
    precision: opt.Precision = None,
    batch_size: opt.BatchSize = None,
    workers: opt.Workers = None,
    dtype: opt.FeatureDtype = None,
    compile: opt.Compile = None,
    tissue_geojson: opt.TissueGeo = None,
    patches: opt.PatchesDir = None,
    overwrite: opt.Overwrite = False,
    fail_fast: opt.FailFast = False,
    cluster: opt.Cluster = None,
):
    """Segment, tile and encode slides: writes features/<encoder>/<slide>.h5 (CLAM layout)."""
    from .config import load_config

    extract_opts = dict(
        encoder=encoder, weights=weights, random_weights=random_weights or None, device=device,
        precision=precision, batch_size=batch_size, workers=workers, dtype=dtype, compile=compile,
    )  # fmt: skip
    cfg = load_config(
        config, tiling=tiling_options(target_mpp, patch_size, overlap, min_tissue), extract=extract_opts,
        qc={"mode": qc, "model": qc_model},
    )  # fmt: skip
    run_slides("extract", slides, mpp, out, cfg, overwrite, tissue_geojson, fail_fast, cluster, patches)


@app.command()
@user_errors
def crossval(
    features: Annotated[Path, typer.Option(help="Folder of <slide>.h5 feature files (features/<encoder>)")],
    labels: Annotated[Path, typer.Option(help="CSV: slide_id,label[,case_id][,split]")],
    out: opt.Out,
    model: Annotated[
        Optional[str],
        train_opt("model", "abmil, dsmil, dtfd, camil, transmil, psmil; linear-probe on slide-embed output"),
    ] = None,
    models: Annotated[
        Optional[str],
        typer.Option(help="Several models on the same splits, comma-separated", show_default="--model"),
    ] = None,
    folds: Annotated[Optional[int], train_opt("folds", "Cross-validation folds")] = None,
    test_frac: Annotated[
        Optional[float], train_opt("test_frac", "Held-out test fraction (0: plain k-fold)")
    ] = None,
    epochs: Annotated[Optional[int], train_opt("epochs", "Maximum epochs")] = None,
    patience: Annotated[Optional[int], train_opt("patience", "Early-stopping patience (epochs)")] = None,
    lr: Annotated[Optional[float], train_opt("lr", "Learning rate", unset="each model's recipe")] = None,
    recipe: Annotated[
        Optional[str], train_opt("recipe", "model: each model's authors' recipe; shared: one for all")
    ] = None,
    small_cohort: Annotated[
        Optional[bool],
        train_opt(
            "small_cohort",
            "Under 300 labelled slides, models with a small-cohort recipe use it",
            "--small-cohort/--no-small-cohort",
        ),
    ] = None,
    seed: Annotated[Optional[int], train_opt("seed", "Seed for splits and training")] = None,
    max_instances: opt.MaxInstances = None,
    device: opt.TrainDevice = None,
    config: opt.Config = None,
    allow_missing: opt.AllowMissing = False,
    selection_fallback: Annotated[
        bool,
        typer.Option(
            "--selection-fallback",
            help="Where a class has under 4 cases in a fold's training folds, choose epoch and threshold on that fold (optimistic, marked) instead of stopping",
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Retrain from scratch into an existing run folder")
    ] = False,
    cluster: opt.Cluster = None,
    annotations: Annotated[
        Optional[Path],
        typer.Option(
            help="Folder of <slide>.xml/.geojson patch annotations: calibrate heatmap probabilities on them",
            show_default="calibrate on the negative slides",
        ),
    ] = None,
):
    """k-fold training + held-out test + majority-vote ensemble; writes report.md."""
    from .config import load_config
    from .localization.scores import inversion_settings
    from .training.crossval import run_crossval

    train = dict(
        folds=folds, test_frac=test_frac, epochs=epochs, patience=patience, lr=lr, seed=seed,
        device=device, max_instances=max_instances, recipe=recipe, small_cohort=small_cohort,
        selection_fallback=selection_fallback or None,
    )  # fmt: skip
    cfg = load_config(config, train=train)
    if model and models:
        raise WsiMilError("--model and --models both given: use --models for several, --model for one")
    names = [m.strip() for m in (models or model or cfg.train.model).split(",") if m.strip()]
    with cluster_map(cluster) as map_fn:
        run_crossval(
            features, labels, out, cfg.train, names, allow_missing,
            lambda msg: say(f"[cyan]crossval[/cyan] {msg}"), map_fn, overwrite=overwrite,
            annotations=annotations, inversion=inversion_settings(cfg.heatmap),
        )  # fmt: skip
    head = (out / "report.md").read_text().split("\n## Training recipes")[0].rstrip()  # the metrics
    stdout().print(head, highlight=False, markup=False)
    say(f"full report: {out / 'report.md'} (and report.html)")


@app.command()
@user_errors
def predict(
    run: opt.RunDir,
    features: Annotated[Path, typer.Option(help="Folder of <slide>.h5 feature files")],
    out: Annotated[
        Optional[Path],
        typer.Option("--out", "-o", help="CSV to write", show_default="RUN/predictions_new.csv"),
    ] = None,
    device: opt.DeviceAuto = "auto",
    scores: Annotated[
        Optional[Path],
        typer.Option(
            "--scores",
            help="Also write per-instance attention/inversion/combined CSVs (one per bag) here",
            show_default="none",
        ),
    ] = None,
    model: Annotated[
        Optional[str], typer.Option(help="Model of the run for --scores", show_default="the run's first")
    ] = None,
    target: Annotated[
        Optional[str],
        typer.Option(help="Class the --scores map", show_default="as heatmap: the positive class"),
    ] = None,
    config: opt.Config = None,
):
    """Apply a run's fold ensemble to new bags' features; --scores adds their patch scores as `heatmap`'s."""
    from .config import load_config
    from .training.predict import check_score_options, predict_run, score_bags

    check_score_options(run, model, target, scores is not None)  # before anything is written
    out = out or run / "predictions_new.csv"
    rows = predict_run(run, features, out, device)
    say(f"{len(rows)} slide(s) predicted -> {out}")
    if scores is not None:
        table = score_bags(run, features, scores, model, target, load_config(config).heatmap, device)
        say(f"{len(table)} bag(s) scored per instance -> {scores}/<bag>_scores.csv")


@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder")] = Path("wsi_mil_demo"),
    slides: Annotated[int, typer.Option(help="Synthetic slides in the cohort")] = 24,
    encoder: Annotated[str, typer.Option(help="Patch encoder (random weights)")] = "resnet18",
    epochs: Annotated[int, typer.Option(help="Maximum training epochs")] = 30,
    folds: Annotated[int, typer.Option(help="Cross-validation folds")] = 5,
):
    """Synthetic cohort -> extract -> crossval (PSMIL, ABMIL) -> heatmaps -> report.html."""
    from .demo import run_demo

    summary = run_demo(out, slides, encoder, epochs, folds, log=lambda m: say(f"[cyan]demo[/cyan] {m}"))
    acc = summary["test_accuracy"]
    aucs = ", ".join(f"{k} {v:.3f} (accuracy {acc[k]:.3f})" for k, v in summary["test_auc"].items())
    loc = summary["localization"]
    say(
        f"test AUC: {aucs}; combined layer: per-slide patch AUC {loc['mean_slide_patch_auc']['combined']:.3f}, "
        f"patch ECE {summary['ece']['combined']:.3f}"
    )
    say(f"timings (s): {summary['timings_s']}")
    say(f"report: {out / 'report.html'}")


from . import cli_review  # noqa: E402  registers heatmap, view and evaluate-localization on `app`

cli_review.register(app)

from . import cli_run  # noqa: E402  registers run (one experiment file end to end)

cli_run.register(app)

from . import cli_slide  # noqa: E402  registers encoders and slide-embed

cli_slide.register(app)
