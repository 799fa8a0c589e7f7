import json
import warnings

import numpy as np
import pytest
import shapely
from shapely.geometry import Point, box

from wsi_mil.config import TilingConfig, TissueConfig
from wsi_mil.formats.patches import read_patches, write_patches
from wsi_mil.formats.tissue_geojson import geojson_to_polygons, read_tissue
from wsi_mil.synthetic import write_blank_slide
from wsi_mil.wsi.readers import open_slide
from wsi_mil.wsi.tiling import tile
from wsi_mil.wsi.tissue import TissueMask, mask_to_polygons, segment_tissue


def _iou(mask: TissueMask, syn) -> float:
    h, w = syn.tissue_mask.shape
    pred = mask.rasterize(w, h, syn.mask_mpp / syn.mpp).astype(bool)
    gt = syn.tissue_mask
    return (pred & gt).sum() / (pred | gt).sum()


@pytest.mark.parametrize("which", [0, 1])
def test_tissue_iou_at_two_scanner_resolutions(synthetic_pair, which):
    syn = synthetic_pair[which]
    with open_slide(syn.path) as slide:
        mask = segment_tissue(slide, TissueConfig())
    assert _iou(mask, syn) >= 0.9
    assert any(len(p.interiors) for p in mask.polygons.geoms), "holes must be kept"


def test_same_physical_tiling_at_both_resolutions(synthetic_pair):
    s50, s25 = synthetic_pair
    grids = []
    for syn in (s50, s25):
        with open_slide(syn.path) as slide:
            grids.append(tile(slide, segment_tissue(slide), TilingConfig(target_mpp=0.5, patch_size=256)))
    g50, g25 = grids
    assert g50.patch_size_level0 == 256 and g25.patch_size_level0 == 512
    phys50 = {tuple(c) for c in (g50.coords * 0.5).tolist()}
    phys25 = {tuple(c) for c in (g25.coords * 0.25).tolist()}
    # Segmentations differ by a few thumbnail pixels at the borders; the grid itself is shared.
    assert len(phys50 & phys25) / len(phys50 | phys25) > 0.95
    assert all(x % 128 == 0 and y % 128 == 0 for x, y in phys50 | phys25)


def test_every_kept_patch_meets_tissue_rule_and_lies_inside(synthetic_slide):
    with open_slide(synthetic_slide.path) as slide:
        mask = segment_tissue(slide)
        cfg = TilingConfig(target_mpp=1.0, patch_size=128, min_tissue=0.6)
        grid = tile(slide, mask, cfg)
        w, h = slide.dimensions
    assert len(grid) > 20
    size0 = grid.patch_size_level0
    assert size0 == 256
    assert (grid.coords >= 0).all()
    assert (grid.coords[:, 0] + size0 <= w).all() and (grid.coords[:, 1] + size0 <= h).all()
    exact = np.array(
        [mask.polygons.intersection(box(x, y, x + size0, y + size0)).area / size0**2 for x, y in grid.coords]
    )
    assert (exact >= 0.6 - 0.03).all()  # raster estimate within 3% of exact geometry
    np.testing.assert_allclose(grid.tissue_fraction, exact, atol=0.03)
    # and the rejected neighbours really fall short
    rejected = 0
    for x in range(0, w - size0 + 1, size0):
        for y in range(0, h - size0 + 1, size0):
            if (x, y) in set(map(tuple, grid.coords.tolist())):
                continue
            frac = mask.polygons.intersection(box(x, y, x + size0, y + size0)).area / size0**2
            assert frac < 0.6 + 0.03
            rejected += 1
    assert rejected > 0


