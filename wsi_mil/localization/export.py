"""Exports for pathologist review, all in level-0 pixel coordinates.

- QuPath GeoJSON: one `tile` object per patch (locked), one measurement per layer named for the
  scored class (`combined P(tumor)`, `attention rank (tumor)`), which QuPath imports and
  colours by measurement.
- Pyramidal OME-TIFF of the coloured heatmap, RGBA (transparent wherever no patch was scored,
  so laid over the slide in QuPath it hides nothing else), with the slide's size and physical
  pixel size (tifffile, SubIFDs).
- Self-contained HTML viewer: Deep Zoom tiles of the slide and of each score overlay, shown
  with a vendored OpenSeadragon (no network), opacity slider, score selector, top-k gallery.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from urllib.parse import quote

import cv2
import numpy as np

from ..formats.scores import PROBABILITY_LAYERS, SCORE_NAMES, PatchScores
from ..formats.tissue_geojson import qupath_feature, square
from ..io import atomic_path
from .render import colourise, score_raster
from .scores import display_values, legend, probability_text

STATIC = Path(__file__).parent / "static"


def measurement_name(name: str, target: str) -> str:
    """A layer's QuPath measurement name, naming the class it scores: `combined P(tumor)`,
    `attention rank (tumor)`; the bare layer name when the class is unknown."""
    if not target:
        return name
    return f"{name} P({target})" if name in PROBABILITY_LAYERS else f"{name} rank ({target})"


def qupath_geojson(scores: PatchScores, size0: float, offset: tuple[int, int] = (0, 0)) -> dict:
    """FeatureCollection of locked square patch tiles with numeric measurements named for the
    scored class, in QuPath's frame (our level-0 minus `offset`, `Slide.qupath_offset`)."""
    values = {measurement_name(n, scores.target): scores.get(n).astype(float).tolist() for n in SCORE_NAMES}
    feats = [
        qupath_feature(
            square(x - offset[0], y - offset[1], size0),
            "tile",
            measurements={n: v[i] for n, v in values.items()},
            locked=True,
        )
        for i, (x, y) in enumerate(scores.coords.tolist())
    ]
    return {"type": "FeatureCollection", "features": feats}


def write_geojson(
    path: str | Path, scores: PatchScores, size0: float, offset: tuple[int, int] = (0, 0)
) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(qupath_geojson(scores, size0, offset)))


