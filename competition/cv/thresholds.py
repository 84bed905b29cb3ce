"""Per-class binarization thresholds, chosen on the blended OOF.

For a fixed blend, the Dice of every image x class at *all* 255 thresholds comes from one histogram
per image and class (:func:`competition.cv.native.curves`: the pixels at each blend level,
separately for truth 1 and truth 0; suffix sums give the intersection and the predicted area at every
threshold at once). Here: choosing a level per class from those curves.

Multiclass tasks have no thresholds (argmax after weighting): their curve has a single column.
"""
from __future__ import annotations

import numpy as np

HALF = 128  # the level that stands for the threshold 0.5


def choose_levels(curve: np.ndarray, subset: np.ndarray) -> np.ndarray:
    """(C,) levels maximising each class's mean Dice over the subset; ties go to the level nearest 0.5.

    Level 0 (predict every pixel) is never chosen. Multiclass curves give zeros (no thresholds).
    """
    K = curve.shape[-1]
    if K == 1:
        return np.zeros(curve.shape[1], np.int64)
    mean = curve[subset].mean(0)  # (C, K)
    mean[:, 0] = -np.inf
    ties = mean >= mean.max(1, keepdims=True) - 1e-12
    dist = np.where(ties, np.abs(np.arange(K) - HALF), K + 1)
    return dist.argmin(1).astype(np.int64)


def at_levels(curve: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """(N, C) Dice of every image x class at each class's level."""
    return np.take_along_axis(curve, levels.reshape(1, -1, 1), axis=2)[..., 0]
