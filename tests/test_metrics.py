"""Dice: hand-computed small cases, empty-mask conventions, and numpy/torch/counts agreement."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from competition.metrics import dice_from_counts, dice_per_class, dice_torch, summarize

# 3x4 masks. A has 4 pixels, B has 3, they share 2: Dice = 2*2 / (4+3) = 4/7.
A = np.array([[1, 1, 0, 0],
              [1, 1, 0, 0],
              [0, 0, 0, 0]], np.uint8)
B = np.array([[0, 1, 0, 0],
              [0, 1, 1, 0],
              [0, 0, 0, 0]], np.uint8)
EMPTY = np.zeros_like(A)


def test_known_answer():
    np.testing.assert_allclose(dice_per_class(A[None], B[None]), [4 / 7])


def test_identical_is_one_and_disjoint_is_zero():
    np.testing.assert_allclose(dice_per_class(A[None], A[None]), [1.0])
    np.testing.assert_allclose(dice_per_class(A[None], (1 - A)[None]), [0.0])


def test_empty_conventions():
    pred = np.stack([EMPTY, EMPTY, A])
    truth = np.stack([EMPTY, A, EMPTY])
    np.testing.assert_allclose(dice_per_class(pred, truth), [1.0, 0.0, 0.0])
    np.testing.assert_allclose(dice_per_class(pred, truth, empty_score=0.25), [0.25, 0.0, 0.0])


def test_batched_shape_and_values():
    pred = np.stack([np.stack([A, EMPTY]), np.stack([B, B])])  # (N=2, C=2, 3, 4)
    truth = np.stack([np.stack([B, EMPTY]), np.stack([B, A])])
    out = dice_per_class(pred.astype(bool), truth.astype(bool))
    assert out.shape == (2, 2) and out.dtype == np.float64
    np.testing.assert_allclose(out, [[4 / 7, 1.0], [1.0, 4 / 7]])


def test_nonzero_is_foreground():
    np.testing.assert_allclose(dice_per_class((A * 255)[None], (B * 3)[None]), [4 / 7])


def test_shape_errors():
    with pytest.raises(ValueError, match="shapes differ"):
        dice_per_class(A[None], np.zeros((1, 3, 5)))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        dice_per_class(A, B)


def test_dice_from_counts_numpy():
    out = dice_from_counts(np.array([2, 0, 0, 5]), np.array([4, 0, 3, 5]), np.array([3, 0, 0, 5]), 1.0)
    np.testing.assert_allclose(out, [4 / 7, 1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="inconsistent"):
        dice_from_counts(np.array([5]), np.array([4]), np.array([9]))


def test_dice_from_counts_torch_keeps_type():
    out = dice_from_counts(torch.tensor([2, 0]), torch.tensor([4, 0]), torch.tensor([3, 0]), 0.5)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    torch.testing.assert_close(out, torch.tensor([4 / 7, 0.5], dtype=torch.float64))


def test_dice_torch_known_answer():
    pred = torch.from_numpy(np.stack([np.stack([A, EMPTY, A])])).bool()  # (1, 3, 3, 4)
    truth = torch.from_numpy(np.stack([np.stack([B, EMPTY, EMPTY])])).bool()
    out = dice_torch(pred, truth)
    assert out.shape == (1, 3)
    torch.testing.assert_close(out, torch.tensor([[4 / 7, 1.0, 0.0]], dtype=torch.float64))


def test_dice_torch_counts_do_not_overflow_at_2048():
    full = torch.ones(1, 1, 2048, 2048, dtype=torch.bool)
    half = full.clone()
    half[..., 1024:, :] = False
    # 2 * 2M / (4M + 2M) = 2/3 exactly only if the 4M-pixel counts are exact.
    torch.testing.assert_close(dice_torch(half, full), torch.tensor([[2 / 3]], dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 20), st.integers(1, 70), st.integers(0, 2**32 - 1))
def test_numpy_torch_and_definition_agree(n, c, h, w, seed):
    rng = np.random.default_rng(seed)
    pred = rng.random((n, c, h, w)) < rng.random()
    truth = rng.random((n, c, h, w)) < rng.random()
    inter = (pred & truth).sum((-2, -1))
    denom = pred.sum((-2, -1)) + truth.sum((-2, -1))
    expected = np.where(denom > 0, 2 * inter / np.maximum(denom, 1), 1.0)
    np.testing.assert_allclose(dice_per_class(pred, truth), expected, rtol=0, atol=1e-15)
    got = dice_torch(torch.from_numpy(pred), torch.from_numpy(truth)).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-15)


def test_summarize():
    scores = np.array([[1.0, 0.5], [0.0, 0.5]])
    out = summarize(scores, ["radius", "ulna"])
    assert out == {"mean": 0.5, "per_class": {"radius": 0.5, "ulna": 0.5}}
    assert isinstance(out["mean"], float)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        summarize(scores, ["a", "b", "c"])
