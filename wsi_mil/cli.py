"""The `wsi-mil` command line: parses options, loads configs, loops over slides with progress.

Every command calls plain functions from the stage modules; errors the user can fix are
printed as one line and exit with status 2.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from .errors import WsiMilError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Whole-slide images to MIL diagnoses and reviewed heatmaps.",
)
console = Console(stderr=True)
log = logging.getLogger("wsi_mil")

Slides = Annotated[
    list[str], typer.Argument(help="Slide files, folders of slides, or CSV slide lists (path[,mpp])")
]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output folder")]
Mpp = Annotated[Optional[float], typer.Option("--mpp", help="um/px for slides that record none")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Redo slides whose outputs exist")]
Config = Annotated[
    Optional[str], typer.Option("--config", "-c", help="YAML config or preset name (biopsy, resection, ...)")
]
TissueGeo = Annotated[
    Optional[Path],
    typer.Option(
        "--tissue-geojson",
        help="GeoJSON tissue annotation (file, or folder of <slide>.geojson) replacing segmentation",
    ),
]


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
        force=True,
    )


def user_errors(fn):
    """Turn WsiMilError into one red line and exit status 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _setup_logging()
        try:
            return fn(*args, **kwargs)
        except WsiMilError as exc:
            console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _progress(label: str):
    def report(entry, i, n):
        console.print(f"[cyan]{label}[/cyan] [{i + 1}/{n}] {entry.name}", highlight=False)

    return report


def _report(manifest, stage: str) -> None:
    failed = [r for r in manifest.rows.values() if r["status"] == "failed"]
    ok = sum(r["status"] in ("ok", "skipped") for r in manifest.rows.values())
    console.print(
        f"{stage}: {ok} slide(s) done, {len(failed)} failed; manifest {manifest.path}", highlight=False
    )
    if failed and ok == 0:
        raise typer.Exit(1)


@app.command()
@user_errors
def info(
    slides: Slides,
    mpp: Mpp = None,
    backend: Annotated[str, typer.Option(help="auto, openslide, tiffslide or image")] = "auto",
):
    """Show backend, size, pyramid levels, mpp (and its source) and objective power."""
    from .slide import collect_slides, open_slide

    table = Table(
        "slide", "backend", "level-0 size", "levels", "downsamples", "mpp", "mpp source", "objective"
    )
    for entry in collect_slides(slides, mpp):
        with open_slide(entry.path, entry.mpp, backend) as s:
            i = s.info()
            table.add_row(
                entry.path.name,
                i["backend"],
                i["level0_size"],
                str(i["levels"]),
                i["downsamples"],
                f"{i['mpp']:.4f}",
                i["mpp_source"],
                str(i["objective_power"] or "-"),
            )
    Console().print(table)


def _tissue_overrides(threshold: str | None) -> dict:
    if threshold is None:
        return {}
    return {"threshold": "otsu" if threshold == "otsu" else int(threshold)}


@app.command()
@user_errors
def segment(
    slides: Slides,
    out: Out,
    mpp: Mpp = None,
    config: Config = None,
    threshold: Annotated[Optional[str], typer.Option(help="'otsu' or a saturation value 0-255")] = None,
    tissue_geojson: TissueGeo = None,
    overwrite: Overwrite = False,
):
    """Segment tissue: writes tissue/<slide>.geojson (QuPath) and a contour thumbnail."""
    from .config import load_config
    from .pipeline import Layout, run_per_slide, segment_one
    from .slide import collect_slides

    cfg = load_config(config, tissue=_tissue_overrides(threshold))
    layout = Layout(out)
    entries = collect_slides(slides, mpp)
    manifest = run_per_slide(
        entries,
        "segment",
        layout,
        lambda e: len(segment_one(e, layout, cfg.tissue, True, tissue_geojson).polygons.geoms),
        lambda e: not overwrite and layout.tissue(e.name).exists(),
        progress=_progress("segment"),
    )
    _report(manifest, "segment")


