import csv
import json

from typer.testing import CliRunner

from wsi_mil.cli import app

runner = CliRunner()


def test_tile_command_writes_outputs_manifest_and_resumes(tmp_path, synthetic_slide):
    out = tmp_path / "out"
    r = runner.invoke(
        app,
        ["tile", str(synthetic_slide.path), "--out", str(out), "--target-mpp", "0.5", "--patch-size", "256"],
    )
    assert r.exit_code == 0, r.output
    name = synthetic_slide.path.stem
    for p in (f"tissue/{name}.geojson", f"tissue/{name}.png", f"patches/{name}.h5", f"patches/{name}.png"):
        assert (out / p).exists(), p
    rows = list(csv.DictReader(open(out / "manifest_tile.csv")))
    assert rows[0]["status"] == "ok" and int(rows[0]["patches"]) > 0
    mtime = (out / f"patches/{name}.h5").stat().st_mtime_ns
    r = runner.invoke(app, ["tile", str(synthetic_slide.path), "--out", str(out)])
    assert r.exit_code == 0
    assert (out / f"patches/{name}.h5").stat().st_mtime_ns == mtime  # skipped
    assert not list(out.rglob("*.partial"))


def test_one_bad_slide_is_reported_and_others_go_on(tmp_path, synthetic_slide):
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"\x00" * 1000)
    out = tmp_path / "out"
    r = runner.invoke(app, ["tile", str(bad), str(synthetic_slide.path), "--out", str(out)])
    assert r.exit_code == 1  # the others were done, but a failed slide is never a silent exit 0
    assert "1 failed (bad)" in r.output
    rows = {row["slide"]: row for row in csv.DictReader(open(out / "manifest_tile.csv"))}
    assert rows["bad"]["status"] == "failed" and "bad.svs" in rows["bad"]["error"]
    assert rows[synthetic_slide.path.stem]["status"] == "ok"
    assert not (out / "patches" / "bad.h5").exists()
    assert not list(out.rglob("*.partial"))


def test_empty_tissue_and_missing_mpp_and_empty_dir_errors(tmp_path):
    import numpy as np
    import tifffile

    from wsi_mil.synthetic import write_blank_slide

    blank = write_blank_slide(tmp_path / "blank.tif")
    out = tmp_path / "out"
    r = runner.invoke(app, ["tile", str(blank), "--out", str(out)])
    assert r.exit_code == 1
    row = next(csv.DictReader(open(out / "manifest_tile.csv")))
    assert "no tissue" in row["error"] and "blank.tif" in row["error"]
    assert not (out / "patches" / "blank.h5").exists()
    assert json.loads((out / "tissue" / "blank.geojson").read_text())["features"] == []

    tifffile.imwrite(tmp_path / "nompp.tif", np.full((64, 64, 3), 200, np.uint8), photometric="rgb")
    r = runner.invoke(app, ["info", str(tmp_path / "nompp.tif")])
    # a slide that cannot be read is a failed slide (exit 1, as in the stages), listed by name
    assert r.exit_code == 1 and "--mpp" in r.output and "nompp.tif" in r.output
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["segment", str(tmp_path / "empty"), "--out", str(out)])
    assert r.exit_code == 2 and "no slides found" in r.output


def test_user_geojson_replaces_segmentation(tmp_path, synthetic_slide):
    from shapely.geometry import MultiPolygon, box

    from wsi_mil.formats.tissue_geojson import polygons_to_geojson

    gj = tmp_path / "roi.geojson"
    gj.write_text(json.dumps(polygons_to_geojson(MultiPolygon([box(0, 0, 1024, 1024)]), "Tissue", (0, 0, 0))))
    out = tmp_path / "out"
    r = runner.invoke(
        app,
        [
            "tile",
            str(synthetic_slide.path),
            "--out",
            str(out),
            "--tissue-geojson",
            str(gj),
            "--min-tissue",
            "0.05",
        ],
    )
    assert r.exit_code == 0, r.output
    from wsi_mil.formats.patches import read_patches

    grid = read_patches(out / "patches" / f"{synthetic_slide.path.stem}.h5")
    assert len(grid) == 16 and grid.coords.max() < 1024


def test_our_own_tissue_file_passed_back_is_used_as_drawn(tmp_path, synthetic_slide):
    """A tissue GeoJSON wsi-mil wrote (with its QC record) given as --tissue-geojson copied that
    record and wrote an empty QC layer saying "remove"; a supplied annotation gets no QC."""
    first = tmp_path / "first"
    assert runner.invoke(app, ["segment", str(synthetic_slide.path), "--out", str(first)]).exit_code == 0
    ours = first / "tissue" / f"{synthetic_slide.path.stem}.geojson"
    assert "qc" in json.dumps(json.loads(ours.read_text()))  # the segment run's QC record
    out = tmp_path / "again"
    r = runner.invoke(
        app, ["tile", str(synthetic_slide.path), "--out", str(out), "--tissue-geojson", str(ours)]
    )
    assert r.exit_code == 0, r.output
    assert not list((out / "tissue").glob("*_qc.geojson"))
    assert '"qc"' not in (out / "tissue" / ours.name).read_text()
    assert "is not run" not in r.output  # --qc left unset: nothing to say
    r = runner.invoke(
        app,
        ["tile", str(synthetic_slide.path), "--out", str(tmp_path / "third"), "--tissue-geojson", str(ours)]
        + ["--qc", "remove"],
    )
    assert r.exit_code == 0 and "--qc remove is not run on the tissue --tissue-geojson gives" in r.output, (
        r.output
    )
