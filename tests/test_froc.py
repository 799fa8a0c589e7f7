"""Camelyon16 FROC: hand-computed cases, and parity with the official Evaluation_FROC.py.

`_official_*` below restate the official script's functions (and NCRF's nms.py loop) line by
line, as plain loops, so our vectorised versions are checked against the protocol itself.
"""

import numpy as np
import pytest
from scipy import ndimage as nd
from skimage import measure

from wsi_mil.localization import froc as camelyon

RES, LEVEL = 0.243, 5


def _official_evaluation_mask(pixelarray, resolution, level):
    distance = nd.distance_transform_edt(255 - pixelarray)
    threshold = 75 / (resolution * pow(2, level) * 2)
    binary = distance < threshold
    filled_image = nd.binary_fill_holes(binary)
    return measure.label(filled_image, connectivity=2)


def _official_itc(evaluation_mask, resolution, level):
    max_label = np.amax(evaluation_mask)
    properties = measure.regionprops(evaluation_mask)
    threshold = 275 / (resolution * pow(2, level))
    # the script reads major_axis_length, renamed axis_major_length in scikit-image 0.26
    return [i + 1 for i in range(0, max_label) if properties[i].axis_major_length < threshold]


def _official_fp_tp(xcorr, ycorr, probs, is_tumor, evaluation_mask, itc, level):
    max_label = np.amax(evaluation_mask) if is_tumor else 0
    fp_probs, tp_probs = [], np.zeros((max_label,), dtype=np.float32)
    if is_tumor:
        for i in range(len(xcorr)):
            hit = evaluation_mask[int(ycorr[i] / pow(2, level)), int(xcorr[i] / pow(2, level))]
            if hit == 0:
                fp_probs.append(probs[i])
            elif hit not in itc:
                if probs[i] > tp_probs[hit - 1]:
                    tp_probs[hit - 1] = probs[i]
    else:
        fp_probs = list(probs)
    return fp_probs, tp_probs, max_label - len(itc)


def _official_froc(froc_data):
    unlisted_fps = [item for sublist in froc_data[1] for item in sublist]
    unlisted_tps = [item for sublist in froc_data[2] for item in sublist]
    total_fps, total_tps = [], []
    all_probs = sorted(set(unlisted_fps + unlisted_tps))
    for thresh in all_probs[1:]:
        total_fps.append((np.asarray(unlisted_fps) >= thresh).sum())
        total_tps.append((np.asarray(unlisted_tps) >= thresh).sum())
    total_fps.append(0)
    total_tps.append(0)
    total_fps = np.asarray(total_fps) / float(len(froc_data[0]))
    total_sensitivity = np.asarray(total_tps) / float(sum(froc_data[3]))
    eval_tps = np.interp([0.25, 0.5, 1, 2, 4, 8], total_fps[::-1], total_sensitivity[::-1])
    return total_fps, total_sensitivity, eval_tps


def _official_nms(probs_map, resolution, radius, thresh):
    probs_map = probs_map.copy()
    h, w = probs_map.shape
    out = []
    while np.max(probs_map) > thresh:
        prob_max = probs_map.max()
        idx = np.where(probs_map == prob_max)
        r, c = idx[0][0], idx[1][0]
        out.append((float(prob_max), int((c + 0.5) * resolution), int((r + 0.5) * resolution)))
        probs_map[max(r - radius, 0) : min(r + radius, h), max(c - radius, 0) : min(c + radius, w)] = 0
    return out


def _blobs(shape, boxes):
    m = np.zeros(shape, np.uint8)
    for r0, c0, r1, c1 in boxes:
        m[r0:r1, c0:c1] = 255
    return m


def test_lesions_merge_within_the_75um_margin_and_small_ones_are_itc():
    # threshold = 75 / (0.243 * 32 * 2) = 4.82 px: blobs 8 px apart merge, 12 px apart do not
    near = camelyon.evaluation_mask(_blobs((100, 100), [(10, 10, 60, 60), (10, 68, 60, 90)]), RES, LEVEL)
    far = camelyon.evaluation_mask(_blobs((100, 100), [(10, 10, 60, 60), (10, 72, 60, 90)]), RES, LEVEL)
    assert near.max() == 1 and far.max() == 2
    # ITC: major axis < 275 / (0.243 * 32) = 35.4 px (after the dilation)
    mask = camelyon.evaluation_mask(_blobs((120, 120), [(10, 10, 70, 70), (100, 100, 104, 104)]), RES, LEVEL)
    big, small = mask[40, 40], mask[102, 102]
    assert camelyon.itc_labels(mask, RES, LEVEL) == {int(small)} and big != small


def test_hits_count_each_lesion_once_ignore_itc_and_call_background_false_positive():
    mask = camelyon.evaluation_mask(_blobs((120, 120), [(10, 10, 70, 70), (100, 100, 104, 104)]), RES, LEVEL)
    itc = camelyon.itc_labels(mask, RES, LEVEL)
    ds = 2**LEVEL
    dets = [
        (0.9, 40 * ds, 40 * ds),
        (0.95, 30 * ds, 50 * ds),
        (0.8, 102 * ds, 102 * ds),
        (0.7, 90 * ds, 5 * ds),
    ]
    fp, tp, n = camelyon.hits(dets, mask, itc, LEVEL)
    assert fp == [0.7] and n == 1
    assert tp[mask[40, 40] - 1] == pytest.approx(0.95) and tp[mask[102, 102] - 1] == 0
    fp, tp, n = camelyon.hits(dets, None, set(), LEVEL)  # a normal slide: all false positives
    assert fp == [0.9, 0.95, 0.8, 0.7] and n == 0


