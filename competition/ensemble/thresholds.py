"""Per-class binarization thresholds, tuned on the blended OOF.

For a fixed blend, the Dice of every image x class at *all* 255 thresholds comes from one histogram:
count the pixels at each blend level separately for truth 1 and truth 0 (one ``np.bincount`` over the
chunk, keyed by image, class, level and truth); suffix sums over the levels give the intersection and
the predicted area at every threshold at once. One streaming pass serves any number of blends (nested
CV has one per outer fold), reading each chunk of the OOF once.

Multiclass tasks have no thresholds (argmax after weighting): their curve has a single column.
"""
from __future__ import annotations

import numpy as np

from competition.ensemble.blend import LEVELS, blend_labels, blend_levels, truth_labels
from competition.ensemble.compact import chunk_images
from competition.metrics import PairMetric, score_counts

HALF = 128  # the level that stands for the threshold 0.5


def curves(members: list, truth, blends: list[np.ndarray], task: str, metric: "PairMetric | float",
           budget_bytes: int = 128 << 20) -> list[np.ndarray]:
    """Dice per image x class x level for each blend: (N, C, 256) float64 (multilabel; level k means
    "blend >= (k - 0.5)/255"), or (N, C, 1) (multiclass argmax)."""
    N, C = len(truth), len(truth.classes)
    HW = int(np.prod(truth.size))
    B = chunk_images(C, HW, len(members) + 12, budget_bytes)
    K = LEVELS if task == "multilabel" else 1
    out = [np.empty((N, C, K)) for _ in blends]
    for s in range(0, N, B):
        e = min(N, s + B)
        b = e - s
        P = [m.read(s, e).reshape(b, C, HW) for m in members]
        T = truth.read(s, e).reshape(b, C, HW)
        if task == "multilabel":
            tsum = np.count_nonzero(T, axis=-1)[..., None]
            base = (np.arange(b * C, dtype=np.int64) * (2 * LEVELS)).reshape(b, C, 1)
            for j, w in enumerate(blends):
                key = base + blend_levels(P, w).astype(np.int64) * 2 + T
                h = np.bincount(key.ravel(), minlength=b * C * 2 * LEVELS).reshape(b, C, LEVELS, 2)
                inter = np.cumsum(h[..., ::-1, 1], axis=-1)[..., ::-1]  # pixels >= level k with truth 1
                pred = np.cumsum(h[..., ::-1, :].sum(-1), axis=-1)[..., ::-1]
                out[j][s:e] = score_counts(inter, pred, tsum, metric)
        else:
            tl = truth_labels(T)
            img = np.arange(b)[:, None] * (C + 1)
            tsum = np.bincount((img + tl).ravel(), minlength=b * (C + 1)).reshape(b, C + 1)[:, 1:]
            for j, w in enumerate(blends):
                lab = blend_labels(P, w)
                key = (img + lab).ravel()
                pred = np.bincount(key, minlength=b * (C + 1)).reshape(b, C + 1)[:, 1:]
                inter = np.bincount(key[(lab == tl).ravel()], minlength=b * (C + 1)).reshape(b, C + 1)[:, 1:]
                out[j][s:e, :, 0] = score_counts(inter, pred, tsum, metric)
    return out


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
