"""The weight search: the pruned ("compact") evaluator against brute force, Caruana and Optuna on
constructed members (a noise member gets weight 0, complementary members are both used)."""
import numpy as np
import pytest
from test_ensemble_util import ArrayView, brute_counts

from competition.cv import compact
from competition.cv.blend import blend_labels, truth_labels
from competition.ensemble import search
from competition.metrics import dice_from_counts


def _random_case(seed=0, N=5, C=3, M=3, size=(16, 12)):
    rng = np.random.default_rng(seed)
    truth = rng.random((N, C, *size)) < 0.3
    members = [np.where(truth, rng.integers(90, 256, truth.shape), rng.integers(0, 170, truth.shape)).astype(np.uint8)
               for _ in range(M)]
    members[0][0, 0] = 0  # an image x class predicted empty by one member
    truth[1, 1] = False  # and one with empty truth
    return members, truth


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_compact_counts_equal_brute_force(threshold, monkeypatch):
    members, truth = _random_case()
    monkeypatch.setattr(compact, "MAX_ELEMS", 50)  # force several image spans per class
    ev = compact.build([ArrayView(m) for m in members], ArrayView(truth), "multilabel", threshold, budget_bytes=3000)
    assert 0 < ev.uncertain < truth.size
    for w in (np.array([[1, 0, 0]] * 3), np.array([[2, 1, 3], [0, 1, 0], [5, 5, 1]]),
              np.array([[0.25, 0.75, 0.0]] * 3), np.array([[1, 1, 1], [0.5, 0.25, 0.25], [0.0, 0.0, 1.0]])):
        inter, pred = ev.counts(w)
        bi, bp = brute_counts(members, truth, w, threshold)
        np.testing.assert_array_equal(inter, bi)
        np.testing.assert_array_equal(pred, bp)
    n = np.array([[1, 2, 0], [0, 0, 0], [3, 0, 1]])
    ci, cp = ev.candidates(n)
    for m in range(3):
        bi, bp = brute_counts(members, truth, n + np.eye(3, dtype=int)[m], threshold)
        np.testing.assert_array_equal(ci[m], bi)
        np.testing.assert_array_equal(cp[m], bp)
    np.testing.assert_array_equal(ev.truth_sum, truth.sum((2, 3)))


@pytest.mark.parametrize("word_bits", [64, 8])
def test_segment_sums_known_answer(word_bits, monkeypatch):
    if word_bits == 8:  # the byte-wise path (big-endian machines, numpy < 2)
        monkeypatch.setattr(compact.sys, "byteorder", "big")
    rng = np.random.default_rng(5)
    pred = rng.random((3, 300)) < 0.5
    bounds = np.array([0, 0, 7, 64, 64, 65, 130, 299, 300])  # empty runs, word edges, the last element
    want = np.array([[row[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])] for row in pred])
    np.testing.assert_array_equal(compact._segment_sums(pred, bounds), want)


def test_multiclass_compact_equals_brute_force():
    rng = np.random.default_rng(3)
    N, C, M = 4, 3, 3
    labels = rng.integers(0, C + 1, (N, 10, 10))
    truth = np.stack([labels == k + 1 for k in range(C)], 1)
    members = []
    for _ in range(M):
        logits = rng.random((N, C + 1, 10, 10)) + 1.5 * np.eye(C + 1)[labels].transpose(0, 3, 1, 2)
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        members.append(np.round(p[:, 1:] * 255).astype(np.uint8))
    ev = compact.build([ArrayView(m) for m in members], ArrayView(truth), "multiclass")
    tl = truth_labels(truth)
    for row in ([1, 0, 0], [2, 1, 1], [0.5, 0.25, 0.25]):
        w = np.array([row] * C)
        lab = blend_labels(members, w)
        k = np.arange(1, C + 1).reshape(1, C, 1, 1)
        pred, tru = lab[:, None] == k, tl[:, None] == k
        inter, ps = ev.counts(w)
        np.testing.assert_array_equal(inter, (pred & tru).sum((2, 3)))
        np.testing.assert_array_equal(ps, pred.sum((2, 3)))
    with pytest.raises(ValueError, match="per-class weights are for multilabel"):
        ev.counts(np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]]))


