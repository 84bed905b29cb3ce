"""Gaussian sliding windows: full coverage, exact results for position-independent models, the
Gaussian's weighting where windows overlap, output scales, padding of small images."""
from __future__ import annotations

import math

import pytest
import torch

from competition.predict.sliding import SIGMA_SCALE, gaussian_importance, sliding_window, window_starts


def test_window_starts_cover_the_image_with_bounded_steps():
    assert window_starts(64, 64, 0.5) == [0]
    assert window_starts(50, 64, 0.5) == [0]
    assert window_starts(128, 64, 0.5) == [0, 32, 64]
    s = window_starts(100, 32, 0.5)
    assert s[0] == 0 and s[-1] == 100 - 32
    assert max(b - a for a, b in zip(s, s[1:])) <= 16
    with pytest.raises(ValueError, match="overlap"):
        window_starts(100, 32, 1.0)


def test_gaussian_importance_peaks_in_the_centre_and_is_never_zero():
    g = gaussian_importance(32, 32)
    assert g.shape == (32, 32) and g.max() == 1 and g.min() > 0
    assert torch.equal(g, g.flip(0)) and torch.equal(g, g.T)
    assert g[15, 15] > g[15, 0] > g[0, 0]


@pytest.mark.parametrize("h,w", [(128, 128), (100, 70), (50, 90)])
def test_pointwise_model_is_reproduced_exactly(h, w):
    x = torch.randn(2, 3, h, w)

    def model(t):  # position-independent: every window predicts the same value at a pixel
        return torch.sigmoid(t[:, :2] * 3)

    out = sliding_window(model, x, window=64, overlap=0.5, batch=3)
    torch.testing.assert_close(out, model(x))


def test_output_scale_two():
    x = torch.randn(1, 1, 96, 80)
    up = torch.nn.Upsample(scale_factor=2, mode="nearest")
    out = sliding_window(up, x, window=32, overlap=0.5, batch=4)
    torch.testing.assert_close(out, up(x))


def test_overlaps_are_weighted_towards_the_nearer_window_centre():
    """Two windows (columns 0-31 and 16-47) predicting 0 and 1: at column c in both, the result is
    g1 / (g0 + g1) with each window's Gaussian at the pixel's offset inside it."""
    counter = iter(range(100))

    def model(t):  # each call gets one window (batch=1); it predicts the window's index everywhere
        return torch.full((t.shape[0], 1, 32, 32), float(next(counter)))

    out = sliding_window(model, torch.zeros(1, 1, 32, 48), window=32, overlap=0.5, batch=1)[0, 0]
    sigma = 32 * SIGMA_SCALE

    def g(offset):
        return math.exp(-(offset - 15.5) ** 2 / (2 * sigma ** 2))

    assert out[5, 8].item() == 0 and out[5, 40].item() == 1  # covered by one window only
    for c in (18, 24, 30):
        assert out[5, c].item() == pytest.approx(g(c - 16) / (g(c) + g(c - 16)), rel=1e-5)
    assert out[5, 24] > 0.5  # column 24 is nearer the second window's centre (31.5) than the first's (15.5)
