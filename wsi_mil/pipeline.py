"""Per-slide stage runners shared by the CLI and the demo: output layout, skipping, manifests.

Output layout under one `--out DIR`:
  tissue/<slide>.geojson, tissue/<slide>.png     segmentation
  patches/<slide>.h5, patches/<slide>.png        tiling
  features/<encoder>/<slide>.h5                  extraction
  manifest_<stage>.csv                           one row per slide per run
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import cv2

from .config import PipelineConfig, TilingConfig, TissueConfig
from .errors import EmptyInputError, WsiMilError
from .slide import SlideEntry, open_slide
from .store import Manifest, atomic_path, read_patches, write_patches
from .tiling import PatchGrid, draw_patches, tile
from .tissue import TissueMask, draw_contours, load_tissue, save_tissue, segment_tissue

log = logging.getLogger("wsi_mil")


@dataclass
class Layout:
    out: Path

    def tissue(self, name: str) -> Path:
        return self.out / "tissue" / f"{name}.geojson"

    def tissue_png(self, name: str) -> Path:
        return self.out / "tissue" / f"{name}.png"

    def patches(self, name: str) -> Path:
        return self.out / "patches" / f"{name}.h5"

    def patches_png(self, name: str) -> Path:
        return self.out / "patches" / f"{name}.png"

    def features_dir(self, encoder: str) -> Path:
        return self.out / "features" / encoder.replace("/", "_").replace(":", "_")

    def features(self, encoder: str, name: str) -> Path:
        return self.features_dir(encoder) / f"{name}.h5"

    def manifest(self, stage: str) -> Path:
        return self.out / f"manifest_{stage}.csv"


def save_png(path: Path, rgb) -> None:
    with atomic_path(path) as tmp:
        ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        tmp.write_bytes(buf.tobytes())


def user_tissue_path(tissue_geojson: Path | None, name: str) -> Path | None:
    """A user-supplied tissue annotation: a file, or `<name>.geojson` inside a folder."""
    if tissue_geojson is None:
        return None
    if tissue_geojson.is_dir():
        p = tissue_geojson / f"{name}.geojson"
        return p if p.exists() else None
    return tissue_geojson


def segment_one(
    entry: SlideEntry,
    layout: Layout,
    cfg: TissueConfig,
    overwrite: bool = False,
    tissue_geojson: Path | None = None,
) -> TissueMask:
    """Segment one slide (or take the user's annotation) and write GeoJSON + contour PNG."""
    out = layout.tissue(entry.name)
    if out.exists() and not overwrite:
        return load_tissue(out)
    with open_slide(entry.path, entry.mpp) as slide:
        user = user_tissue_path(tissue_geojson, entry.name)
        if user is not None:
            mask = load_tissue(user)
            mask.thumbnail, mask.thumb_mpp = slide.thumbnail_at_mpp(cfg.seg_mpp)
        else:
            mask = segment_tissue(slide, cfg)
        if mask.is_empty:
            log.warning("%s: no tissue found; the mask is empty (try --threshold or a preset)", entry.path)
        save_tissue(mask, out)
        thumb_px = mask.thumb_mpp / slide.mpp
        save_png(layout.tissue_png(entry.name), draw_contours(mask, mask.thumbnail, thumb_px))
    return mask


def tile_one(
    entry: SlideEntry,
    layout: Layout,
    tissue_cfg: TissueConfig,
    cfg: TilingConfig,
    overwrite: bool = False,
    tissue_geojson: Path | None = None,
) -> PatchGrid:
    """Tile one slide (segmenting first when its tissue file is missing); write coords + preview."""
    out = layout.patches(entry.name)
    if out.exists() and not overwrite:
        return read_patches(out)
    mask = segment_one(entry, layout, tissue_cfg, overwrite, tissue_geojson)
    with open_slide(entry.path, entry.mpp) as slide:
        if mask.is_empty:
            raise EmptyInputError(
                f"{entry.path}: no tissue in the mask; check "
                f"{layout.tissue_png(entry.name)} or supply --tissue-geojson"
            )
        grid = tile(slide, mask, cfg)
        if len(grid) == 0:
            raise EmptyInputError(
                f"{entry.path}: no patch reaches --min-tissue {cfg.min_tissue}; "
                "lower --min-tissue or --patch-size"
            )
        write_patches(out, grid, slide_path=str(entry.path))
        if mask.thumbnail is None:  # a saved mask loaded from GeoJSON carries no image
            mask.thumbnail, mask.thumb_mpp = slide.thumbnail_at_mpp(tissue_cfg.seg_mpp)
        preview = draw_patches(grid, mask.thumbnail, mask.thumb_mpp / slide.mpp)
        save_png(layout.patches_png(entry.name), preview)
    return grid


def run_per_slide(
    entries: Iterable[SlideEntry],
    stage: str,
    layout: Layout,
    fn: Callable[[SlideEntry], int | None],
    done: Callable[[SlideEntry], bool],
    fail_fast: bool = False,
    progress=None,
) -> Manifest:
    """Call `fn` for each slide not yet `done`; record outcomes; one bad slide does not stop others.

    `fn` returns the number of patches (or None). `progress(entry, i, n)` is called before each.
    """
    entries = list(entries)
    manifest = Manifest(layout.manifest(stage))
    for i, entry in enumerate(entries):
        if progress:
            progress(entry, i, len(entries))
        if done(entry):
            if entry.name not in manifest.rows:
                manifest.record(entry.name, "skipped")
            continue
        t0 = time.perf_counter()
        try:
            n = fn(entry)
        except WsiMilError as exc:
            manifest.record(entry.name, "failed", error=str(exc))
            log.error("%s", exc)
            if fail_fast:
                raise
            continue
        except Exception as exc:
            msg = f"{entry.path}: {type(exc).__name__}: {exc}"
            manifest.record(entry.name, "failed", error=msg)
            log.error("%s", msg)
            if fail_fast:
                raise
            continue
        manifest.record(entry.name, "ok", n, time.perf_counter() - t0)
    return manifest


def extract_one(
    entry: SlideEntry,
    layout: Layout,
    cfg: PipelineConfig,
    runner,
    overwrite: bool = False,
    tissue_geojson: Path | None = None,
    on_batch=None,
) -> dict:
    """Tile if needed, then encode one slide into features/<encoder>/<slide>.h5."""
    from .features.extract import extract_features

    grid = tile_one(entry, layout, cfg.tissue, cfg.tiling, overwrite, tissue_geojson)
    out = layout.features(runner.info.name, entry.name)
    if out.exists() and overwrite:
        out.unlink()
    return extract_features(entry.path, grid, runner, out, cfg.extract, entry.mpp, on_batch)
