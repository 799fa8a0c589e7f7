"""The `wsi-mil` command line: parses options, loads configs, loops over slides with progress.

Every command calls plain functions from the stage modules; errors the user can fix are
printed as one line and exit with status 2.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from .errors import WsiMilError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Whole-slide images to MIL diagnoses and reviewed heatmaps.")
console = Console(stderr=True)
log = logging.getLogger("wsi_mil")

Slides = Annotated[list[str], typer.Argument(help="Slide files, folders of slides, or CSV slide lists (path[,mpp])")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output folder")]
Mpp = Annotated[Optional[float], typer.Option("--mpp", help="um/px for slides that record none")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Redo slides whose outputs exist")]
Config = Annotated[Optional[str], typer.Option("--config", "-c", help="YAML config or preset name (biopsy, resection, ...)")]
TissueGeo = Annotated[Optional[Path], typer.Option("--tissue-geojson", help="GeoJSON tissue annotation (file, or folder of <slide>.geojson) replacing segmentation")]


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
                        force=True)


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
    console.print(f"{stage}: {ok} slide(s) done, {len(failed)} failed; manifest {manifest.path}",
                  highlight=False)
    if failed and ok == 0:
        raise typer.Exit(1)


@app.command()
@user_errors
def info(slides: Slides, mpp: Mpp = None,
         backend: Annotated[str, typer.Option(help="auto, openslide, tiffslide or image")] = "auto"):
    """Show backend, size, pyramid levels, mpp (and its source) and objective power."""
    from .slide import collect_slides, open_slide

    table = Table("slide", "backend", "level-0 size", "levels", "downsamples", "mpp",
                  "mpp source", "objective")
    for entry in collect_slides(slides, mpp):
        with open_slide(entry.path, entry.mpp, backend) as s:
            i = s.info()
            table.add_row(entry.path.name, i["backend"], i["level0_size"], str(i["levels"]),
                          i["downsamples"], f"{i['mpp']:.4f}", i["mpp_source"],
                          str(i["objective_power"] or "-"))
    Console().print(table)


def _tissue_overrides(threshold: str | None) -> dict:
    if threshold is None:
        return {}
    return {"threshold": "otsu" if threshold == "otsu" else int(threshold)}


@app.command()
@user_errors
def segment(slides: Slides, out: Out, mpp: Mpp = None, config: Config = None,
            threshold: Annotated[Optional[str], typer.Option(help="'otsu' or a saturation value 0-255")] = None,
            tissue_geojson: TissueGeo = None, overwrite: Overwrite = False):
    """Segment tissue: writes tissue/<slide>.geojson (QuPath) and a contour thumbnail."""
    from .config import load_config
    from .pipeline import Layout, run_per_slide, segment_one
    from .slide import collect_slides

    cfg = load_config(config, tissue=_tissue_overrides(threshold))
    layout = Layout(out)
    entries = collect_slides(slides, mpp)
    manifest = run_per_slide(
        entries, "segment", layout,
        lambda e: len(segment_one(e, layout, cfg.tissue, True, tissue_geojson).polygons.geoms),
        lambda e: not overwrite and layout.tissue(e.name).exists(), progress=_progress("segment"))
    _report(manifest, "segment")


@app.command("tile")
@user_errors
def tile_cmd(slides: Slides, out: Out, mpp: Mpp = None, config: Config = None,
             target_mpp: Annotated[Optional[float], typer.Option("--target-mpp", help="um/px of the patches (0.5 ~ 20x)")] = None,
             patch_size: Annotated[Optional[int], typer.Option(help="Patch side in px at --target-mpp")] = None,
             overlap: Annotated[Optional[float], typer.Option(help="Fraction of the patch side shared by neighbours (0-0.9)")] = None,
             min_tissue: Annotated[Optional[float], typer.Option(help="Tissue fraction a patch needs (0-1)")] = None,
             tissue_geojson: TissueGeo = None, overwrite: Overwrite = False):
    """Tile tissue into patches at a target mpp: writes patches/<slide>.h5 (coords) + preview."""
    from .config import load_config
    from .pipeline import Layout, run_per_slide, tile_one
    from .slide import collect_slides

    cfg = load_config(config, tiling=dict(target_mpp=target_mpp, patch_size=patch_size,
                                          overlap=overlap, min_tissue=min_tissue))
    layout = Layout(out)
    manifest = run_per_slide(
        collect_slides(slides, mpp), "tile", layout,
        lambda e: len(tile_one(e, layout, cfg.tissue, cfg.tiling, overwrite, tissue_geojson)),
        lambda e: not overwrite and layout.patches(e.name).exists(), progress=_progress("tile"))
    _report(manifest, "tile")


def main() -> None:  # pragma: no cover - console entry for `python -m wsi_mil`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
