"""Tissue quality control (wsi/qc.py): each detector on patches with known answers, the QC
GeoJSON layer, and --qc off giving exactly the outputs without QC."""

import json

import cv2
import numpy as np
import pytest
import shapely
from shapely.geometry import MultiPolygon, box, shape

from wsi_mil.config import PipelineConfig, QCConfig
from wsi_mil.formats.patches import read_patches
from wsi_mil.formats.tissue_geojson import qc_path, read_tissue, write_tissue
from wsi_mil.pipeline.layout import Layout
from wsi_mil.pipeline.stages import TileStage
from wsi_mil.synthetic import artefact_masks, paint_artefacts, write_synthetic_slide
from wsi_mil.synthetic_artefacts import INK, ON_TISSUE_KINDS
from wsi_mil.wsi import qc
from wsi_mil.wsi.collect import SlideEntry
from wsi_mil.wsi.readers import open_slide
from wsi_mil.wsi.tiling import tile
from wsi_mil.wsi.tissue import mask_to_polygons, segment_tissue

CFG = QCConfig(mode="remove")
PINK = (236, 168, 196)  # the synthetic stroma colour
PURPLE = (150, 90, 160)  # dense nuclei


def tissue_patch(color=PINK, size=64, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.array(color, np.float32) + rng.normal(0, 6, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def with_square(img, fn):
    out = img.copy()
    out[16:48, 16:48] = fn(out[16:48, 16:48].astype(np.float32)).clip(0, 255).astype(np.uint8)
    truth = np.zeros(img.shape[:2], bool)
    truth[16:48, 16:48] = True
    return out, truth


def agreement(mask, truth):
    """(fraction of the truth found, fraction of the rest flagged)."""
    return mask[truth].mean(), mask[~truth].mean()


@pytest.mark.parametrize("ink", ["pen_blue", "pen_green", "pen_red"])
@pytest.mark.parametrize("under", [PINK, PURPLE])
def test_pen_colours(ink, under):
    img, truth = with_square(tissue_patch(under), lambda p: p * np.array(INK[ink], np.float32))
    masks = qc.pen_masks(img, CFG)
    found, false = agreement(masks[ink], truth)
    assert found > (0.95 if under == PINK else 0.7) and false == 0  # ink on dense nuclei is darker
    for other in set(masks) - {ink}:  # green on purple turns teal: partly called blue (ink either way)
        assert masks[other].mean() < (0.02 if under == PINK else 0.1), other


def test_black_ink_and_dark_tissue():
    img, truth = with_square(tissue_patch(PINK), lambda p: p * 0.12)
    found, false = agreement(qc.black_mask(img, CFG), truth)
    assert found > 0.95 and false == 0
    dark_purple = tissue_patch((70, 30, 90))  # epidermis-dark but coloured: not ink
    assert not qc.black_mask(dark_purple, CFG).any()


def test_background_rules():
    white = tissue_patch((245, 245, 245))
    grey = tissue_patch((160, 160, 162))
    assert qc.white_mask(white, CFG).mean() > 0.95 and not qc.white_mask(tissue_patch(), CFG).any()
    assert qc.greyspace_mask(grey, CFG).mean() > 0.95 and not qc.greyspace_mask(tissue_patch(), CFG).any()


def test_fold_is_relative_to_the_tissue():
    img, truth = with_square(tissue_patch(PINK, 96)[:64, :64], lambda p: 255 * (p / 255) ** 2.5)
    img = cv2.GaussianBlur(img, (0, 0), 1)
    found, false = agreement(qc.fold_mask(img, np.ones(truth.shape, bool), CFG), truth)
    assert found > 0.9 and false < 0.02
    assert not qc.fold_mask(tissue_patch(PURPLE), np.ones((64, 64), bool), CFG).any()


def test_fold_on_pale_tissue_beside_denser_tissue():
    """A fold on pale stroma is no darker than the slide's dense tissue (the slide-wide median
    misses it) but twice as dense as tissue of its own stain mix; the dense tissue stays."""
    from wsi_mil.wsi.qc_rules import optical_density

    img = tissue_patch(PURPLE, 96, seed=1)
    img[:, :40] = tissue_patch(PINK, 96)[:, :40]
    truth = np.zeros(img.shape[:2], bool)
    truth[30:60, 8:32] = True
    img[truth] = (255 * (img[truth] / 255) ** 2.5).astype(np.uint8)
    img = cv2.GaussianBlur(img, (0, 0), 1)
    od = optical_density(img)
    assert np.median(od[truth]) < 1.4 * np.median(od)  # the case: as dark as the purple
    found, false = agreement(qc.fold_mask(img, np.ones(truth.shape, bool), CFG), truth)
    assert found > 0.9 and false < 0.02


def test_a_micro_metastasis_among_stroma_is_no_fold():
    """The most hematoxylin-rich tissue is denser than any stain-mix bin it falls in (a small
    tumour among stroma shares a bin with stroma): it is judged by the darkness rule alone."""
    img = tissue_patch(PINK, 96)
    cv2.circle(img, (48, 48), 7, PURPLE, -1)
    img = cv2.GaussianBlur(img, (0, 0), 1)
    assert not qc.fold_mask(img, np.ones(img.shape[:2], bool), CFG).any()


def test_robust_median_of_masked_values_is_the_subsampled_median():
    """The tissue medians the rules compare against: the median of every step-th masked value
    (the mask's cells subsampled before they are gathered), also for 2-D images."""
    from wsi_mil.wsi.qc_rules import robust_median

    rng = np.random.default_rng(0)
    values = rng.random((300, 250)).astype(np.float32)
    mask = rng.random((300, 250)) < 0.6
    masked = values[mask]
    for most in (1_000, 20_000, 10**6):
        step = max(1, len(masked) // most)
        assert robust_median(values, mask, most) == float(np.median(masked[::step]))
    assert robust_median(values.ravel(), mask.ravel(), 1_000) == robust_median(values, mask, 1_000)


def test_bubble_rule():
    img, truth = with_square(tissue_patch(), lambda p: 0.25 * p + 0.75 * np.array([226, 226, 230]))
    found, false = agreement(qc.bubble_mask(img, CFG), truth)
    assert found > 0.9 and false == 0


def test_blur_half_of_a_textured_patch():
    rng = np.random.default_rng(0)
    tex = np.clip(180 + 40 * rng.standard_normal((128, 128)), 0, 255).astype(np.uint8)
    tex = cv2.GaussianBlur(tex, (0, 0), 0.6)
    blurred = tex.copy()
    blurred[:, 64:] = cv2.GaussianBlur(tex, (0, 0), 2.0)[:, 64:]
    rgb = np.repeat(blurred[..., None], 3, axis=2)
    mask = qc.blur_mask(rgb, np.ones((128, 128), bool), 4.0, QCConfig(blur_window_um=16))
    assert mask[:, 80:].mean() > 0.9 and mask[:, :48].mean() < 0.02


def test_qc_masks_disjoint_and_clean_tissue_kept():
    rng = np.random.default_rng(1)
    img = tissue_patch(PINK, 200, seed=1)
    tissue = np.ones((200, 200), bool)
    masks = artefact_masks(tissue, rng, ("pen_blue", "fold"), mask_mpp=8.0, scale_um=400)
    painted = paint_artefacts(img, masks, 8.0, 8.0)
    out = qc.qc_masks(painted, tissue, 8.0, CFG)
    stack = np.stack(list(out.values()))
    assert stack.sum(0).max() <= 1  # one reason per pixel
    for kind in ("pen_blue", "fold"):
        assert (stack.any(0) & masks[kind]).sum() >= 0.9 * masks[kind].sum(), kind
    art = cv2.dilate(np.any([masks[k] for k in masks], 0).astype(np.uint8), np.ones((7, 7))) > 0
    assert stack.any(0)[~art].mean() < 0.02
    assert not qc.qc_masks(img, tissue, 8.0, CFG)["pen_blue"].any()


@pytest.fixture(scope="module")
def painted_slide(tmp_path_factory):
    d = tmp_path_factory.mktemp("qc")
    return write_synthetic_slide(d / "art.tif", 1600, 1200, 1.0, seed=3, n_pieces=2, artefacts=True)


@pytest.fixture(scope="module")
def clean_slide(tmp_path_factory):
    d = tmp_path_factory.mktemp("qc_clean")
    return write_synthetic_slide(d / "clean.tif", 3000, 2000, 1.0, seed=7, tumor_regions=1)


def test_qc_layer_and_holes(painted_slide, tmp_path):
    cfg = PipelineConfig(qc=QCConfig(mode="remove"))
    stage = TileStage(Layout(tmp_path), cfg)
    entry = SlideEntry(painted_slide.path)
    stage.run(entry)
    layer = json.loads(qc_path(stage.layout.tissue(entry.name)).read_text())
    names = {name for name, _ in qc.REASONS.values()}
    polys = [(f["properties"]["classification"]["name"], shape(f["geometry"])) for f in layer["features"]]
    assert polys and all(n in names and p.is_valid and p.area > 0 for n, p in polys)
    assert "Pen blue" in {n for n, _ in polys} and len({n for n, _ in polys}) >= 3
    tissue = read_tissue(stage.layout.tissue(entry.name))
    assert tissue.qc["mode"] == "remove" and tissue.qc["removed_total"] > 0
    assert set(tissue.qc["removed_fraction"]) == set(qc.RULE_REASONS)  # no GrandQC-only "pen"
    removed = [p for _, p in polys]
    assert all(tissue.polygons.intersection(p).area < 1e-3 * p.area + 1 for p in removed)
    grid = read_patches(stage.layout.patches(entry.name))
    size = grid.patch_size_level0
    inside = [
        max(p.intersection(box(x, y, x + size, y + size)).area for _, p in polys) for x, y in grid.coords
    ]
    # no kept patch lies more than max_patch_artefact (0.125) under the removed artefacts (the
    # patch grid is rasterised at 1/SUBSAMPLE of a patch, hence the margin)
    assert QCConfig().max_patch_artefact == 0.125 and max(inside) / size**2 <= 0.125 + 0.05
    # every patch QC took keeps its reason: mostly over an artefact of that reason, none kept
    assert grid.dropped is not None and len(grid.dropped) == len(grid.dropped_reason) > 0
    assert set(grid.dropped_reason) <= set(qc.REASONS) and "pen_blue" in set(grid.dropped_reason)
    assert not {tuple(c) for c in grid.dropped} & {tuple(c) for c in grid.coords}
    by_reason = {r: shapely.union_all([p for n, p in polys if n == qc.REASONS[r][0]]) for r in qc.REASONS}
    for (x, y), reason in zip(grid.dropped, grid.dropped_reason):  # the reason covering most of it
        areas = {r: g.intersection(box(x, y, x + size, y + size)).area for r, g in by_reason.items()}
        assert areas[reason] > 0 and areas[reason] >= 0.9 * max(areas.values())


def test_artefact_annotations_cover_tissue_except_ink(painted_slide):
    """The demo's ground truth: blur, fold and bubble only over tissue (over glass they change no
    analysed pixel), ink wherever it was painted."""
    s = painted_slide
    layer = s.artefact_geojson()["features"]
    f = s.mask_mpp / s.mpp
    tissue = mask_to_polygons(s.tissue_mask, f, min_area_px=0, min_hole_px=0, max_holes=64).buffer(2 * f)
    for kind, m in s.artefacts.items():
        drawn = shapely.union_all(
            [
                shape(x["geometry"])
                for x in layer
                if x["properties"]["classification"]["name"] == qc.REASONS[kind][0]
            ]
        )
        if kind in ON_TISSUE_KINDS:
            assert drawn.difference(tissue).area <= 0.01 * drawn.area, kind
            if (m & ~s.tissue_mask).any():  # painted over glass too: that part is left out
                assert drawn.area < 0.99 * m.sum() * f**2, kind
        else:
            assert drawn.area == pytest.approx(m.sum() * f**2, rel=0.05), kind


def test_qc_off_equals_no_qc(clean_slide, tmp_path):
    cfg = PipelineConfig(qc=QCConfig(mode="off"))
    stage = TileStage(Layout(tmp_path), cfg)
    entry = SlideEntry(clean_slide.path)
    stage.run(entry)
    with open_slide(clean_slide.path) as slide:  # today's stage: the preview is read first
        slide.thumbnail_long_side(cfg.tissue.preview_px)
        mask = segment_tissue(slide, cfg.tissue)
        grid = tile(slide, mask, cfg.tiling.with_defaults())
    saved = read_patches(stage.layout.patches(entry.name))
    np.testing.assert_array_equal(saved.coords, grid.coords)
    data = json.loads(stage.layout.tissue(entry.name).read_text())
    assert "properties" not in data and not qc_path(stage.layout.tissue(entry.name)).exists()
    write_tissue(tmp_path / "direct.geojson", mask)
    assert stage.layout.tissue(entry.name).read_text() == (tmp_path / "direct.geojson").read_text()
    assert not any(k.startswith("qc_") for k in saved.attrs) and saved.dropped is None


def test_clean_slide_loses_nothing(clean_slide):
    with open_slide(clean_slide.path) as slide:
        mask = segment_tissue(slide)
        after = qc.apply_qc(slide, mask, CFG)
    assert after.qc["removed_total"] == 0 and after.polygons.equals(mask.polygons)


@pytest.mark.parametrize("mode", ["mark", "remove"])
def test_heatmap_never_over_artefacts(mode):
    from wsi_mil.localization.render import heatmap_overlay
    from wsi_mil.wsi.tissue import TissueMask

    tissue, ink = box(0, 0, 1000, 1000), box(400, 0, 600, 1000)
    kept = tissue.difference(ink) if mode == "remove" else tissue
    mask = TissueMask(
        MultiPolygon(getattr(kept, "geoms", [kept])), artefacts={"pen_blue": MultiPolygon([ink])}
    )
    mask.qc = {"mode": mode}
    thumb = np.full((100, 100, 3), 200, np.uint8)
    thumb[:, 40:60] = (220, 30, 40)  # red ink, which a reader could take for a hot score
    coords = np.array([(x, y) for y in range(0, 1000, 100) for x in range(0, 1000, 100)])  # mark: all scored
    out = heatmap_overlay(thumb, 10.0, coords, np.ones(len(coords)), 100, mask, blur=False)
    ink_grey = round(0.299 * 220 + 0.587 * 30 + 0.114 * 40)
    assert (np.abs(out[:, 41:59].astype(int) - ink_grey) <= 1).all()  # no score, and the ink shown grey
    assert (out[:, :39] != thumb[:, :39]).any(-1).all() and (out[:, 61:] != thumb[:, 61:]).any(-1).all()


def test_ink_takes_no_part_in_the_blur_windows():
    rng = np.random.default_rng(0)
    energy = (20 + rng.normal(0, 2, (60, 60))).astype(np.float32)
    energy[:, 28:32] = 1  # ink: hardly any gray detail, and not the slide's tissue
    tissue, ref = np.ones((60, 60), bool), np.ones((60, 60), bool)
    ref[:, 28:32] = False
    blur = qc.blur_from_energy(energy, tissue, 16.0, CFG, ref)
    assert not blur[:, :28].any() and not blur[:, 32:].any()
    energy[10:50, 5:20] = 3  # a defocused region is still found
    assert qc.blur_from_energy(energy, tissue, 16.0, CFG, ref)[15:45, 8:17].all()


def test_contour_preview_names_its_colours_below_the_thumbnail():
    """The tissue preview's legend: tissue outline, hole and each QC reason found, in their
    colours, on a band below the (unchanged-size) thumbnail."""
    from wsi_mil.wsi.draw import HOLE_COLOUR, TISSUE_COLOUR, draw_contours
    from wsi_mil.wsi.tissue import TissueMask

    thumb = np.full((200, 300, 3), 240, np.uint8)
    tissue = MultiPolygon([box(20, 20, 280, 180).difference(box(40, 40, 60, 60))])
    mask = TissueMask(tissue, thumb, 1.0, 1.0, {"fold": MultiPolygon([box(100, 100, 150, 150)])})
    out = draw_contours(mask, thumb, 1.0)
    assert out.shape[1] == 300 and out.shape[0] > 200
    band = out[200:].reshape(-1, 3)
    for colour in (TISSUE_COLOUR, HOLE_COLOUR, qc.REASONS["fold"][1]):
        assert (band == colour).all(1).any(), colour
    assert not (band == qc.REASONS["pen_blue"][1]).all(1).any()  # only the reasons found
