"""`wsi-mil view`: Deep Zoom from the reader, score layers, patch lookup, and the page in Chromium."""

import json
import threading
import time
import urllib.error
import urllib.request

import browser
import cv2
import numpy as np
import pytest

from wsi_mil.formats.scores import PatchScores
from wsi_mil.localization.server import Review, make_server
from wsi_mil.wsi.deepzoom import DeepZoom
from wsi_mil.wsi.readers import open_slide


def test_deep_zoom_geometry_follows_the_dzi_convention():
    dz = DeepZoom(6000, 4000, tile=254, overlap=1)
    assert dz.max_level == 13 and dz.level_size(13) == (6000, 4000) and dz.level_size(0) == (1, 1)
    assert dz.level_size(12) == (3000, 2000) and dz.tile_grid(13) == (24, 16)
    assert dz.tile_box(13, 0, 0) == (0, 0, 255, 255)  # overlap only towards neighbours
    assert dz.tile_box(13, 1, 1) == (253, 253, 509, 509)
    assert dz.tile_box(13, 23, 15) == (23 * 254 - 1, 15 * 254 - 1, 6000, 4000)
    with pytest.raises(KeyError):
        dz.tile_box(13, 24, 0)
    assert 'TileSize="254"' in dz.dzi("jpeg") and 'Width="6000"' in dz.dzi("jpeg")


@pytest.fixture(scope="module")
def served(synthetic_slide):
    slide = open_slide(synthetic_slide.path)
    w, h = slide.dimensions
    coords = np.array([[x, y] for y in range(0, h // 2, 256) for x in range(0, w // 2, 256)], np.int64)
    values = np.linspace(0, 1, len(coords))
    scores = PatchScores(coords, values, values, values, np.array([0.1, 0.9]), 1, 256.0, target="tumor")
    review = Review(slide, scores, "s#1 100%?")
    server = make_server(review, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", review, slide
    server.shutdown()
    server.server_close()
    slide.close()


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


def test_server_tiles_reach_level0_pixels_and_overlays_are_transparent_outside_patches(served):
    base, review, slide = served
    dzi = _get(base + "/slide.dzi").decode()
    assert f'Width="{slide.dimensions[0]}"' in dzi
    top = review.dz.max_level
    tile = cv2.imdecode(np.frombuffer(_get(f"{base}/slide_files/{top}/1_1.jpeg"), np.uint8), cv2.IMREAD_COLOR)
    truth = slide.read_region((253, 253), 0, (256, 256))
    assert tile.shape == (256, 256, 3)
    assert np.abs(tile[..., ::-1].astype(int) - truth).mean() < 6  # JPEG q85 of the same pixels
    overview = _get(f"{base}/slide_files/8/0_0.jpeg")
    assert (
        cv2.imdecode(np.frombuffer(overview, np.uint8), cv2.IMREAD_COLOR).shape[:2]
        == review.dz.level_size(8)[::-1]
    )
    png = _get(f"{base}/overlay/combined_files/{top}/0_0.png")
    rgba = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert rgba.shape == (255, 255, 4) and (rgba[..., 3] == 255).all()  # inside the scored quarter
    far = review.dz.tile_grid(top)[0] - 1
    rgba = cv2.imdecode(np.frombuffer(_get(f"{base}/overlay/combined_files/{top}/{far}_0.png"), np.uint8), -1)
    assert (rgba[..., 3] == 0).all()  # no patch there: fully transparent
    hit = json.loads(_get(f"{base}/api/patch?x=300&y=10"))
    assert hit["x"] == 256 and hit["y"] == 0 and set(hit) >= {"attention", "inversion", "combined"}
    assert json.loads(_get(f"{base}/api/patch?x={slide.dimensions[0] - 5}&y=5")) is None
    info = json.loads(_get(base + "/api/info"))
    assert info["target"] == "tumor" and "probability that this patch is tumor" in info["legend"]
    assert "rank within this slide" in info["legends"]["attention"]
    assert info["top"]["combined"][0]["value"] == pytest.approx(1.0)
    assert _get(f"{base}/api/thumb/{info['top']['combined'][0]['index']}.jpg")[:2] == b"\xff\xd8"
    for bad in ("/slide_files/99/0_0.jpeg", "/overlay/nope_files/1/0_0.png", "/api/thumb/99999.jpg", "/x"):
        with pytest.raises(urllib.error.HTTPError) as err:
            _get(base + bad)
        assert err.value.code == 404


def _zoom_full_frame(b: browser.Chromium, base: str, review: Review) -> dict:
    review.max_level_served = -1
    assert b.open(base + "/?zoom=full&x=700&y=500&score=attention") == "attention"
    assert review.max_level_served == review.dz.max_level  # level-0 pixels were served
    return browser.viewer_frame_checks(b.screenshot())


@pytest.mark.skipif(not browser.available(), reason="Debian chromium not installed")
def test_page_in_headless_chromium_at_overview_and_full_zoom(served):
    """The page in a real browser, screenshots taken once it says it is drawn (tests/browser.py):
    the overview never reads level 0; a `?zoom=full` link draws level 0 with its overlay on the
    first load, with the lower levels cached and in a new browser."""
    base, review, slide = served
    review.max_level_served = -1  # count only what the page asks for
    with browser.Chromium() as b:
        assert b.open(base + "/") == "combined"
        dom = b.dom()
        assert 'id="status">loaded combined<' in dom and '<pre id="errors"></pre>' in dom
        assert dom.count('src="api/thumb/') == 12
        frame = browser.viewer_frame_checks(b.screenshot())
        assert frame["unpainted"] < 0.6 and frame["overlay"] > 0.05, frame  # slide and overlay drawn
        assert review.max_level_served < review.dz.max_level  # the overview never reads level 0
        frame = _zoom_full_frame(b, base, review)  # the lower levels are cached by now
        assert frame["unpainted"] < 0.01 and frame["overlay"] > 0.5, frame
        # the checks see what is missing: the overlay hidden, then the slide hidden too
        b.evaluate("viewer.world.getItemAt(1).setOpacity(0); viewer.forceRedraw(); 1")
        time.sleep(0.5)
        assert browser.viewer_frame_checks(b.screenshot())["overlay"] < 0.01
        b.evaluate("viewer.world.getItemAt(0).setOpacity(0); viewer.forceRedraw(); 1")
        time.sleep(0.5)
        assert browser.viewer_frame_checks(b.screenshot())["unpainted"] > 0.99
    with browser.Chromium() as b:  # a new browser: nothing cached
        frame = _zoom_full_frame(b, base, review)
        assert frame["unpainted"] < 0.01 and frame["overlay"] > 0.5, frame
