import numpy as np
import pytest
import tifffile

from wsi_mil.errors import MissingMPPError, SlideOpenError
from wsi_mil.wsi.collect import collect_slides
from wsi_mil.wsi.readers import open_slide


def test_synthetic_slide_opens_in_both_backends_with_same_pixels(synthetic_slide):
    a = open_slide(synthetic_slide.path, backend="openslide")
    b = open_slide(synthetic_slide.path, backend="tiffslide")
    assert a.dimensions == b.dimensions == synthetic_slide.size
    assert a.mpp == pytest.approx(0.5) and b.mpp == pytest.approx(0.5)
    assert a.level_count >= 2
    for level in range(a.level_count):
        ra = a.read_region((1000, 800), level, (300, 200))
        rb = b.read_region((1000, 800), level, (300, 200))
        assert ra.shape == (200, 300, 3) and ra.dtype == np.uint8
        np.testing.assert_array_equal(ra, rb)


def test_auto_backend_prefers_tiffslide_for_tiff_and_pads_white_like_openslide(synthetic_slide):
    fast = open_slide(synthetic_slide.path)
    ref = open_slide(synthetic_slide.path, backend="openslide")
    assert fast.backend == "tiffslide"  # generic tiled TIFF: the faster reader
    w, h = ref.dimensions
    for level in (0, 1):
        for loc in ((-300, -200), (w - 150, h - 100), (w + 10, 0)):
            a = ref.read_region(loc, level, (256, 192))
            b = fast.read_region(loc, level, (256, 192))
            assert b.shape == (192, 256, 3) and b.flags.c_contiguous
            assert ((a == 255).all(-1) == (b == 255).all(-1)).mean() > 0.999  # same white margin
            assert np.abs(a.astype(int) - b).max() <= 4  # edge-tile decoding differs by a few levels


def test_read_at_mpp_uses_pyramid_and_resizes(synthetic_pair):
    s50, s25 = synthetic_pair
    with open_slide(s50.path) as a, open_slide(s25.path) as b:
        # the same 512 um box read at 2 um/px from both scans
        ia = a.read_at_mpp(2000, 1000, 1024, 1024, 2.0)
        ib = b.read_at_mpp(4000, 2000, 2048, 2048, 2.0)
        assert ia.shape == ib.shape == (256, 256, 3)
        assert np.abs(ia.astype(float) - ib).mean() < 12
        assert b.best_level_for_downsample(8.0) == 1  # 4x level, not level 0


def test_real_svs_same_pixels_in_both_backends(real_slide):
    a = open_slide(real_slide, backend="openslide")
    b = open_slide(real_slide, backend="tiffslide")
    assert a.dimensions == b.dimensions == (2220, 2967)
    assert a.mpp == pytest.approx(0.499, abs=1e-3) and a.mpp_source == "properties"
    assert a.objective_power == 20
    ra, rb = a.read_region((500, 700), 0, (512, 512)), b.read_region((500, 700), 0, (512, 512))
    assert np.abs(ra.astype(int) - rb).max() <= 2  # same JPEG tiles, decoder rounding only


def _tiffslide_region(path, slide, loc, level, size):
    """What tiffslide's own (zarr) read returns, painted white outside as our reader does."""
    import warnings

    import tiffslide

    with tiffslide.TiffSlide(str(path)) as ts, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "out-of-bounds, but padding is requested"
        arr = np.asarray(ts.read_region(loc, level, size, as_array=True))[..., :3].copy()
    return slide._whiten_outside(arr, *loc, level)


def test_tiles_decoded_straight_from_the_file_equal_tiffslides_reads(synthetic_slide, real_slide, tmp_path):
    import shutil

    rng = np.random.default_rng(0)
    for path in (synthetic_slide.path, real_slide):
        with open_slide(path) as slide:
            assert slide._tiles is not None  # the direct tile path is the one in use
            w, h = slide.dimensions
            for level in range(slide.level_count):
                boxes = [
                    ((-300, -200), (256, 192)),
                    ((w - 150, h - 100), (300, 300)),
                    ((w + 10, 0), (64, 64)),
                ]
                for _ in range(6):
                    size = tuple(int(v) for v in rng.integers(1, 600, 2))
                    boxes.append(((int(rng.integers(-500, w)), int(rng.integers(-500, h))), size))
                for loc, size in boxes:
                    got = slide.read_region(loc, level, size)
                    np.testing.assert_array_equal(got, _tiffslide_region(path, slide, loc, level, size))
    # an unwritten tile (offset and byte count 0) reads as tiffslide reads it
    sparse = tmp_path / "sparse.tif"
    shutil.copy(synthetic_slide.path, sparse)
    with tifffile.TiffFile(sparse) as tif:
        page = tif.pages[0]
        tag_offset = page.tags["TileByteCounts"].valueoffset
        width = 8 if tif.is_bigtiff else 4
    with open(sparse, "r+b") as fh:
        fh.seek(tag_offset + 3 * width)  # tile 3 of the first row
        fh.write(b"\x00" * width)
    with open_slide(sparse) as slide:
        box = ((2 * 256, 0), (3 * 256, 256))
        got = slide.read_region(box[0], 0, box[1])
        np.testing.assert_array_equal(got, _tiffslide_region(sparse, slide, box[0], 0, box[1]))
        assert (got[:, 256:512] == 0).all()


