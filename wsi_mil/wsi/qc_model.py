"""GrandQC's artefact segmentation model (Weng et al., Nat. Commun. 2024) as a QC source.

Built as its authors build it (cpath-ukk/grandqc `01_WSI_inference_OPENSLIDE_QC/main.py` and
`wsi_process.py`; TRIDENT `segmentation_models/load.py` `GrandQCArtifactSegmenter`): a
segmentation_models_pytorch `Unet("timm-efficientnet-b0", classes=8)`, fed 512 px tiles at the
model's mpp (TRIDENT's `GrandQC_MPP1_state_dict.pth`: 1.0 um/px; the authors also release 1.5
and 2.0), ImageNet-normalised RGB (smp's `get_preprocessing_fn(..., "imagenet")`), per-pixel
argmax of the 8 outputs. Classes 1-7: normal tissue, fold, dark spot & foreign object, pen
marking, edge & air bubble, out of focus, background; tiles with almost no tissue are
background, as the authors skip them. The checkpoint is a state dict, loaded strictly; the
authors' own release pickles the whole model, which TRIDENT re-saved as a state dict.

Deliberate differences: tiles are read with our `read_at_mpp` (area resampling from the best
pyramid level) where the authors read level 0 and resize with Lanczos; the class map is
brought to the QC grid by the majority of each cell.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch

from ..errors import WsiMilError

# class index -> wsi.qc reason (None: normal tissue, kept)
GRANDQC_CLASSES: dict[int, str | None] = {
    1: None,
    2: "fold",
    3: "dark_spot",
    4: "pen",
    5: "bubble",
    6: "blur",
    7: "background",
}
TILE_PX = 512
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_grandqc() -> torch.nn.Module:
    """The untrained GrandQC network (`smp.Unet`, timm-efficientnet-b0 encoder, 8 classes)."""
    from ..features.compat import import_timm

    import_timm()  # registers torchvision's stand-in ops first (features/compat.py)
    try:
        import segmentation_models_pytorch as smp
    except ImportError as e:
        raise WsiMilError(
            "--qc-model needs segmentation-models-pytorch: pip install -c constraints.txt "
            "'wsi-mil[qc]' (or segmentation-models-pytorch)"
        ) from e
    with warnings.catch_warnings():  # smp 0.5+ deprecates "timm-" names; GrandQC was trained with one
        warnings.simplefilter("ignore", DeprecationWarning)
        return smp.Unet(encoder_name="timm-efficientnet-b0", encoder_weights=None, classes=8, activation=None)


def load_grandqc(path: str | Path) -> torch.nn.Module:
    """GrandQC from a state-dict checkpoint (TRIDENT's `GrandQC_MPP1_state_dict.pth`), strictly."""
    path = Path(path)
    if not path.is_file():
        raise WsiMilError(f"--qc-model {path}: no such file; give GrandQC's state-dict checkpoint")
    model = build_grandqc()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickled whole model (the authors' release) or not a checkpoint
        raise WsiMilError(
            f"--qc-model {path}: not a state dict ({type(e).__name__}); use GrandQC_MPP1_state_dict.pth "
            "from huggingface.co/MahmoodLab/hest-tissue-seg, or re-save the authors' pickled model "
            "with torch.save(model.state_dict(), ...)"
        ) from e
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise WsiMilError(f"--qc-model {path}: not GrandQC's artefact model ({first})") from e
    return model.eval()


@functools.lru_cache(maxsize=2)
def load_grandqc_cached(path: str) -> torch.nn.Module:
    """`load_grandqc`, once per process (a cohort's slides share it)."""
    return load_grandqc(path)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.inference_mode()
def predict_classes(model: torch.nn.Module, tiles: np.ndarray, batch: int = 8) -> np.ndarray:
    """Per-pixel GrandQC class [n, h, w] (uint8) of RGB uint8 tiles [n, h, w, 3]."""
    device = next(model.parameters()).device
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    out = []
    for i in range(0, len(tiles), batch):
        x = torch.from_numpy(tiles[i : i + batch]).to(device).permute(0, 3, 1, 2).float() / 255.0
        out.append(model((x - mean) / std).argmax(1).to(torch.uint8).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, *tiles.shape[1:3]), np.uint8)


def grandqc_masks(
    slide,
    tissue: np.ndarray,
    grid_px_level0: float,
    model: torch.nn.Module,
    model_mpp: float = 1.0,
    min_tissue: float = 0.002,
    batch: int = 8,
) -> dict[str, np.ndarray]:
    """Each GrandQC reason's mask on the QC grid (`tissue` [h, w] bool, one cell =
    `grid_px_level0` level-0 px): 512 px tiles at `model_mpp` over the tissue's bounding box,
    tiles under `min_tissue` tissue skipped as background (the authors skip tiles with at most
    50 tissue pixels of 512 x 512), each cell the majority class of its pixels, tissue only."""
    model = model.to(_device())
    h, w = tissue.shape
    out = {r: np.zeros((h, w), bool) for r in GRANDQC_CLASSES.values() if r}
    if not tissue.any():
        return out
    side0 = TILE_PX * model_mpp / slide.mpp  # a tile's side in level-0 px
    cells = side0 / grid_px_level0  # ... and in grid cells
    x, y, bw, bh = cv2.boundingRect(tissue.astype(np.uint8))
    nx, ny = int(np.ceil(bw / cells)), int(np.ceil(bh / cells))
    background = max(k for k, r in GRANDQC_CLASSES.items() if r == "background")
    mosaic = np.full((ny * TILE_PX, nx * TILE_PX), background, np.uint8)  # at model_mpp
    todo = [
        (i, j)
        for j in range(ny)
        for i in range(nx)
        if tissue[
            int(y + j * cells) : int(np.ceil(y + (j + 1) * cells)),
            int(x + i * cells) : int(np.ceil(x + (i + 1) * cells)),
        ].mean()
        > min_tissue
    ]
    W0, H0 = slide.dimensions
    for b in range(0, len(todo), batch):
        chunk, tiles = todo[b : b + batch], []
        for i, j in chunk:
            x0, y0 = (
                int(round((x + i * cells) * grid_px_level0)),
                int(round((y + j * cells) * grid_px_level0)),
            )
            w0, h0 = min(int(round(side0)), W0 - x0), min(int(round(side0)), H0 - y0)
            img = slide.read_at_mpp(x0, y0, max(1, w0), max(1, h0), model_mpp)[:TILE_PX, :TILE_PX]
            tile = np.full((TILE_PX, TILE_PX, 3), 255, np.uint8)  # glass beyond the slide's edge
            tile[: img.shape[0], : img.shape[1]] = img
            tiles.append(tile)
        for (i, j), classes in zip(chunk, predict_classes(model, np.stack(tiles), batch)):
            mosaic[j * TILE_PX : (j + 1) * TILE_PX, i * TILE_PX : (i + 1) * TILE_PX] = classes
    # the mosaic spans nx * cells grid cells from (x, y): each class's share of every cell
    gw, gh = int(round(nx * cells)), int(round(ny * cells))
    shares = np.stack(
        [
            cv2.resize((mosaic == k).astype(np.uint8) * 255, (gw, gh), interpolation=cv2.INTER_AREA)
            for k in range(8)
        ]
    )
    winner = shares.argmax(0)[: min(gh, h - y), : min(gw, w - x)]
    box = (slice(y, y + winner.shape[0]), slice(x, x + winner.shape[1]))
    for k, reason in GRANDQC_CLASSES.items():
        if reason:
            out[reason][box] = (winner == k) & tissue[box]
    return out
