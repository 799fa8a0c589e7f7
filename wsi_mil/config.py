"""Per-stage settings (pydantic), loaded from YAML presets in configs/ plus CLI overrides, and
the experiment files `wsi-mil run` takes (an `experiment:` section beside the stage sections)."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, ValidationError

from .errors import WsiMilError

CONFIG_DIR = Path(__file__).parent / "configs"


class Section(BaseModel):
    """A config section: a misspelt key is an error (`explain` names it), never ignored."""

    model_config = {"extra": "forbid"}


class TissueConfig(Section):
    """Tissue segmentation on a low-resolution image (CLAM-style saturation thresholding)."""

    seg_mpp: float = Field(8.0, description="um/px of the image segmentation runs on")
    threshold: Literal["otsu"] | int = "otsu"
    blur_um: float = Field(56.0, description="median blur kernel in um (CLAM mthresh=7 at 8 um/px)")
    close_um: float = Field(32.0, description="morphological closing kernel in um")
    min_tissue_area_um2: float = 0.25e6
    min_hole_area_um2: float = 0.05e6
    max_holes: int = 8
    preview_px: int = Field(1024, ge=64, description="long side of tissue and tiling previews, px")


class QCConfig(Section):
    """Tissue quality control between segmentation and tiling (wsi/qc_rules.py documents each
    rule and where its threshold comes from). Gray levels and saturations are 0-255."""

    # remove by default: on the painted slides (docs/benchmarks.md) it takes >= 93% of every
    # artefact for <= 1.9% of clean tissue; off leaves all of it
    mode: Literal["remove", "mark", "off"] = Field(
        "remove", description="remove: artefacts become holes in the tissue; mark: only written"
    )
    model: Path | None = Field(
        None, description="GrandQC artefact model state dict (wsi/qc_model.py): replaces the rules"
    )
    model_mpp: float = Field(1.0, description="um/px the GrandQC model was trained at (MPP1: 1.0)")
    grid_um: float = Field(16.0, description="um/px of the grid the rules run on (the smoothing's scale)")
    detail_mpp: float = Field(4.0, description="um/px of the blur image (HistoQC's 2.5x)")
    white_gray: int = Field(230, description="background: gray above this (HistoQC 0.9)")
    grey_std: float = Field(10.0, description="greyspace: RGB std below this (HistoQC lower_std)")
    black_value: int = Field(70, description="black ink / scanner border: HSV value below this")
    black_chroma: int = Field(30, description="... and max-min of RGB below this (neutral)")
    pen_saturation: int = Field(80, description="blue/green ink: HSV saturation above this")
    red_saturation: int = Field(170, description="red ink: HSV saturation above this")
    fold_od_ratio: float = Field(
        1.7, description="fold: optical density / that of tissue of its stain mix above this"
    )
    fold_extend_ratio: float = Field(1.45, description="fold: grown into connected cells above this ratio")
    fold_bins: int = Field(8, description="fold: tissue compared within this many stain-mix bins")
    fold_passes: int = Field(2, ge=1, description="fold: medians taken again without the fold found")
    fold_mix_quantile: float = Field(0.9, description="fold: ... for stain mixes below this quantile")
    fold_dark_ratio: float = Field(3.0, description="fold: or optical density / tissue median above this")
    bubble_gray: tuple[int, int] = Field((209, 240), description="bubble: gray range (HistoQC .82-.94)")
    bubble_std: float = Field(11.0, description="bubble: RGB std below this (HistoQC upper_variance)")
    blur_ratio: float = Field(0.5, description="blur: local Laplacian energy / tissue median below this")
    blur_bins: int = Field(4, description="blur: tissue compared within this many brightness bins")
    blur_extend_ratio: float = Field(0.65, description="blur: grown into nearby cells below this ratio")
    blur_window_um: float = Field(32.0, description="blur: window of the energy (a box of this std), um")
    smooth_um: float = Field(16.0, description="colour rules run on the image smoothed by this sigma")
    grow_um: float = Field(16.0, description="artefacts but background and bubbles grown by this, um")
    min_area_um2: float = Field(0.02e6, description="smaller artefact regions are ignored")
    flag_fraction: float = Field(0.3, description="flag a slide losing more than this tissue fraction")
    # 0.125, one 16 um fringe (`grow_um`) of a 128 um patch: a patch may touch an artefact's grown
    # edge, not the artefact. Only "more artefact than tissue" left a patch 47% on ink at 0.70 on
    # a demo cohort of another seed (3); 0.25 left one 20% under black ink at 0.63 on the demo's
    # normal_014 (2026-12-04); on cohort 3, 0.25 / 0.125 leave no patch on an artefact above 0.5
    # and 0.125 drops 1-6% more of a painted slide's patches (bench_demo_qc.py --limits)
    max_patch_artefact: float = Field(
        0.125, description="remove: a patch goes when artefacts cover more than this fraction of it"
    )


class TilingConfig(Section):
    """One global patch grid at a physical resolution (extraction fills unset target_mpp and
    patch_size from the encoder's training resolution; tiling alone uses 0.5 um/px, 256 px)."""

    defaults_from: str | None = Field(None, description="set when target_mpp/patch_size were filled in")

    target_mpp: float | None = Field(None, gt=0, description="um/px of the patches; None: the encoder's own")
    patch_size: int | None = Field(None, ge=8, description="patch side in px at target_mpp; None: encoder's")
    overlap: float = Field(0.0, ge=0.0, le=0.9, description="fraction of patch side shared")
    # 1%: any patch that holds tissue is kept, so no tissue edge is lost (metastases often start
    # in the lymph node's subcapsular sinus, at the very edge); TRIDENT keeps any patch touching
    # tissue. At 0.5 the kept patches cover 70% of the shared real slide's tissue, at 0.01 91%.
    min_tissue: float = Field(0.01, ge=0.0, le=1.0, description="tissue fraction a patch needs")

    def with_defaults(self, target_mpp: float = 0.5, patch_size: int = 256, source: str = "default"):
        """A copy with unset fields filled in, and `defaults_from` naming where they came from."""
        filled = self.model_copy()
        if filled.target_mpp is None or filled.patch_size is None:
            filled.defaults_from = source
        filled.target_mpp = target_mpp if filled.target_mpp is None else filled.target_mpp
        filled.patch_size = patch_size if filled.patch_size is None else filled.patch_size
        return filled


class ExtractConfig(Section):
    encoder: str = "resnet50_trunc"
    weights: str | None = None
    random_weights: bool = False
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = "auto"  # int8: CPU with VNNI, CNNs
    int8_calibration: str | None = None  # int8: the calibration patches (set by the extract stage)
    batch_size: int = Field(64, ge=1)
    workers: int | None = None  # readers; None: 1 thread on the CPU, a process per spare core on a GPU
    dtype: Literal["float32", "float16"] = "float32"
    compile: Literal["auto", "on", "off"] = "auto"


class TrainConfig(Section):
    """Bag-level training. Each model trains with its authors' recipe (`Recipe` on the model
    class: optimiser, lr, weight decay, schedule, clipping, init); a field set here overrides
    it for every model; `recipe="shared"` trains all with wsi-mil 0.1's one recipe."""

    model: str = "psmil"
    model_kwargs: dict = Field(default_factory=dict)
    folds: int = Field(5, ge=2)
    test_frac: float = Field(0.25, ge=0.0, lt=1.0)
    epochs: int = Field(50, ge=1)
    patience: int = Field(10, ge=1)
    min_epochs: int = Field(5, ge=0)
    recipe: Literal["model", "shared"] = "model"
    # a model's small-cohort recipe for runs of fewer than 300 labelled bags (models/recipe.py)
    small_cohort: bool = True
    # "inner": epoch and threshold chosen on an inner fold of the training folds, the reported
    # fold only scored (selection-free); "outer": chosen on the reported fold (optimistic)
    selection: Literal["inner", "outer"] = "inner"
    # "inner" with a class of fewer than 4 cases in a fold's training folds: an error, unless
    # this allows choosing on that outer fold (marked in metrics.json and report.md)
    selection_fallback: bool = False
    lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    optimizer: Literal["adam", "adamw", "sgd", "radam_lookahead"] | None = None
    schedule: Literal["none", "cosine", "step", "plateau"] | None = None
    grad_clip: float | None = Field(None, gt=0)
    max_instances: int | None = Field(None, ge=1)
    preload: bool = True
    seed: int = 0
    device: str = "auto"
    bootstrap: int = Field(1000, ge=0)


class HeatmapConfig(Section):
    inversion_steps: int = 50
    inversion_lr: float = 0.1
    inversion_lambda: float = 1.6
    inversion_score: Literal["inverted_attention", "evidence", "survival", "change"] = "inverted_attention"
    blur: bool = True
    thumb_mpp: float = 8.0
    viewer_mpp: float = 2.0
    top_k: int = 12


class PipelineConfig(Section):
    tissue: TissueConfig = Field(default_factory=TissueConfig)
    qc: QCConfig = Field(default_factory=QCConfig)
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    heatmap: HeatmapConfig = Field(default_factory=HeatmapConfig)


def _read_yaml(path_or_preset: str | Path) -> dict:
    p = Path(path_or_preset)
    if not p.exists():
        p = CONFIG_DIR / f"{path_or_preset}.yaml"
    if not p.exists():
        presets = ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("*.yaml")))
        raise WsiMilError(f"{path_or_preset}: no such config file or preset (presets: {presets})")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "unreadable"
        raise WsiMilError(f"{p}: not valid YAML{where} ({problem}): check its indents and colons") from None
    if not isinstance(data, dict):
        raise WsiMilError(f"{p}: a config is a YAML mapping of sections (tissue:, tiling:, ...)")
    return data


