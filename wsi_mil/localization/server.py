"""`wsi-mil view`: a local web server for reviewing a slide with its patch scores.

The slide is served as Deep Zoom straight from its reader (`/slide.dzi`,
`/slide_files/<level>/<col>_<row>.jpeg`, the layout of openslide-python's deepzoom server), so
zoom reaches level-0 pixels; each score is a second tiled layer (`/overlay/<score>.dzi`,
`/overlay/<score>_files/<level>/<col>_<row>.png`, RGBA, transparent where no patch was scored).
The page (OpenSeadragon, vendored) has a score selector, an opacity slider, the top patches
gallery and, on click, the scores of the patch under the pointer (`/api/patch?x=&y=` in level-0
pixels). `/?x=&y=&zoom=full` opens at full resolution on a level-0 point. Binds 127.0.0.1 by
default: slides are patient data.
"""

from __future__ import annotations

import html
import json
import threading
from functools import lru_cache
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import cv2
import numpy as np

from ..formats.scores import SCORE_NAMES, PatchScores, grid_step
from ..wsi.deepzoom import DeepZoom, SlideDeepZoom
from ..wsi.slide import Slide
from .export import OPACITY_AND_COLOUR_BAR, READY_JS, STATIC, VIEWER_STYLE
from .render import colourise, score_raster
from .scores import display_values, legend


class ScoreLayer:
    """A score as Deep Zoom RGBA tiles over the slide's level-0 frame (one cell per patch step)."""

    def __init__(self, dz: DeepZoom, scores: PatchScores, values: np.ndarray):
        self.dz = dz
        self.cell = max(1.0, min(grid_step(scores.coords, scores.size0), scores.size0))
        shape = (int(np.ceil(dz.height / self.cell)), int(np.ceil(dz.width / self.cell)))
        self.mean, self.covered = score_raster(scores.coords, values, scores.size0, shape, self.cell)

    def read_tile(self, level: int, col: int, row: int) -> np.ndarray:
        x0, y0, x1, y1 = self.dz.tile_box(level, col, row)
        ds = self.dz.downsample(level)
        h, w = self.mean.shape
        rows = np.clip(((np.arange(y0, y1) + 0.5) * ds / self.cell).astype(int), 0, h - 1)
        cols = np.clip(((np.arange(x0, x1) + 0.5) * ds / self.cell).astype(int), 0, w - 1)
        idx = np.ix_(rows, cols)
        return colourise(self.mean[idx], self.covered[idx])


