"""Fault injection: every bad input or interruption a user has hit gets one clear line (or a
clean resume), a non-zero exit where something failed, and never a half-written output.
docs/reliability.md lists each fault, the behaviour and the test that holds it."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from wsi_mil.cli import app
from wsi_mil.synthetic import make_feature_cohort, write_synthetic_slide

runner = CliRunner()
TRAIN = ["--model", "abmil", "--folds", "3", "--epochs", "3", "--patience", "2", "--test-frac", "0.25"]


def _one_line_error(r, *needles):
    """Exit 2, one 'error:' line naming what went wrong, and no traceback."""
    out = r.output
    assert r.exit_code == 2, out
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    for n in needles:
        assert n in out, (n, out)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    make_feature_cohort(d, n_bags=24, dim=32, seed=4, strength=4.0)
    r = runner.invoke(
        app,
        [
            "crossval",
            "--features",
            str(d / "features"),
            "--labels",
            str(d / "labels.csv"),
            "--out",
            str(d / "run"),
            *TRAIN,
        ],
    )
    assert r.exit_code == 0, r.output
    return d


def _copy_features(src, dst, n=4):
    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.glob("*.h5"))[:n]:
        shutil.copy(p, dst / p.name)
    return dst


def _crossval(cohort, out, labels=None, *extra):
    labels = labels or cohort / "labels.csv"
    args = ["crossval", "--features", str(cohort / "features"), "--labels", str(labels), "--out", str(out)]
    return runner.invoke(app, [*args, *TRAIN, *extra])


# -- stale run folders ----------------------------------------------------------------------
def test_rerun_with_flipped_labels_refuses_then_overwrite_retrains(cohort, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(cohort / "run", run)
    before = (run / "splits.csv").read_text()
    df = pd.read_csv(cohort / "labels.csv")
    df["label"] = 1 - df["label"]
    df.to_csv(tmp_path / "flipped.csv", index=False)
    r = _crossval(cohort, run, tmp_path / "flipped.csv")
    _one_line_error(r, str(run), "labels", "--overwrite")
    assert (run / "splits.csv").read_text() == before  # the folder still tells the truth
    r = _crossval(cohort, run, tmp_path / "flipped.csv", "--overwrite")
    assert r.exit_code == 0, r.output
    new = pd.read_csv(run / "splits.csv").set_index("slide_id").label_name.astype(str)
    assert (new == df.set_index("slide_id").label.astype(str)).all()


def test_rerun_with_other_settings_refuses_naming_them(cohort, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(cohort / "run", run)
    config = (run / "config.yaml").read_text()
    r = _crossval(cohort, run, None, "--lr", "0.01")
    _one_line_error(r, "config", "lr")
    assert (run / "config.yaml").read_text() == config
    r = _crossval(cohort, run)  # the same call resumes: nothing to train
    assert r.exit_code == 0 and "fold 0 (1 of 3)" not in r.output, r.output
    # a run made before a setting existed resumes while the setting is at its default
    fp = json.loads((run / "fingerprint.json").read_text())
    del fp["config"]["selection_fallback"]
    (run / "fingerprint.json").write_text(json.dumps(fp))
    r = _crossval(cohort, run)
    assert r.exit_code == 0 and "fold 0 (1 of 3)" not in r.output, r.output
    _one_line_error(_crossval(cohort, run, None, "--selection-fallback"), "selection_fallback")


def test_resuming_folds_trained_with_an_older_recipe_is_refused(cohort, tmp_path):
    """A wsi-mil update that changes a model's recipe (TransMIL's and DSMIL's small-cohort ones
    did) must not resume a run whose finished folds were trained with the old one."""
    import yaml

    run = tmp_path / "run"
    shutil.copytree(cohort / "run", run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["recipes"]["abmil"]["lr"] = 0.5  # as an older wsi-mil would have recorded it
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    before = (run / "config.yaml").read_text()
    _one_line_error(_crossval(cohort, run), str(run), "abmil: lr 0.5 -> 0.0005", "--overwrite")
    assert (run / "config.yaml").read_text() == before
    del config["recipes"]  # a run from before recipes were recorded: nothing to compare
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    r = _crossval(cohort, run)
    assert r.exit_code == 0 and "fold 0 (1 of 3)" not in r.output, r.output


def test_the_features_parent_folder_is_pointed_to_its_encoder_subfolder(cohort, tmp_path):
    """`extract` writes features/<encoder>/; a user who passed features/ to crossval got "24
    labelled slide(s) have no feature file ... pass --allow-missing", to predict "no .h5 files"."""
    parent = tmp_path / "features"
    shutil.copytree(cohort / "features", parent / "resnet18")
    r = runner.invoke(
        app, ["crossval", "--features", str(parent), "--labels", str(cohort / "labels.csv"),
              "--out", str(tmp_path / "run"), *TRAIN],
    )  # fmt: skip
    _one_line_error(r, str(parent), f"pass {parent / 'resnet18'}")
    assert not (tmp_path / "run").exists()
    out = tmp_path / "p.csv"
    r = runner.invoke(
        app, ["predict", "--run", str(cohort / "run"), "--features", str(parent), "--out", str(out)]
    )
    _one_line_error(r, str(parent), f"pass {parent / 'resnet18'}")
    assert not out.exists()


