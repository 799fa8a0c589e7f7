"""The per-slide stages: segment, tile and extract, each with its output and a `run`.

One opened slide flows segment -> tile -> extract: a stage makes the earlier stages' outputs
it needs when they are missing (or when `overwrite` asks for them anew) and reuses them
otherwise. Whether a slide is already done is decided in one place, `Stage.done`, used by the
runner (pipeline/runner.py); stages themselves always do their work when called.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import h5py

from ..config import PipelineConfig
from ..errors import EmptyInputError, WsiMilError
from ..formats.patches import read_patches, write_patches
from ..formats.tissue_geojson import qc_path, read_qc, read_qc_record, read_tissue, write_qc, write_tissue
from ..io import save_png
from ..wsi.collect import SlideEntry
from ..wsi.draw import draw_contours, draw_patches
from ..wsi.qc import apply_qc
from ..wsi.readers import open_slide
from ..wsi.slide import Slide
from ..wsi.tiling import PatchGrid, tile
from ..wsi.tissue import TissueMask, segment_tissue
from .layout import Layout

log = logging.getLogger("wsi_mil")


def user_patches_path(patches_dir: Path | None, name: str) -> Path | None:
    """A coords file for slide `name` in a CLAM (`<name>.h5`, also under `patches/`) or TRIDENT
    (`<name>_patches.h5`) output folder."""
    if patches_dir is None:
        return None
    for folder in (patches_dir, patches_dir / "patches"):
        for candidate in (folder / f"{name}.h5", folder / f"{name}_patches.h5"):
            if candidate.exists():
                return candidate
    return None


def user_tissue_path(tissue_geojson: Path | None, name: str) -> Path | None:
    """A user-supplied tissue annotation: a file, or `<name>.geojson` inside a folder."""
    if tissue_geojson is None:
        return None
    if tissue_geojson.is_dir():
        p = tissue_geojson / f"{name}.geojson"
        return p if p.exists() else None
    return tissue_geojson


@dataclass
class Stage:
    """Settings shared by every slide of one run of a stage over a work folder."""

    layout: Layout
    cfg: PipelineConfig
    overwrite: bool = False
    tissue_geojson: Path | None = None
    patches_dir: Path | None = None  # coords files written by CLAM or TRIDENT, used as they are
    name = "stage"
    reuses = ()  # earlier stages' outputs it reuses: "patches", "tissue"

    def __post_init__(self):  # here so the dataclass __init__ calls subclasses' overrides
        qc = self.cfg.qc
        if self.tissue_geojson is not None and qc.mode != "off" and "mode" in qc.model_fields_set:
            log.warning("--qc %s is not run on the tissue --tissue-geojson gives (taken as drawn)", qc.mode)
        if qc.mode != "off" and qc.model is not None:  # a bad --qc-model: one line, not one per slide
            from ..wsi.qc_model import load_grandqc_cached

            load_grandqc_cached(str(qc.model))

    def output(self, entry: SlideEntry) -> Path:  # pragma: no cover - every stage defines it
        raise TypeError(f"{type(self).__name__} names no output")

    def done(self, entry: SlideEntry) -> bool:
        """The slide needs no work: its output exists and --overwrite was not given. An output
        made otherwise than this run asks (settings it was given) is refused in one line."""
        if self.overwrite:
            return False
        out = self.output(entry)
        if not out.exists():  # an earlier stage's output it would reuse is checked now, not mid-run
            _refuse_changed(*self._reused(entry))
            return False
        _refuse_changed(out, self.changed_settings(out))
        return True

    def _reused(self, entry: SlideEntry) -> tuple[Path | None, list[str]]:
        """The earlier stage's output this stage would reuse for `entry` (patches, else the
        tissue file) and how it was made otherwise than this run asks."""
        if self.patches_dir is not None:  # a user's coords, used as they are
            return None, []
        patches, tissue = self.layout.patches(entry.name), self.layout.tissue(entry.name)
        if "patches" in self.reuses and patches.exists():
            return patches, self._grid_changes(self._attrs(patches))
        if "tissue" in self.reuses and tissue.exists():
            return tissue, self._tissue_changes(tissue)
        return None, []

    def _tissue_changes(self, tissue: Path) -> list[str]:
        qc = read_qc_record(tissue)
        return self._qc_changes(qc["mode"] if qc else "off")

    def changed_settings(self, out: Path) -> list[str]:
        """The settings this run was given (options or config) that `out` was made without
        ("name file's -> run's"); settings left unset never refuse a done slide."""
        return []

    @staticmethod
    def _attrs(out: Path) -> dict:
        """A patches or feature file's attributes (root, completed by those on `coords`)."""
        from ..formats.hdf5 import merged_attrs

        with h5py.File(out, "r") as f:
            return merged_attrs(f)

    def _grid_changes(self, attrs: dict) -> list[str]:
        """A patches or feature file's grid (mpp, patch size, overlap, QC on or off) against
        the ones this run was given; a user's coords or tissue annotation is used as given."""
        if self.patches_dir is not None:
            return []
        tiling, given = self.cfg.tiling, self.cfg.tiling.model_fields_set
        changed = []
        for k in ("target_mpp", "patch_size", "overlap"):
            now, made = getattr(tiling, k), attrs.get(k)
            if k in given and now is not None and made is not None and abs(float(made) - float(now)) > 1e-6:
                changed.append(f"{k} {float(made):g} -> {float(now):g}")
        made = attrs.get("qc_mode", "on" if "qc_removed" in attrs else "off")  # "on": before qc_mode
        return changed + self._qc_changes(str(made))

    def _qc_changes(self, made: str) -> list[str]:
        """QC's mode an output was made with ("on": remove or mark, files older than qc_mode)
        against the one this run was given."""
        now = self.cfg.qc.mode
        if "mode" not in self.cfg.qc.model_fields_set or self.tissue_geojson is not None:
            return []
        if made == now or (made == "on" and now != "off"):
            return []
        return [f"qc {made} -> {now}"]

    def tiling(self):
        """The tiling settings for this stage (unset size and mpp: 0.5 um/px, 256 px)."""
        return self.cfg.tiling.with_defaults()

    def _reuse(self, path: Path) -> bool:
        """An earlier stage's output is reused unless --overwrite redoes the whole chain."""
        return not self.overwrite and path.exists()

    # -- the chain, on one opened slide ---------------------------------------------------------
    def tissue_for(self, slide: Slide, entry: SlideEntry) -> TissueMask:
        """The slide's tissue mask: the saved one, the user's annotation, or a new segmentation."""
        out = self.layout.tissue(entry.name)
        if self._reuse(out):
            mask = read_tissue(out, slide.qupath_offset)
            if mask.qc is not None and qc_path(out).exists():  # tiling drops patches on artefacts
                mask.artefacts = read_qc(qc_path(out), slide.qupath_offset)
            return mask
        qc = self.cfg.qc
        if qc.mode != "off":  # QC's finer image first: the thumbnails below are resized from it
            slide.thumbnail_at_mpp(qc.detail_mpp)
        # the preview first: when it is the finer image, segmentation resizes it (one decode)
        thumb, thumb_mpp = slide.thumbnail_long_side(self.cfg.tissue.preview_px)
        user = user_tissue_path(self.tissue_geojson, entry.name)
        mask = (
            read_tissue(user, slide.qupath_offset)
            if user is not None
            else segment_tissue(slide, self.cfg.tissue)
        )
        if mask.is_empty:
            log.warning("%s: no tissue found; the mask is empty (try --threshold or a preset)", entry.path)
        if user is None:  # a user's annotation is taken as drawn (no QC on it)
            mask = apply_qc(slide, mask, qc)
        else:  # nor a QC record copied from the file (one of ours, passed back)
            mask.qc = None
        if mask.qc is not None:
            write_qc(qc_path(out), mask, slide.qupath_offset)
            if mask.qc["flagged"]:
                log.warning(
                    "%s: quality control %s %.0f%% of the tissue (over %.0f%%); see %s",
                    entry.path, "removed" if qc.mode == "remove" else "marked",
                    100 * mask.qc["removed_total"], 100 * qc.flag_fraction, qc_path(out),
                )  # fmt: skip
        write_tissue(out, mask, slide.qupath_offset)
        save_png(self.layout.tissue_png(entry.name), draw_contours(mask, thumb, thumb_mpp / slide.mpp))
        return mask

    def grid_for(self, slide: Slide, entry: SlideEntry) -> PatchGrid:
        """The slide's patch grid: the saved one, or tiled now (segmenting first if needed)."""
        theirs = user_patches_path(self.patches_dir, entry.name)
        if theirs is not None:
            return read_patches(theirs, slide.mpp)
        if self.patches_dir is not None:
            raise WsiMilError(
                f"{entry.path}: no coords file for {entry.name} in {self.patches_dir} (looked for "
                f"{entry.name}.h5 and {entry.name}_patches.h5, also under patches/)"
            )
        out = self.layout.patches(entry.name)
        if self._reuse(out):  # made as this run asks: `done` refused it otherwise
            return read_patches(out)
        mask = self.tissue_for(slide, entry)
        if mask.is_empty:
            raise EmptyInputError(
                f"{entry.path}: no tissue in the mask; check "
                f"{self.layout.tissue_png(entry.name)} or supply --tissue-geojson"
            )
        grid = tile(slide, mask, self.tiling())
        grid.attrs.update(qc_columns(mask))  # the slide's QC summary travels with its patches
        w, h = slide.dimensions
        if len(grid) == 0 and grid.patch_size_level0 > min(w, h):
            raise EmptyInputError(
                f"{entry.path}: a patch covers {int(grid.patch_size_level0)} level-0 px, more than the "
                f"slide's {w} x {h}: lower --patch-size or --target-mpp"
            )
        if len(grid) == 0:
            raise EmptyInputError(
                f"{entry.path}: no patch reaches --min-tissue {self.cfg.tiling.min_tissue}; "
                "lower --min-tissue or --patch-size"
            )
        write_patches(out, grid, slide_path=str(entry.path))
        thumb, thumb_mpp = slide.thumbnail_long_side(self.cfg.tissue.preview_px)
        save_png(self.layout.patches_png(entry.name), draw_patches(grid, thumb, thumb_mpp / slide.mpp))
        return grid


