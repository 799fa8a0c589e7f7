"""The terminal side of the CLI: one rich console, one-line errors, progress, shared options.

Commands in cli.py stay thin: they parse options with the shared types below, call a stage
runner or a protocol function, and report through these helpers. Exit status: 0 all done,
1 some slide or bag failed (the summary names them), 2 bad input (one line, no traceback).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .errors import WsiMilError

console = Console(stderr=True)
log = logging.getLogger("wsi_mil")

Slides = Annotated[
    list[str], typer.Argument(help="Slide files, folders of slides, or CSV slide lists (path[,mpp])")
]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output folder")]
Mpp = Annotated[Optional[float], typer.Option("--mpp", help="um/px for slides that record none")]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", help="Redo outputs that exist (a flag: takes no value)")
]
Config = Annotated[
    Optional[str], typer.Option("--config", "-c", help="YAML config or preset name (biopsy, resection, ...)")
]
PatchesDir = Annotated[
    Optional[Path],
    typer.Option("--patches", help="Folder of coords files from CLAM or TRIDENT to use as the grid"),
]
TissueGeo = Annotated[
    Optional[Path],
    typer.Option("--tissue-geojson", help="GeoJSON tissue annotation (file, or folder of <slide>.geojson)"),
]
TargetMpp = Annotated[Optional[float], typer.Option("--target-mpp", help="um/px of the patches (0.5 ~ 20x)")]
PatchSize = Annotated[Optional[int], typer.Option("--patch-size", help="Patch side in px at --target-mpp")]
Overlap = Annotated[
    Optional[float], typer.Option("--overlap", help="Fraction of the patch side shared (0-0.9)")
]
MinTissue = Annotated[
    Optional[float], typer.Option("--min-tissue", help="Tissue fraction a patch needs (0-1)")
]
Device = Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda or cuda:N")]
FailFast = Annotated[
    bool, typer.Option("--fail-fast", help="Stop at the first failing slide (default: keep going)")
]
Cluster = Annotated[
    Optional[str],
    typer.Option("--cluster", help="Dask cluster: local:N, tcp://host:8786 or slurm:CONFIG.yaml"),
]

# extract
Encoder = Annotated[
    Optional[str], typer.Option(help="resnet50_trunc, resnet18, timm:<name> or hf-hub:<repo>")
]
Weights = Annotated[Optional[str], typer.Option(help="Local .pth/.bin/.safetensors weights")]
RandomWeights = Annotated[
    bool, typer.Option("--random-weights", help="Random encoder weights (tests, benchmarks, offline demo)")
]
Precision = Annotated[
    Optional[str], typer.Option(help="auto, fp32, bf16, fp16, or int8 (CNN encoders on a CPU with VNNI)")
]
BatchSize = Annotated[Optional[int], typer.Option(help="Patches per encoder batch")]
Workers = Annotated[
    Optional[int],
    typer.Option(help="Readers (default: a thread on a CPU, a process per spare core on a GPU)"),
]
FeatureDtype = Annotated[Optional[str], typer.Option("--dtype", help="float32 or float16 features")]
Compile = Annotated[Optional[str], typer.Option("--compile", help="torch.compile: auto, on, off")]
# crossval, predict, heatmap
RunDir = Annotated[Path, typer.Option(help="A crossval --out folder")]
DeviceAuto = Annotated[str, typer.Option(help="auto, cpu or cuda")]
AllowMissing = Annotated[
    bool, typer.Option("--allow-missing", help="Skip labelled slides without features (and vice versa)")
]
MaxInstances = Annotated[
    Optional[int], typer.Option(help="Sample at most this many instances per training bag")
]


def tiling_options(target_mpp, patch_size, overlap, min_tissue) -> dict:
    return dict(target_mpp=target_mpp, patch_size=patch_size, overlap=overlap, min_tissue=min_tissue)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
        force=True,
    )
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)  # damaged files are reported per slide
    for noisy in ("distributed", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def user_errors(fn):
    """Run a command: WsiMilError becomes one red line and exit status 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        setup_logging()
        try:
            return fn(*args, **kwargs)
        except WsiMilError as exc:
            console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def say(text: str) -> None:
    console.print(text, highlight=False)


def finish_stage(result, manifest_path: Path) -> None:
    """Print the stage summary; exit 1 when any slide failed."""
    say(f"{result.summary()}; manifest {manifest_path}")
    if not result.ok:
        raise typer.Exit(1)


