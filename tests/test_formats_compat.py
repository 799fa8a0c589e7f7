"""Patch and feature files that CLAM's and TRIDENT's readers accept, and theirs that ours do.

TRIDENT (trident/wsi_objects/WSI.py) needs `coords` attrs patch_size, level0_magnification and
target_magnification and reads patch_size * level0_mag / target_mag level-0 px per patch
(`overlap` in px). CLAM's Whole_Slide_Bag_FP reads `coords` attrs patch_level and patch_size
and reads patch_size px at that pyramid level."""

import h5py
import numpy as np
from typer.testing import CliRunner

from wsi_mil.cli import app
from wsi_mil.config import TilingConfig, TissueConfig
from wsi_mil.formats.features import read_features
from wsi_mil.formats.patches import read_patches, write_patches
from wsi_mil.wsi.readers import open_slide
from wsi_mil.wsi.tiling import tile
from wsi_mil.wsi.tissue import segment_tissue

EXTRACT = ["--encoder", "resnet18", "--random-weights", "--workers", "0"]


def _grid(slide_path, **tiling):
    with open_slide(slide_path) as s:
        return tile(s, segment_tissue(s, TissueConfig()), TilingConfig(**tiling)), s.level_downsamples


def _trident_size0(attrs):
    return attrs["patch_size"] * attrs["level0_magnification"] / attrs["target_magnification"]


def test_our_patch_file_follows_tridents_and_clams_rules(tmp_path, real_slide):
    grid, downsamples = _grid(real_slide, target_mpp=0.5, patch_size=256, overlap=0.25)
    write_patches(tmp_path / "p.h5", grid)
    with h5py.File(tmp_path / "p.h5") as f:
        a = dict(f["coords"].attrs)
    assert abs(_trident_size0(a) - grid.patch_size_level0) <= 1  # TRIDENT reads the same region
    assert a["overlap"] == 64  # TRIDENT: pixels at the target resolution
    level = int(a["patch_level"])  # CLAM: patch_size px at patch_level is our patch
    assert abs(a["patch_size"] * downsamples[level] - grid.patch_size_level0) <= 0.01 * grid.patch_size_level0
    assert read_patches(tmp_path / "p.h5").attrs["overlap"] == 0.25  # ours still reads a fraction


def test_clams_level_is_left_out_where_no_pyramid_level_matches(tmp_path, real_slide):
    grid, _ = _grid(real_slide, target_mpp=0.7, patch_size=256)
    write_patches(tmp_path / "p.h5", grid)
    with h5py.File(tmp_path / "p.h5") as f:
        assert "patch_level" not in f["coords"].attrs
        assert abs(_trident_size0(dict(f["coords"].attrs)) - grid.patch_size_level0) <= 1


def _coords_file(path, coords, attrs):
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("coords", data=np.asarray(coords, np.int64))
        ds.attrs.update(attrs)