def test_overlap_halves_stride_and_edges_are_excluded(synthetic_slide):
    with open_slide(synthetic_slide.path) as slide:
        mask = TissueMask(shapely.MultiPolygon([box(0, 0, *slide.dimensions)]))
        g0 = tile(slide, mask, TilingConfig(target_mpp=0.5, patch_size=256, min_tissue=0.5))
        g1 = tile(slide, mask, TilingConfig(target_mpp=0.5, patch_size=256, overlap=0.5, min_tissue=0.5))
        w, h = slide.dimensions
    assert len(g0) == (w // 256) * (h // 256)
    xs = np.unique(g1.coords[:, 0])
    assert np.diff(xs).tolist() == [128] * (len(xs) - 1)
    assert len(g1) == ((w - 256) // 128 + 1) * ((h - 256) // 128 + 1)
    assert (g1.coords[:, 0] + 256 <= w).all()


def test_patch_file_roundtrip_and_clam_attrs(tmp_path, synthetic_slide):
    import h5py

    with open_slide(synthetic_slide.path) as slide:
        grid = tile(slide, segment_tissue(slide))
    write_patches(tmp_path / "p.h5", grid, slide_path="x")
    back = read_patches(tmp_path / "p.h5")
    np.testing.assert_array_equal(back.coords, grid.coords)
    assert (back.patch_size, back.patch_size_level0, back.target_mpp) == (256, 256, 0.5)
    # A CLAM file: attrs on coords, patch_size at patch_level with a downsample
    with h5py.File(tmp_path / "clam.h5", "w") as f:
        ds = f.create_dataset("coords", data=np.array([[0, 0], [1024, 0]], np.int64))
        ds.attrs["patch_level"] = 1
        ds.attrs["patch_size"] = 256
        ds.attrs["downsample"] = np.array([4.0, 4.0])
    clam = read_patches(tmp_path / "clam.h5", level0_mpp=0.25)
    assert clam.patch_size_level0 == 1024 and clam.target_mpp == pytest.approx(1.0)


def test_blank_slide_gives_empty_mask_not_crash(tmp_path):
    path = write_blank_slide(tmp_path / "blank.tif")
    with open_slide(path) as slide:
        mask = segment_tissue(slide)
        assert mask.is_empty
        assert len(tile(slide, mask)) == 0


def test_geojson_is_qupath_annotation_with_holes(synthetic_slide, tmp_path):
    from wsi_mil.formats.tissue_geojson import write_tissue

    with open_slide(synthetic_slide.path) as slide:
        mask = segment_tissue(slide)
    write_tissue(tmp_path / "t.geojson", mask)
    data = json.loads((tmp_path / "t.geojson").read_text())
    assert data["type"] == "FeatureCollection"
    f = data["features"][0]
    assert f["properties"]["objectType"] == "annotation"
    assert f["properties"]["classification"]["name"] == "Tissue"
    for feat in data["features"]:
        for ring in feat["geometry"]["coordinates"]:
            assert ring[0] == ring[-1]
    back = read_tissue(tmp_path / "t.geojson")
    assert back.polygons.symmetric_difference(mask.polygons).area / mask.area_level0 < 1e-3
    assert geojson_to_polygons(data["features"]).area == pytest.approx(back.polygons.area)
    assert back.polygons.contains(Point(*mask.polygons.geoms[0].representative_point().coords[0]))


def test_real_slide_segments_and_tiles(real_slide):
    with open_slide(real_slide) as slide:
        mask = segment_tissue(slide, TissueConfig(seg_mpp=4.0, min_tissue_area_um2=2e4))
        grid = tile(slide, mask, TilingConfig(target_mpp=0.5, patch_size=224))
    assert 0.1 < mask.area_level0 / (2220 * 2967) < 0.9
    assert len(grid) > 10


def test_default_tiling_loses_no_tissue_edge_on_the_real_slide(real_slide):
    """Kept patches cover >= 90% of an independent grayscale-Otsu tissue mask (at 0.5 um/px,
    256 px), and every kept patch holds tissue."""
    import cv2
    from skimage.filters import threshold_otsu

    from wsi_mil.config import TilingConfig, TissueConfig

    with open_slide(real_slide) as s:
        grid = tile(s, segment_tissue(s, TissueConfig()), TilingConfig(target_mpp=0.5, patch_size=256))
        img, mpp = s.thumbnail_at_mpp(2.0)
        px = mpp / s.mpp
    gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    otsu = gray < threshold_otsu(gray)
    covered = np.zeros_like(otsu)
    k = int(round(grid.patch_size_level0 / px))
    for x, y in grid.coords:
        covered[int(y / px) : int(y / px) + k, int(x / px) : int(x / px) + k] = True
    assert (covered & otsu).sum() / otsu.sum() >= 0.9
    assert grid.tissue_fraction.min() > 0


# a demo slide's QC mask (42 x 58 cells of 31.9 level-0 px at row 58, column 24 of its 125 x 188
# grid): a curve one cell wide, whose contour comes out of make_valid with line parts
SPUR_MASK = (
    "000000000000000000000000000020000000000000080000000000000200000000000001000000000000004000000000"
    "0000300000000000001800000000000004000000000000030000000000000180000000000000c0000000000000e00000"
    "00000000600000000000002000000000000018000000000000180000000000000c000000000000060000000000000200"
    "0000000000010000000000000180000000000000c0000000000000600000000000003000000000000038000000000000"
    "18000000000000080000000000000c000000000000060000000000000300000000000003000000000000018000000000"
    "0000c000000000000040000000000000200000000000003000000000000010000000000000180000000000001c000000"
    "00007ff800000000000000000000000000"
)


def test_polygons_of_a_one_cell_wide_mask_raise_no_warning():
    """This mask made every `extract` and `demo` print "RuntimeWarning: divide by zero
    encountered in buffer" (GEOS's mitre joins on the line parts); its polygons are valid, cover
    the cells, and come without a warning."""
    cells = np.unpackbits(np.frombuffer(bytes.fromhex(SPUR_MASK), np.uint8))[: 42 * 58].reshape(42, 58)
    mask = np.zeros((125, 188), bool)
    mask[58:100, 24:82] = cells
    px = 31.914893617021278
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        poly = mask_to_polygons(mask, px, min_area_px=1, min_hole_px=1, max_holes=10_000)
    assert poly.is_valid and poly.area >= cells.sum() * px**2


def test_tissue_touching_the_image_border_stays_on_the_slide():
    """The half-pixel growth to the true tissue edge stopped at the border: a polygon reached
    9 level-0 px beyond the bottom of the shared real slide."""
    from wsi_mil.wsi.tissue import mask_to_polygons

    mask = np.zeros((40, 60), bool)
    mask[10:, :30] = True  # touches the left and bottom edges
    polys = mask_to_polygons(mask, 16.0, 1, 1, 4)
    minx, miny, maxx, maxy = polys.bounds
    assert minx == 0 and maxy == 40 * 16.0
    assert abs(polys.area - 30 * 30 * 16.0**2) < 16.0**2 * 30  # no area lost inside the image


def test_tissue_stays_inside_the_slide_past_the_thumbnails_rounded_last_pixel(real_slide):
    """The thumbnail's last row (2967 / 16 rounds up to 186 rows) reached 2976 level-0 px on a
    slide 2967 px high: polygons are clipped at the slide's own size, not the mask's."""
    with open_slide(real_slide) as slide:
        w, h = slide.dimensions
        mask = segment_tissue(slide)
    minx, miny, maxx, maxy = mask.polygons.bounds
    assert minx >= 0 and miny >= 0 and maxx <= w and maxy <= h, (mask.polygons.bounds, w, h)


def test_heavy_pen_ink_does_not_raise_the_tissue_threshold():
    """Otsu on saturation put the threshold between pale tissue and blue ink once ink covered a
    third of the thumbnail: the tissue was lost (the real slide with six strokes: no tissue)."""
    from wsi_mil.wsi.tissue import saturation_mask

    rng = np.random.default_rng(0)
    img = np.full((200, 300, 3), 242, np.float32)
    img[40:160, 20:140] = (225, 185, 205)  # pale stroma, HSV saturation ~45
    img[20:180, 160:290] = (60, 80, 220)  # blue ink, saturation ~185, a third of the image
    img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
    mask = saturation_mask(img, TissueConfig(), 8.0)
    assert mask[50:150, 30:130].mean() > 0.99 and mask[:15].mean() == 0  # tissue kept, glass not
    assert mask[30:170, 170:280].all()  # the ink itself is thresholded in (QC cuts it out)
