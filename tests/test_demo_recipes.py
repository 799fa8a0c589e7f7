import json
import time

import pandas as pd
import pytest
from typer.testing import CliRunner

from wsi_mil.cli import app
from wsi_mil.errors import WsiMilError
from wsi_mil.recipes import camelyon16, tcga_nsclc


@pytest.mark.slow
def test_demo_runs_end_to_end_and_resumes(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--slides", "8", "--folds", "3", "--epochs", "12"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    report = (out / "report.html").read_text()
    assert "Slide-level classification" in report and "<td>psmil</td>" in report  # Markdown rendered
    assert "| psmil |" not in report and "Slide AUC" in report and "per-slide patch AUC" in report
    assert "(micro-metastasis)" in report and "Reliability of the patch probabilities" in report
    assert report.count("data:image/png;base64") >= 6  # ROC x2, reliability x2, truth and heatmaps
    assert "random weights" in report
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["test_auc"]) == {"psmil", "abmil"}
    assert min(summary["test_auc"].values()) >= 0.9
    # heatmaps of test slides vs their ground-truth tumor: the combined layer localises, and
    # its probabilities are calibrated (on the annotated out-of-fold slides)
    assert summary["localization"]["mean_slide_patch_auc"]["combined"] >= 0.9
    assert summary["ece"]["combined"] <= 0.1
    normal = [r for r in summary["per_slide"].values() if not r["tumor"]]
    assert normal and max(r["above_half"] for r in normal) < 0.01
    # half the slides carry painted ink, blur, folds, bubbles: QC leaves no patch on them
    assert len(summary["qc"]) == 4 and "Tissue quality control" in report
    for sid, qc in summary["qc"].items():
        assert qc["removed_total"] > 0.02 and qc["patches"] > 20, sid
        assert qc["patch_centres_on_artefacts"] == 0 and qc["patches_half_on_artefacts"] == 0, sid
    # the per-slide fractions reach the extraction manifest and the crossval report
    manifest = pd.read_csv(out / "manifest_extract.csv").set_index("slide")
    run_qc = pd.read_csv(out / "run" / "qc.csv").set_index("slide_id")
    for sid, qc in summary["qc"].items():
        assert manifest.loc[sid, "qc_removed"] == pytest.approx(qc["removed_total"])
        assert run_qc.loc[sid, "removed"] == pytest.approx(qc["removed_total"])
    assert "## Tissue quality control" in (out / "run" / "report.md").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".h5", ".pt", ".tif")}
    t0 = time.perf_counter()
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert time.perf_counter() - t0 < 60
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}  # nothing recomputed

    # `wsi-mil heatmap` on a slide without features: extracts with the run's encoder settings
    slide = sorted((out / "cohort" / "slides").glob("tumor_*.tif"))[0]
    hm = tmp_path / "hm"
    r = CliRunner().invoke(
        app,
        [
            "heatmap",
            str(slide),
            "--run",
            str(out / "run"),
            "--out",
            str(hm),
            "--overlap",
            "0.5",
            "--target",
            "tumor",
            "--no-viewer",
        ],
    )
    assert r.exit_code == 0, r.output
    for suffix in ("_heatmap.png", ".geojson", "_heatmap.ome.tiff", "_scores.h5", "_scores.csv"):
        assert (hm / f"{slide.stem}{suffix}").exists(), suffix
    scores = pd.read_csv(hm / f"{slide.stem}_scores.csv")
    xs = sorted(scores.x.unique())
    assert xs[1] - xs[0] == 128  # 128 px at 1 um/px = 256 level-0 px at 0.5 um/px; half overlap
    r = CliRunner().invoke(
        app,
        [
            "evaluate-localization",
            "--scores",
            str(hm),
            "--annotations",
            str(out / "cohort" / "tumor_annotations"),
        ],
    )
    assert r.exit_code == 0, r.output
    loc = json.loads((hm / "localization.json").read_text())
    assert loc["pooled_patch_auc"]["combined"] >= 0.9

    # a normal slide's tumour heatmap: the inversion towards tumour empties its bag, which the
    # summary says (a flat inversion layer), without a warning: it is what a normal slide does
    normal = sorted((out / "cohort" / "slides").glob("normal_*.tif"))[0]
    r = CliRunner().invoke(
        app, ["heatmap", str(normal), "--run", str(out / "run"), "--out", str(hm), "--no-viewer"]
    )
    assert r.exit_code == 0, r.output
    text = "".join(r.output.split())  # the console wraps lines, even inside words
    assert "predictsnormal" in text and "inversionlayerflat:3of3foldmodel(s)" in text
    assert "randomencoderweights" in text  # warnings reach this output
    assert "removednearlyeverypatch(over90%tied)" not in text  # warned on slides called tumour


def test_camelyon16_labels_from_fake_tree(tmp_path):
    root = tmp_path / "CAMELYON16"
    for rel in (
        "training/normal/normal_001.tif",
        "training/normal/normal_002.tif",
        "training/tumor/tumor_001.tif",
        "testing/images/test_001.tif",
        "testing/images/test_002.tif",
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    (root / "testing" / "reference.csv").write_text("Test_001,Tumor,Macro,Yes\nTest_002,Normal,,\n")
    df = camelyon16.build_labels(root).set_index("slide_id")
    assert df.loc["normal_001", "label"] == "normal" and df.loc["tumor_001", "label"] == "tumor"
    assert df.loc["test_001", "label"] == "tumor" and df.loc["test_002", "label"] == "normal"
    assert (df.loc[["test_001", "test_002"], "split"] == "test").all()
    assert (df.loc[["normal_001", "tumor_001"], "split"] == "train").all()
    with pytest.raises(WsiMilError, match="no Camelyon16 slides"):
        camelyon16.build_labels(tmp_path / "empty")


def test_tcga_labels_cases_from_barcodes(tmp_path):
    names = {
        "TCGA-LUAD": ["TCGA-05-4244-01Z-00-DX1.abc.svs", "TCGA-05-4244-01Z-00-DX2.def.svs"],
        "TCGA-LUSC": ["TCGA-18-3406-01Z-00-DX1.ghi.svs"],
    }
    for project, files in names.items():
        for i, f in enumerate(files):
            p = tmp_path / project / f"uuid{i}" / f
            p.parent.mkdir(parents=True)
            p.write_bytes(b"")
    df = tcga_nsclc.build_labels(tmp_path)
    assert len(df) == 3
    luad = df[df.label == "LUAD"]
    assert set(luad.case_id) == {"TCGA-05-4244"}  # two slides, one patient
    assert df[df.label == "LUSC"].case_id.tolist() == ["TCGA-18-3406"]
    # and the splits keep that patient together
    from wsi_mil.training.data import stratified_group_folds

    big = pd.concat(
        [df.assign(slide_id=df.slide_id + f"_{k}", case_id=df.case_id + f"_{k}") for k in range(6)]
    )
    folds = stratified_group_folds(big.label.values, big.case_id.values, 3, 0)
    assert big.assign(fold=folds).groupby("case_id").fold.nunique().max() == 1