# -- bad feature files ----------------------------------------------------------------------
def _poison(path, kind):
    with h5py.File(path, "r+") as f:
        if kind == "nan":
            x = f["features"][:]
            x[3, 5] = np.nan
            f["features"][:] = x
        else:  # 5 coords fewer than feature rows
            c = f["coords"][:-5]
            del f["coords"]
            f.create_dataset("coords", data=c)


@pytest.mark.parametrize("kind, needle", [("nan", "NaN or Inf"), ("rows", "coords")])
def test_bad_feature_file_is_named_by_predict_and_nothing_is_written(cohort, tmp_path, kind, needle):
    feats = _copy_features(cohort / "features", tmp_path / "new")
    bad = sorted(feats.glob("*.h5"))[1]
    _poison(bad, kind)
    out = tmp_path / "pred.csv"
    r = runner.invoke(
        app, ["predict", "--run", str(cohort / "run"), "--features", str(feats), "--out", str(out)]
    )
    _one_line_error(r, bad.name, needle)
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, with_scores, needle",
    [
        (["--target", "Tumour"], True, "--target Tumour: not a class of this run"),
        (["--model", "transmil"], True, "--model transmil: not a model this run trained"),
        (["--model", "abmil"], False, "--model and --target choose what --scores maps"),
    ],
)
def test_predict_refuses_bad_score_options_before_writing(cohort, tmp_path, extra, with_scores, needle):
    """The predictions CSV used to be written before --target was checked, and a --model
    without --scores was ignored (exit 0)."""
    out, sc = tmp_path / "pred.csv", tmp_path / "sc"
    args = [
        "predict",
        "--run",
        str(cohort / "run"),
        "--features",
        str(cohort / "features"),
        "--out",
        str(out),
    ]
    _one_line_error(
        runner.invoke(app, [*args, *extra, *(["--scores", str(sc)] if with_scores else [])]), needle
    )
    assert not out.exists() and not sc.exists()


def test_an_interrupted_run_and_an_ambiguous_target_are_refused_before_predict_writes(cohort, tmp_path):
    """An interrupted crossval (folds trained, no metrics.json) was used as a smaller ensemble
    without a word (and heatmap called it a run from before 0.3); a two-class run whose classes
    neither read as the negative wrote its predictions, then asked for --target (exit 2)."""
    from wsi_mil.errors import WsiMilError
    from wsi_mil.formats.run import RunFolder, load_ensemble

    run, out, sc = tmp_path / "run", tmp_path / "pred.csv", tmp_path / "sc"
    shutil.copytree(cohort / "run", run)
    (run / "abmil" / "metrics.json").unlink()
    args = ["predict", "--run", str(run), "--features", str(cohort / "features"), "--out", str(out)]
    _one_line_error(runner.invoke(app, args), "the crossval of 'abmil' did not finish", "re-run")
    with pytest.raises(WsiMilError, match="did not finish"):  # the heatmap's loader too
        load_ensemble(RunFolder(run), "abmil")
    shutil.copy(cohort / "run" / "abmil" / "metrics.json", run / "abmil" / "metrics.json")
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("models:\n- abmil\n", "models:\n- abmil\n- dsmil\n"))
    # a listed model with no fold yet was left out of the predictions without a word
    _one_line_error(runner.invoke(app, args), "the crossval of 'dsmil' did not finish (0 fold(s)")
    (run / "config.yaml").write_text(config)
    (run / "classes.json").write_text(json.dumps(["LUAD", "LUSC"]))
    _one_line_error(runner.invoke(app, [*args, "--scores", str(sc)]), "pass --target LUAD or --target LUSC")
    assert not out.exists() and not sc.exists()