def test_mpp_from_tiff_tags_and_override(tmp_path):
    img = np.full((300, 400, 3), 200, np.uint8)
    tifffile.imwrite(
        tmp_path / "tagged.tif",
        img,
        resolution=(10000 / 0.5, 10000 / 0.5),
        resolutionunit="CENTIMETER",
        photometric="rgb",
    )
    s = open_slide(tmp_path / "tagged.tif")
    assert s.mpp == pytest.approx(0.5)
    tifffile.imwrite(tmp_path / "untagged.tif", img, photometric="rgb")
    with pytest.raises(MissingMPPError, match="untagged.tif.*--mpp"):
        open_slide(tmp_path / "untagged.tif")
    s = open_slide(tmp_path / "untagged.tif", mpp=0.25)
    assert s.mpp == 0.25 and s.mpp_source == "override"


def test_plain_png_reads_and_pads_outside(tmp_path):
    import cv2

    img = np.zeros((100, 120, 3), np.uint8)
    img[:, :, 0] = 90
    cv2.imwrite(str(tmp_path / "crop.png"), img[..., ::-1])
    s = open_slide(tmp_path / "crop.png", mpp=0.5)
    r = s.read_region((100, 90), 0, (40, 20))
    assert r.shape == (20, 40, 3)
    assert (r[:10, :20, 0] == 90).all() and (r[15:, 25:] == 255).all()


def test_bad_inputs_give_one_clear_line(tmp_path):
    with pytest.raises(SlideOpenError, match="no such file"):
        open_slide(tmp_path / "missing.svs")
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"this is not a slide" * 100)
    with pytest.raises(SlideOpenError, match="junk.svs: not a readable slide"):
        open_slide(junk)
    (tmp_path / "notes.xyz").write_text("x")
    with pytest.raises(SlideOpenError):
        open_slide(tmp_path / "notes.xyz")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(Exception, match="no slides found"):
        collect_slides([empty])


def test_slides_in_subfolders_are_pointed_out(tmp_path, caplog):
    """Folders are read one level deep: a folder of per-case subfolders said only "no slides
    found", and slides in subfolders beside top-level ones were left out without a word."""
    (tmp_path / "case1").mkdir()
    (tmp_path / "case1" / "a.svs").write_bytes(b"x")
    with pytest.raises(Exception, match=r"no slides found .*; its subfolders hold 1: pass them"):
        collect_slides([tmp_path])
    (tmp_path / "b.svs").write_bytes(b"x")
    with caplog.at_level("WARNING", logger="wsi_mil"):
        assert [e.name for e in collect_slides([tmp_path])] == ["b"]
    assert "1 slide(s) in its subfolders are left out" in caplog.text
    assert [e.name for e in collect_slides([tmp_path / "case1", tmp_path])] == ["a", "b"]


def test_collect_slides_from_csv_with_mpp(tmp_path, synthetic_slide):
    csv = tmp_path / "slides.csv"
    csv.write_text(f"path,mpp\n{synthetic_slide.path},0.3\n")
    entries = collect_slides([csv])
    assert entries[0].path == synthetic_slide.path and entries[0].mpp == 0.3


def test_dicom_slides_are_found_in_folders_and_named_by_their_series_folder(tmp_path):
    """A DICOM WSI is a folder of .dcm instances (OpenSlide 4 opens it from any one of them)."""
    for name in ("caseA", "caseB"):
        (tmp_path / "cohort" / name).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "cohort" / name / f"level{i}.dcm").write_bytes(b"")
    entries = collect_slides([tmp_path / "cohort"])
    assert [e.name for e in entries] == ["caseA", "caseB"]
    assert [e.path.suffix for e in entries] == [".dcm", ".dcm"]
    assert [e.name for e in collect_slides([tmp_path / "cohort" / "caseA"])] == ["caseA"]


def test_an_mpp_the_slide_overrules_is_said_once(real_slide, caplog):
    """--mpp (or a CSV's mpp) applies only to slides that record none; one that records its own
    dropped the given value without a word."""
    with caplog.at_level("WARNING", logger="wsi_mil"):
        for _ in range(2):
            with open_slide(real_slide, 0.25) as s:
                assert s.mpp == pytest.approx(0.499) and s.mpp_source == "properties"
    assert caplog.text.count("the given mpp 0.25 applies only to slides that record none") == 1
