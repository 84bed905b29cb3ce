"""Thresholds from one histogram per blend, and post-processing under nnU-Net's acceptance rule, through
the ensemble's native passes (``competition.cv.native``) on in-memory stores."""
import cv2
import numpy as np
from test_ensemble_util import ArrayView, memory_images, underconfident

from competition.config import PostProcess
from competition.cv import compact, native
from competition.cv import postprocess as pp
from competition.cv.blend import blend_levels, threshold_value
from competition.cv.thresholds import HALF, at_levels, choose_levels
from competition.metrics import dice_per_class


def curves(members, truth, blends, task, metric):
    return native.curves(memory_images(members, truth, task), blends, task, metric, lambda *_: None, workers=1)[0]


def components(members, truth, configs, task):
    return native.components(memory_images(members, truth, task), configs, task, workers=1)


def test_curves_equal_dice_at_every_level():
    rng = np.random.default_rng(0)
    truth = rng.random((3, 2, 12, 10)) < 0.4
    members = [rng.integers(0, 256, truth.shape).astype(np.uint8) for _ in range(2)]
    w = np.array([[1, 2], [3, 1]])
    (curve,) = curves(members, truth, [w], "multilabel", 1.0)
    q = blend_levels(members, w)
    for k in (1, 50, 127, HALF, 200, 255):
        np.testing.assert_array_equal(curve[:, :, k], dice_per_class(q >= k, truth))
    # Level 128 is the threshold 0.5 the search uses: the same Dice as the compact counts.
    ev = compact.build([ArrayView(m) for m in members], ArrayView(truth), "multilabel")
    from competition.metrics import dice_from_counts
    np.testing.assert_array_equal(curve[:, :, HALF], dice_from_counts(*ev.counts(w), ev.truth_sum))
    assert threshold_value(HALF) == 0.5


def test_tuned_thresholds_beat_half_on_an_underconfident_member():
    rng = np.random.default_rng(1)
    truth = np.zeros((4, 3, 16, 16), bool)
    truth[:, :, 4:10, 3:12] = True
    truth[1, 2] = False
    probs = underconfident(truth.astype(np.uint8), rng)  # 100 on the truth, 10 elsewhere: never >= 0.5
    (curve,) = curves([probs], truth, [np.ones((3, 1), np.int64)], "multilabel", 1.0)
    levels = choose_levels(curve, np.ones(4, bool))
    assert ((levels > 10) & (levels <= 100)).all()
    tuned = at_levels(curve, levels)
    half = at_levels(curve, np.full(3, HALF))
    assert tuned.mean() == 1.0 and half.mean() < 0.2
    # Ties go to the level nearest 0.5: any level in (10, 100] is perfect, 100 is nearest 128.
    assert (levels == 100).all()


def test_choose_levels_uses_only_the_subset():
    curve = np.zeros((2, 1, 256), np.float32)
    curve[0, 0, 60] = 1.0  # image 0 prefers level 60
    curve[1, 0, 200] = 1.0  # image 1 prefers level 200
    assert choose_levels(curve, np.array([True, False]))[0] == 60
    assert choose_levels(curve, np.array([False, True]))[0] == 200


def _blobs():
    """Class 0: truth has a big and a small component, predicted exactly (removing the small one hurts).
    Class 1: predicted right plus small spurious blobs (removing them helps)."""
    truth = np.zeros((3, 2, 48, 48), bool)
    pred = np.zeros_like(truth)
    for i in range(3):
        cv2.circle(truth[i, 0].view(np.uint8), (15, 15), 9, 1, -1)
        cv2.circle(truth[i, 0].view(np.uint8), (38, 38), 2, 1, -1)
        cv2.circle(truth[i, 1].view(np.uint8), (24, 24), 10, 1, -1)
    pred[:] = truth
    pred[:, 1, 2:4, 2:4] = True
    pred[:, 1, 44:46, 40:42] = True
    return truth, np.where(pred, 220, 20).astype(np.uint8)


def test_postprocessing_that_hurts_a_class_is_rejected_and_one_that_helps_is_kept():
    truth, probs = _blobs()
    (comps,) = components([probs], truth, [(np.ones((2, 1), np.int64), np.full(2, HALF))], "multilabel")
    rules = [PostProcess(keep_largest=True), PostProcess(min_area=20), PostProcess(min_area=60)]
    truth_sum = truth.sum((2, 3))
    chosen, inter, pred = pp.choose(comps, truth_sum, np.ones(3, bool), rules, np.ones(3), 1.0)
    assert 0 not in chosen  # every rule would delete class 0's true small component
    assert 1 in chosen and (chosen[1].keep_largest or chosen[1].min_area)
    np.testing.assert_array_equal(pred[:, 1], truth_sum[:, 1])  # the spurious blobs are gone
    np.testing.assert_array_equal(pred[:, 0], truth_sum[:, 0])  # class 0 untouched
    # The base counts (no rule) are the blended mask's own counts.
    bi, bp = pp.rule_counts(comps[1], None, np.ones(3), 3)
    np.testing.assert_array_equal(bp, (probs[:, 1] >= HALF).sum((1, 2)))