def test_extract_accepts_trident_and_clam_coords_files(tmp_path, synthetic_pair):
    s50, s25 = synthetic_pair  # the same tissue at 0.5 and 0.25 um/px
    grid, _ = _grid(s25.path, target_mpp=0.5, patch_size=256)
    coords = grid.coords[:12]
    trident = tmp_path / "trident" / "20x_256px_0px_overlap" / "patches"
    trident.mkdir(parents=True)
    _coords_file(
        trident / f"{s25.path.stem}_patches.h5",
        coords,
        {"patch_size": 256, "level0_magnification": 40, "target_magnification": 20, "overlap": 0,
         "patch_size_level0": 512, "name": s25.path.stem},
    )  # fmt: skip
    r = CliRunner().invoke(
        app,
        ["extract", str(s25.path), "--out", str(tmp_path / "a"), *EXTRACT, "--patches", str(trident.parent)],
    )
    assert r.exit_code == 0, r.output
    bag = read_features(tmp_path / "a" / "features" / "resnet18" / f"{s25.path.stem}.h5")
    np.testing.assert_array_equal(bag.coords, coords)
    assert bag.attrs["patch_size_level0"] == 512 and bag.attrs["patch_size"] == 256

    clam = tmp_path / "clam" / "patches"
    clam.mkdir(parents=True)
    _coords_file(
        clam / f"{s50.path.stem}.h5",
        coords // 2,
        {"patch_level": 0, "patch_size": 256, "downsample": [1.0, 1.0]},
    )
    r = CliRunner().invoke(
        app, ["extract", str(s50.path), "--out", str(tmp_path / "b"), *EXTRACT, "--patches", str(clam.parent)]
    )
    assert r.exit_code == 0, r.output
    bag = read_features(tmp_path / "b" / "features" / "resnet18" / f"{s50.path.stem}.h5")
    np.testing.assert_array_equal(bag.coords, coords // 2)
    assert bag.attrs["patch_size_level0"] == 256
    with h5py.File(tmp_path / "b" / "features" / "resnet18" / f"{s50.path.stem}.h5") as f:
        assert _trident_size0(dict(f["coords"].attrs)) == 256  # TRIDENT reads our feature file too


def test_missing_coords_file_is_one_clear_error(tmp_path, synthetic_slide):
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(
        app,
        [
            "extract",
            str(synthetic_slide.path),
            "--out",
            str(tmp_path / "o"),
            *EXTRACT,
            "--patches",
            str(tmp_path / "empty"),
        ],
    )
    assert r.exit_code == 1 and f"no coords file for {synthetic_slide.path.stem}" in r.output


def test_qupath_exports_follow_the_slides_bounds_offset(tmp_path):
    """MRXS-style `openslide.bounds-x/y`: QuPath shows the slide cropped to the bounds, so every
    QuPath GeoJSON we write is shifted by the offset, and every one we read is shifted back."""
    from shapely.geometry import MultiPolygon, box

    from wsi_mil.formats.scores import PatchScores, read_scores, write_scores
    from wsi_mil.formats.tissue_geojson import read_tissue, write_tissue
    from wsi_mil.localization.evaluate import read_annotation
    from wsi_mil.localization.export import qupath_geojson
    from wsi_mil.wsi.readers import ImageReader
    from wsi_mil.wsi.tissue import TissueMask

    slide = ImageReader(
        tmp_path / "x.mrxs", [(4000, 3000)], [1.0], 0.25, "properties", None,
        {"openslide.bounds-x": "1200", "openslide.bounds-y": "800"}, [np.zeros((1, 1, 3), np.uint8)],
    )  # fmt: skip
    assert slide.qupath_offset == (1200, 800)
    mask = TissueMask(MultiPolygon([box(1500, 1000, 2500, 2000)]))
    write_tissue(tmp_path / "t.geojson", mask, slide.qupath_offset)
    import json

    ring = json.loads((tmp_path / "t.geojson").read_text())["features"][0]["geometry"]["coordinates"][0]
    assert min(x for x, _ in ring) == 300 and min(y for _, y in ring) == 200  # QuPath's frame
    assert read_tissue(tmp_path / "t.geojson", slide.qupath_offset).polygons.equals(mask.polygons)
    v = np.array([0.2, 0.9])
    scores = PatchScores(np.array([[1500, 1000], [1756, 1000]]), v, v, v, np.array([0.1, 0.9]), 1, 256.0)
    tile0 = qupath_geojson(scores, 256.0, slide.qupath_offset)["features"][0]["geometry"]["coordinates"][0][0]
    assert tile0 == [300, 200]
    scores.qupath_offset = slide.qupath_offset
    write_scores(tmp_path / "s_scores.h5", scores)
    back = read_annotation(tmp_path / "t.geojson", read_scores(tmp_path / "s_scores.h5").qupath_offset)
    assert back.equals(mask.polygons)