def _refuse_changed(out: Path | None, changed: list[str]) -> None:
    """One line when `out` (a done slide, or an earlier stage's output this stage would reuse)
    was made with other settings than this run was given."""
    if changed:
        raise WsiMilError(
            f"{out} was made with other settings ({'; '.join(changed)}): pass --overwrite to redo "
            "it, or write to another --out"
        )


def qc_columns(mask: TissueMask) -> dict:
    """The QC summary as flat manifest-style columns: qc_<reason> fractions, total, flagged."""
    if mask.qc is None:
        return {}
    qc = mask.qc
    cols = {f"qc_{r}": f for r, f in qc["removed_fraction"].items()}
    return {"qc_mode": qc["mode"], **cols, "qc_removed": qc["removed_total"], "qc_flagged": qc["flagged"]}


class SegmentStage(Stage):
    name = "segment"

    def output(self, entry):
        return self.layout.tissue(entry.name)

    def changed_settings(self, out: Path) -> list[str]:
        return self._tissue_changes(out)

    def run(self, entry: SlideEntry, on_batch=None) -> dict:
        with open_slide(entry.path, entry.mpp) as slide:
            mask = self.tissue_for(slide, entry)
        return {"patches": None, "polygons": len(mask.polygons.geoms), **qc_columns(mask)}


