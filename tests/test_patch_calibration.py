"""Patch probabilities: the calibration maps, their reliability, and what a run writes."""

import json

import numpy as np
import pytest
from scipy.special import expit

from wsi_mil.calibration import PlattScaling
from wsi_mil.localization.patch_calibration import (
    PatchCalibration,
    fit_negatives,
    fit_patch_calibration,
    reliability,
    score_map,
)


def _mixture(pi, n=20000, shift=3.0, seed=0):
    """Scores of negative slides' patches N(0, 1) and of positive slides' patches, a mixture
    (1 - pi) N(0, 1) + pi N(shift, 1); the true P(target | s) is logistic in s."""
    rng = np.random.default_rng(seed)
    s_neg = rng.normal(0, 1, n)
    target = rng.random(n) < pi
    s_pos = np.where(target, rng.normal(shift, 1, n), rng.normal(0, 1, n))
    inputs = np.zeros((2 * n, 3))
    inputs[:, 0] = np.r_[s_neg, s_pos]
    inputs[:, 1:] = rng.normal(size=(2 * n, 2))  # attention and inversion inputs: noise here
    from_positive = np.r_[np.zeros(n, bool), np.ones(n, bool)]
    truth = expit(np.log(pi / (1 - pi)) + shift * s_pos - shift**2 / 2)
    return inputs, from_positive, target, truth


@pytest.mark.parametrize("pi", [0.02, 0.1, 0.3])
def test_negatives_mode_recovers_the_share_and_the_probability_without_patch_labels(pi):
    """Only slide labels: the negative slides' patches fix the null; the mixture model recovers
    the positive slides' share of target patches and P(target | s) (Elkan & Noto, NU form)."""
    inputs, from_positive, target, truth = _mixture(pi)
    m, prior = fit_negatives(score_map(inputs, [1, 0, 0]), inputs, from_positive)
    assert prior == pytest.approx(pi, abs=0.01)
    p = m.apply(inputs[from_positive])
    assert np.abs(p - truth).mean() < 0.01 and np.abs(p - truth).max() < 0.06
    rel = reliability(p, target)
    assert rel["ece"] < 0.02  # against the true patch labels it was never shown


def test_annotations_mode_is_platt_on_labelled_patches_and_both_maps_round_trip():
    inputs, from_positive, target, _ = _mixture(0.1, n=5000)
    labels = np.r_[np.zeros(5000, int), target.astype(int)]
    labels[:100] = -1  # unknown patches are left out
    cal = fit_patch_calibration("tumor", inputs, from_positive, labels, {"slides": 3})
    assert cal.mode == "annotations" and cal.data["patches"] == 10000 - 100
    assert cal.data["positive_patches"] == int(target.sum())
    assert reliability(cal.instance.apply(inputs[100:]), labels[100:] == 1)["ece"] < 0.02
    assert cal.combined.coef[0] == 1 and min(cal.combined.coef[1:]) >= 0  # context: positive evidence only
    again = PatchCalibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    np.testing.assert_allclose(again.combined.apply(inputs), cal.combined.apply(inputs))
    neg = fit_patch_calibration("tumor", inputs, from_positive, None, {})
    assert neg.mode == "negatives" and neg.prior == pytest.approx(0.1, abs=0.02)


def test_reliability_by_hand():
    prob = np.array([0.05, 0.05, 0.95, 0.95, 0.55, 0.55])
    positive = np.array([0, 0, 1, 0, 1, 1], bool)
    rel = reliability(prob, positive, bins=10)
    # bins [0, .1): mean .05, 0 positive; [.9, 1]: .95 vs .5; [.5, .6): .55 vs 1
    expected = (2 * 0.05 + 2 * 0.45 + 2 * 0.45) / 6
    assert rel["ece"] == pytest.approx(expected)
    assert [b["n"] for b in rel["bins"]] == [2, 2, 2]


def test_slide_platt_scaling_sums_to_one_for_any_number_of_classes():
    rng = np.random.default_rng(0)
    for k in (2, 3, 4):
        prob = rng.dirichlet(np.ones(k), 40)
        labels = rng.integers(0, k, 40)
        cal = PlattScaling.fit(prob, labels)
        out = cal.apply_all(prob)
        np.testing.assert_allclose(out.sum(1), 1.0)
        np.testing.assert_allclose(cal.apply(prob, k - 1), out[:, k - 1])
        back = PlattScaling.from_dict(cal.to_dict())
        np.testing.assert_allclose(back.apply_all(prob), out)


def test_context_inputs_weigh_by_their_agreement_with_the_instance_evidence_or_not_at_all():
    """Negatives mode: attention that ranks the class's patches as the instance evidence does
    enters the combined layer; one that looks the other way (PSMIL's on the demo) is left out."""
    from wsi_mil.localization.patch_calibration import CONTEXT_SCALE, negatives_weights

    inputs, from_positive, target, _ = _mixture(0.1)
    rng = np.random.default_rng(1)
    z = np.zeros_like(inputs)
    z[:, 0] = inputs[:, 0]
    z[:, 1] = inputs[:, 0] + 0.3 * rng.normal(size=len(z))  # agrees
    z[:, 2] = -inputs[:, 0]  # looks away
    p = expit(3 * inputs[:, 0] - 6)
    w = negatives_weights(z, from_positive, p)
    assert w[0] == 1 and w[1] > 0.9 * CONTEXT_SCALE and w[2] == 0
    assert negatives_weights(z, from_positive, np.zeros(len(z))) == [1.0, 0.0, 0.0]  # no confident call


def test_negatives_share_holds_on_small_and_rare_mixtures():
    """Cohorts the size of the digit bags (380 patches a side, 20% of them the class) and of the
    harder cohort (2,100, 2%, overlapping): the fitted share stays within 0.1 of the truth (the
    likelihood alone put up to 0.98 on the 2% cohort)."""
    from wsi_mil.localization.patch_calibration import fit_negatives, score_map

    for pi, n, mu, sd in ((0.2, 380, 3.5, 1.5), (0.02, 2100, 1.5, 1.0)):
        for seed in range(5):
            rng = np.random.default_rng(seed)
            n_t = int(pi * n)
            own = np.concatenate([rng.normal(0, 1, n - n_t), rng.normal(mu, sd, n_t)])
            x = np.r_[own, rng.normal(0, 1, n)][:, None] * np.ones((1, 3))
            own_slide = np.r_[np.ones(n, bool), np.zeros(n, bool)]
            _, share = fit_negatives(score_map(x, [1.0, 0.0, 0.0]), x, own_slide)
            assert abs(share - pi) < 0.1, (pi, seed, share)


def test_soft_fit_never_turns_more_evidence_into_a_lower_probability():
    """A multi-class run's background class (every patch of its own slides looks like the
    others') got combined maps with negative slopes (-0.38 measured) from the soft fit."""
    from wsi_mil.localization.patch_calibration import fit_soft

    s = np.linspace(-3, 3, 400)
    inputs = np.c_[s, np.zeros((400, 2))]
    m = fit_soft(score_map(inputs, [1.0, 0.0, 0.0]), inputs, expit(-2 * s))  # targets fall with s
    assert m.a == 0 and m.apply(inputs) == pytest.approx(np.full(400, expit(-2 * s).mean()))
    m = fit_soft(score_map(inputs, [1.0, 0.0, 0.0]), inputs, expit(2 * s - 1))
    assert m.a > 0 and m.apply(inputs)[-1] > 0.9  # rising targets keep their fit