@app.command("tile")
@user_errors
def tile_cmd(
    slides: Slides,
    out: Out,
    mpp: Mpp = None,
    config: Config = None,
    target_mpp: Annotated[
        Optional[float], typer.Option("--target-mpp", help="um/px of the patches (0.5 ~ 20x)")
    ] = None,
    patch_size: Annotated[Optional[int], typer.Option(help="Patch side in px at --target-mpp")] = None,
    overlap: Annotated[
        Optional[float], typer.Option(help="Fraction of the patch side shared by neighbours (0-0.9)")
    ] = None,
    min_tissue: Annotated[Optional[float], typer.Option(help="Tissue fraction a patch needs (0-1)")] = None,
    tissue_geojson: TissueGeo = None,
    overwrite: Overwrite = False,
):
    """Tile tissue into patches at a target mpp: writes patches/<slide>.h5 (coords) + preview."""
    from .config import load_config
    from .pipeline import Layout, run_per_slide, tile_one
    from .slide import collect_slides

    cfg = load_config(
        config,
        tiling=dict(target_mpp=target_mpp, patch_size=patch_size, overlap=overlap, min_tissue=min_tissue),
    )
    layout = Layout(out)
    manifest = run_per_slide(
        collect_slides(slides, mpp),
        "tile",
        layout,
        lambda e: len(tile_one(e, layout, cfg.tissue, cfg.tiling, overwrite, tissue_geojson)),
        lambda e: not overwrite and layout.patches(e.name).exists(),
        progress=_progress("tile"),
    )
    _report(manifest, "tile")