def _members(seed=0):
    """Truth, a good member, a soft one with different errors, and noise."""
    rng = np.random.default_rng(seed)
    N, C = 8, 4
    yy, xx = np.mgrid[:32, :32]
    truth = np.zeros((N, C, 32, 32), bool)
    for i in range(N):
        for c in range(C):
            cy, cx, r = rng.integers(8, 24), rng.integers(8, 24), rng.integers(3, 8)
            truth[i, c] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    good = np.where(truth, 200, 40).astype(np.uint8)
    good[rng.random(truth.shape) < 0.08] = 140  # scattered false positives
    soft = np.where(truth, 150, 60).astype(np.uint8)
    soft[:, :, :, :3] = 200  # a systematic error on the left edge
    noise = rng.integers(0, 256, truth.shape).astype(np.uint8)
    return truth, [good, soft, noise]


def test_caruana_gives_noise_weight_zero_and_beats_every_single():
    truth, members = _members()
    ev = compact.build([ArrayView(m) for m in members], ArrayView(truth), "multilabel")
    all_ = np.ones(len(truth), bool)
    res = search.caruana(ev, all_, 1.0, steps=20)
    w = res.weights / res.weights.sum(1, keepdims=True)
    np.testing.assert_allclose(w.sum(1), 1.0)
    assert w[0, 2] == 0  # the noise member
    assert w[0, 0] > 0 and w[0, 1] > 0  # the two complementary members are both used
    singles = search.singles(ev, all_, 1.0).mean(1)
    assert res.score > singles.max() + 0.01
    assert singles.argmax() != 2 and res.path[0]["added"] == int(singles.argmax())  # starts from the best single
    # The reported score is the score of the returned weights.
    d = dice_from_counts(*ev.counts(res.weights), ev.truth_sum, 1.0)
    assert d.mean() == pytest.approx(res.score)


def test_per_class_caruana_picks_each_class_expert():
    truth, (_, _, noise) = _members(1)
    clean = np.where(truth, 200, 40).astype(np.uint8)  # blending noise into it can only hurt
    a, b = clean.copy(), clean.copy()
    a[:, 2:] = noise[:, 2:]  # member a: right on classes 0-1 only
    b[:, :2] = noise[:, :2]  # member b: right on classes 2-3 only
    ev = compact.build([ArrayView(a), ArrayView(b)], ArrayView(truth), "multilabel")
    res = search.caruana(ev, np.ones(len(truth), bool), 1.0, per_class=True, steps=10)
    w = res.weights / res.weights.sum(1, keepdims=True)
    np.testing.assert_array_equal(w, [[1, 0], [1, 0], [0, 1], [0, 1]])
    glob = search.caruana(ev, np.ones(len(truth), bool), 1.0, per_class=False, steps=10)
    assert res.score > glob.score


def test_search_respects_the_subset():
    truth, members = _members(2)
    ev = compact.build([ArrayView(m) for m in members], ArrayView(truth), "multilabel")
    sub = np.zeros(len(truth), bool)
    sub[:3] = True
    res = search.caruana(ev, sub, 1.0, steps=10)
    d = dice_from_counts(*ev.counts(res.weights), ev.truth_sum, 1.0)
    assert d[sub].mean() == pytest.approx(res.score)


def test_optuna_weights_are_on_the_simplex_and_no_worse_than_singles_or_equal():
    truth, members = _members(3)
    ev = compact.build([ArrayView(m) for m in members], ArrayView(truth), "multilabel")
    all_ = np.ones(len(truth), bool)
    res = search.optuna_weights(ev, all_, 1.0, trials=15)
    np.testing.assert_allclose(res.weights.sum(1), 1.0)
    assert res.score >= search.singles(ev, all_, 1.0).mean(1).max() - 1e-12
    assert res.score >= search.equal(ev, all_, 1.0).score - 1e-12
    per = search.optuna_weights(ev, all_, 1.0, per_class=True, trials=15)
    np.testing.assert_allclose(per.weights.sum(1), 1.0)
    # One-hot weights are tried first in every class's study: no class is worse than its best member.
    assert (per.per_class >= search.singles(ev, all_, 1.0).max(0) - 1e-12).all()
    d = dice_from_counts(*ev.counts(per.weights), ev.truth_sum, 1.0)
    np.testing.assert_allclose(d.mean(0), per.per_class)
