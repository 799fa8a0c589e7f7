import json
from dataclasses import replace

import browser
import numpy as np
import pytest
import tifffile
import torch
from shapely.geometry import box

from wsi_mil.errors import WsiMilError
from wsi_mil.formats.scores import PatchScores
from wsi_mil.localization.evaluate import (
    patch_auc,
    patch_tumor_fraction,
    read_asap_xml,
)
from wsi_mil.localization.export import qupath_geojson, write_ome_tiff, write_viewer
from wsi_mil.localization.inversion import soft_threshold, sparse_inversion
from wsi_mil.localization.render import score_raster
from wsi_mil.models.base import MILModel, MILOutput


class MeanLinear(MILModel):
    """Mean pooling + a fixed linear classifier: class 1 evidence is feature 0."""

    def __init__(self):
        super().__init__()
        self.n_classes = 2
        self.w = torch.nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.w.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0]]))

    def forward(self, x, coords=None):
        return MILOutput(self.w(x.mean(0)), torch.full((len(x),), 1 / len(x)))


def test_soft_threshold():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.5])
    torch.testing.assert_close(soft_threshold(x, 0.5), torch.tensor([-1.5, 0.0, 0.0, 0.0, 1.0]))


class MeanLinearBias(MeanLinear):
    """MeanLinear whose class-1 logit is mean(feature 0) - 1: shrinking the bag flips it."""

    def forward(self, x, coords=None):
        out = super().forward(x, coords)
        return MILOutput(out.logits - torch.tensor([0.0, 1.0]), out.instance_scores)


def test_inversion_keeps_positive_evidence_and_zeroes_the_rest():
    model = MeanLinear()
    x = torch.tensor([[3.0, 1.0], [0.1, 1.0], [0.2, 1.0], [2.5, 1.0]])
    res = sparse_inversion(model, x, target=1, steps=10, lr=0.5, lam=0.4, score="evidence")
    z = res.x
    assert (z[:, 1] == 0).all()  # no evidence in feature 1: shrunk to zero everywhere
    assert z[0, 0] > 0 and z[3, 0] > 0  # strong positive evidence survives
    assert z[1, 0] == 0 and z[2, 0] == 0  # weak evidence is thresholded away
    assert res.scores[0] > res.scores[1] and res.scores[3] > res.scores[2]
    assert len(res.losses) == 10 and res.steps_kept == 10 and res.kept
    # weights frozen and restored
    assert all(p.requires_grad for p in model.parameters())


def test_inversion_stops_before_the_step_that_would_change_the_prediction():
    model = MeanLinearBias()
    x = torch.tensor([[3.0, 1.0], [0.5, 1.0], [0.4, 1.0], [0.6, 1.0]])  # mean 1.125: class 1
    assert model(x).logits.argmax() == 1
    res = sparse_inversion(model, x, target=1, steps=50, lr=0.5, lam=0.2)
    assert 0 < res.steps_kept < 50 and res.kept and res.prob > 0.5
    assert model(res.x).logits.argmax() == 1  # the inverted bag still predicts class 1
    # one more ISTA step from there would have flipped it (or emptied the bag): why it stopped
    scale = x.abs().mean()
    z = (res.x / scale).clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model(z * scale).logits.unsqueeze(0), torch.tensor([1]))
    (grad,) = torch.autograd.grad(loss, z)
    nxt = soft_threshold(z.detach() - 0.5 * grad, 0.5 * 0.2) * scale
    assert not nxt.any() or model(nxt).logits.argmax() == 0
    # a class the bag is not called: the inversion keeps that class's probability from falling
    neg = sparse_inversion(model, x, target=0, steps=50, lr=0.5, lam=0.2)
    with torch.no_grad():
        assert neg.prob >= float(torch.softmax(model(x).logits, -1)[0]) - 1e-6


