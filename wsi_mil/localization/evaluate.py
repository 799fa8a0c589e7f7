"""Localization against ground-truth tumor annotations: patch AUC, Camelyon16 FROC, slide AUC.

Annotations, per slide, in the annotations folder: `<slide>.xml` (ASAP XML as distributed
with Camelyon16: groups `_0`/`_1`/`Tumor` are tumor, `_2` marks exclusion regions inside
tumor), `<slide>.geojson` (QuPath polygons) or a mask `<slide>_mask.tif` / `<slide>.tif`
(Camelyon16's pyramidal masks, nonzero = tumor) or `.png` / `.npy` (any size; scaled to the
slide). A slide without any annotation counts as tumor-free (Camelyon16 normals have none).
- Patch AUC: a patch is positive when at least `pos_frac` of it is tumor, negative when none
  of it is; patches in between are left out. Per slide (and its mean over tumour slides: the
  localisation within slides), and pooled over slides beside the pooled AUC of the same scores
  shuffled within each slide (what the pooled AUC owes to telling slides apart).
- Per slide and layer: top score, share of tumour patches and of all patches above 0.5.
- Reliability of the probability layers (combined, instance): reliability diagram and
  expected calibration error over the labelled patches of all slides.
- FROC: froc.py, Camelyon16's Evaluation_FROC.py on the scores' probability map.
- Slide AUC: each slide's probability of the mapped class against tumor / no tumor.
Scores must be on the absolute scale (`scale` attr): within-slide ranks from wsi-mil 0.1 are
refused for FROC and pooled AUC, which compare values across slides.
"""

from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, box
from sklearn.metrics import roc_auc_score

from ..errors import WsiMilError
from ..formats.scores import PROBABILITY_LAYERS, SCORE_NAMES, PatchScores, read_scores
from ..formats.tissue_geojson import read_geojson_polygons, shift
from . import froc as camelyon
from .patch_calibration import reliability

MASK_SUFFIXES = (".tif", ".tiff", ".png", ".npy")
log = logging.getLogger("wsi_mil")
EXCLUSION_GROUPS = {"_2", "exclusion", "Exclusion"}