class TileStage(Stage):
    name = "tile"
    reuses = ("tissue",)

    def output(self, entry):
        return self.layout.patches(entry.name)

    def changed_settings(self, out: Path) -> list[str]:
        return self._grid_changes(self._attrs(out))

    def run(self, entry: SlideEntry, on_batch=None) -> dict:
        with open_slide(entry.path, entry.mpp) as slide:
            grid = self.grid_for(slide, entry)
        return {"patches": len(grid), **{k: v for k, v in grid.attrs.items() if k.startswith("qc_")}}


class ExtractStage(Stage):
    name = "extract"
    reuses = ("patches", "tissue")
    streams = True  # in one process, the runner encodes the cohort as one stream (`plan`)

    def __post_init__(self):
        super().__post_init__()
        ext = self.cfg.extract
        if ext.precision == "int8" and ext.int8_calibration is None:  # shared by every run on the folder
            ext.int8_calibration = str(self.layout.features_dir(ext.encoder) / "int8_calibration.npy")

    def output(self, entry):
        return self.layout.features(self.cfg.extract.encoder, entry.name)

    def changed_settings(self, out: Path) -> list[str]:
        """The grid, and the weights when given: random, or a file (the same path or sha256)."""
        attrs = self._attrs(out)  # one read for the grid and the weights
        changed = self._grid_changes(attrs)
        ext = self.cfg.extract
        made, sha = attrs.get("encoder_weights"), attrs.get("encoder_weights_sha256")
        if made is None or not (ext.weights or ext.random_weights):  # unset: the hub's, or as made
            return changed
        made, now = str(made), str(ext.weights) if ext.weights else "random"
        same = now == made
        if not same and now != "random":  # a file: the same path, or the same bytes
            from ..features.weights import file_sha256

            same = Path(made).resolve() == Path(now).resolve() or (
                sha is not None and Path(now).is_file() and str(sha) == file_sha256(Path(now))
            )
        return changed if same else [*changed, f"encoder weights {made} -> {now}"]

    _tiling = None  # resolved once; pickled with the stage, so planning processes need no torch

    def tiling(self):
        """Unset --target-mpp / --patch-size come from the encoder's training resolution."""
        if self._tiling is None:
            from ..features.encoders import recommended_tiling

            name = self.cfg.extract.encoder
            mpp, px = recommended_tiling(name) or (0.5, 256)
            self._tiling = self.cfg.tiling.with_defaults(mpp, px, f"encoder {name}")
        return self._tiling

    def run(self, entry: SlideEntry, on_batch=None) -> dict:
        from ..features.extract import extract_features
        from ..features.runner import runner_for

        with open_slide(entry.path, entry.mpp) as slide:
            grid = self.grid_for(slide, entry)
        out = self.output(entry)  # with --overwrite the old file is replaced only when complete
        runner = runner_for(self.cfg.extract)
        summary = extract_features(entry.path, grid, runner, out, self.cfg.extract, entry.mpp, on_batch)
        return {**summary, **{k: v for k, v in grid.attrs.items() if k.startswith("qc_")}}

    def plan(self, entry: SlideEntry, grid: PatchGrid | None = None):
        """The slide as a job of the cohort stream (features/stream.py): tiled (segmenting
        first if needed) unless a planning process passes its `grid`, and its feature file
        opened, resuming a partial one."""
        from ..features.extract import open_feature_writer
        from ..features.runner import runner_for
        from ..features.stream import StreamJob

        if grid is None:
            with open_slide(entry.path, entry.mpp) as slide:
                grid = self.grid_for(slide, entry)
        writer = open_feature_writer(
            self.output(entry), grid, runner_for(self.cfg.extract), self.cfg.extract, entry.path
        )
        return StreamJob(entry.name, entry.path, entry.mpp, grid, writer)


STAGES: dict[str, type[Stage]] = {"segment": SegmentStage, "tile": TileStage, "extract": ExtractStage}


def prepare_grid(stage: Stage, entry: SlideEntry) -> PatchGrid:
    """Segment and tile one slide into the stage's work folder, in a planning process. The
    grid goes back to the stream, which then need not open the slide: that open was the stream
    process's largest serial cost per slide (docs/benchmarks.md, GPU stream)."""
    with open_slide(entry.path, entry.mpp) as slide:
        return stage.grid_for(slide, entry)
