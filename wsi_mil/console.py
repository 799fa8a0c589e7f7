"""The terminal side of the CLI: one rich console, one-line errors, progress, shared options,
and the command classes every command gets (help with defaults, flags shown as flags, one hint
for a flag given a value).

Commands in cli.py stay thin: they parse options with the shared types below, call a stage
runner or a protocol function, and report through these helpers. Exit status: 0 all done,
1 some slide or bag failed (the summary names them), 2 bad input (one line, no traceback).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from typer.core import TyperArgument, TyperCommand, TyperGroup

from .config import PipelineConfig
from .errors import WsiMilError

console = Console(stderr=True)
log = logging.getLogger("wsi_mil")
FLAG_VALUES = {"true", "false", "yes", "no", "on", "off", "1", "0", "y", "n", "t", "f"}


def fail(message: str, code: int = 2) -> NoReturn:
    """One red `error:` line on stderr, exit status `code` (2: bad input)."""
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def flag_given_a_value(command, ctx, args: list[str]) -> tuple[str, str] | None:
    """(flag, as written) where `args` give a flag a value: `--flag=v`, `--flag true`, or
    `--flag v` with `v` left over as an extra argument; None where no flag has one."""
    flags = {
        o for p in command.get_params(ctx) if getattr(p, "is_flag", False) for o in p.opts + p.secondary_opts
    }
    try:
        extra = command.make_parser(ctx).parse_args(list(args))[1]
    except Exception:  # a bad command line: the real parse reports it
        extra = []
    for arg, value in zip(args, [*args[1:], None]):
        if arg == "--":
            break
        name, eq, _ = arg.partition("=")
        if eq and name in flags:
            return name, arg
        if arg in flags and value is not None and (value.lower() in FLAG_VALUES or value in extra):
            return arg, f"{arg} {value}"
    return None


class _FlagsShownAsFlags:
    """Help shows a flag without a type (typer's rich help would write `--flag <bool>`)."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for p in params:
            if getattr(p, "is_flag", False):
                p.metavar = ""
        return params


class Command(_FlagsShownAsFlags, TyperCommand):
    """A command: flags shown as flags, `SLIDES...` in the usage line, one hint for `--flag value`."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if isinstance(p, TyperArgument):
                name = (p.metavar or p.name).upper()
                pieces.append((name if p.required else f"[{name}]") + ("..." if p.nargs != 1 else ""))
        return pieces

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        given = flag_given_a_value(self, ctx, args)
        if given:
            fail(f"{given[0]} is a flag and takes no value: write {given[0]}, not {given[1]}")
        return super().parse_args(ctx, args)


class Group(_FlagsShownAsFlags, TyperGroup):
    """The `wsi-mil` group: its `--help` shown as a flag too."""


class App(typer.Typer):
    """`typer.Typer` whose commands are all `Command`s, however they are registered."""

    def __init__(self, **kwargs):
        super().__init__(cls=Group, **kwargs)

    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or Command, **kwargs)


_TILED = PipelineConfig().tiling.with_defaults()  # tiling's built-in mpp and patch size
DEVICE_HELP = "auto, cpu, cuda or cuda:N"


def config_option(section: str, name: str, help: str, flag: str | None = None, unset: object = None):
    """An option --config may set: help says 'from --config, else <default>' (`unset`: None)."""
    value = getattr(getattr(PipelineConfig(), section), name)
    if isinstance(value, bool):
        value = ("--" if value else "--no-") + name.replace("_", "-")
    shown = f"from --config, else {unset if value is None else value}"
    return typer.Option(*[flag] if flag else [], help=help, show_default=shown)


def _grid(name: str, help: str, encoder: bool = False):
    """--target-mpp / --patch-size: from --config, else (extract) the encoder's, else tiling's."""
    unset = getattr(_TILED, name)
    flag = "--" + name.replace("_", "-")
    return config_option("tiling", name, help, flag, f"the encoder's, else {unset}" if encoder else unset)


Slides = Annotated[
    list[str], typer.Argument(help="Slide files, folders of slides, or CSV slide lists (path[,mpp])")
]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output folder")]
Mpp = Annotated[
    Optional[float],
    typer.Option("--mpp", help="um/px for slides that record none", show_default="the slide's own"),
]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Redo outputs that exist")]
Config = Annotated[
    Optional[str],
    typer.Option(
        "--config",
        "-c",
        help="YAML config or preset name (biopsy, resection, ...)",
        show_default="built-in settings",
    ),
]
PatchesDir = Annotated[
    Optional[Path],
    typer.Option(
        "--patches",
        help="Folder of coords files from CLAM or TRIDENT to use as the grid",
        show_default="tile the tissue",
    ),
]
TissueGeo = Annotated[
    Optional[Path],
    typer.Option(
        "--tissue-geojson",
        help="GeoJSON tissue annotation (file, or folder of <slide>.geojson)",
        show_default="segment the tissue",
    ),
]
_MPP, _PX = "um/px of the patches (0.5 ~ 20x)", "Patch side in px at --target-mpp"
TargetMpp = Annotated[Optional[float], _grid("target_mpp", _MPP)]
PatchSize = Annotated[Optional[int], _grid("patch_size", _PX)]
EncoderMpp = Annotated[Optional[float], _grid("target_mpp", _MPP, encoder=True)]
EncoderPatchSize = Annotated[Optional[int], _grid("patch_size", _PX, encoder=True)]
Overlap = Annotated[
    Optional[float], config_option("tiling", "overlap", "Fraction of the patch side shared (0-0.9)")
]
MinTissue = Annotated[
    Optional[float], config_option("tiling", "min_tissue", "Tissue fraction a patch needs (0-1)")
]
QC = Annotated[  # the one --qc option of segment, tile and extract (wsi/qc.py)
    Optional[str], config_option("qc", "mode", "Tissue QC: remove artefacts, mark them only, or off", "--qc")
]
QCModel = Annotated[  # GrandQC's artefact model in place of the rules (wsi/qc_model.py)
    Optional[Path], config_option("qc", "model", "GrandQC state dict", "--qc-model", "the rules")
]
Device = Annotated[Optional[str], config_option("extract", "device", DEVICE_HELP, "--device")]
TrainDevice = Annotated[Optional[str], config_option("train", "device", DEVICE_HELP, "--device")]
DeviceAuto = Annotated[str, typer.Option("--device", help=DEVICE_HELP)]
FailFast = Annotated[
    bool, typer.Option("--fail-fast", help="Stop at the first failing slide (default: keep going)")
]
Cluster = Annotated[
    Optional[str],
    typer.Option(
        "--cluster",
        help="Dask cluster: local:N, tcp://host:8786 or slurm:CONFIG.yaml",
        show_default="none: run here",
    ),
]

# extract
Encoder = Annotated[
    Optional[str],
    config_option("extract", "encoder", "resnet50_trunc, resnet18, timm:<name> or hf-hub:<repo>"),
]
Weights = Annotated[
    Optional[str],
    config_option("extract", "weights", "Local .pth/.bin/.safetensors weights", unset="the encoder's own"),
]
RandomWeights = Annotated[
    bool, typer.Option("--random-weights", help="Random encoder weights (tests, benchmarks, offline demo)")
]
Precision = Annotated[
    Optional[str],
    config_option("extract", "precision", "auto, fp32, bf16, fp16, or int8 (CNNs, CPU with VNNI)"),
]
BatchSize = Annotated[Optional[int], config_option("extract", "batch_size", "Patches per encoder batch")]
_READERS = "a thread on a CPU, a process per spare core on a GPU"
Workers = Annotated[Optional[int], config_option("extract", "workers", "Readers", unset=_READERS)]
FeatureDtype = Annotated[
    Optional[str], config_option("extract", "dtype", "float32 or float16 features", "--dtype")
]
Compile = Annotated[
    Optional[str], config_option("extract", "compile", "torch.compile: auto, on, off", "--compile")
]
# crossval, predict, heatmap
RunDir = Annotated[Path, typer.Option(help="A crossval --out folder")]
AllowMissing = Annotated[
    bool, typer.Option("--allow-missing", help="Skip labelled slides without features (and vice versa)")
]
MaxInstances = Annotated[
    Optional[int], config_option("train", "max_instances", "Cap on instances per training bag", unset="all")
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
    """Run a command: WsiMilError or an OS error naming a file is one red line, exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        setup_logging()
        try:
            return fn(*args, **kwargs)
        except WsiMilError as exc:
            fail(str(exc), exc.exit_code)
        except OSError as exc:  # a folder that cannot be made or written (--out under a file, /proc)
            if exc.filename is None or not exc.strerror:
                raise
            fail(f"{exc.filename}: {exc.strerror}; check the path and its permissions", 2)

    return wrapper


def say(text: str) -> None:
    console.print(text, highlight=False)


def stdout(min_width: int = 0) -> Console:
    """stdout at the terminal's width (at least `min_width`); unbounded in a pipe: no table is cut."""
    term = Console()
    return Console(width=max(term.width, min_width) if term.is_terminal else 100_000)


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
    stdout().print(table)


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
    stdout(min_width=160).print(table)
    lesions = next(iter(result["froc"].values()))["lesions"]
    tumor = sum(1 for r in result["per_slide"].values() if r["tumor"])
    say(
        f"per-slide AUC: mean over {tumor} tumour slide(s); slide AUC {fmt(result.get('slide_auc'))}; "
        f"{lesions} lesion(s), isolated tumour cells excluded"
    )


def print_encoders(rows: list[dict], slide: bool = False) -> None:
    """The patch encoder table, or (`slide`) the slide encoder table with the input it takes."""
    cols = ("input", "mpp", "patch px") if slide else ("input px", "mpp", "patch px", "resize")
    table = Table("slide encoder" if slide else "name", "dim", *cols, "weights", "gated", "requires")
    for r in rows:
        grid = [f"{r['mpp']:g}" if r["mpp"] else "any", str(r["patch_px"] or "any")]
        mid = [r["input"], *grid] if slide else [str(r["input_px"]), *grid, r["interpolation"]]
        table.add_row(
            r["name"], str(r["dim"]), *mid, r["weights"], "yes" if r["gated"] else "no", r.get("extra") or "-"
        )
    stdout().print(table)