def test_patch_scores_on_graded_key_instances(tmp_path):
    """The bench_patch_scores.py protocol on one graded cohort (seed 2, the one the combined
    layer's weights were designed on): a 3-fold PSMIL run calibrated from its negative bags
    alone, every bag scored as the heatmap scores it. Key-instance AUC of the combined layer at
    least attention's; key instances mostly above 0.5, negative bags' instances almost never;
    every inversion kept its bag's prediction."""
    from sklearn.metrics import roc_auc_score

    from wsi_mil.config import HeatmapConfig, TrainConfig
    from wsi_mil.formats.features import read_features
    from wsi_mil.formats.run import RunFolder, load_ensemble
    from wsi_mil.localization.scores import read_calibrations, score_with_config
    from wsi_mil.synthetic import make_feature_cohort
    from wsi_mil.training.crossval import run_crossval

    keys = make_feature_cohort(tmp_path, n_bags=48, n_cases=30, seed=2, graded=True, n_key=(4, 12))
    run_crossval(
        tmp_path / "features",
        tmp_path / "labels.csv",
        tmp_path / "run",
        TrainConfig(folds=3, test_frac=0.25, epochs=20, patience=8, lr=5e-4, bootstrap=50),
        ["psmil"],
    )
    run = RunFolder(tmp_path / "run")
    _, models, _ = load_ensemble(run, "psmil")
    calibrations, inversion = read_calibrations(run, "psmil", HeatmapConfig())
    assert calibrations["1"].mode == "negatives" and inversion["score"] == "inverted_attention"
    att, inv, comb, key_p, neg_p, steps = [], [], [], [], [], []
    for name, key in keys.items():
        bag = read_features(tmp_path / "features" / f"{name}.h5")
        x, c = torch.from_numpy(bag.features), torch.from_numpy(bag.coords)
        s = score_with_config(models, x, c, ["0", "1"], calibrations, inversion, "1")
        assert len(s.steps_kept) == 3  # inversion steps kept, per fold model
        if not key.any():
            neg_p.append(s.combined)
            continue
        steps.extend(s.steps_kept)
        att.append(roc_auc_score(key, s.attention))
        inv.append(roc_auc_score(key, s.inversion))
        comb.append(roc_auc_score(key, s.combined))
        key_p.append((s.combined, key))
    att, inv, comb = np.mean(att), np.mean(inv), np.mean(comb)
    assert min(att, inv, comb) >= 0.9, (att, inv, comb)
    assert comb >= att, (att, inv, comb)
    assert np.mean(steps) > 3  # positive bags: the inversion removes before it must stop
    # without instance labels: key instances far above the other instances of their bags, the
    # negative bags' instances below 0.5 (the weakest keys, 1.5 sd, stay ambiguous and low)
    p = np.concatenate([v for v, _ in key_p])
    truth = np.concatenate([k for _, k in key_p])
    assert p[truth].mean() > 5 * p[~truth].mean() and (np.concatenate(neg_p) > 0.5).mean() < 0.02
    # --target the class not calibrated (the negative of two): P = 1 - P(the calibrated one); it
    # was the uncalibrated instance probability under a legend that said "calibrated"
    other = score_with_config(models, x, c, ["0", "1"], calibrations, inversion, "0")
    s = score_with_config(models, x, c, ["0", "1"], calibrations, inversion, "1")
    assert np.allclose(other.combined + s.combined, 1) and np.allclose(other.patch_alone + s.patch_alone, 1)
    assert other.calibrated == "negatives (1 - p(1))" and other.predicted == 0


def test_score_raster_averages_overlaps():
    coords = np.array([[0, 0], [2, 0]])
    mean, covered = score_raster(coords, np.array([1.0, 3.0]), 4, (4, 8), 1.0)
    assert mean[0, 0] == 1 and mean[0, 2] == 2 and mean[0, 5] == 3 and not covered[0, 7]


def _scores(n=6):
    coords = np.array([[i * 256, 0] for i in range(n)], np.int64)
    v = np.linspace(0, 1, n)
    return PatchScores(coords, v, v[::-1].copy(), v, np.array([0.3, 0.7]), 1, 256.0)


def test_non_finite_scores_are_refused_not_exported_as_zero():
    coords = np.array([[0, 0], [256, 0]], np.int64)
    with pytest.raises(ValueError, match="non-finite"):
        PatchScores(coords, np.array([np.nan, 1.0]), np.ones(2), np.ones(2), np.array([0.5, 0.5]), 1)


