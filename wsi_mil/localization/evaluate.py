"""Localization against ground-truth tumor annotations: patch AUC and Camelyon16-style FROC.

Annotations: ASAP XML as distributed with Camelyon16 (groups `_0`/`_1`/`Tumor` are tumor,
`_2` marks exclusion regions inside tumor) or GeoJSON polygons (any classification, or the
one named). A patch is positive when at least `pos_frac` of it is tumor, negative when none of
it is; patches in between are left out of the AUC.
FROC follows Camelyon16's lesion-level protocol in patch form: detections are score-ordered
patches kept by non-maximum suppression; a detection inside a lesion is a true positive for
that lesion (each lesion counted once), otherwise a false positive; sensitivity is read at
1/4, 1/2, 1, 2, 4 and 8 average false positives per slide, and the FROC score is their mean.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, box
from sklearn.metrics import roc_auc_score

from ..errors import WsiMilError
from ..formats.scores import SCORE_NAMES, read_scores
from ..formats.tissue_geojson import read_geojson_polygons, shift

FP_RATES = (0.25, 0.5, 1, 2, 4, 8)
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
    if tumor.is_empty:
        return np.zeros(len(coords))
    boxes = [box(x, y, x + size0, y + size0) for x, y in coords.tolist()]
    hits = shapely.intersects(boxes, tumor)
    frac = np.zeros(len(coords))
    for i in np.nonzero(hits)[0]:
        frac[i] = boxes[i].intersection(tumor).area / size0**2
    return frac


def patch_auc(scores: np.ndarray, frac: np.ndarray, pos_frac: float = 0.5) -> float:
    pos, neg = frac >= pos_frac, frac <= 0
    keep = pos | neg
    if pos[keep].all() or not pos[keep].any():
        return float("nan")
    return float(roc_auc_score(pos[keep], scores[keep]))


@dataclass
class SlideLocalization:
    slide: str
    coords: np.ndarray
    size0: float
    scores: dict[str, np.ndarray]
    tumor: MultiPolygon


def _detections(loc: SlideLocalization, name: str, radius_patches: float = 2.0):
    """(score, lesion index or -1) of NMS-kept detections, best first."""
    s = loc.scores[name]
    order = np.argsort(-s)
    centres = loc.coords + loc.size0 / 2
    suppressed = np.zeros(len(s), bool)
    lesions = list(getattr(loc.tumor, "geoms", []))
    out = []
    r2 = (radius_patches * loc.size0) ** 2
    for i in order:
        if suppressed[i]:
            continue
        d2 = ((centres - centres[i]) ** 2).sum(1)
        suppressed |= d2 <= r2
        pt = shapely.Point(*centres[i])
        hit = next((j for j, les in enumerate(lesions) if les.contains(pt)), -1)
        out.append((float(s[i]), hit))
    return out


def froc(slides: list[SlideLocalization], name: str) -> dict:
    """Sensitivity at FP_RATES average false positives per slide, and their mean."""
    dets = []
    n_lesions = 0
    for k, loc in enumerate(slides):
        n_lesions += len(getattr(loc.tumor, "geoms", []))
        dets.extend((score, k, lesion) for score, lesion in _detections(loc, name))
    dets.sort(key=lambda t: -t[0])
    found, fps, curve = set(), 0, []
    for _score, k, lesion in dets:
        if lesion >= 0:
            found.add((k, lesion))
        else:
            fps += 1
        curve.append((fps / len(slides), len(found) / max(n_lesions, 1)))
    sens = {}
    for rate in FP_RATES:
        ok = [s for f, s in curve if f <= rate]
        sens[str(rate)] = float(max(ok)) if ok else 0.0
    return {"sensitivity": sens, "froc": float(np.mean(list(sens.values()))), "lesions": n_lesions}


def evaluate(slides: list[SlideLocalization], pos_frac: float = 0.5) -> dict:
    """Patch AUC per slide and pooled, and FROC, for each score."""
    names = list(slides[0].scores)
    out = {"per_slide": {}, "pooled_patch_auc": {}, "froc": {}}
    fracs = [patch_tumor_fraction(s.coords, s.size0, s.tumor) for s in slides]
    for s, f in zip(slides, fracs):
        out["per_slide"][s.slide] = {n: patch_auc(s.scores[n], f, pos_frac) for n in names}
    for n in names:
        out["pooled_patch_auc"][n] = patch_auc(
            np.concatenate([s.scores[n] for s in slides]), np.concatenate(fracs), pos_frac
        )
        out["froc"][n] = froc(slides, n)
    return out


def evaluate_folder(scores_dir: str | Path, annotations_dir: str | Path, pos_frac: float = 0.5) -> dict:
    """Evaluate every `<slide>_scores.h5` that has `<slide>.xml` or `<slide>.geojson`.

    A scored slide without an annotation counts as tumor-free (Camelyon16 normals have none).
    """
    scores_dir, annotations_dir = Path(scores_dir), Path(annotations_dir)
    files = sorted(scores_dir.glob("*_scores.h5"))
    if not files:
        raise WsiMilError(f"{scores_dir}: no <slide>_scores.h5 files; run 'wsi-mil heatmap' first")
    slides = []
    for f in files:
        sid = f.name[: -len("_scores.h5")]
        ann = next(
            (p for p in (annotations_dir / f"{sid}.xml", annotations_dir / f"{sid}.geojson") if p.exists()),
            None,
        )
        ps = read_scores(f)
        tumor = read_annotation(ann, ps.qupath_offset) if ann else MultiPolygon()
        slides.append(SlideLocalization(sid, ps.coords, ps.size0, {n: ps.get(n) for n in SCORE_NAMES}, tumor))
    return evaluate(slides, pos_frac)
