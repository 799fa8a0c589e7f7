"""`wsi-mil view` on the synthetic 40,000 x 30,000 px slide: time to first tile and tiles/s,
side by side with openslide-python's DeepZoomGenerator on the same file (same tiles, JPEG q85).

Each run starts a fresh server (empty tile cache) and measures
- first tile: from opening the slide to the first overview tile's bytes over HTTP;
- tiles/s over HTTP (urllib: a new connection per tile): 200 distinct random level-0 tiles (the
  full-zoom case), 1 client and 4 concurrent clients, and all tiles of an overview level (1/32);
- the same level-0 tiles read and encoded in process (what the server does per tile);
- the reference: DeepZoomGenerator.get_tile + JPEG encode for the same level-0 tiles, in process.

Usage: python bench/bench_viewer.py [--runs 3] [--tiles 200]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import large_slide  # noqa: E402


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.read()


def one_run(path: Path, n_tiles: int, seed: int) -> dict:
    from wsi_mil.formats.scores import PatchScores
    from wsi_mil.localization.server import Review, make_server
    from wsi_mil.wsi.readers import open_slide

    t0 = time.perf_counter()
    slide = open_slide(path)
    w, h = slide.dimensions
    coords = np.array([[x, y] for y in range(0, h, 512) for x in range(0, w, 512)], np.int64)
    v = np.random.default_rng(0).random(len(coords))
    review = Review(
        slide, PatchScores(coords, v, v, v, np.array([0.2, 0.8]), 1, 512.0, target="tumor"), "bench"
    )
    server = make_server(review, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    get(f"{base}/slide_files/9/0_0.jpeg")
    first = time.perf_counter() - t0
    top = review.dz.max_level
    cols, rows = review.dz.tile_grid(top)
    rng = np.random.default_rng(seed)
    picks = rng.choice(cols * rows, size=2 * n_tiles, replace=False)
    urls = [f"{base}/slide_files/{top}/{i % cols}_{i // cols}.jpeg" for i in picks]
    t1 = time.perf_counter()
    for u in urls[:n_tiles]:
        get(u)
    serial = n_tiles / (time.perf_counter() - t1)
    t1 = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(get, urls[n_tiles:]))
    parallel = n_tiles / (time.perf_counter() - t1)
    t1 = time.perf_counter()
    for i in picks[:n_tiles]:  # the same tiles in process: read + JPEG encode, no HTTP
        review._slide_tile(top, int(i % cols), int(i // cols))
    in_process = n_tiles / (time.perf_counter() - t1)
    level = top - 5  # an overview level (1/32), every tile
    c5, r5 = review.dz.tile_grid(level)
    t1 = time.perf_counter()
    for r in range(r5):
        for c in range(c5):
            get(f"{base}/slide_files/{level}/{c}_{r}.jpeg")
    overview = c5 * r5 / (time.perf_counter() - t1)
    server.shutdown()
    server.server_close()
    slide.close()
    return {
        "first_tile_s": first,
        "level0_serial": serial,
        "level0_4clients": parallel,
        "overview_tiles_s": overview,
        "level0_in_process": in_process,
        "picks": picks[:n_tiles],
        "cols": cols,
        "top": top,
    }


def reference(path: Path, picks, cols: int, top: int) -> float:
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    slide = openslide.OpenSlide(str(path))
    dz = DeepZoomGenerator(slide, tile_size=254, overlap=1, limit_bounds=False)
    assert dz.level_count - 1 == top
    t0 = time.perf_counter()
    for i in picks:
        tile = dz.get_tile(top, (int(i % cols), int(i // cols)))
        buf = io.BytesIO()
        tile.save(buf, "jpeg", quality=85)
    rate = len(picks) / (time.perf_counter() - t0)
    slide.close()
    return rate


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tiles", type=int, default=200)
    args = ap.parse_args()
    path = large_slide()
    results = []
    for k in range(args.runs):
        r = one_run(path, args.tiles, seed=k)
        r["openslide_deepzoom"] = reference(path, r["picks"], r["cols"], r["top"])
        results.append(r)
    keys = ("first_tile_s", "level0_serial", "level0_4clients", "level0_in_process", "overview_tiles_s",
            "openslide_deepzoom")  # fmt: skip
    for key in keys:
        runs = [round(r[key], 3) for r in results]
        print(f"{key:20s} median {statistics.median(r[key] for r in results):8.3f}   runs {runs}")


if __name__ == "__main__":
    main()