def test_froc_by_hand():
    # slide A: lesions hit at 0.9 and 0.7, false positives 0.8 and 0.6; slide B (normal): 0.85, 0.3
    per_slide = [([0.8, 0.6], np.array([0.9, 0.7], np.float32), 2), ([0.85, 0.3], np.zeros(0, np.float32), 0)]
    fps, sens = camelyon.froc_curve(per_slide)
    np.testing.assert_allclose(fps, [1.5, 1.0, 1.0, 0.5, 0.0, 0.0])
    np.testing.assert_allclose(sens, [1.0, 1.0, 0.5, 0.5, 0.5, 0.0])
    score = camelyon.froc_score(fps, sens)
    assert score["sensitivity"]["0.25"] == pytest.approx(0.5)
    assert score["sensitivity"]["2"] == score["sensitivity"]["8"] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(6))
def test_froc_matches_the_official_script_on_random_masks_and_detections(seed):
    rng = np.random.default_rng(seed)
    ds = 2**LEVEL
    per_slide, official = [], [[], [], [], []]
    for k in range(4):
        is_tumor = k < 3
        shape = (160, 200)
        boxes = []
        for _ in range(rng.integers(1, 6)):
            r, c = rng.integers(0, 150), rng.integers(0, 190)
            boxes.append((r, c, r + rng.integers(1, 50), c + rng.integers(1, 50)))
        pixels = _blobs(shape, boxes)
        n_det = int(rng.integers(0, 25))
        # multiples of 1/256: exact in float32, so the script's mixed float32/float64 threshold
        # sort (not a total order under NumPy 2) cannot reorder ties
        probs = (rng.integers(1, 256, n_det) / 256).tolist()
        xs = rng.integers(0, shape[1] * ds, n_det).tolist()
        ys = rng.integers(0, shape[0] * ds, n_det).tolist()
        dets = list(zip(probs, xs, ys))
        if is_tumor:
            ours_mask = camelyon.evaluation_mask(pixels, RES, LEVEL)
            ref_mask = _official_evaluation_mask(pixels, RES, LEVEL)
            np.testing.assert_array_equal(ours_mask, ref_mask)
            itc = camelyon.itc_labels(ours_mask, RES, LEVEL)
            ref_itc = _official_itc(ref_mask, RES, LEVEL)
            assert itc == set(ref_itc)
            per_slide.append(camelyon.hits(dets, ours_mask, itc, LEVEL))
            ref = _official_fp_tp(xs, ys, probs, True, ref_mask, ref_itc, LEVEL)
        else:
            per_slide.append(camelyon.hits(dets, None, set(), LEVEL))
            ref = _official_fp_tp(xs, ys, probs, False, np.zeros((1, 1), int), [], LEVEL)
        official[0].append(k)
        for i in range(3):
            official[i + 1].append(ref[i])
    if sum(official[3]) == 0 or len({p for fp in official[1] for p in fp} | {0.0}) < 2:
        pytest.skip("degenerate draw: no lesion or no detection")
    fps, sens = camelyon.froc_curve(per_slide)
    ref_fps, ref_sens, ref_eval = _official_froc(official)
    np.testing.assert_allclose(fps, ref_fps)
    np.testing.assert_allclose(sens, ref_sens)
    score = camelyon.froc_score(fps, sens)
    np.testing.assert_allclose(list(score["sensitivity"].values()), ref_eval)
    assert score["froc"] == pytest.approx(float(np.mean(ref_eval)))


def test_detections_equal_ncrf_nms_loop():
    rng = np.random.default_rng(0)
    prob = nd.gaussian_filter(rng.random((60, 80)), 3)
    prob = (prob - prob.min()) / (prob.max() - prob.min())
    prob[10, 10] = prob[40, 70] = 2.0  # a tie: the first in row-major order wins
    ours = camelyon.detections(prob, 32, radius=5, min_prob=0.3)
    assert ours == _official_nms(prob, 32, 5, 0.3)
    assert ours[0][1:] == (int(10.5 * 32), int(10.5 * 32)) and len(ours) > 3


def test_patch_detections_sit_at_patch_centres_and_find_a_lesion_under_one_patch_centre():
    """A lesion that covers only the middle of one 256-px patch: the patch's detection lands on
    it at the patch centre; a point at the patch's top-left map cell (the old placement, 112
    level-0 pixels from the centre) would miss it."""
    size0, ds = 256, 2**LEVEL
    coords = np.array([[x, y] for y in range(0, 2048, 256) for x in range(0, 2048, 256)], np.int64)
    values = np.full(len(coords), 0.1)
    hot = int(np.flatnonzero((coords == [768, 768]).all(1))[0])
    values[hot] = 0.9
    dets = camelyon.patch_detections(coords, values, size0, radius0=5 * ds, min_prob=0.05)
    assert dets[0] == (0.9, 768 + 128, 768 + 128)
    # suppression: no second detection within the square of half-side 5 cells around the first
    assert all(max(abs(x - 896), abs(y - 896)) >= 5 * ds for _, x, y in dets[1:])
    mask = np.zeros((64, 64), np.uint8)
    mask[25:31, 25:31] = 255  # level-0 800-992 around the patch centre (896, 896); the patch spans 768-1024
    lesions = camelyon.evaluation_mask(mask, 2.0, LEVEL)  # 2 um/px: wide enough not to be an ITC
    fp, tp, n = camelyon.hits(dets[:1], lesions, camelyon.itc_labels(lesions, 2.0, LEVEL), LEVEL)
    assert n == 1 and tp.max() == pytest.approx(0.9) and fp == []
    old = [(0.9, 768 + ds // 2, 768 + ds // 2)]  # the top-left cell's centre
    fp_old, tp_old, _ = camelyon.hits(old, lesions, set(), LEVEL)
    assert fp_old == [0.9] and tp_old.max() == 0