def test_geojson_is_valid_qupath_tiles():
    data = qupath_geojson(_scores(), 256)
    assert data["type"] == "FeatureCollection" and len(data["features"]) == 6
    for f in data["features"]:
        ring = f["geometry"]["coordinates"][0]
        assert f["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) == 5
        assert f["properties"]["objectType"] == "tile" and f["properties"]["isLocked"] is True
        m = f["properties"]["measurements"]
        assert set(m) == {"attention", "inversion", "combined", "patch_alone"}  # no class named: bare names
        assert all(np.isfinite(v) for v in m.values())
    json.dumps(data, allow_nan=False)
    named = qupath_geojson(replace(_scores(), target="tumor"), 256)["features"][0]["properties"]
    ranks = {f"{n} rank (tumor)" for n in ("attention", "inversion")}
    expected = {"combined P(tumor)", "patch_alone P(tumor)", *ranks}
    assert set(named["measurements"]) == expected


def test_ome_tiff_is_a_transparent_rgba_overlay_with_slide_size_and_mpp(tmp_path):
    write_ome_tiff(tmp_path / "h.ome.tiff", _scores(), 256, 256, (5000, 3000), 0.5)
    with tifffile.TiffFile(tmp_path / "h.ome.tiff") as tif:
        assert tif.is_ome
        levels = tif.series[0].levels
        assert levels[0].shape == (3000, 5000, 4)
        assert len(levels) >= 2 and levels[1].shape[2] == 4
        assert 'PhysicalSizeX="0.5"' in tif.ome_metadata
        assert tif.pages[0].extrasamples == (2,)  # unassociated alpha
        img = levels[0].asarray()
    top = img[10, 256 * 5 + 10]
    assert top[3] == 255 and top[:3].tolist() != [0, 0, 0]  # top-scored patch: opaque colour
    assert img[2000, 4000].tolist() == [0, 0, 0, 0]  # no patch there: fully transparent
    assert (img[..., 3] == 0).mean() > 0.9  # only the scored strip hides the slide


ASAP = """<?xml version="1.0"?><ASAP_Annotations><Annotations>
<Annotation Name="A1" Type="Polygon" PartOfGroup="_0"><Coordinates>
<Coordinate Order="0" X="0" Y="0"/><Coordinate Order="1" X="1000" Y="0"/>
<Coordinate Order="2" X="1000" Y="1000"/><Coordinate Order="3" X="0" Y="1000"/></Coordinates></Annotation>
<Annotation Name="A2" Type="Polygon" PartOfGroup="_2"><Coordinates>
<Coordinate Order="0" X="200" Y="200"/><Coordinate Order="1" X="400" Y="200"/>
<Coordinate Order="2" X="400" Y="400"/><Coordinate Order="3" X="200" Y="400"/></Coordinates></Annotation>
<Annotation Name="A3" Type="Polygon" PartOfGroup="Tumor"><Coordinates>
<Coordinate Order="0" X="3000" Y="3000"/><Coordinate Order="1" X="3500" Y="3000"/>
<Coordinate Order="2" X="3500" Y="3500"/></Coordinates></Annotation>
</Annotations><AnnotationGroups/></ASAP_Annotations>"""


def test_asap_xml_exclusion_groups_patch_auc_and_folder_evaluation(tmp_path):
    from wsi_mil.formats.scores import write_scores
    from wsi_mil.localization.evaluate import evaluate_folder

    (tmp_path / "t.xml").write_text(ASAP)
    tumor = read_asap_xml(tmp_path / "t.xml")
    assert tumor.area == pytest.approx(1000 * 1000 - 200 * 200 + 500 * 500 / 2)
    assert not tumor.contains(box(250, 250, 300, 300))
    coords = np.array([[0, 600], [200, 200], [2000, 2000], [3000, 3200]], np.int64)
    frac = patch_tumor_fraction(coords, 200, tumor)
    assert frac[0] == 1 and frac[1] == 0 and frac[2] == 0
    assert patch_auc(np.array([0.9, 0.1, 0.2, 0.5]), frac) == 1.0
    # a folder: the tumour slide (ASAP XML), a normal slide (no annotation) and one with a mask
    ann, heat = tmp_path / "ann", tmp_path / "heat"
    ann.mkdir()
    heat.mkdir()
    (ann / "t.xml").write_text(ASAP)
    grid = np.array([[x, y] for y in range(0, 4000, 200) for x in range(0, 4000, 200)], np.int64)
    inside = patch_tumor_fraction(grid, 200, tumor) >= 0.5
    v = np.where(inside, 0.9, 0.05)
    common = dict(size0=200.0, mpp=0.25, slide_size=(4000, 4000))
    write_scores(heat / "t_scores.h5", PatchScores(grid, v, v, v, np.array([0.1, 0.9]), 1, **common))
    low = np.full(len(grid), 0.02)
    write_scores(heat / "n_scores.h5", PatchScores(grid, low, low, low, np.array([0.95, 0.05]), 1, **common))
    mask = np.zeros((125, 125), np.uint8)  # 4000 / 32 cells: the first lesion as a mask
    mask[:31, :31] = 255
    np.save(ann / "m.npy", mask)
    vm = np.where((grid < 1000).all(1), 0.9, 0.05)
    write_scores(heat / "m_scores.h5", PatchScores(grid, vm, vm, vm, np.array([0.2, 0.8]), 1, **common))
    res = evaluate_folder(heat, ann)
    assert res["slide_auc"] == 1.0
    t, n = res["per_slide"]["t"]["combined"], res["per_slide"]["n"]["combined"]
    assert t["auc"] == 1.0 and n["auc"] is None and t["tumor_above_half"] == 1.0 and n["above_half"] == 0
    assert res["mean_slide_patch_auc"]["combined"] == 1.0
    assert res["pooled_patch_auc"]["combined"] > 0.95
    assert res["reliability"]["combined"]["patches"] > 0 and "attention" not in res["reliability"]
    f = res["froc"]["combined"]
    # the XML's square (250 um) and the mask's lesion count; the XML's triangle (125 um across at
    # 0.25 um/px) is an isolated-tumour-cell region, neither hit nor false positive
    assert f["lesions"] == 2
    assert f["froc"] == pytest.approx(1.0)  # every lesion found at 0.9, no false positive above 0.05
    json.dumps(res, allow_nan=False)


def test_folder_evaluation_names_unused_annotations_and_refuses_mixed_classes(tmp_path, caplog):
    """An annotation named unlike its slide was silently unused (0 lesions, FROC printed as
    0.000), and score files mapping different classes were pooled into one result."""
    from wsi_mil.formats.scores import write_scores
    from wsi_mil.localization.evaluate import evaluate_folder

    ann, heat = tmp_path / "ann", tmp_path / "heat"
    ann.mkdir()
    heat.mkdir()
    (ann / "T.xml").write_text(ASAP)  # the slide is "t"
    grid = np.array([[x, y] for y in range(0, 2000, 200) for x in range(0, 2000, 200)], np.int64)
    common = dict(size0=200.0, mpp=0.25, slide_size=(2000, 2000), target="tumor")
    v = np.linspace(0, 1, len(grid))
    write_scores(heat / "t_scores.h5", PatchScores(grid, v, v, v, np.array([0.1, 0.9]), 1, **common))
    write_scores(heat / "n_scores.h5", PatchScores(grid, v, v, v, np.array([0.9, 0.1]), 1, **common))
    with (
        caplog.at_level("WARNING", logger="wsi_mil"),
        pytest.raises(WsiMilError, match="no annotation for any"),
    ):
        evaluate_folder(heat, ann)  # was 0 lesions and every figure undefined, exit 0
    assert "1 annotation file(s) in" in caplog.text and "T.xml" in caplog.text
    (ann / "n.xml").write_text(ASAP)  # now one file is read: only the near miss is named
    (ann / "unscored.xml").write_text(ASAP)  # a whole cohort's annotations beside a test subset
    caplog.clear()
    with caplog.at_level("WARNING", logger="wsi_mil"):
        evaluate_folder(heat, ann)
    assert "T.xml" in caplog.text and "unscored" not in caplog.text
    (ann / "T.xml").unlink()
    caplog.clear()
    with caplog.at_level("WARNING", logger="wsi_mil"):
        evaluate_folder(heat, ann)
    assert "annotation file(s)" not in caplog.text
    other = {**common, "target": "inflamed"}
    write_scores(heat / "i_scores.h5", PatchScores(grid, v, v, v, np.array([0.5, 0.5]), 1, **other))
    with pytest.raises(WsiMilError, match=r"map different classes \(inflamed: i; tumor: n, t\)"):
        evaluate_folder(heat, ann)


def test_a_slide_in_the_annotations_folder_is_not_read_as_its_mask(tmp_path):
    """`--annotations` given the slides folder read tumor_004.tif itself as the tumour mask: every
    patch tumour, ECE 0.806, exit 0."""
    import tifffile

    from wsi_mil.localization.evaluate import read_mask

    rng = np.random.default_rng(0)
    slide = np.clip(rng.normal((220, 160, 200), 20, (64, 64, 3)), 0, 255).astype(np.uint8)
    tifffile.imwrite(
        tmp_path / "s.tif", slide, photometric="rgb", resolution=(40000, 40000), resolutionunit="CENTIMETER"
    )
    with pytest.raises(WsiMilError, match="a colour image, not a tumor mask"):
        read_mask(tmp_path / "s.tif", (64, 64), 0)
    mask = np.zeros((64, 64), np.uint8)
    mask[10:30, 10:30] = 255
    np.save(tmp_path / "m.npy", np.repeat(mask[..., None], 3, -1))  # a gray mask with 3 channels
    assert read_mask(tmp_path / "m.npy", (64, 64), 0).sum() == 400
    red = np.zeros((64, 64, 3), np.uint8)
    red[10:30, 10:30, 0] = 255  # a colour-coded mask: tumour in red on black
    np.save(tmp_path / "red.npy", red)
    assert read_mask(tmp_path / "red.npy", (64, 64), 0).sum() == 400


def test_rank_scores_from_old_files_are_refused_for_cross_slide_metrics(tmp_path):
    from wsi_mil.localization.evaluate import SlideLocalization, evaluate

    coords = np.array([[0, 0], [256, 0]], np.int64)
    v = np.array([0.5, 1.0])
    old = PatchScores(coords, v, v, v, np.array([0.5, 0.5]), 1, scale="rank")
    with pytest.raises(Exception, match="within-slide ranks"):
        evaluate([SlideLocalization("s", old, box(0, 0, 10, 10).buffer(0))])


@pytest.mark.skipif(not browser.available(), reason="Debian chromium not installed")
def test_html_viewer_loads_in_headless_chromium(tmp_path):
    rng = np.random.default_rng(0)
    slide = np.full((600, 800, 3), 240, np.uint8)
    slide[100:500, 100:700] = (220, 150, 190)
    coords = np.array([[x, y] for y in range(100, 500, 50) for x in range(100, 700, 50)], np.int64)
    v = rng.random(len(coords))
    scores = PatchScores(coords * 4, v, v, v, np.array([0.2, 0.8]), 1, 200.0)
    html = write_viewer(tmp_path / "s.html", slide, 4.0, scores, 200.0, None, "s", "tumor", 6)
    assert (tmp_path / "s_viewer" / "openseadragon.min.js").exists()
    with browser.Chromium() as b:
        assert b.open(html.as_uri()) == "combined"  # the page says the slide and overlay are drawn
        dom = b.dom()
        assert 'id="status">loaded combined<' in dom and '<pre id="errors"></pre>' in dom
        assert dom.count('src="s_viewer/top/combined_') == 6
        frame = browser.viewer_frame_checks(b.screenshot(), width=900)
    assert frame["overlay"] > 0.05, frame  # the jet overlay's blues and reds over the tissue


def test_platt_scaling_spreads_uncalibrated_probabilities_and_stays_finite_when_separable():
    from wsi_mil.calibration import PlattScaling

    # a briefly trained model: every slide near 0.5, yet perfectly separated
    p_pos = np.array([0.62, 0.66, 0.7, 0.64])
    p_neg = np.array([0.44, 0.47, 0.45, 0.5])
    prob = np.stack([1 - np.r_[p_pos, p_neg], np.r_[p_pos, p_neg]], 1)
    labels = np.r_[np.ones(4, int), np.zeros(4, int)]
    cal = PlattScaling.fit(prob, labels)
    assert np.isfinite(cal.a).all() and cal.a[1] > 1
    out = cal.apply(prob, 1)
    assert out[:4].min() > 0.7 and out[4:].max() < 0.3  # Platt's targets: 5/6 and 1/6
    assert PlattScaling.from_dict(cal.to_dict()).apply(prob, 1) == pytest.approx(out)


def test_mapped_class_reads_negative_names_and_asks_when_ambiguous():
    from wsi_mil.errors import WsiMilError
    from wsi_mil.localization.scores import calibration_targets, mapped_class

    assert mapped_class(["normal", "tumor"]) == 1 and mapped_class(["Tumor", "Normal"]) == 0
    assert mapped_class(["non-tumor", "tumor"]) == 1 and mapped_class(["tumor", "not tumor"]) == 0
    assert mapped_class(["no_metastasis", "metastasis"]) == 1 and mapped_class(["nontumor", "tumor"]) == 1
    for ambiguous in (["LUAD", "LUSC"], ["normal", "benign"]):
        with pytest.raises(WsiMilError, match="--target"):
            mapped_class(ambiguous, np.array([0.3, 0.7]))
        assert calibration_targets(ambiguous) == [0, 1]  # both calibrated: either may be asked for
    assert mapped_class(["LUAD", "LUSC"], target="LUSC") == 1
    with pytest.raises(WsiMilError, match="not a class"):
        mapped_class(["LUAD", "LUSC"], target="tumor")
    assert mapped_class(["a", "b", "c"], np.array([0.2, 0.5, 0.3])) == 1  # several: the prediction
    # normal beside two diseases: a slide called normal maps its likelier disease (it mapped
    # "normal", whose negatives-mode calibration has no patches of its own: flat at 0)
    assert mapped_class(["LUAD", "LUSC", "normal"], np.array([0.1, 0.3, 0.6])) == 1
    assert mapped_class(["LUAD", "LUSC", "normal"], np.array([0.1, 0.3, 0.6]), target="normal") == 2
    assert calibration_targets(["normal", "tumor"]) == [1]


def test_a_patch_keeps_its_probability_on_a_slide_called_negative_and_a_one_patch_bag_gets_its_own():
    """No slide gate: the instance probability of a lone strong patch (a micro-metastasis) is
    the same whatever the rest of the slide says."""
    from wsi_mil.localization.patch_calibration import PatchCalibration, ScoreMap
    from wsi_mil.localization.scores import score_bag

    model = MeanLinear()
    coords = torch.zeros(4, 2, dtype=torch.long)
    x = torch.tensor([[-3.0, 1.0], [-2.5, 1.0], [-2.0, 1.0], [4.0, 1.0]])  # mean -0.875: P(1) 0.29
    s = score_bag([model], x, coords, classes=["normal", "tumor"], steps=3)
    assert s.predicted == 1 and s.prob[1] < 0.5
    assert s.combined.argmax() == 3 and s.combined[3] == pytest.approx(1 / (1 + np.exp(-4.0)))
    assert s.calibrated == "none" and s.patch_alone[3] == s.combined[3]
    one = score_bag([model], x[3:], coords[3:], classes=["normal", "tumor"], steps=3)
    assert one.combined[0] == pytest.approx(s.combined[3]) and one.attention[0] == 1.0
    # with a patch calibration, both probability layers go through its maps
    flat = ScoreMap([1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], a=2.0, b=-1.0)
    cal = PatchCalibration("tumor", "negatives", flat, flat)
    c = score_bag([model], x, coords, 1, ["normal", "tumor"], cal, steps=3)
    assert c.combined[3] == pytest.approx(1 / (1 + np.exp(-(2 * 4.0 - 1))))
    assert c.calibrated == "negatives"


def test_a_collapsed_attention_is_reported_not_shown_as_a_silent_blank_layer():
    from wsi_mil.localization.scores import flat_attention_warning, score_bag

    coords = torch.zeros(4, 2, dtype=torch.long)
    x = torch.tensor([[3.0, 1.0], [0.0, 1.0], [0.5, 1.0], [0.2, 1.0]])
    s = score_bag([MeanLinear(), MeanLinear()], x, coords, classes=["normal", "tumor"], steps=3)
    assert s.flat_attention == 2 and np.ptp(s.attention) == 0  # uniform 1/N attention: one flat colour
    assert s.combined.argmax() == 0  # the probability layers still find the evidence
    assert "2 of 2 models" in flat_attention_warning(s.flat_attention, 2, "slide.svs")
    one = score_bag([MeanLinear()], x[:1], coords[:1], classes=["normal", "tumor"], steps=3)
    assert one.flat_attention == 0 and flat_attention_warning(0, 1, "x") is None  # one patch: no claim


def test_an_inversion_that_removed_nearly_every_patch_is_reported_as_a_flat_layer():
    from wsi_mil.localization.scores import flat_inversion_warning, is_mostly_tied, score_bag

    assert not is_mostly_tied(np.r_[np.zeros(9), 1.0]) and is_mostly_tied(np.r_[np.zeros(10), 1.0])
    assert not is_mostly_tied(np.zeros(1))  # one patch: no claim
    coords = torch.zeros(4, 2, dtype=torch.long)
    x = torch.tensor([[3.0, 1.0], [0.0, 1.0], [0.5, 1.0], [0.2, 1.0]])
    s = score_bag([MeanLinear(), MeanLinear()], x, coords, classes=["normal", "tumor"], steps=3)
    assert s.flat_inversion == 2  # uniform attention on the inverted bag: every patch tied
    warning = flat_inversion_warning(s.flat_inversion, 2, "slide.svs", "tumor")
    assert "slide.svs" in warning and "towards tumor of 2 of 2 models" in warning
    assert flat_inversion_warning(0, 2, "slide.svs", "tumor") is None


def test_static_viewer_urls_are_percent_encoded(tmp_path):
    slide = np.full((200, 300, 3), 230, np.uint8)
    coords = np.array([[0, 0], [200, 0]], np.int64)
    v = np.array([0.2, 0.9])
    scores = PatchScores(coords, v, v, v, np.array([0.1, 0.9]), 1, 200.0, target="tumor")
    html = write_viewer(tmp_path / "a#1 50%?.html", slide, 2.0, scores, 200.0, None, "a#1", "tumor", 2)
    text = html.read_text()
    assert 'src="a%231%2050%25%3F_viewer/openseadragon.min.js"' in text
    assert "a%231%2050%25%3F_viewer/slide_files/" in text
    assert "probability that this patch is tumor" in text and "rank within this slide" in text
    # the calibrated slide probability beside the raw one (it was printed in the terminal only)
    html = write_viewer(
        tmp_path / "b.html",
        slide,
        2.0,
        scores,
        200.0,
        None,
        "b",
        "tumor",
        2,
        calibrated=np.array([0.05, 0.95]),
    )
    assert "p(1) = 0.90; calibrated p(0) = 0.05, p(1) = 0.95" in html.read_text()


def test_report_markdown_renders_as_html_tables():
    from wsi_mil.training.report import markdown_html

    out = markdown_html("# Title\n\ntext with `code`\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    assert "<h2>Title</h2>" in out and "<code>code</code>" in out
    assert "<table><tr><th>a</th><th>b</th></tr><tr><td>1</td><td>2</td></tr></table>" in out


def test_report_markdown_inlines_its_images(tmp_path):
    from wsi_mil.io import save_png
    from wsi_mil.training.report import markdown_html

    save_png(tmp_path / "r.png", np.zeros((4, 4, 3), np.uint8))
    out = markdown_html("text\n\n![psmil: reliability](r.png)\n", tmp_path)
    assert '<img alt="psmil: reliability" src="data:image/png;base64,' in out
    assert "![" in markdown_html("![x](missing.png)\n", tmp_path)  # a missing file stays text


def test_legends_say_when_probabilities_are_not_calibrated():
    """Runs without a patch calibration for the class score uncalibrated instance
    probabilities; the legend said "calibrated" all the same."""
    from wsi_mil.localization.scores import legend

    assert legend("combined", "tumor").endswith("inversion, calibrated)")
    text = legend("patch_alone", "tumor", calibrated=False)
    assert "probability that this patch is tumor" in text and text.endswith(", not calibrated)")
    assert legend("attention", "tumor", calibrated=False) == legend("attention", "tumor")