@pytest.mark.parametrize("kind", ["nan", "rows"])
def test_bad_feature_file_stops_crossval_before_any_output(cohort, tmp_path, kind):
    feats = _copy_features(cohort / "features", tmp_path / "features", n=24)
    bad = sorted(feats.glob("*.h5"))[7]
    _poison(bad, kind)
    labels = tmp_path / "labels.csv"
    shutil.copy(cohort / "labels.csv", labels)
    out = tmp_path / "run"
    args = ["crossval", "--features", str(feats), "--labels", str(labels), "--out", str(out), *TRAIN]
    _one_line_error(runner.invoke(app, args), bad.name)
    assert not out.exists()  # no husk of classes.json/config.yaml/splits.csv


def test_heatmap_refuses_bad_and_foreign_features(cohort, tmp_path):
    slide = write_synthetic_slide(tmp_path / "s.tif", 2000, 1500, 0.5, seed=3)
    n = 20
    coords = np.stack([np.arange(n) * 256 % 1792, np.arange(n) // 7 * 256], 1).astype(np.int64)
    attrs = {"patch_size_level0": 256, "encoder": "synthetic"}
    from wsi_mil.formats.features import write_features

    foreign = tmp_path / "foreign.h5"
    write_features(foreign, np.ones((n, 16), np.float32), coords, {**attrs, "encoder": "resnet18"})
    out = tmp_path / "heat"
    args = ["heatmap", str(slide.path), "--run", str(cohort / "run"), "--out", str(out), "--no-viewer"]
    _one_line_error(runner.invoke(app, [*args, "--features", str(foreign)]), "16-d", "32-d", "synthetic")
    good = tmp_path / "good.h5"
    write_features(good, np.ones((n, 32), np.float32), coords, attrs)
    (tmp_path / "a_file").write_text("")
    r = runner.invoke(app, [*args[:4], "--out", str(tmp_path / "a_file" / "heat"), "--features", str(good)])
    _one_line_error(r, "a_file", "check the path and its permissions")  # was a 106-line traceback
    r = runner.invoke(app, [*args, "--features", str(tmp_path / "missing.h5")])  # said: re-run extract
    _one_line_error(r, "missing.h5: no such file; check the path, or leave --features out")
    bad = tmp_path / "bad.h5"
    write_features(bad, np.ones((n, 32), np.float32), coords, attrs)
    _poison(bad, "rows")
    _one_line_error(runner.invoke(app, [*args, "--features", str(bad)]), "bad.h5", "coords")
    # a grid unlike the run's (its features: 256-px patches) is refused by heatmap and predict
    (tmp_path / "grid").mkdir()
    grid = tmp_path / "grid" / "grid.h5"
    write_features(grid, np.ones((n, 32), np.float32), coords, {**attrs, "patch_size": 128})
    _one_line_error(runner.invoke(app, [*args, "--features", str(grid)]), "128-px", "--patch-size 256")
    r = runner.invoke(app, ["predict", "--run", str(cohort / "run"), "--features", str(tmp_path / "grid")])
    _one_line_error(r, "grid.h5", "128-px")
    # another slide's features: patches past this slide's 2000 x 1500 px (was a cv2 traceback
    # after the GeoJSON, OME-TIFF and PNG had been written)
    far = tmp_path / "far.h5"
    write_features(far, np.ones((n, 32), np.float32), coords + [4000, 0], attrs)
    _one_line_error(runner.invoke(app, [*args, "--features", str(far)]), "far.h5", "start outside")
    # another slide of the same size: its recorded slide names another one (was a warning, exit
    # 0, and a map titled with this slide showing the other's lesion)
    other = tmp_path / "other.h5"
    write_features(other, np.ones((n, 32), np.float32), coords, {**attrs, "slide_path": "/x/tumor_004.tif"})
    r = runner.invoke(app, [*args, "--features", str(other)])
    _one_line_error(r, "other.h5: made from tumor_004.tif, not", "leave --features out")
    assert not out.exists() or not list(out.iterdir())


def test_model_and_models_together_duplicate_rows_and_a_missing_slide_to_view(cohort, tmp_path, caplog):
    from wsi_mil.training.data import load_labels

    df = pd.read_csv(cohort / "labels.csv")
    pd.concat([df, df.iloc[[3]]]).to_csv(tmp_path / "dup.csv", index=False)  # the same row twice
    assert len(load_labels(tmp_path / "dup.csv", cohort / "features").table) == len(df)
    assert "1 repeated row(s) of the same slide" in caplog.text
    r = _crossval(cohort, tmp_path / "run", None, "--models", "psmil,abmil")  # TRAIN has --model
    _one_line_error(r, "--model and --models")
    r = runner.invoke(app, ["view", str(tmp_path / "nosuch.svs"), "--run", str(cohort / "run")])
    _one_line_error(r, "nosuch.svs", "no such slide file")


def test_missing_fold_folder_and_score_file_are_named_as_such(cohort, tmp_path, synthetic_slide):
    slide = str(synthetic_slide.path)
    r = runner.invoke(app, ["heatmap", slide, "--run", str(cohort / "run"), "--fold", "7"])
    _one_line_error(r, "model 'abmil' has no fold 7; pick --fold from 0, 1, 2 or all")
    r = runner.invoke(app, ["predict", "--run", str(cohort / "run"), "--features", str(tmp_path / "nosuch")])
    _one_line_error(r, "nosuch: no such features folder")
    r = runner.invoke(app, ["view", slide, "--scores", str(tmp_path / "none_scores.h5")])
    _one_line_error(r, "none_scores.h5: no such score file")


def test_non_positive_mpp_and_missing_annotations_folder_are_refused(tmp_path, synthetic_slide):
    """Both were accepted: a bad --mpp was silently ignored, and a misspelt --annotations folder
    counted every slide as tumour-free and wrote metrics."""
    slide = str(synthetic_slide.path)
    for mpp in ("-1", "0"):
        r = runner.invoke(app, ["extract", slide, "--out", str(tmp_path / "w"), "--mpp", mpp])
        _one_line_error(r, f"mpp {float(mpp)} is not a positive um/px")
    r = runner.invoke(app, ["evaluate-localization", "--scores", str(tmp_path), "--annotations", "nosuch"])
    _one_line_error(r, "nosuch: no such annotations folder")
    args = ["evaluate-localization", "--scores", str(tmp_path), "--annotations", str(tmp_path)]
    r = runner.invoke(app, [*args, "--pos-frac", "2"])
    _one_line_error(r, "--pos-frac 2.0: the share of a patch's area in tumour")
    assert not (tmp_path / "localization.json").exists()  # --pos-frac 2 gave every AUC n/a, exit 0


# -- exit codes, flags, duplicates ----------------------------------------------------------
def test_boolean_flag_given_a_value_is_one_clear_error(tmp_path, synthetic_slide):
    r = runner.invoke(app, ["tile", str(synthetic_slide.path), "--out", str(tmp_path), "--overwrite", "true"])
    _one_line_error(r, "--overwrite, not --overwrite true")


def test_conflicting_duplicate_labels_name_both_lines(cohort, tmp_path):
    df = pd.read_csv(cohort / "labels.csv")
    dup = df.iloc[[2]].assign(label=1 - df.label.iloc[2])
    pd.concat([df, dup]).to_csv(tmp_path / "dup.csv", index=False)
    r = _crossval(cohort, tmp_path / "run", tmp_path / "dup.csv")
    _one_line_error(r, "bag_002", "lines 4 and 26")


def test_a_given_split_with_a_patient_on_both_sides_is_refused_naming_the_cases(cohort, tmp_path):
    df = pd.read_csv(cohort / "labels.csv")
    df["case_id"] = [f"p{i // 2}" for i in range(len(df))]
    df["split"] = ["test" if i % 4 == 1 else "train" for i in range(len(df))]  # p0: slides 0 and 1
    df.to_csv(tmp_path / "split.csv", index=False)
    r = _crossval(cohort, tmp_path / "run", tmp_path / "split.csv")
    _one_line_error(r, "6 case(s) have slides on both sides", "p0", "same split")
    assert not (tmp_path / "run").exists()


def test_too_few_cases_for_the_inner_selection_stop_unless_the_fallback_is_asked_for(tmp_path):
    make_feature_cohort(tmp_path, n_bags=12, dim=16, seed=9, strength=4.0)
    base = ["crossval", "--features", str(tmp_path / "features"), "--labels", str(tmp_path / "labels.csv")]
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "run"), *TRAIN])
    _one_line_error(r, "too few for the inner selection split", "--selection-fallback")
    assert not (tmp_path / "run").exists()
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "run"), *TRAIN, "--selection-fallback"])
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "run" / "abmil" / "metrics.json").read_text())
    assert metrics["selection"] == "outer" and metrics["selection_fallback_folds"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert metrics["selection_fallback_folds"] == [0, 1, 2]  # every fold: it said "the other folds"
    assert "Optimistic: too few cases for an inner selection split in every fold" in report
    assert "selection-free" not in report.split("## Cross-validation folds")[1].split("##")[0]


def test_two_slides_with_one_name_are_refused(tmp_path, synthetic_slide):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(synthetic_slide.path, tmp_path / "a" / "case.tif")
    shutil.copy(synthetic_slide.path, tmp_path / "b" / "case.tiff")
    r = runner.invoke(app, ["tile", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "o")])
    _one_line_error(r, "a/case.tif", "b/case.tiff", "'case'")