def _stage_sections(data: dict, source: str | Path) -> dict:
    """The file's stage sections over its `preset:` (if any), without its `experiment:`."""
    data = {k: v for k, v in data.items() if k != "experiment"}
    preset = data.pop("preset", None)
    if preset is None:
        return data
    if Path(str(preset)).resolve() == Path(source).resolve() or preset == Path(source).stem:
        raise WsiMilError(f"{source}: preset: {preset} names this file itself")
    merged = _stage_sections(_read_yaml(preset), preset)
    for section, values in data.items():
        merged.setdefault(section, {}).update(values or {})
    return merged


def _fields(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the section `loc` (a key path) of `model`."""
    for key in loc:
        field = model.model_fields.get(str(key))
        sub = getattr(field, "annotation", None) if field is not None else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            break
        model = sub
    return list(model.model_fields)


def explain(error: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """A validation error in one line: the first problem's key path and what is wrong, with
    the closest known key for an unknown one."""
    errors = error.errors()
    first, loc = errors[0], tuple(errors[0]["loc"])
    where = prefix + ".".join(str(k) for k in loc)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if first["type"] == "extra_forbidden":
        known = _fields(model, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        parent = prefix + "".join(f"{k}." for k in loc[:-1])
        hint = f"did you mean {parent}{close[0]}?" if close else f"known keys: {', '.join(known)}"
        return f"unknown key {where}{more}: {hint}"
    return f"{where}: {first['msg']} (got {first.get('input')!r}){more}"


OPTION_FLAGS = {"qc.mode": "--qc"}  # config fields whose command-line option is not --<field>


def _validate(data: dict, source: str | Path | None, overrides: dict | None = None) -> PipelineConfig:
    """`data` as a PipelineConfig; an error names the config file, or the command line when
    the offending value came from an option."""
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        loc = tuple(e.errors()[0]["loc"])
        given = (overrides or {}).get(str(loc[0]), {}) if loc else {}
        from_option = source is None or (len(loc) > 1 and given.get(str(loc[1])) is not None)
        where = "command-line option " if from_option else f"{source}: "
        message = explain(e, PipelineConfig)
        if from_option and len(loc) > 1:  # name the option as typed: qc.mode -> --qc, train.lr -> --lr
            key = f"{loc[0]}.{loc[1]}"
            flag = OPTION_FLAGS.get(key, "--" + str(loc[1]).replace("_", "-"))
            message = flag + message.removeprefix(key) if message.startswith(key) else message
        raise WsiMilError(f"{where}{message}") from None


def load_config(path_or_preset: str | Path | None = None, **overrides: dict) -> PipelineConfig:
    """Load a YAML file (or a preset name from configs/), then apply per-section overrides.

    A file may name a `preset:` it builds on; an `experiment:` section is `wsi-mil run`'s."""
    data: dict = {}
    if path_or_preset:
        data = _stage_sections(_read_yaml(path_or_preset), path_or_preset)
    for section, values in overrides.items():
        data.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    return _validate(data, path_or_preset, overrides)


class ExperimentConfig(Section):
    """What `wsi-mil run` does end to end: extract -> crossval -> heatmaps (-> localisation).

    Relative paths are read from the current folder, as on the command line."""

    slides: list[Path] = Field(description="folders of slides or CSV slide lists (as `extract` takes)")
    labels: Path = Field(description="CSV: slide_id,label[,case_id][,split]")
    out: Path = Field(description="experiment folder: work/ (features), run/, heatmaps/")
    models: list[str] = Field(default_factory=lambda: ["psmil", "abmil"])
    annotations: Path | None = Field(None, description="<slide>.xml/.geojson: calibration + evaluation")
    heatmaps: Literal["test", "all", "none"] = "test"
    heatmap_model: str | None = Field(None, description="model the heatmaps map (default: the first)")
    target: str | None = Field(None, description="class the heatmaps map (default: the positive one)")
    mpp: float | None = Field(None, description="um/px for slides that record none")
    allow_missing: bool = Field(False, description="skip slides without a label, and labels without a slide")


def load_experiment(path: str | Path) -> tuple[ExperimentConfig, PipelineConfig]:
    """An experiment file: its `experiment:` section, and its stage settings over its preset."""
    data = _read_yaml(path)
    if "experiment" not in data:
        raise WsiMilError(
            f"{path}: no experiment: section (slides, labels, out, models): a preset is used by "
            f"naming it in an experiment file (preset: {Path(path).stem})"
        )
    exp = data["experiment"] or {}
    if isinstance(exp.get("slides"), (str, Path)):
        exp = {**exp, "slides": [exp["slides"]]}
    if isinstance(exp.get("models"), str):
        exp = {**exp, "models": [m.strip() for m in exp["models"].split(",") if m.strip()]}
    try:
        experiment = ExperimentConfig.model_validate(exp)
    except ValidationError as e:
        raise WsiMilError(f"{path}: {explain(e, ExperimentConfig, 'experiment.')}") from None
    return experiment, _validate(_stage_sections(data, path), path)
