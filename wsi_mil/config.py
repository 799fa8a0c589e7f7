"""Per-stage settings (pydantic), loaded from YAML presets in configs/ plus CLI overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field

from .errors import WsiMilError

CONFIG_DIR = Path(__file__).parent / "configs"


class TissueConfig(BaseModel):
    """Tissue segmentation on a low-resolution image (CLAM-style saturation thresholding)."""

    seg_mpp: float = Field(8.0, description="um/px of the image segmentation runs on")
    threshold: Literal["otsu"] | int = "otsu"
    blur_um: float = Field(56.0, description="median blur kernel in um (CLAM mthresh=7 at 8 um/px)")
    close_um: float = Field(32.0, description="morphological closing kernel in um")
    min_tissue_area_um2: float = 0.25e6
    min_hole_area_um2: float = 0.05e6
    max_holes: int = 8
    preview_px: int = Field(1024, ge=64, description="long side of tissue and tiling previews, px")


class TilingConfig(BaseModel):
    """One global patch grid at a physical resolution (extraction fills unset target_mpp and
    patch_size from the encoder's training resolution; tiling alone uses 0.5 um/px, 256 px)."""

    defaults_from: str | None = Field(None, description="set when target_mpp/patch_size were filled in")

    target_mpp: float | None = Field(None, description="um/px of the patches; None: the encoder's own")
    patch_size: int | None = Field(None, description="patch side in px at target_mpp; None: the encoder's")
    overlap: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of patch side shared")
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


class ExtractConfig(BaseModel):
    encoder: str = "resnet50_trunc"
    weights: str | None = None
    random_weights: bool = False
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = "auto"  # int8: CPU with VNNI, CNNs
    int8_calibration: str | None = None  # int8: the calibration patches (set by the extract stage)
    batch_size: int = 64
    workers: int | None = None  # readers; None: 1 thread on the CPU, a process per spare core on a GPU
    dtype: Literal["float32", "float16"] = "float32"
    compile: Literal["auto", "on", "off"] = "auto"


class TrainConfig(BaseModel):
    """Bag-level training. Each model trains with its authors' recipe (`Recipe` on the model
    class: optimiser, lr, weight decay, schedule, clipping, init); a field set here overrides
    it for every model; `recipe="shared"` trains all with wsi-mil 0.1's one recipe."""

    model: str = "psmil"
    model_kwargs: dict = Field(default_factory=dict)
    folds: int = 5
    test_frac: float = 0.25
    epochs: int = 50
    patience: int = 10
    min_epochs: int = 5
    recipe: Literal["model", "shared"] = "model"
    # a model's small-cohort recipe for runs of fewer than 300 labelled bags (models/recipe.py)
    small_cohort: bool = True
    # "inner": epoch and threshold chosen on an inner fold of the training folds, the reported
    # fold only scored (selection-free); "outer": chosen on the reported fold (optimistic)
    selection: Literal["inner", "outer"] = "inner"
    # "inner" with a class of fewer than 4 cases in a fold's training folds: an error, unless
    # this allows choosing on that outer fold (marked in metrics.json and report.md)
    selection_fallback: bool = False
    lr: float | None = None
    weight_decay: float | None = None
    optimizer: Literal["adam", "adamw", "sgd", "radam_lookahead"] | None = None
    schedule: Literal["none", "cosine", "step", "plateau"] | None = None
    grad_clip: float | None = None
    max_instances: int | None = None
    preload: bool = True
    seed: int = 0
    device: str = "auto"
    bootstrap: int = 1000


class HeatmapConfig(BaseModel):
    inversion_steps: int = 50
    inversion_lr: float = 0.1
    inversion_lambda: float = 1.6
    inversion_score: Literal["inverted_attention", "evidence", "survival", "change"] = "inverted_attention"
    blur: bool = True
    thumb_mpp: float = 8.0
    viewer_mpp: float = 2.0
    top_k: int = 12


class PipelineConfig(BaseModel):
    tissue: TissueConfig = Field(default_factory=TissueConfig)
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    heatmap: HeatmapConfig = Field(default_factory=HeatmapConfig)


def load_config(path_or_preset: str | Path | None = None, **overrides: dict) -> PipelineConfig:
    """Load a YAML file (or a preset name from configs/), then apply per-section overrides."""
    data: dict = {}
    if path_or_preset:
        p = Path(path_or_preset)
        if not p.exists():
            p = CONFIG_DIR / f"{path_or_preset}.yaml"
        if not p.exists():
            presets = ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("*.yaml")))
            raise WsiMilError(f"{path_or_preset}: no such config file or preset (presets: {presets})")
        data = yaml.safe_load(p.read_text()) or {}
    for section, values in overrides.items():
        data.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    return PipelineConfig.model_validate(data)