class Review:
    """What the server shows: the slide, its scores and their layers; thread-safe reads."""

    def __init__(
        self, slide: Slide, scores: PatchScores, title: str, scale: str = "absolute", top_k: int = 12
    ):
        self.slide, self.scores, self.title, self.scale, self.top_k = slide, scores, title, scale, top_k
        self.dz = SlideDeepZoom(slide)
        self.values = {n: display_values(scores, n, scale) for n in SCORE_NAMES}
        self.layers = {n: ScoreLayer(self.dz, scores, v) for n, v in self.values.items()}
        self.lock = threading.Lock()
        self.max_level_served = -1
        self.tiles_served = 0
        self.slide_tile = lru_cache(maxsize=512)(self._slide_tile)
        self.overlay_tile = lru_cache(maxsize=512)(self._overlay_tile)

    def _slide_tile(self, level: int, col: int, row: int) -> bytes:
        with self.lock:  # not every reader backend is thread-safe
            img = self.dz.read_tile(level, col, row)
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
        return buf.tobytes()

    def _overlay_tile(self, name: str, level: int, col: int, row: int) -> bytes:
        rgba = self.layers[name].read_tile(level, col, row)
        ok, buf = cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
        return buf.tobytes()

    def patch_at(self, x: float, y: float) -> dict | None:
        c, s = self.scores.coords, self.scores.size0
        inside = (c[:, 0] <= x) & (x < c[:, 0] + s) & (c[:, 1] <= y) & (y < c[:, 1] + s)
        hits = np.nonzero(inside)[0]
        if not len(hits):
            return None
        i = int(hits[np.argmax(self.values["combined"][hits])])
        return {
            "index": i,
            "x": int(c[i, 0]),
            "y": int(c[i, 1]),
            "size": s,
            **{n: float(self.scores.get(n)[i]) for n in SCORE_NAMES},
        }

    def top(self, name: str) -> list[dict]:
        order = np.argsort(-self.values[name], kind="stable")[: self.top_k]
        return [
            {"index": int(i), "x": int(self.scores.coords[i, 0]), "y": int(self.scores.coords[i, 1]),
             "size": self.scores.size0, "value": float(self.values[name][i])}
            for i in order
        ]  # fmt: skip

    def thumbnail(self, i: int) -> bytes:
        x, y = (int(v) for v in self.scores.coords[i])
        s = int(self.scores.size0)
        with self.lock:
            img = self.slide.read_at_mpp(x, y, s, s, self.slide.mpp * max(1.0, s / 96))
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        return buf.tobytes()

    def info(self) -> dict:
        target = self.scores.target or "the mapped class"
        return {
            "title": self.title,
            "width": self.dz.width,
            "height": self.dz.height,
            "mpp": self.slide.mpp,
            "prob": [float(p) for p in self.scores.prob],
            "target": target,
            "scale": self.scale,
            "legend": legend("combined", target, self.scale, self.scores.is_calibrated),
            "legends": {n: legend(n, target, self.scale, self.scores.is_calibrated) for n in SCORE_NAMES},
            "scores": list(SCORE_NAMES),
            "top": {n: self.top(n) for n in SCORE_NAMES},
        }


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>wsi-mil: {title}</title>
{style}</head>
<body><div id="viewer"></div><div id="side">
<h3 style="margin-top:0">{title}</h3>
<label>Score <select id="score"></select></label><br><br>
{colour_bar}
<p id="legend"></p>
<p>Click a patch for its scores.</p><pre id="patch"></pre>
<p>Top patches by the selected score (click to zoom):</p><div id="gallery"></div>
<p id="status">loading</p><pre id="errors"></pre></div>
<script>window.onerror = function (m) {{ document.getElementById('errors').textContent += m + '\\n'; }};</script>
<script src="static/openseadragon.min.js"></script>
<script>
{ready_js}
const params = new URLSearchParams(window.location.search);
let info = null, overlay = null;
settled = params.get('zoom') !== 'full';
const viewer = OpenSeadragon({{ id: 'viewer', tileSources: 'slide.dzi', drawer: 'canvas',
  showNavigationControl: false, maxZoomPixelRatio: 2, crossOriginPolicy: false,
  immediateRender: params.get('zoom') === 'full' }});  // a link to a point: its level-0 tiles first