@app.command()
@user_errors
def extract(
    slides: Slides,
    out: Out,
    mpp: Mpp = None,
    config: Config = None,
    encoder: Annotated[
        Optional[str], typer.Option(help="resnet50_trunc, resnet18, timm:<name> or hf-hub:<repo>")
    ] = None,
    weights: Annotated[Optional[str], typer.Option(help="Local .pth/.safetensors weights")] = None,
    random_weights: Annotated[
        bool,
        typer.Option("--random-weights", help="Random encoder weights (tests, benchmarks, offline demo)"),
    ] = False,
    target_mpp: Annotated[Optional[float], typer.Option("--target-mpp", help="um/px of the patches")] = None,
    patch_size: Annotated[Optional[int], typer.Option(help="Patch side in px at --target-mpp")] = None,
    overlap: Annotated[Optional[float], typer.Option(help="Fraction of the patch side shared")] = None,
    min_tissue: Annotated[Optional[float], typer.Option(help="Tissue fraction a patch needs")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto, fp32, bf16 or fp16")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Patches per encoder batch")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Reader processes")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="float32 or float16 features")] = None,
    compile: Annotated[Optional[str], typer.Option("--compile", help="torch.compile: auto, on, off")] = None,
    tissue_geojson: TissueGeo = None,
    overwrite: Overwrite = False,
    fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop at the first failing slide")] = False,
    cluster: Annotated[
        Optional[str], typer.Option(help="Dask cluster: local:N, tcp://host:8786 or slurm:CONFIG.yaml")
    ] = None,
):
    """Segment, tile and encode slides: writes features/<encoder>/<slide>.h5 (CLAM layout)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .config import load_config
    from .features.extract import runner_for
    from .pipeline import Layout, extract_one, run_per_slide
    from .slide import collect_slides

    cfg = load_config(
        config,
        tiling=dict(target_mpp=target_mpp, patch_size=patch_size, overlap=overlap, min_tissue=min_tissue),
        extract=dict(
            encoder=encoder,
            weights=weights,
            random_weights=random_weights or None,
            device=device,
            precision=precision,
            batch_size=batch_size,
            workers=workers,
            dtype=dtype,
            compile=compile,
        ),
    )
    e = cfg.extract
    entries = collect_slides(slides, mpp)
    layout = Layout(out)
    if cluster:
        _extract_on_cluster(cluster, entries, layout, cfg, overwrite, tissue_geojson)
        return
    todo = [en for en in entries if overwrite or not layout.features(e.encoder, en.name).exists()]
    if todo:  # build the encoder now (a done cohort needs no weights): fail early, one clear line
        r = runner_for(e)
        console.print(
            f"encoder {r.info.name} ({r.info.dim}-d, weights {r.info.weights}) on {r.device} {r.precision_name}",
            highlight=False,
        )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as bar:
        cohort = bar.add_task("slides", total=len(entries))
        patches = bar.add_task("patches", total=None)

        def progress(entry, i, n):
            bar.update(cohort, completed=i)
            bar.update(patches, description=entry.name, completed=0, total=None)

        def one(entry):
            summary = extract_one(
                entry,
                layout,
                cfg,
                runner_for(e),
                overwrite,
                tissue_geojson,
                lambda done, total: bar.update(patches, completed=done, total=total),
            )
            if summary["failed_patches"]:
                log.warning(
                    "%s: %d unreadable patches encoded as white", entry.path, summary["failed_patches"]
                )
            return summary["patches"]

        manifest = run_per_slide(
            entries,
            "extract",
            layout,
            one,
            lambda en: not overwrite and layout.features(e.encoder, en.name).exists(),
            fail_fast=fail_fast,
            progress=progress,
        )
        bar.update(cohort, completed=len(entries))
    _report(manifest, "extract")


def _extract_on_cluster(spec, entries, layout, cfg, overwrite, tissue_geojson) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from .cluster import extract_on_cluster, make_client
    from .store import Manifest

    manifest = Manifest(layout.manifest("extract"))
    todo = [e for e in entries if overwrite or not layout.features(cfg.extract.encoder, e.name).exists()]
    for e in entries:
        if e not in todo and e.name not in manifest.rows:
            manifest.record(e.name, "skipped")
    with (
        make_client(spec) as client,
        Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console) as bar,
    ):
        task = bar.add_task(f"slides on {spec}", total=len(todo))

        def done(name, result):
            if isinstance(result, Exception):
                manifest.record(name, "failed", error=str(result))
                log.error("%s: %s", name, result)
            else:
                note = (
                    f"succeeded on attempt {result['attempts']} (a worker died)"
                    if result["attempts"] > 1
                    else ""
                )
                manifest.record(name, "ok", result["patches"], result["seconds"], note)
            bar.advance(task)

        extract_on_cluster(client, todo, layout.out, cfg, overwrite, tissue_geojson, done)
    _report(manifest, "extract")


def _model_list(model: str | None, models: str | None, default: str) -> list[str]:
    names = models or model or default
    return [m.strip() for m in names.split(",") if m.strip()]


@app.command()
@user_errors
def crossval(
    features: Annotated[Path, typer.Option(help="Folder of <slide>.h5 feature files (features/<encoder>)")],
    labels: Annotated[Path, typer.Option(help="CSV: slide_id,label[,case_id][,split]")],
    out: Out,
    model: Annotated[Optional[str], typer.Option(help="abmil, dsmil, dtfd, camil, transmil or psmil")] = None,
    models: Annotated[
        Optional[str], typer.Option(help="Several models on the same splits, comma-separated")
    ] = None,
    folds: Annotated[Optional[int], typer.Option(help="Cross-validation folds")] = None,
    test_frac: Annotated[
        Optional[float], typer.Option(help="Held-out test fraction (0: plain k-fold)")
    ] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Maximum epochs")] = None,
    patience: Annotated[Optional[int], typer.Option(help="Early-stopping patience (epochs)")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for splits and training")] = None,
    max_instances: Annotated[
        Optional[int], typer.Option(help="Sample at most this many instances per training bag")
    ] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda")] = None,
    config: Config = None,
    allow_missing: Annotated[
        bool, typer.Option("--allow-missing", help="Skip labelled slides without features (and vice versa)")
    ] = False,
    cluster: Annotated[
        Optional[str],
        typer.Option(help="Dask cluster for parallel folds: local:N, tcp://host:8786 or slurm:CONFIG.yaml"),
    ] = None,
):
    """k-fold training + held-out test + majority-vote ensemble; writes report.md."""
    from .config import load_config
    from .training.crossval import run_crossval

    cfg = load_config(
        config,
        train=dict(
            folds=folds,
            test_frac=test_frac,
            epochs=epochs,
            patience=patience,
            lr=lr,
            seed=seed,
            device=device,
            max_instances=max_instances,
        ),
    )
    names = _model_list(model, models, cfg.train.model)

    def progress(msg):
        console.print(f"[cyan]crossval[/cyan] {msg}", highlight=False)

    if cluster:
        from .cluster import make_client

        with make_client(cluster) as client:
            run_crossval(features, labels, out, cfg.train, names, allow_missing, progress, client)
    else:
        run_crossval(features, labels, out, cfg.train, names, allow_missing, progress)
    console.print((out / "report.md").read_text(), highlight=False, markup=False)


@app.command()
@user_errors
def predict(
    run: Annotated[Path, typer.Option(help="A crossval --out folder")],
    features: Annotated[Path, typer.Option(help="Folder of <slide>.h5 feature files")],
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="CSV to write (default RUN/predictions_new.csv)")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
):
    """Apply a run's fold ensemble to new slides' features."""
    from .training.crossval import predict_run

    out = out or run / "predictions_new.csv"
    rows = predict_run(run, features, out, device)
    console.print(f"{len(rows)} slide(s) predicted -> {out}", highlight=False)


@app.command()
@user_errors
def heatmap(
    slide: Annotated[Path, typer.Argument(help="The slide file")],
    run: Annotated[Path, typer.Option(help="A crossval --out folder")],
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Output folder (default heatmaps/)")
    ] = None,
    features: Annotated[
        Optional[Path], typer.Option(help="The slide's feature .h5 (else extracted with the run's encoder)")
    ] = None,
    model: Annotated[Optional[str], typer.Option(help="Which model of the run (default: its first)")] = None,
    score: Annotated[
        str, typer.Option(help="combined, attention or inversion (PNG and OME-TIFF)")
    ] = "combined",
    overlap: Annotated[float, typer.Option(help="Patch overlap when extracting (0.5 for a finer map)")] = 0.0,
    fold: Annotated[str, typer.Option(help="'all' (ensemble) or a fold number")] = "all",
    target: Annotated[
        Optional[str], typer.Option(help="Class whose evidence is mapped (default: the prediction)")
    ] = None,
    mpp: Mpp = None,
    config: Config = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "auto",
    no_viewer: Annotated[bool, typer.Option("--no-viewer", help="Skip the HTML viewer")] = False,
):
    """Per-patch attention + sparse-inversion scores -> PNG, QuPath GeoJSON, OME-TIFF, HTML."""
    from .config import load_config
    from .features.extract import resolve_device
    from .localization.heatmap import heatmap_slide

    if score not in ("combined", "attention", "inversion"):
        raise WsiMilError(f"--score {score}: choose combined, attention or inversion")
    cfg = load_config(config, heatmap={"score": score})
    summary = heatmap_slide(
        slide,
        run,
        out or Path("heatmaps"),
        features,
        model,
        fold,
        overlap,
        score,
        cfg,
        mpp,
        str(resolve_device(device)),
        not no_viewer,
        target,
    )
    console.print(
        f"{summary['slide']}: {summary['model']} ({summary['folds']} fold(s)) predicts "
        f"{summary['predicted']} (p = {summary['probability']:.3f})",
        highlight=False,
    )
    for key in ("png", "geojson", "ome_tiff", "html", "scores"):
        console.print(f"  {key:8s} {summary[key]}", highlight=False)


@app.command("evaluate-localization")
@user_errors
def evaluate_localization(
    scores: Annotated[Path, typer.Option(help="Folder of <slide>_scores.h5 from 'wsi-mil heatmap'")],
    annotations: Annotated[
        Path, typer.Option(help="Folder of <slide>.xml (ASAP) or <slide>.geojson tumour annotations")
    ],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="JSON file for the results")] = None,
    pos_frac: Annotated[float, typer.Option(help="Tumour fraction that makes a patch positive")] = 0.5,
):
    """Patch-level AUC of each score and Camelyon16-style FROC against annotations."""
    from .localization.evaluate import evaluate_folder

    result = evaluate_folder(scores, annotations, pos_frac)
    table = Table("score", "pooled patch AUC", "FROC", *[f"sens@{r}" for r in ("0.25", "1", "8")])
    for n, auc in result["pooled_patch_auc"].items():
        f = result["froc"][n]
        table.add_row(
            n, f"{auc:.3f}", f"{f['froc']:.3f}", *[f"{f['sensitivity'][r]:.3f}" for r in ("0.25", "1", "8")]
        )
    Console().print(table)
    out = out or scores / "localization.json"
    from .store import atomic_path

    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    console.print(f"-> {out}", highlight=False)


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

    summary = run_demo(
        out,
        slides,
        encoder,
        epochs,
        folds,
        log=lambda m: console.print(f"[cyan]demo[/cyan] {m}", highlight=False),
    )
    aucs = ", ".join(f"{k} {v:.3f}" for k, v in summary["test_auc"].items())
    console.print(
        f"test AUC: {aucs}; patch AUC (combined): {summary['patch_auc']['score']:.3f}", highlight=False
    )
    console.print(f"timings (s): {summary['timings_s']}", highlight=False)
    console.print(f"report: {out / 'report.html'}", highlight=False)


def main() -> None:  # pragma: no cover - console entry for `python -m wsi_mil`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