def read_asap_xml(path: str | Path) -> MultiPolygon:
    """Tumor polygons from an ASAP XML, exclusion (`_2`) regions subtracted."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise WsiMilError(f"{path}: not a readable ASAP XML annotation ({exc})") from exc
    tumor, exclude = [], []
    for ann in root.iter("Annotation"):
        pts = sorted(ann.iter("Coordinate"), key=lambda c: float(c.get("Order", 0)))
        xy = [(float(c.get("X")), float(c.get("Y"))) for c in pts]
        if len(xy) < 3:
            continue
        poly = shapely.make_valid(Polygon(xy))
        (exclude if ann.get("PartOfGroup") in EXCLUSION_GROUPS else tumor).append(poly)
    region = shapely.unary_union(tumor) if tumor else MultiPolygon()
    if exclude:
        region = region.difference(shapely.unary_union(exclude))
    return _as_multipolygon(region)


def _as_multipolygon(geom) -> MultiPolygon:
    polys = [g for g in getattr(geom, "geoms", [geom]) if isinstance(g, Polygon) and not g.is_empty]
    for g in getattr(geom, "geoms", []):
        if isinstance(g, MultiPolygon):
            polys.extend(g.geoms)
    return MultiPolygon(polys)


def read_annotation(path: str | Path, qupath_offset: tuple[int, int] = (0, 0)) -> MultiPolygon:
    """Tumor polygons in level-0 pixels: ASAP XML as is (Camelyon16's frame), GeoJSON from
    QuPath moved back by the slide's `qupath_offset`."""
    path = Path(path)
    if path.suffix.lower() == ".xml":
        return read_asap_xml(path)
    return _as_multipolygon(shift(read_geojson_polygons(path), qupath_offset, +1))


def patch_tumor_fraction(coords: np.ndarray, size0: float, tumor: MultiPolygon) -> np.ndarray:
    """Fraction of each patch box inside the tumour polygons."""
    if tumor.is_empty:
        return np.zeros(len(coords))
    boxes = [box(x, y, x + size0, y + size0) for x, y in coords.tolist()]
    hits = shapely.intersects(boxes, tumor)
    frac = np.zeros(len(coords))
    for i in np.nonzero(hits)[0]:
        frac[i] = boxes[i].intersection(tumor).area / size0**2
    return frac


def patch_auc(scores: np.ndarray, frac: np.ndarray, pos_frac: float = 0.5) -> float | None:
    """ROC AUC of positive (>= pos_frac tumor) against tumor-free patches; None if undefined."""
    pos, neg = frac >= pos_frac, frac <= 0
    keep = pos | neg
    if pos[keep].all() or not pos[keep].any():
        return None
    return float(roc_auc_score(pos[keep], scores[keep]))


@dataclass
class SlideLocalization:
    """One slide's scores and ground truth: the tumour as polygons (level-0 pixels) and as a
    mask at the evaluation level (downsample 2^level), both empty for a tumor-free slide."""

    slide: str
    scores: PatchScores
    tumor: MultiPolygon
    mask: np.ndarray | None = None  # bool at downsample 2^level; None: rasterised from `tumor`
    resolution: float = camelyon.CAMELYON_MPP  # level-0 um/px

    @property
    def is_tumor(self) -> bool:
        return not self.tumor.is_empty or (self.mask is not None and bool(self.mask.any()))

    def grid_shape(self, level: int) -> tuple[int, int]:
        ds = 2**level
        w, h = self.scores.slide_size
        far = self.scores.coords.max(0) + self.scores.size0 if len(self.scores.coords) else np.zeros(2)
        if not self.tumor.is_empty:
            far = np.maximum(far, self.tumor.bounds[2:])
        w, h = max(w, far[0]), max(h, far[1])
        return int(math.ceil(h / ds)), int(math.ceil(w / ds))

    def tumor_mask(self, level: int) -> np.ndarray:
        if self.mask is not None:
            return self.mask
        shape = self.grid_shape(level)
        mask = np.zeros(shape, np.uint8)
        for poly in getattr(self.tumor, "geoms", []):
            rings = [np.round(np.asarray(poly.exterior.coords)[:, :2] / 2**level).astype(np.int32)]
            cv2.fillPoly(mask, rings, 1)
            for hole in poly.interiors:
                cv2.fillPoly(mask, [np.round(np.asarray(hole.coords)[:, :2] / 2**level).astype(np.int32)], 0)
        return mask.astype(bool)

    def patch_fraction(self, level: int) -> np.ndarray:
        if self.mask is None:
            return patch_tumor_fraction(self.scores.coords, self.scores.size0, self.tumor)
        acc, cnt = _box_means(self.scores.coords, self.scores.size0, self.mask, 2**level)
        return acc / np.maximum(cnt, 1)


def _box_means(
    coords: np.ndarray, size0: float, mask: np.ndarray, cell: float
) -> tuple[np.ndarray, np.ndarray]:
    """(tumour cells, cells) inside each patch box, from an integral image of the mask."""
    integral = np.pad(mask.astype(np.float64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    h, w = mask.shape
    x0 = np.clip(np.floor(coords[:, 0] / cell).astype(int), 0, w)
    y0 = np.clip(np.floor(coords[:, 1] / cell).astype(int), 0, h)
    x1 = np.clip(np.ceil((coords[:, 0] + size0) / cell).astype(int), 0, w)
    y1 = np.clip(np.ceil((coords[:, 1] + size0) / cell).astype(int), 0, h)
    acc = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return acc, (x1 - x0) * (y1 - y0).astype(np.float64)


def slide_detections(
    loc: SlideLocalization, name: str, level: int, min_prob: float
) -> list[tuple[float, int, int]]:
    """(p, x, y) at the centres of the patches that are local maxima of the slide's `name`
    scores, suppressed over NCRF's NMS radius (froc.patch_detections)."""
    radius0 = camelyon.nms_radius_cells(loc.resolution, level) * 2**level
    s = loc.scores
    return camelyon.patch_detections(s.coords, s.get(name), s.size0, radius0, min_prob)


def froc(
    slides: list[SlideLocalization], name: str, level: int = camelyon.EVALUATION_LEVEL, min_prob: float = 0.0
) -> dict:
    """Camelyon16 FROC of one score over the slides (froc.py). Every local maximum above
    `min_prob` is a detection: the script never uses its lowest probability as a threshold, so
    with only confident detections that lowest one is a lesion, never counted (a run that finds
    every lesion and no false positive scored 0.8 on the demo with 0.05 here)."""
    per_slide = []
    for loc in slides:
        dets = slide_detections(loc, name, level, min_prob)
        if loc.is_tumor:
            lesions = camelyon.evaluation_mask(loc.tumor_mask(level), loc.resolution, level)
            itc = camelyon.itc_labels(lesions, loc.resolution, level)
            per_slide.append(camelyon.hits(dets, lesions, itc, level))
        else:
            per_slide.append(camelyon.hits(dets, None, set(), level))
    lesions = int(sum(n for *_, n in per_slide))
    if not lesions:  # nothing to find: the sensitivity is undefined, not 0
        return {"sensitivity": dict.fromkeys(map(str, camelyon.FP_RATES)), "froc": None, "lesions": 0}
    avg_fp, sensitivity = camelyon.froc_curve(per_slide)
    return {**camelyon.froc_score(avg_fp, sensitivity), "lesions": lesions}


def slide_auc(slides: list[SlideLocalization]) -> float | None:
    """AUC of the slides' probability of the mapped class against tumor / tumor-free."""
    y = [s.is_tumor for s in slides]
    if all(y) or not any(y):
        return None
    return float(roc_auc_score(y, [float(s.scores.prob[s.scores.predicted]) for s in slides]))


def slide_summary(scores: np.ndarray, frac: np.ndarray, pos_frac: float = 0.5) -> dict:
    """One slide's layer: patch AUC, top score, share of tumour patches and of all patches
    above 0.5 (what the map shows a reader at the usual threshold)."""
    tumor = frac >= pos_frac
    return {
        "auc": patch_auc(scores, frac, pos_frac),
        "top": float(scores.max()) if len(scores) else None,
        "tumor_above_half": float((scores[tumor] > 0.5).mean()) if tumor.any() else None,
        "above_half": float((scores > 0.5).mean()) if len(scores) else None,
    }


def shuffled_within_slides(values: list[np.ndarray], seed: int = 0) -> list[np.ndarray]:
    """Each slide's scores permuted among its own patches: no localisation left, each slide's
    distribution kept. A pooled AUC that holds up on these measures the slides, not the patches."""
    rng = np.random.default_rng(seed)
    return [rng.permutation(v) for v in values]


def evaluate(
    slides: list[SlideLocalization], pos_frac: float = 0.5, level: int = camelyon.EVALUATION_LEVEL
) -> dict:
    """Per-slide patch AUC (and its mean over tumour slides) first; pooled patch AUC beside the
    same AUC of within-slide shuffled scores; FROC per layer; the reliability of the
    probability layers (ECE); slide AUC."""
    ranked = [s.slide for s in slides if s.scores.scale == "rank"]
    if ranked:
        raise WsiMilError(
            f"{', '.join(ranked[:3])}: scores are within-slide ranks (wsi-mil 0.1), not comparable "
            "across slides; re-run 'wsi-mil heatmap' for absolute scores"
        )
    fracs = [s.patch_fraction(level) for s in slides]
    out = {
        "mean_slide_patch_auc": {},
        "per_slide": {},
        "pooled_patch_auc": {},
        "pooled_patch_auc_shuffled": {},
        "froc": {},
        "reliability": {},
        "slide_auc": slide_auc(slides),
        "layers": {n: "probability" if n in PROBABILITY_LAYERS else "rank within slide" for n in SCORE_NAMES},
    }
    for s, f in zip(slides, fracs):
        row = {"tumor": s.is_tumor, "patches": len(f), "tumor_patches": int((f >= pos_frac).sum())}
        out["per_slide"][s.slide] = {
            **row,
            **{n: slide_summary(s.scores.get(n), f, pos_frac) for n in SCORE_NAMES},
        }
    frac_all = np.concatenate(fracs)
    for n in SCORE_NAMES:
        values = [s.scores.get(n) for s in slides]
        aucs = [out["per_slide"][s.slide][n]["auc"] for s in slides]
        aucs = [a for a in aucs if a is not None]
        out["mean_slide_patch_auc"][n] = float(np.mean(aucs)) if aucs else None
        out["pooled_patch_auc"][n] = patch_auc(np.concatenate(values), frac_all, pos_frac)
        out["pooled_patch_auc_shuffled"][n] = patch_auc(
            np.concatenate(shuffled_within_slides(values)), frac_all, pos_frac
        )
        out["froc"][n] = froc(slides, n, level)
        if n in PROBABILITY_LAYERS:
            known = (frac_all >= pos_frac) | (frac_all <= 0)
            out["reliability"][n] = reliability(np.concatenate(values)[known], frac_all[known] >= pos_frac)
    return out


def read_mask(path: Path, grid: tuple[int, int], level: int) -> np.ndarray:
    """A tumour mask file as a bool array on the evaluation grid (nonzero = tumor)."""
    try:
        if path.suffix == ".npy":
            img = np.load(path)
        elif path.suffix == ".png":
            img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if img is None:
                raise OSError("unreadable image")
        else:
            from ..wsi.readers import open_slide

            with open_slide(path, mpp=1.0) as m:  # Camelyon16 masks: a pyramid at level-0 size
                ds = 2**level
                img = m.read_at_mpp(0, 0, *m.dimensions, m.mpp * ds)
    except (OSError, ValueError) as exc:
        raise WsiMilError(
            f"{path}: not a readable tumor mask ({exc}); give a TIFF, PNG or .npy mask"
        ) from exc
    img = np.asarray(img)
    if img.ndim == 3:
        rgb = img[..., :3].astype(np.int16)
        coloured = img.shape[-1] >= 3 and np.abs(rgb - rgb[..., :1]).mean() > 2
        if coloured and (rgb[..., 0] > 0).mean() > 0.95:  # a slide (no mask is tumour almost everywhere)
            raise WsiMilError(
                f"{path}: a colour image, not a tumor mask (nonzero = tumor); is --annotations the "
                "slides folder? give the folder of <slide>.xml, .geojson or <slide>_mask.tif"
            )
        img = img[..., 0]
    if img.shape != grid:
        img = cv2.resize(img.astype(np.uint8), (grid[1], grid[0]), interpolation=cv2.INTER_NEAREST)
    return img > 0


# the names a slide's annotation may have, in the order they are looked for
ANNOTATION_ENDINGS = (".xml", ".geojson", *(f"_mask{x}" for x in MASK_SUFFIXES), *MASK_SUFFIXES)


def find_annotation(annotations_dir: Path, sid: str) -> Path | None:
    names = [f"{sid}{e}" for e in ANNOTATION_ENDINGS]
    return next((annotations_dir / n for n in names if (annotations_dir / n).exists()), None)


def evaluate_folder(
    scores_dir: str | Path,
    annotations_dir: str | Path,
    pos_frac: float = 0.5,
    level: int = camelyon.EVALUATION_LEVEL,
) -> dict:
    """Evaluate every `<slide>_scores.h5` against its annotation (none: tumor-free)."""
    scores_dir, annotations_dir = Path(scores_dir), Path(annotations_dir)
    if not annotations_dir.is_dir():  # else every slide would count as tumour-free
        raise WsiMilError(f"{annotations_dir}: no such annotations folder; give the one with <slide>.xml")
    files = sorted(scores_dir.glob("*_scores.h5"))
    if not files:
        raise WsiMilError(f"{scores_dir}: no <slide>_scores.h5 files; run 'wsi-mil heatmap' first")
    slides, targets, used = [], {}, False
    for f in files:
        sid = f.name[: -len("_scores.h5")]
        ps = read_scores(f)
        targets.setdefault(ps.target, []).append(sid)
        loc = SlideLocalization(sid, ps, MultiPolygon(), resolution=ps.mpp or camelyon.CAMELYON_MPP)
        ann = find_annotation(annotations_dir, sid)
        used = used or ann is not None
        if ann is not None and ann.suffix.lower() in (".xml", ".geojson", ".json"):
            loc.tumor = read_annotation(ann, ps.qupath_offset)
        elif ann is not None:
            loc.mask = read_mask(ann, loc.grid_shape(level), level)
        slides.append(loc)
    if len(targets) > 1:
        mix = "; ".join(f"{t}: {', '.join(s[:3])}{', ...' if len(s) > 3 else ''}" for t, s in targets.items())
        raise WsiMilError(
            f"{scores_dir}: the score files map different classes ({mix}); evaluate one class at a time "
            "(heatmap --target CLASS --out a folder of its own)"
        )
    _warn_misnamed_annotations(annotations_dir, [s.slide for s in slides], used)
    if not used:  # every slide tumour-free: nothing to localise, every figure undefined
        raise WsiMilError(
            f"{annotations_dir}: no annotation for any of the {len(slides)} scored slide(s) (looked for "
            "<slide>.xml, .geojson, <slide>_mask.tif); give the folder that holds them"
        )
    return evaluate(slides, pos_frac, level)


def _warn_misnamed_annotations(annotations_dir: Path, slide_ids: list[str], any_used: bool) -> None:
    """Name annotation files that look meant for a scored slide but were not read: all of them
    when none was read, else those whose name differs from a slide's only in case. (A folder
    annotating a whole cohort beside the heatmaps of its test slides is normal: no warning.)"""
    ids = {s.lower() for s in slide_ids}
    unused = [
        a.name for a in sorted(annotations_dir.iterdir())
        if a.is_file() and not set(_annotation_slide_ids(a.name)) & set(slide_ids)
    ]  # fmt: skip
    suspect = [a for a in unused if {i.lower() for i in _annotation_slide_ids(a)} & ids]
    if suspect or (unused and not any_used):
        shown = suspect or unused
        log.warning(
            "%d annotation file(s) in %s were not used, though they look meant for the scored slides: %s "
            "(name them exactly <slide>.xml, .geojson or <slide>_mask.tif)",
            len(shown), annotations_dir, ", ".join(shown[:5]),
        )  # fmt: skip


def _annotation_slide_ids(name: str) -> list[str]:
    """The slide ids an annotation file name can stand for (`find_annotation`'s names)."""
    return [name[: -len(e)] for e in ANNOTATION_ENDINGS if name.lower().endswith(e.lower())]
