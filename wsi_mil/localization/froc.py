"""The Camelyon16 lesion-level FROC, as the challenge's `Evaluation_FROC.py` defines it.

Source: Camelyon16's official evaluation script (B. Ehteshami Bejnordi, 2016; public copies e.g.
in NCRF's repository, `bin/Evaluation_FROC.py`). Steps, each named after the script's function:
- `evaluation_mask` (computeEvaluationMask): the tumour mask at pyramid level `level`
  (downsample 2^level), Euclidean distance to the nearest tumour pixel, kept where
  distance < 75 / (2 * resolution * 2^level) pixels (the script's threshold: "75 um is the
  equivalent size of 5 tumour cells", halved in the code), holes filled, 8-connected
  components labelled as lesions.
- `itc_labels` (computeITCList): lesions whose major axis is < 275 / (resolution * 2^level)
  pixels are isolated tumour cells: neither a hit nor a false positive.
- `hits` (compute_FP_TP_Probs): a detection (p, x, y) in level-0 pixels looks up
  mask[int(y / 2^level), int(x / 2^level)]; label 0 is a false positive, an ITC label is
  ignored, any other lesion keeps the highest p that hit it. On a slide without tumour every
  detection is a false positive.
- `froc_curve` (computeFROC): for each distinct probability but the lowest, the false
  positives per slide and the sensitivity (lesions hit at >= that probability over all
  non-ITC lesions), then (0, 0).
- `froc_score`: sensitivity linearly interpolated at 1/4, 1/2, 1, 2, 4 and 8 false positives
  per slide (np.interp on the reversed curve, as the script does) and their mean.
Detections: local maxima by non-maximum suppression as in NCRF's `nms.py`: repeatedly take
the maximum (first in order), report it at its centre, suppress a square of `radius` around
it, until the maximum falls below `min_prob`. `detections` runs it on a probability map (the
cells of NCRF's map); `patch_detections` on the scored patches themselves, reporting each at
its patch centre (NCRF and the challenge's entries report centres; a map cell of a 256-px
patch rasterised at level 5 is 112 level-0 pixels off it).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as nd
from skimage import measure

FP_RATES = (0.25, 0.5, 1, 2, 4, 8)
EVALUATION_LEVEL = 5  # EVALUATION_MASK_LEVEL in the script
CAMELYON_MPP = 0.243  # L0_RESOLUTION in the script: um per level-0 pixel
NMS_RADIUS_UM = 12 * 64 * CAMELYON_MPP  # NCRF nms.py: radius 12 at level 6 (~187 um)


def evaluation_mask(tumor: np.ndarray, resolution: float, level: int = EVALUATION_LEVEL) -> np.ndarray:
    """Labelled lesions (int32, 0 = background) from a tumour mask at `level` (nonzero = tumour)."""
    tumor = np.asarray(tumor) > 0
    distance = nd.distance_transform_edt(~tumor)
    threshold = 75 / (resolution * 2**level * 2)
    filled = nd.binary_fill_holes(distance < threshold)
    return measure.label(filled, connectivity=2).astype(np.int32)


def itc_labels(mask: np.ndarray, resolution: float, level: int = EVALUATION_LEVEL) -> set[int]:
    """Labels of lesions whose major axis is below 275 um (isolated tumour cells)."""
    threshold = 275 / (resolution * 2**level)
    return {p.label for p in measure.regionprops(mask) if p.axis_major_length < threshold}


def detections(
    prob_map: np.ndarray, cell: float, radius: int, min_prob: float = 0.5
) -> list[tuple[float, int, int]]:
    """(p, x, y) local maxima of a probability map whose cells are `cell` level-0 pixels.

    Same result as NCRF's loop (take the global maximum, zero a (2 radius + 1)^2 square, repeat
    while the maximum exceeds `min_prob`), computed in one pass over the cells sorted by value
    (stable, so ties fall in row-major order as np.where gives them)."""
    prob_map = np.asarray(prob_map, np.float64)
    rows, cols = np.nonzero(prob_map > min_prob)
    values = prob_map[rows, cols]
    order = np.argsort(-values, kind="stable")
    taken = np.zeros(prob_map.shape, bool)
    out = []
    for k in order:
        r, c = rows[k], cols[k]
        if taken[r, c]:
            continue
        out.append((float(values[k]), int((c + 0.5) * cell), int((r + 0.5) * cell)))
        taken[max(r - radius, 0) : r + radius, max(c - radius, 0) : c + radius] = True
    return out


def patch_detections(
    coords: np.ndarray, values: np.ndarray, size0: float, radius0: float, min_prob: float = 0.5
) -> list[tuple[float, int, int]]:
    """(p, x, y) at the centres of the patches that are local maxima: the highest-scoring
    patch first (ties: the first listed), then patches whose centre is not within the square of
    half-side `radius0` level-0 pixels around an earlier detection."""
    values = np.asarray(values, np.float64)
    centres = np.asarray(coords, np.float64) + size0 / 2
    out, taken = [], []
    for i in np.argsort(-values, kind="stable"):
        if values[i] <= min_prob:
            break
        c = centres[i]
        if taken and (np.abs(np.asarray(taken) - c) < radius0).all(1).any():
            continue
        taken.append(c)
        out.append((float(values[i]), int(c[0]), int(c[1])))
    return out


def hits(
    dets: list[tuple[float, int, int]], mask: np.ndarray | None, itc: set[int], level: int = EVALUATION_LEVEL
) -> tuple[list[float], np.ndarray, int]:
    """(false-positive probabilities, best probability per lesion, number of non-ITC lesions).

    `mask` None means a slide without tumour."""
    if mask is None:
        return [d[0] for d in dets], np.zeros(0, np.float32), 0
    n_labels = int(mask.max())
    fp, tp = [], np.zeros(n_labels, np.float32)
    ds = 2**level
    for p, x, y in dets:
        r, c = int(y / ds), int(x / ds)
        label = int(mask[r, c]) if 0 <= r < mask.shape[0] and 0 <= c < mask.shape[1] else 0
        if label == 0:
            fp.append(p)
        elif label not in itc and p > tp[label - 1]:
            tp[label - 1] = p
    return fp, tp, n_labels - len(itc)


def froc_curve(per_slide: list[tuple[list[float], np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(average false positives per slide, sensitivity) over increasing thresholds.

    Lesion probabilities are float32 and compared in float32, as the script's TP_probs array is
    (so a lesion hit at float32(0.29) counts at threshold 0.29)."""
    fps = np.asarray([p for fp, _, _ in per_slide for p in fp], np.float64)
    tps = np.asarray([p for _, tp, _ in per_slide for p in tp], np.float32)  # float32 as the script's
    n_tumors = sum(n for _, _, n in per_slide)
    thresholds = np.unique(np.concatenate([fps, tps.astype(np.float64)]))[1:]
    total_fp = [(fps >= t).sum() for t in thresholds] + [0]
    total_tp = [(tps >= np.float32(t)).sum() for t in thresholds] + [0]  # compared in float32
    avg_fp = np.asarray(total_fp, np.float64) / len(per_slide)
    sensitivity = np.asarray(total_tp, np.float64) / n_tumors if n_tumors else np.zeros(len(total_tp))
    return avg_fp, sensitivity


def froc_score(avg_fp: np.ndarray, sensitivity: np.ndarray) -> dict:
    """Sensitivity at each of FP_RATES (np.interp as the script) and their mean."""
    at = np.interp(FP_RATES, avg_fp[::-1], sensitivity[::-1])
    return {"sensitivity": {str(r): float(s) for r, s in zip(FP_RATES, at)}, "froc": float(np.mean(at))}


def nms_radius_cells(
    resolution: float, level: int = EVALUATION_LEVEL, radius_um: float = NMS_RADIUS_UM
) -> int:
    return max(1, int(math.ceil(radius_um / (resolution * 2**level))))
