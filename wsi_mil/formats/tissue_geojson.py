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
    """Tissue as QuPath annotations, in QuPath's frame (our level-0 minus `offset`)."""
    polys = shift(mask.polygons, offset, -1)
    write_text(path, json.dumps(polygons_to_geojson(polys, TISSUE_CLASS, TISSUE_COLOR)))


def read_tissue(path: str | Path, offset: tuple[float, float] = (0, 0)) -> TissueMask:
    """Tissue from QuPath GeoJSON (ours or a user's export), back in our level-0 frame."""
    polys = shift(read_geojson_polygons(path), offset, +1)
    return TissueMask(polys if isinstance(polys, MultiPolygon) else MultiPolygon([polys]))