def test_nnunet_acceptance_rule():
    before = np.array([0.8, 0.7, 0.9])
    assert pp.accept(before, np.array([0.8, 0.75, 0.9]), 1)
    assert not pp.accept(before, np.array([0.8, 0.7, 0.9]), 1)  # no gain
    assert not pp.accept(before, np.array([0.79, 0.75, 0.9]), 1)  # another class got worse
    assert not pp.accept(before, np.array([0.8, 0.65, 0.95]), 1)  # the class itself got worse


def test_min_area_is_in_original_pixels_scaled_to_the_oof():
    # Two components of 12 and 8 OOF pixels; originals are 4x the OOF side, so 16x the area.
    comp = pp.Components(image=np.array([0, 0]), area=np.array([12, 8]), inter=np.array([12, 0]))
    scale = np.array([1 / 16])
    inter, pred = pp.rule_counts(comp, PostProcess(min_area=160), scale, 1)  # 160 px original = 10 px OOF
    assert pred.tolist() == [12] and inter.tolist() == [12]
    inter, pred = pp.rule_counts(comp, PostProcess(min_area=100), scale, 1)  # 6.25 px OOF: both kept
    assert pred.tolist() == [20]


def test_keep_largest_is_per_image():
    comp = pp.Components(image=np.array([0, 0, 1, 1, 1]), area=np.array([5, 9, 2, 7, 3]),
                         inter=np.array([1, 2, 3, 4, 5]))
    inter, pred = pp.rule_counts(comp, PostProcess(keep_largest=True), np.ones(2), 2)
    assert pred.tolist() == [9, 7] and inter.tolist() == [2, 4]


def test_candidate_rules_scale_with_the_original_size():
    rules = pp.candidate_rules(np.array([2048 * 2048] * 3))
    assert rules[0].keep_largest and [r.min_area for r in rules[1:]] == sorted(r.min_area for r in rules[1:])
    assert rules[1].min_area == round(1e-5 * 2048 * 2048)


def test_multiclass_components_count_the_argmax_masks():
    from competition.cv.blend import blend_labels, truth_labels
    truth, _ = _blobs()
    lab = truth_labels(truth)
    probs = np.stack([np.where(lab == k + 1, 200, 20) for k in range(2)], 1).astype(np.uint8)
    probs[:, 1, 2:4, 2:4] = 240  # a spurious class-1 blob in the background
    w = np.ones((2, 1), np.int64)
    (comps,) = components([probs], truth, [(w, np.zeros(2, np.int64))], "multiclass")
    pred_lab = blend_labels([probs], w)
    for c in range(2):
        inter, pred = pp.rule_counts(comps[c], None, np.ones(3), 3)
        np.testing.assert_array_equal(pred, (pred_lab == c + 1).sum((1, 2)))
        np.testing.assert_array_equal(inter, ((pred_lab == c + 1) & (lab == c + 1)).sum((1, 2)))
    assert (np.bincount(comps[1].image) == 2).all()  # the disc and the spurious blob, in every image


def test_one_threshold_to_level_rule():
    """threshold_level is the nearest level, inverts threshold_value, and the search's cut agrees
    with blend_levels for thresholds other than 0.5 (the rule training, `oof` and `ensemble` share)."""
    from competition.cv.blend import blend_levels, threshold_level, threshold_value
    from competition.cv.compact import level_cut
    assert all(threshold_level(threshold_value(k)) == k for k in range(1, 256))
    assert threshold_level(0.5) == 128 and threshold_level(0.3) == 77 and threshold_level(0.01) == 3
    for t in (0.01 * i for i in range(1, 100)):
        k = threshold_level(t)
        assert abs(threshold_value(k) - t) <= 0.5 / 255 + 1e-12
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 256, (2, 1, 50), dtype=np.uint8) for _ in range(3)]
    w = np.array([[2, 1, 1]])
    s = sum(c.astype(np.int64) * wi for c, wi in zip(chunks, w[0]))
    for t in (0.13, 0.3, 0.5, 0.77):
        np.testing.assert_array_equal(s >= level_cut(t, int(w.sum())), blend_levels(chunks, w) >= threshold_level(t))
