"""`wsi-mil run EXPERIMENT.yaml`: the shipped experiment files load; one file runs extract ->
crossval -> heatmaps -> localisation into the same results as the separate commands, and a
run killed with SIGKILL resumes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from wsi_mil.cli import app
from wsi_mil.config import CONFIG_DIR, load_config, load_experiment
from wsi_mil.errors import WsiMilError
from wsi_mil.synthetic import make_cohort

runner = CliRunner()
REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_shipped_configs_are_one_copy_and_load():
    # configs/ at the top of the repository is the package's own folder, not a copy
    assert REPO_CONFIGS.resolve() == CONFIG_DIR.resolve()
    for name in ("camelyon16", "tcga_nsclc", "demo"):
        exp, cfg = load_experiment(CONFIG_DIR / f"{name}.yaml")
        assert exp.models and exp.labels.name == "labels.csv"
        assert load_config(name) == cfg  # the same file is the `--config` preset
    assert load_experiment(CONFIG_DIR / "camelyon16.yaml")[1].train.test_frac == 0.0
    with pytest.raises(WsiMilError, match="no experiment: section"):
        load_experiment(CONFIG_DIR / "biopsy.yaml")


def test_experiment_file_builds_on_a_preset_and_refuses_typos(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text(
        "preset: biopsy\nexperiment: {slides: s, labels: l.csv, out: o, models: abmil}\n"
        "tissue: {max_holes: 2}\ntrain: {folds: 3}\n"
    )
    exp, cfg = load_experiment(f)
    assert exp.models == ["abmil"] and exp.slides == [Path("s")]
    assert cfg.tissue.max_holes == 2 and cfg.tissue.close_um == 16 and cfg.train.folds == 3
    f.write_text("experiment: {slides: s, labels: l.csv, out: o}\ntrian: {folds: 3}\n")
    with pytest.raises(WsiMilError, match="trian"):
        load_experiment(f)
    f.write_text("experiment: {slides: s, labels: l.csv, out: o, model: abmil}\n")
    with pytest.raises(
        WsiMilError, match=r"unknown key experiment\.model: did you mean experiment\.models\?"
    ):
        load_experiment(f)
    # a misspelt key inside a section is refused too (it was ignored: training ran 50 epochs)
    f.write_text("preset: biopsy\ntrain: {epochz: 3}\n")
    with pytest.raises(
        WsiMilError, match=r"mine\.yaml: unknown key train\.epochz: did you mean train\.epochs\?"
    ):
        load_config(f)


@pytest.mark.parametrize(
    "yaml_text, overrides, message",
    [
        # a YAML syntax error was a traceback through the parser, exit 1, no file named
        ("train:\n  epochs: 3\n lr: 2\n", {}, r"mine\.yaml: not valid YAML at line 3, column 2 .*indent"),
        # out-of-range values crashed deep in training (epochs 0: a TypeError) or tiling
        ("train: {epochs: -3}\n", {}, r"mine\.yaml: train\.epochs: .*greater than or equal to 1"),
        ("", {"train": {"lr": -1.0}}, r"^command-line option --lr: .*greater than 0"),
        ("", {"train": {"folds": 1}}, r"^command-line option --folds: .*greater than or equal to 2"),
        ("", {"train": {"test_frac": 1.5}}, r"^command-line option --test-frac"),
        ("", {"tiling": {"target_mpp": 0.0}}, r"^command-line option --target-mpp"),
        ("", {"tiling": {"overlap": 0.95}}, r"^command-line option --overlap: .*0\.9"),
        # was named by its field (qc.mode), not by the option a user typed
        ("", {"qc": {"mode": "foo"}}, r"^command-line option --qc: .*'mark' or 'off' \(got 'foo'\)"),
    ],
)
def test_bad_config_values_end_in_one_line_naming_their_source(tmp_path, yaml_text, overrides, message):
    f = tmp_path / "mine.yaml"
    f.write_text(yaml_text or "train: {folds: 3}\n")
    with pytest.raises(WsiMilError, match=message) as info:
        load_config(f, **overrides)
    assert "\n" not in str(info.value)


def test_slides_and_labels_are_matched_before_any_extraction(tmp_path, caplog):
    """`run` extracted every slide and only then stopped on unlabelled ones, pointing to an
    --allow-missing that `run` did not have."""
    from types import SimpleNamespace

    from wsi_mil.pipeline.experiment import labelled_entries

    (tmp_path / "l.csv").write_text("slide_id,label\na,tumor\nb,normal\nc.svs,normal\ne,normal\n")
    f = tmp_path / "exp.yaml"
    f.write_text(f"experiment: {{slides: s, labels: {tmp_path / 'l.csv'}, out: o}}\n")
    entries = [SimpleNamespace(name=n) for n in ("a", "b", "c", "d")]
    with pytest.raises(
        WsiMilError, match=r"1 slide\(s\) have no label in .*l.csv: d; 1 labelled slide\(s\) are not among "
        r"the slides: e \(.*set experiment.allow_missing: true\)",
    ):  # fmt: skip
        labelled_entries(entries, load_experiment(f)[0])
    f.write_text(f"experiment: {{slides: s, labels: {tmp_path / 'l.csv'}, out: o, allow_missing: true}}\n")
    with caplog.at_level("WARNING", logger="wsi_mil"):
        kept = labelled_entries(entries, load_experiment(f)[0])
    assert [e.name for e in kept] == ["a", "b", "c"] and "(skipped)" in caplog.text


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """A 12-slide synthetic cohort of small slides and an experiment file: configs/demo.yaml
    with its paths pointed there, small tissue pieces kept and a shorter training."""
    root = tmp_path_factory.mktemp("experiment")
    cohort = make_cohort(root / "cohort", 12, width_um=1500, height_um=1000, mpp=1.0, seed=3)
    truth = root / "cohort" / "truth"
    truth.mkdir()
    for s in cohort:
        (truth / f"{s.path.stem}.geojson").write_text(json.dumps(s.tumor_geojson()))
    data = yaml.safe_load((CONFIG_DIR / "demo.yaml").read_text())
    data["experiment"].update(
        slides=str(root / "cohort" / "slides"), labels=str(root / "cohort" / "labels.csv"),
        annotations=str(truth), out=str(root / "exp"), models=["abmil"],
    )  # fmt: skip
    data["train"].update(folds=2, epochs=3, patience=2, min_epochs=1, bootstrap=50)
    data["tissue"] = {"min_tissue_area_um2": 20000, "min_hole_area_um2": 5000}
    cfg_file = root / "exp.yaml"
    cfg_file.write_text(yaml.safe_dump(data))
    return root, cfg_file


def _scores(path: Path) -> dict:
    with h5py.File(path) as f:
        return {k: f[k][()] for k in f if isinstance(f[k], h5py.Dataset)}


def test_run_equals_the_separate_commands_and_resumes_after_kill(experiment):
    root, cfg_file = experiment
    exp_out = root / "exp"
    # 1. `wsi-mil run`, killed with SIGKILL once the first slide's features are written
    proc = subprocess.Popen(
        [sys.executable, "-m", "wsi_mil", "run", str(cfg_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    features = exp_out / "work" / "features" / "resnet18"
    deadline = time.time() + 180
    while time.time() < deadline and len(list(features.glob("*.h5"))) < 2 and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (exp_out / "run" / "report.md").exists()  # it was stopped mid-extraction
    # 2. rerun: resumes, says so, finishes
    r = runner.invoke(app, ["run", str(cfg_file)])
    assert r.exit_code == 0, r.output
    assert "already done" in r.output
    summary = json.loads((exp_out / "summary.json").read_text())
    test_slides = summary["heatmaps"]["slides"]
    assert test_slides and summary["localization"] is not None
    assert (exp_out / "heatmaps" / "localization.json").exists()

    # 3. the separate commands, each given the same file as --config (extract on one slide
    # to compare; crossval and heatmap on the run's features)
    sep = root / "separate"
    slides = root / "cohort" / "slides"
    one = test_slides[0]
    r = runner.invoke(
        app, ["extract", str(slides / f"{one}.tif"), "--out", str(sep / "work"), "--config", str(cfg_file)]
    )
    assert r.exit_code == 0, r.output
    x, y = _scores(features / f"{one}.h5"), _scores(sep / "work" / "features" / "resnet18" / f"{one}.h5")
    np.testing.assert_allclose(x["features"], y["features"], atol=1e-4)
    np.testing.assert_array_equal(x["coords"], y["coords"])
    r = runner.invoke(
        app,
        ["crossval", "--features", str(features), "--labels", str(root / "cohort" / "labels.csv"),
         "--models", "abmil", "--out", str(sep / "run"), "--config", str(cfg_file),
         "--annotations", str(root / "cohort" / "truth")],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    for sid in test_slides:
        r = runner.invoke(
            app,
            ["heatmap", str(slides / f"{sid}.tif"), "--run", str(sep / "run"), "--features",
             str(features / f"{sid}.h5"), "--out", str(sep / "heatmaps"),
             "--config", str(cfg_file), "--target", "tumor", "--device", "cpu"],
        )  # fmt: skip
        assert r.exit_code == 0, r.output

    # same splits, test predictions and heatmap scores
    pd.testing.assert_frame_equal(
        pd.read_csv(exp_out / "run" / "splits.csv"), pd.read_csv(sep / "run" / "splits.csv")
    )
    a = pd.read_csv(exp_out / "run" / "abmil" / "predictions.csv")
    b = pd.read_csv(sep / "run" / "abmil" / "predictions.csv")
    pd.testing.assert_frame_equal(a, b, atol=1e-4)
    for sid in test_slides:
        x, y = (
            _scores(exp_out / "heatmaps" / f"{sid}_scores.h5"),
            _scores(sep / "heatmaps" / f"{sid}_scores.h5"),
        )
        assert x.keys() == y.keys() and "combined" in x
        for k in x:
            np.testing.assert_allclose(x[k], y[k], atol=1e-4, err_msg=f"{sid} {k}")

    # a finished experiment reruns at once, with nothing redone
    r = runner.invoke(app, ["run", str(cfg_file)])
    assert r.exit_code == 0 and f"{len(test_slides)} of {len(test_slides)} already done" in r.output