def write_ome_tiff(
    path: str | Path,
    scores: PatchScores,
    size0: float,
    stride0: float,
    slide_size: tuple[int, int],
    mpp: float,
    name: str = "combined",
    scale: str = "absolute",
    tile: int = 512,
) -> None:
    """Pyramidal RGBA OME-TIFF of the heatmap at the slide's level-0 size and mpp; alpha 0
    wherever no patch was scored."""
    import tifffile

    width, height = slide_size
    cell = max(1.0, float(stride0))
    shape = (int(math.ceil(height / cell)), int(math.ceil(width / cell)))
    mean, covered = score_raster(scores.coords, display_values(scores, name, scale), size0, shape, cell)
    rgba_cells = colourise(mean, covered)
    rgba_cells[~covered] = 0
    levels = [1]
    while max(width, height) / levels[-1] > 2048:
        levels.append(levels[-1] * 4)

    def tiles(ds):
        lw, lh = max(1, width // ds), max(1, height // ds)
        for ty in range(0, lh, tile):
            rows = np.clip(((np.arange(ty, ty + tile) + 0.5) * ds / cell).astype(int), 0, shape[0] - 1)
            for tx in range(0, lw, tile):
                cols = np.clip(((np.arange(tx, tx + tile) + 0.5) * ds / cell).astype(int), 0, shape[1] - 1)
                yield rgba_cells[np.ix_(rows, cols)]

    label = legend(name, scores.target or "the mapped class", scale, scores.is_calibrated)
    meta = {
        "axes": "YXS",
        "Channel": {"Name": ["red", "green", "blue", "alpha"]},
        "PhysicalSizeX": mpp,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": mpp,
        "PhysicalSizeYUnit": "µm",
        "Name": f"wsi-mil heatmap ({label})",
    }
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=width * height > 2**31, ome=True) as tif:
        opts = dict(
            tile=(tile, tile),
            photometric="rgb",
            extrasamples=["unassalpha"],
            compression="zlib",
            dtype=np.uint8,
        )
        tif.write(
            tiles(1),
            shape=(height, width, 4),
            subifds=len(levels) - 1,
            metadata=meta,
            resolution=(1e4 / mpp, 1e4 / mpp),
            resolutionunit="CENTIMETER",
            **opts,
        )
        for ds in levels[1:]:
            tif.write(
                tiles(ds),
                shape=(max(1, height // ds), max(1, width // ds), 4),
                subfiletype=1,
                resolution=(1e4 / (mpp * ds), 1e4 / (mpp * ds)),
                resolutionunit="CENTIMETER",
                **opts,
            )


def write_dzi(image: np.ndarray, folder: Path, fmt: str = "jpg", tile: int = 254, overlap: int = 1) -> dict:
    """Deep Zoom pyramid of an RGB(A) image into `folder/<level>/<col>_<row>.<fmt>`.

    Returns the inline tile-source description OpenSeadragon takes (no XHR needed on file://).
    """
    h, w = image.shape[:2]
    max_level = int(math.ceil(math.log2(max(w, h, 1))))
    img = image
    for level in range(max_level, -1, -1):
        lw, lh = img.shape[1], img.shape[0]
        d = folder / str(level)
        d.mkdir(parents=True, exist_ok=True)
        for row in range(int(math.ceil(lh / tile))):
            for col in range(int(math.ceil(lw / tile))):
                x0, y0 = max(col * tile - overlap, 0), max(row * tile - overlap, 0)
                x1, y1 = min((col + 1) * tile + overlap, lw), min((row + 1) * tile + overlap, lh)
                crop = img[y0:y1, x0:x1]
                if fmt == "jpg":
                    ok, buf = cv2.imencode(
                        ".jpg", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85]
                    )
                else:
                    ok, buf = cv2.imencode(".png", cv2.cvtColor(crop, cv2.COLOR_RGBA2BGRA))
                (d / f"{col}_{row}.{fmt}").write_bytes(buf.tobytes())
        if level:
            img = cv2.resize(
                img, (max(1, (lw + 1) // 2), max(1, (lh + 1) // 2)), interpolation=cv2.INTER_AREA
            )
    return {
        "Image": {
            "xmlns": "http://schemas.microsoft.com/deepzoom/2008",
            "Url": f"{folder.name}/",
            "Format": fmt,
            "Overlap": str(overlap),
            "TileSize": str(tile),
            "Size": {"Width": str(w), "Height": str(h)},
        }
    }


VIEWER_STYLE = """<style>
body { margin: 0; font-family: system-ui, sans-serif; display: flex; height: 100vh; }
#viewer { flex: 1; background: #222; }
#side { width: 290px; padding: 10px; overflow-y: auto; background: #f6f6f6; font-size: 13px; }
#side img { width: 80px; height: 80px; margin: 2px; cursor: pointer; border: 2px solid #ccc; }
.bar { height: 12px; background: linear-gradient(to right, #00008f, #00f, #0ff, #ff0, #f00, #800000); }
</style>
"""  # shared by the static export and `wsi-mil view`
OPACITY_AND_COLOUR_BAR = """<label>Overlay opacity <input id="opacity" type="range" min="0" max="1" step="0.05" value="0.5"></label>
<div class="bar"></div><div style="display:flex;justify-content:space-between"><span>0</span><span>0.5</span><span>1</span></div>"""


# Marks the page drawn once the slide and the overlay hold every tile the view needs
# (body data-ready = the layer's name): what review scripts and the browser tests wait for.
READY_JS = """
let settled = true;  // false while a requested zoom has not been applied yet
function watchReady(name) {{
  document.body.dataset.ready = '';
  const timer = setInterval(function () {{
    const n = viewer.world.getItemCount();
    let done = n >= 2 && settled;
    for (let i = 0; i < n && done; i++) done = viewer.world.getItemAt(i).getFullyLoaded();
    if (done) {{ clearInterval(timer); document.body.dataset.ready = name; }}
  }}, 50);
}}
"""


VIEWER_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>wsi-mil: {title}</title>
{style}</head>
<body><div id="viewer"></div><div id="side">
<h3 style="margin-top:0">{title}</h3>
<p>Slide: <b>{prediction}</b> ({probabilities})</p>
<label>Score <select id="score">{options}</select></label><br><br>
{colour_bar}
<p id="legend">{legend}</p>
<p>Top {k} patches by the selected score (click to zoom):</p><div id="gallery"></div>
<p id="status">loading</p><pre id="errors"></pre></div>
<script>
window.onerror = function (m) {{ document.getElementById('errors').textContent += m + '\\n'; }};
</script>
<script src="{folder}/openseadragon.min.js"></script>
<script>
const data = {data};
{ready_js}
const viewer = OpenSeadragon({{ id: 'viewer', tileSources: [data.slide], drawer: 'canvas',
  showNavigationControl: false, crossOriginPolicy: false, maxZoomPixelRatio: 4 }});
let overlay = null;
function showScore(name) {{
  const opacity = parseFloat(document.getElementById('opacity').value);
  document.getElementById('legend').textContent = data.legends[name];
  if (overlay) {{ viewer.world.removeItem(overlay); overlay = null; }}
  viewer.addTiledImage({{ tileSource: data.overlays[name], opacity: opacity,
    success: function (e) {{ overlay = e.item; document.getElementById('status').textContent = 'loaded ' + name; watchReady(name); }} }});
  const g = document.getElementById('gallery'); g.innerHTML = '';
  data.top[name].forEach(function (p) {{
    const im = document.createElement('img'); im.src = p.src;
    im.title = name + ' ' + p.value.toFixed(3);
    im.onclick = function () {{ viewer.viewport.fitBounds(new OpenSeadragon.Rect(p.x, p.y, p.w, p.w)); }};
    g.appendChild(im);
  }});
}}
viewer.addHandler('open', function () {{ showScore(document.getElementById('score').value); }});
document.getElementById('score').onchange = function (e) {{ showScore(e.target.value); }};
document.getElementById('opacity').oninput = function (e) {{ if (overlay) overlay.setOpacity(parseFloat(e.target.value)); }};
</script></body></html>
"""


def write_viewer(
    html_path: str | Path,
    slide_rgb: np.ndarray,
    view_px_level0: float,
    scores: PatchScores,
    size0: float,
    tissue_mask: np.ndarray | None,
    title: str,
    prediction: str,
    k: int = 12,
    scale: str = "absolute",
    classes: list[str] | None = None,
    calibrated: np.ndarray | None = None,
) -> Path:
    """The HTML viewer plus its tile folder `<name>_viewer/` next to it (URLs percent-encoded,
    so slide names with `#`, `%` or `?` work)."""
    import html as html_lib

    html_path = Path(html_path)
    folder = html_path.with_name(html_path.stem + "_viewer")
    tmp_folder = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp_folder, ignore_errors=True)
    tmp_folder.mkdir(parents=True)
    shutil.copy(STATIC / "openseadragon.min.js", tmp_folder)
    shutil.copy(STATIC / "OPENSEADRAGON_LICENSE.txt", tmp_folder)
    h, w = slide_rgb.shape[:2]
    url = quote(folder.name)
    slide_src = write_dzi(slide_rgb, tmp_folder / "slide_files")
    overlays, top = {}, {}
    (tmp_folder / "top").mkdir()
    for name in SCORE_NAMES:
        values = display_values(scores, name, scale)
        mean, covered = score_raster(scores.coords, values, size0, (h, w), view_px_level0)
        show = covered if tissue_mask is None else covered & tissue_mask
        overlays[name] = write_dzi(colourise(mean, show), tmp_folder / f"{name}_files", fmt="png")
        order = np.argsort(-values)[:k]
        items = []
        for rank, i in enumerate(order):
            x, y = scores.coords[i]
            x0, y0 = int(x / view_px_level0), int(y / view_px_level0)
            s = max(2, int(size0 / view_px_level0))
            crop = slide_rgb[y0 : y0 + s, x0 : x0 + s]
            crop = cv2.resize(crop, (96, 96), interpolation=cv2.INTER_AREA)
            fname = f"top/{name}_{rank}.jpg"
            cv2.imwrite(str(tmp_folder / fname), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
            items.append(
                {
                    "src": f"{url}/{fname}",
                    "x": float(x / view_px_level0 / w),
                    "y": float(y / view_px_level0 / w),
                    "w": float(size0 / view_px_level0 / w),
                    "value": float(values[i]),
                }
            )
        top[name] = items
    for src in [slide_src, *overlays.values()]:  # URLs relative to the HTML file
        src["Image"]["Url"] = f"{url}/{quote(src['Image']['Url'])}"
    target = scores.target or "the mapped class"
    legends = {n: legend(n, target, scale, scores.is_calibrated) for n in SCORE_NAMES}
    data = {"slide": slide_src, "overlays": overlays, "top": top, "legends": legends}
    options = "".join(
        f'<option value="{n}"{" selected" if n == "combined" else ""}>{n}</option>' for n in SCORE_NAMES
    )
    esc = html_lib.escape
    html = VIEWER_HTML.format(
        style=VIEWER_STYLE,
        colour_bar=OPACITY_AND_COLOUR_BAR,
        title=esc(title),
        prediction=esc(prediction),
        probabilities=esc(
            probability_text(scores.prob, classes)
            + (f"; calibrated {probability_text(calibrated, classes)}" if calibrated is not None else "")
        ),
        options=options,
        k=k,
        folder=esc(url),
        legend=esc(legends["combined"]),
        ready_js=READY_JS.format(),
        data=json.dumps(data).replace("</", "<\\/"),
    )
    shutil.rmtree(folder, ignore_errors=True)
    tmp_folder.rename(folder)
    with atomic_path(html_path) as tmp:
        tmp.write_text(html)
    return html_path