def test_three_classes_train_without_a_warning_flood(tmp_path):
    make_feature_cohort(tmp_path, n_bags=30, dim=16, seed=8)
    df = pd.read_csv(tmp_path / "labels.csv")
    df["label"] = [i % 3 for i in range(len(df))]
    df.to_csv(tmp_path / "labels.csv", index=False)
    args = [sys.executable, "-m", "wsi_mil", "crossval", "--features", str(tmp_path / "features")]
    args += ["--labels", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "run"), *TRAIN]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("Warning") == 0, r.stderr[-2000:]


# -- concurrency, clusters, interruptions ---------------------------------------------------
EXTRACT = ["--encoder", "resnet18", "--random-weights", "--target-mpp", "1.0", "--patch-size", "128"]


def _cli(*args, env=None):
    return [sys.executable, "-m", "wsi_mil", *args]


def test_two_extract_processes_share_one_output_folder(tmp_path, four_slides):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = _cli("extract", str(four_slides), "--out", str(tmp_path), *EXTRACT, "--workers", "0")
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
        assert "Error" not in out and "Traceback" not in out, out[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "manifest_extract.csv")))
    assert sorted(r["slide"] for r in rows) == [f"s{i}" for i in range(4)]
    assert all(r["status"] in ("ok", "skipped") for r in rows), rows
    assert len(list((tmp_path / "features" / "resnet18").glob("*.h5"))) == 4
    assert not list(tmp_path.rglob("*.partial"))