function toViewport(x, y, w) {{
  return viewer.world.getItemAt(0).imageToViewportRectangle(x, y, w, w);
}}
function showScore(name) {{
  const opacity = parseFloat(document.getElementById('opacity').value);
  document.getElementById('legend').textContent = info.legends[name];
  if (overlay) {{ viewer.world.removeItem(overlay); overlay = null; }}
  viewer.addTiledImage({{ tileSource: 'overlay/' + encodeURIComponent(name) + '.dzi', opacity: opacity,
    success: function (e) {{ overlay = e.item; document.getElementById('status').textContent = 'loaded ' + name; watchReady(name); }} }});
  const g = document.getElementById('gallery'); g.innerHTML = '';
  info.top[name].forEach(function (p) {{
    const im = document.createElement('img'); im.src = 'api/thumb/' + p.index + '.jpg';
    im.title = name + ' ' + p.value.toFixed(3);
    im.onclick = function () {{ viewer.viewport.fitBounds(toViewport(p.x, p.y, p.size)); }};
    g.appendChild(im);
  }});
}}
viewer.addHandler('open', function () {{
  fetch('api/info').then(function (r) {{ return r.json(); }}).then(function (data) {{
    info = data;
    document.getElementById('legend').textContent = info.legend;
    const sel = document.getElementById('score');
    info.scores.forEach(function (n) {{ const o = document.createElement('option'); o.value = n; o.textContent = n; sel.appendChild(o); }});
    sel.value = params.get('score') || 'combined';
    showScore(sel.value);
    if (params.get('zoom') === 'full') {{
      const x = parseFloat(params.get('x')), y = parseFloat(params.get('y'));
      const item = viewer.world.getItemAt(0);
      viewer.viewport.panTo(item.imageToViewportCoordinates(x, y), true);
      viewer.viewport.zoomTo(item.imageToViewportZoom(1.0), null, true);
      settled = true;
    }}
  }});
}});
viewer.addHandler('canvas-click', function (e) {{
  if (!e.quick || !info) return;
  const p = viewer.world.getItemAt(0).viewerElementToImageCoordinates(e.position);
  fetch('api/patch?x=' + p.x + '&y=' + p.y).then(function (r) {{ return r.json(); }}).then(function (d) {{
    document.getElementById('patch').textContent = d ? JSON.stringify(d, null, 1) : 'no patch here';
  }});
}});
document.getElementById('score').onchange = function (e) {{ showScore(e.target.value); }};
document.getElementById('opacity').oninput = function (e) {{ if (overlay) overlay.setOpacity(parseFloat(e.target.value)); }};
</script></body></html>
"""


def make_handler(review: Review) -> type[BaseHTTPRequestHandler]:
    page = PAGE.format(
        style=VIEWER_STYLE,
        colour_bar=OPACITY_AND_COLOUR_BAR,
        title=html.escape(review.title),
        ready_js=READY_JS.format(),
    ).encode()
    info = json.dumps(review.info()).encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: a browser fetches many tiles per view

        def log_message(self, format, *args):  # noqa: A002 - quiet: no line per tile
            pass

        def send(self, body: bytes, ctype: str, status: HTTPStatus = HTTPStatus.OK) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "max-age=3600")
            self.end_headers()
            self.wfile.write(body)

        def tile_args(self, rest: str) -> tuple[int, int, int]:
            level, name = rest.split("/")
            col, row = name.rsplit(".", 1)[0].split("_")
            return int(level), int(col), int(row)

        def do_GET(self):  # noqa: N802 - http.server's name
            url = urlparse(self.path)
            path = url.path
            try:
                if path in ("/", "/index.html"):
                    return self.send(page, "text/html; charset=utf-8")
                if path == "/static/openseadragon.min.js":
                    return self.send((STATIC / "openseadragon.min.js").read_bytes(), "text/javascript")
                if path == "/slide.dzi":
                    return self.send(review.dz.dzi("jpeg").encode(), "application/xml")
                if path.startswith("/slide_files/"):
                    level, col, row = self.tile_args(path[len("/slide_files/") :])
                    body = review.slide_tile(level, col, row)
                    review.max_level_served = max(review.max_level_served, level)
                    review.tiles_served += 1
                    return self.send(body, "image/jpeg")
                if path.startswith("/overlay/"):
                    rest = path[len("/overlay/") :]
                    if rest.endswith(".dzi") and rest[:-4] in review.layers:
                        return self.send(review.dz.dzi("png").encode(), "application/xml")
                    name, tile = rest.split("_files/", 1)
                    if name not in review.layers:
                        raise KeyError(name)
                    return self.send(review.overlay_tile(name, *self.tile_args(tile)), "image/png")
                if path == "/api/info":
                    return self.send(info, "application/json")
                if path == "/api/patch":
                    q = parse_qs(url.query)
                    hit = review.patch_at(float(q["x"][0]), float(q["y"][0]))
                    return self.send(json.dumps(hit).encode(), "application/json")
                if path.startswith("/api/thumb/"):
                    i = int(path[len("/api/thumb/") :].split(".")[0])
                    if not 0 <= i < len(review.scores.coords):
                        raise KeyError(i)
                    return self.send(review.thumbnail(i), "image/jpeg")
            except (KeyError, ValueError, IndexError):
                pass
            self.send(b"not found", "text/plain", HTTPStatus.NOT_FOUND)

    return Handler


def make_server(review: Review, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """The server (not started): `serve_forever()` it, or run it in a thread for tests."""
    server = ThreadingHTTPServer((host, port), make_handler(review))
    server.daemon_threads = True
    return server
