"""Polygons as QuPath GeoJSON: tissue annotations, tumor annotations and per-patch tiles.

QuPath reads a FeatureCollection whose features carry `properties.objectType` ("annotation",
"tile", "detection"), an optional `classification {name, color}`, `isLocked` and numeric
`measurements`; coordinates are level-0 pixels. Holes are interior rings.
"""

from __future__ import annotations

import json
from pathlib import Path

import shapely
import shapely.affinity
from shapely.geometry import MultiPolygon, Polygon, mapping, shape

from ..errors import WsiMilError
from ..io import write_text
from ..wsi.tissue import TissueMask

TISSUE_CLASS, TISSUE_COLOR = "Tissue", (20, 180, 60)


def qupath_feature(
    geometry: dict,
    object_type: str = "annotation",
    class_name: str | None = None,
    color: tuple[int, int, int] | None = None,
    measurements: dict | None = None,
    locked: bool = False,
) -> dict:
    """One QuPath object as a GeoJSON Feature."""
    props: dict = {"objectType": object_type}
    if class_name is not None:
        props["classification"] = {"name": class_name, **({"color": list(color)} if color else {})}
    if locked:
        props["isLocked"] = True
    if measurements is not None:
        props["measurements"] = measurements
    return {"type": "Feature", "geometry": geometry, "properties": props}


def square(x: float, y: float, side: float) -> dict:
    """A GeoJSON polygon for the square patch with top-left (x, y)."""
    x1, y1 = x + side, y + side
    return {"type": "Polygon", "coordinates": [[[x, y], [x1, y], [x1, y1], [x, y1], [x, y]]]}


def polygons_to_geojson(polys: MultiPolygon, class_name: str, color: tuple[int, int, int]) -> dict:
    """QuPath-compatible FeatureCollection: one annotation Feature per polygon."""
    features = [
        qupath_feature(mapping(shapely.set_precision(p, 0.01)), "annotation", class_name, color)
        for p in getattr(polys, "geoms", [polys])
        if not p.is_empty
    ]
    return {"type": "FeatureCollection", "features": features}


def geojson_to_polygons(data: dict | list, class_name: str | None = None) -> MultiPolygon:
    """Polygons from a FeatureCollection, Feature list or geometry (QuPath exports all three)."""
    if isinstance(data, list):
        features = data
    elif data.get("type") == "FeatureCollection":
        features = data.get("features", [])
    elif data.get("type") == "Feature":
        features = [data]
    else:
        features = [{"type": "Feature", "geometry": data, "properties": {}}]
    polys = []
    for feat in features:
        props = feat.get("properties") or {}
        cls = (props.get("classification") or {}).get("name")
        if class_name is not None and cls not in (None, class_name):
            continue
        geom = feat.get("geometry")
        if not geom:
            continue
        g = shape(geom)
        if not g.is_valid:
            g = shapely.make_valid(g)
        polys.extend(p for p in getattr(g, "geoms", [g]) if isinstance(p, Polygon))
    return MultiPolygon(polys)


def read_geojson_polygons(path: str | Path, class_name: str | None = None) -> MultiPolygon:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WsiMilError(
            f"{path}: not a readable GeoJSON file ({type(exc).__name__}); export the "
            "annotation from QuPath as GeoJSON or re-run 'wsi-mil segment'"
        ) from exc
    return geojson_to_polygons(data, class_name)


def shift(polys: MultiPolygon, offset: tuple[float, float], sign: int) -> MultiPolygon:
    """Polygons moved by `sign * offset` (between our level-0 frame and QuPath's, see
    `Slide.qupath_offset`)."""
    if not any(offset):
        return polys
    return shapely.affinity.translate(polys, sign * offset[0], sign * offset[1])


def write_tissue(path: str | Path, mask: TissueMask, offset: tuple[float, float] = (0, 0)) -> None:
    """Tissue as QuPath annotations, in QuPath's frame (our level-0 minus `offset`). After
    quality control the collection's `properties.qc` holds its summary (QuPath ignores it)."""
    polys = shift(mask.polygons, offset, -1)
    data = polygons_to_geojson(polys, TISSUE_CLASS, TISSUE_COLOR)
    if mask.qc is not None:
        data["properties"] = {"qc": mask.qc}
    write_text(path, json.dumps(data))


def read_tissue(path: str | Path, offset: tuple[float, float] = (0, 0)) -> TissueMask:
    """Tissue from QuPath GeoJSON (ours or a user's export), back in our level-0 frame."""
    polys = shift(read_geojson_polygons(path), offset, +1)
    mask = TissueMask(polys if isinstance(polys, MultiPolygon) else MultiPolygon([polys]))
    mask.qc = read_qc_record(path)
    return mask


def read_qc_record(path: str | Path) -> dict | None:
    """The QC summary a tissue GeoJSON of ours holds (`properties.qc`), None without one."""
    try:
        return (json.loads(Path(path).read_text()).get("properties") or {}).get("qc")
    except AttributeError:  # a bare Feature list
        return None


def qc_path(tissue_path: str | Path) -> Path:
    """`tissue/<slide>_qc.geojson` beside `tissue/<slide>.geojson`."""
    p = Path(tissue_path)
    return p.with_name(f"{p.stem}_qc.geojson")


def qc_to_geojson(mask: TissueMask, offset: tuple[float, float] = (0, 0)) -> dict:
    """The QC layer: one locked annotation per artefact polygon, classified by reason (one
    QuPath class per artefact, `properties.reason` the machine name), and the QC summary as
    the collection's `properties`."""
    from ..wsi.qc import REASONS

    features = []
    for reason, polys in mask.artefacts.items():
        name, color = REASONS[reason]
        for feat in polygons_to_geojson(shift(polys, offset, -1), name, color)["features"]:
            feat["properties"].update({"isLocked": True, "reason": reason})
            features.append(feat)
    return {"type": "FeatureCollection", "features": features, "properties": mask.qc or {}}


def write_qc(path: str | Path, mask: TissueMask, offset: tuple[float, float] = (0, 0)) -> None:
    write_text(path, json.dumps(qc_to_geojson(mask, offset)))


def read_qc(path: str | Path, offset: tuple[float, float] = (0, 0)) -> dict[str, MultiPolygon]:
    """Artefact polygons per reason from a QC layer, in our level-0 frame."""
    data = json.loads(Path(path).read_text())
    by_reason: dict[str, list] = {}
    for feat in data.get("features", []):
        by_reason.setdefault(feat["properties"].get("reason", "artefact"), []).append(feat)
    return {r: shift(geojson_to_polygons(f), offset, +1) for r, f in by_reason.items()}