def test_cluster_extraction_with_reader_workers_on_the_real_slide(tmp_path, real_slide):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(2):
        os.symlink(real_slide, slides / f"cmu{i}.svs")
    opts = ["--encoder", "resnet18", "--random-weights", "--workers", "2", "--batch-size", "16"]
    opts += ["--target-mpp", "1.0", "--patch-size", "128"]  # ~90 patches a slide, still JPEG tiles
    local = subprocess.run(
        _cli("extract", str(slides), "--out", str(tmp_path / "a"), *opts),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert local.returncode == 0, local.stderr[-3000:]
    dask = subprocess.run(
        _cli("extract", str(slides), "--out", str(tmp_path / "b"), *opts, "--cluster", "local:2"),
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert dask.returncode == 0, dask.stderr[-3000:]
    assert "daemonic" not in dask.stderr
    for i in range(2):
        a = h5py.File(tmp_path / "a" / "features" / "resnet18" / f"cmu{i}.h5")["features"][:]
        b = h5py.File(tmp_path / "b" / "features" / "resnet18" / f"cmu{i}.h5")["features"][:]
        assert a.shape == b.shape and len(a) > 10
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_corrupt_jpeg_tile_is_one_quiet_report(tmp_path, real_slide):
    import tifffile

    bad = tmp_path / "bad.svs"
    shutil.copy(real_slide, bad)
    with tifffile.TiffFile(bad) as tif:
        page = tif.pages[0]
        offset = page.dataoffsets[len(page.dataoffsets) // 2]
    with open(bad, "r+b") as fh:  # wipe one tile's JPEG header: the decoder refuses the tile
        fh.seek(offset)
        fh.write(b"\x00" * 64)
    r = subprocess.run(
        _cli("extract", str(bad), "--out", str(tmp_path / "o"), "--encoder", "resnet18", "--random-weights"),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    err = r.stdout + r.stderr
    for noise in ("Event loop is closed", "was never awaited", "Traceback", "tifffile"):
        assert noise not in err, err[-3000:]
    assert r.returncode == 1 and err.count("ERROR") == 1 and "Not a JPEG" in err, err[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "o" / "manifest_extract.csv")))
    assert rows[0]["status"] == "failed" and "bad.svs" in rows[0]["error"]
    assert not list((tmp_path / "o").rglob("*.partial"))


def test_heatmap_killed_mid_run_resumes_to_identical_scores(cohort, tmp_path, synthetic_slide):
    from wsi_mil.formats.features import write_features

    rng = np.random.default_rng(0)
    n = 600
    coords = np.stack([np.arange(n) % 30 * 200, np.arange(n) // 30 * 200], 1).astype(np.int64)
    feats = tmp_path / "f.h5"
    write_features(
        feats,
        rng.standard_normal((n, 32)).astype(np.float32),
        coords,
        {"patch_size_level0": 200, "encoder": "synthetic"},
    )
    base = _cli(
        "heatmap",
        str(synthetic_slide.path),
        "--run",
        str(cohort / "run"),
        "--features",
        str(feats),
        "--no-viewer",
    )
    subprocess.run([*base, "--out", str(tmp_path / "ref")], check=True, capture_output=True, timeout=600)
    out = tmp_path / "killed"
    proc = subprocess.Popen([*base, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out.exists() and any(out.iterdir())):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = subprocess.run([*base, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not list(out.rglob("*.partial"))
    a, b = h5py.File(tmp_path / "ref" / "s50_scores.h5"), h5py.File(out / "s50_scores.h5")
    for name in ("coords", "attention", "inversion", "combined"):
        np.testing.assert_array_equal(a[name][:], b[name][:])


@pytest.mark.parametrize("threshold, expected", [(0.0, 1), (1.01, 0)])
def test_heatmap_calls_the_slide_as_predict_does(cohort, tmp_path, synthetic_slide, threshold, expected):
    """`heatmap`'s slide call is the fold models' thresholded majority vote, as crossval's and
    `predict`'s (not the argmax of their mean probability): with every fold's threshold set to
    0 (1.01) both call the second (first) class, whatever the probabilities."""
    import torch

    from wsi_mil.formats.features import write_features
    from wsi_mil.pipeline.heatmap import HeatmapRequest, heatmap_slide
    from wsi_mil.training.predict import predict_run

    run = tmp_path / "run"
    shutil.copytree(cohort / "run", run)
    for ckpt_path in run.glob("abmil/fold_*/model.pt"):
        ckpt = torch.load(ckpt_path, weights_only=False)
        ckpt["threshold"] = threshold
        torch.save(ckpt, ckpt_path)
    n = 300
    coords = np.stack([np.arange(n) % 20 * 200, np.arange(n) // 20 * 200], 1).astype(np.int64)
    feats = tmp_path / "features" / "s50.h5"
    feats.parent.mkdir()
    x = np.random.default_rng(1).standard_normal((n, 32)).astype(np.float32)
    write_features(feats, x, coords, {"patch_size_level0": 200, "encoder": "synthetic"})
    summary = heatmap_slide(
        synthetic_slide.path, run, tmp_path / "hm", features=feats, request=HeatmapRequest(viewer=False)
    )
    classes = json.loads((run / "classes.json").read_text())
    classes = classes["classes"] if isinstance(classes, dict) else classes
    table = predict_run(run, feats.parent)
    assert summary["predicted"] == table.abmil_prediction[0] == classes[expected]
    assert summary["votes"] == table.abmil_votes[0] == 3


def test_heatmap_of_a_new_slide_stays_out_of_the_runs_feature_folder(tmp_path):
    """A cohort slide's features are reused from the run's work folder; a new slide's are
    extracted under the heatmaps folder, never among the run's training features (where the
    next `crossval` on that folder would stop on a feature file without a label)."""
    from wsi_mil.formats.run import RunFolder
    from wsi_mil.pipeline.heatmap import default_work_folder
    from wsi_mil.pipeline.layout import Layout

    work = tmp_path / "work"
    features_dir = Layout(work).features_dir("resnet18")
    features_dir.mkdir(parents=True)
    (features_dir / "cohort_slide.h5").write_bytes(b"")
    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    run.write_config({"features_dir": str(features_dir)})
    out = tmp_path / "heatmaps"

    def has(name):
        return lambda w: Layout(w).features("resnet18", name).exists()

    assert default_work_folder(run, out, has("cohort_slide")) == work.resolve()
    assert default_work_folder(run, out, has("new_slide")) == out / "work"


def test_a_partial_begun_with_other_weights_starts_again(tmp_path, caplog):
    """A run interrupted with random weights and resumed with a weights file kept the random
    rows and appended the file's (one feature file, two encoders, attrs saying "random")."""
    from wsi_mil.formats.features import FeatureWriter

    coords = np.stack([np.arange(8) * 128, np.zeros(8)], 1).astype(np.int64)
    attrs = {"encoder": "resnet18", "encoder_weights": "random", "precision": "bf16", "patch_size": 128}
    w = FeatureWriter(tmp_path / "s.h5", coords, 4, "float32", attrs)
    w.write(0, np.ones((5, 4), np.float32))
    w.abort()
    assert FeatureWriter(tmp_path / "s.h5", coords, 4, "float32", attrs).n_done == 5  # same: resumed
    for changed in (
        {"encoder_weights": "r18.pth", "encoder_weights_sha256": "ab" * 32},
        {"precision": "fp32"},
    ):
        with caplog.at_level("WARNING", logger="wsi_mil"):
            again = FeatureWriter(tmp_path / "s.h5", coords, 4, "float32", {**attrs, **changed})
        assert again.n_done == 0 and "begun with other settings" in caplog.text
        again.write(0, np.ones((5, 4), np.float32))
        again.abort()
        FeatureWriter(tmp_path / "s.h5", coords, 4, "float32", attrs).abort()  # back to the first


def test_rerun_into_the_same_folder_with_other_settings_is_refused(tmp_path, four_slides):
    """A second `extract`/`tile` into the same --out with new weights, grid or QC said
    "already done" and kept the old files."""
    from wsi_mil.features.compat import import_torchvision

    out = tmp_path / "w"
    base = ["extract", str(four_slides / "s0.tif"), "--out", str(out), "--encoder", "resnet18"]
    grid = ["--target-mpp", "1.0", "--patch-size", "128"]
    r = runner.invoke(app, [*base, *grid, "--random-weights"])
    assert r.exit_code == 0, r.output
    before = (out / "features" / "resnet18" / "s0.h5").read_bytes()
    torch.save(import_torchvision().models.resnet18().state_dict(), tmp_path / "r18.pth")
    r = runner.invoke(app, [*base, *grid, "--weights", str(tmp_path / "r18.pth")])
    _one_line_error(r, "encoder weights random ->", "--overwrite")
    r = runner.invoke(app, [*base, "--target-mpp", "0.5", "--patch-size", "128", "--random-weights"])
    _one_line_error(r, "target_mpp 1 -> 0.5")
    r = runner.invoke(app, [*base, *grid, "--random-weights", "--qc", "off"])
    _one_line_error(r, "qc remove -> off")
    tile = [
        "tile",
        str(four_slides / "s0.tif"),
        "--out",
        str(out),
        "--patch-size",
        "256",
        "--target-mpp",
        "1.0",
    ]
    _one_line_error(runner.invoke(app, tile), "patch_size 128 -> 256")
    assert (out / "features" / "resnet18" / "s0.h5").read_bytes() == before
    r = runner.invoke(app, [*base, *grid, "--random-weights"])  # the same settings: skipped
    assert r.exit_code == 0 and "already done" in r.output, r.output


def test_an_earlier_stage_made_with_another_qc_mode_is_not_reused(tmp_path, four_slides):
    """`extract --qc off` on a folder tiled with QC reused its patches (27 of 50 on a painted
    slide) and exited 0; a tissue file segmented without QC was tiled under `--qc remove`."""
    slide, out = str(four_slides / "s0.tif"), tmp_path / "w"
    grid = ["--target-mpp", "1.0", "--patch-size", "128"]
    assert runner.invoke(app, ["tile", slide, "--out", str(out), *grid]).exit_code == 0
    r = runner.invoke(
        app,
        [
            "extract",
            slide,
            "--out",
            str(out),
            *grid,
            "--encoder",
            "resnet18",
            "--random-weights",
            "--qc",
            "off",
        ],
    )
    _one_line_error(r, "s0.h5 was made with other settings", "qc remove -> off", "--overwrite")
    assert not (out / "features").exists() or not any((out / "features").rglob("*.h5"))
    r = runner.invoke(app, ["tile", slide, "--out", str(out), *grid, "--qc", "mark"])
    _one_line_error(r, "qc remove -> mark")
    other = tmp_path / "v"
    assert runner.invoke(app, ["segment", slide, "--out", str(other), "--qc", "off"]).exit_code == 0
    r = runner.invoke(app, ["tile", slide, "--out", str(other), *grid, "--qc", "remove"])
    _one_line_error(r, "s0.geojson was made with other settings", "qc off -> remove")
    assert not (other / "patches").exists() or not any((other / "patches").glob("*.h5"))
    r = runner.invoke(app, ["tile", slide, "--out", str(other), *grid])  # unset: reused as made
    assert r.exit_code == 0, r.output


def test_a_bad_qc_model_is_one_line_before_any_slide(tmp_path, four_slides):
    """A missing or foreign --qc-model was an error per slide, each marked failed (exit 1)."""
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    for model, needle in (
        (tmp_path / "nosuch.pth", "no such file"),
        (tmp_path / "junk.pth", "not a state dict"),
    ):
        r = runner.invoke(
            app, ["segment", str(four_slides), "--out", str(tmp_path / "o"), "--qc-model", str(model)]
        )
        _one_line_error(r, f"--qc-model {model}", needle)
        assert not (tmp_path / "o").exists()


def test_fail_fast_exits_1_as_a_failed_slide_does(tmp_path):
    """--fail-fast stopped with exit status 2, the code for bad input; a slide that fails is 1."""
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "bad.svs").write_bytes(b"not a slide" * 100)
    r = runner.invoke(app, ["extract", str(slides), "--out", str(tmp_path / "o"), "--fail-fast", *EXTRACT])
    assert r.exit_code == 1 and "stopped at the first failure (--fail-fast)" in r.output, r.output
    assert (
        runner.invoke(app, ["extract", str(slides), "--out", str(tmp_path / "o2"), *EXTRACT]).exit_code == 1
    )


def test_info_shows_every_readable_slide_then_names_the_bad_ones(tmp_path, real_slide):
    """`info` stopped at the first unreadable slide and showed nothing of the others."""
    slides = tmp_path / "slides"
    slides.mkdir()
    os.symlink(real_slide, slides / "a.svs")
    (slides / "bad.svs").write_bytes(open(real_slide, "rb").read(100_000))
    r = runner.invoke(app, ["info", str(slides)])
    assert r.exit_code == 1 and "a.svs" in r.output and "2220 x 2967" in r.output, r.output
    assert "1 slide(s) could not be read" in r.output and "bad.svs" in r.output


def test_a_patch_larger_than_the_slide_says_so(tmp_path, real_slide):
    """It said "no patch reaches --min-tissue 0.01; lower --min-tissue", which cannot help."""
    r = runner.invoke(app, ["tile", str(real_slide), "--out", str(tmp_path), "--patch-size", "5000"])
    assert r.exit_code == 1
    row = next(csv.DictReader(open(tmp_path / "manifest_tile.csv")))
    assert "more than the slide's 2220 x 2967: lower --patch-size or --target-mpp" in row["error"], row