def run_stage_with_progress(stage, entries, *, map_fn=None, fail_fast=False, label=None):
    """`pipeline.runner.run_stage` with a cohort bar and a per-slide patch bar."""
    from .pipeline.runner import run_stage

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        cohort = bar.add_task(label or stage.name, total=len(entries))
        patches = bar.add_task("patches", total=None, visible=map_fn is None and stage.name == "extract")

        def on_start(entry, i, n):
            bar.update(patches, description=entry.name, completed=0, total=None)

        def on_done(entry, outcome):
            bar.advance(cohort)

        result = run_stage(
            stage,
            entries,
            map_fn=map_fn,
            fail_fast=fail_fast,
            on_start=on_start,
            on_done=on_done,
            on_batch=lambda done, total: bar.update(patches, completed=done, total=total),
        )
        bar.update(cohort, completed=len(entries))
    return result


def cluster_map(spec: str | None):
    """A context manager yielding a Dask map function for `--cluster`, or None without one."""
    import contextlib

    if not spec:
        return contextlib.nullcontext(None)
    from .cluster import dask_map, make_client

    @contextlib.contextmanager
    def ctx():
        with make_client(spec) as client:
            yield dask_map(client)

    return ctx()


def run_slides(
    stage_name: str,
    slides,
    mpp,
    out,
    cfg,
    overwrite,
    tissue_geojson,
    fail_fast=False,
    cluster=None,
    patches=None,
):
    """A per-slide command: collect the slides, build the stage, run it with progress, report."""
    from .pipeline.layout import Layout
    from .pipeline.stages import STAGES
    from .wsi.collect import collect_slides

    entries = collect_slides(slides, mpp)
    stage = STAGES[stage_name](Layout(out), cfg, overwrite, tissue_geojson, patches)
    if stage_name == "extract" and not all(stage.done(e) for e in entries) and not cluster:
        from .features.runner import runner_for  # build the encoder now: a bad one fails early

        r = runner_for(cfg.extract)
        info = r.info
        say(f"encoder {info.name} ({info.dim}-d, weights {info.weights}) on {r.device} {r.precision_name}")
    with cluster_map(cluster) as map_fn:
        result = run_stage_with_progress(stage, entries, map_fn=map_fn, fail_fast=fail_fast)
    finish_stage(result, stage.layout.manifest(stage_name))


def print_slide_info(infos: list[dict]) -> None:
    table = Table(
        "slide", "backend", "level-0 size", "levels", "downsamples", "mpp", "mpp source", "objective"
    )
    for i in infos:
        table.add_row(
            Path(i["slide"]).name, i["backend"], i["level0_size"], str(i["levels"]), i["downsamples"],
            f"{i['mpp']:.4f}", i["mpp_source"], str(i["objective_power"] or "-"),
        )  # fmt: skip
    Console().print(table)


def print_localization(result: dict) -> None:
    rates = ("0.25", "1", "8")
    table = Table(
        "layer", "scale", "per-slide patch AUC", "pooled AUC", "pooled, shuffled", "ECE", "FROC",
        *[f"sens@{r}" for r in rates],
    )  # fmt: skip
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
    for n, auc in result["mean_slide_patch_auc"].items():
        f = result["froc"][n]
        ece = result["reliability"].get(n, {}).get("ece")
        table.add_row(
            n, result["layers"][n], fmt(auc), fmt(result["pooled_patch_auc"][n]),
            fmt(result["pooled_patch_auc_shuffled"][n]), fmt(ece), fmt(f["froc"]),
            *[fmt(f["sensitivity"][r]) for r in rates],
        )  # fmt: skip
    Console(width=max(160, Console().width)).print(table)
    lesions = next(iter(result["froc"].values()))["lesions"]
    tumor = sum(1 for r in result["per_slide"].values() if r["tumor"])
    say(
        f"per-slide AUC: mean over {tumor} tumour slide(s); slide AUC {fmt(result.get('slide_auc'))}; "
        f"{lesions} lesion(s), isolated tumour cells excluded"
    )


def print_encoders(rows: list[dict]) -> None:
    table = Table("name", "dim", "input px", "mpp", "patch px", "resize", "weights", "gated")
    for r in rows:
        table.add_row(
            r["name"], str(r["dim"]), str(r["input_px"]), f"{r['mpp']:g}", str(r["patch_px"]),
            r["interpolation"], r["weights"], "yes" if r["gated"] else "no",
        )  # fmt: skip
    Console().print(table)
