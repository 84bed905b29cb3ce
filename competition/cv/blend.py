"""Blending members' uint8 probabilities: the one definition used by the search, the thresholds and
the post-processing, so that every score of a recipe is computed on the same blended masks.

Weights are a (C, M) array, one row per class (a global blend repeats its row). Integer weights (the
counts of Caruana's selection with replacement, or one-hot, or all ones) are blended exactly in
integers; other weights are normalised per class and blended in float32.

Multilabel: the blend, on the 0..255 scale, rounded half up to an integer *level* q; ``q >= k`` means
"blended probability >= (k - 0.5) / 255", so k = 128 is exactly the threshold 0.5 (the OOF stores
round(255 p), so a stored value v stands for p in [(v - 0.5) / 255, (v + 0.5) / 255)).

Multiclass: each member's background is max(255 - sum of its class values, 0) (the OOF keeps only the
classes); the label is the argmax over (background, classes) of the blend, ties going to the lower
index, like torch.argmax. Class k is label k + 1; the truth label is the last class present, like
training's target (``to_target``).
"""
from __future__ import annotations

import math

import numpy as np

LEVELS = 256  # blend levels 0..255; thresholds k = 1..255


def threshold_value(k: int) -> float:
    """The probability threshold that level ``k`` stands for: (k - 0.5) / 255."""
    return (float(k) - 0.5) / 255.0


def threshold_level(t: float) -> int:
    """The level k whose threshold (k - 0.5) / 255 is nearest to ``t``, so ``stored uint8 >= k`` is
    ``p >= t`` up to the quantisation and ``threshold_level(threshold_value(k)) == k``. The one rule
    turning a probability threshold into a uint8 level (training's OOF score, ``competition oof``,
    ensembles)."""
    return int(min(LEVELS - 1, max(1, math.floor(float(t) * 255.0 + 1.0))))


def threshold_table() -> np.ndarray:
    """(255,) float32 thresholds of levels 1..255, as the submission compares them (``p >= t``):
    ``np.searchsorted(table, p, side="right")`` is the level of a float probability p."""
    return np.array([threshold_value(k) for k in range(1, LEVELS)], np.float32)


def is_integer(w: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(w).dtype, np.integer)


def check_weights(w: np.ndarray, n_classes: int, n_members: int) -> np.ndarray:
    w = np.asarray(w)
    if w.shape != (n_classes, n_members):
        raise ValueError(f"weights must be (classes, members) = ({n_classes}, {n_members}), got {w.shape}")
    if (w < 0).any() or not (w.sum(1) > 0).all():
        raise ValueError("weights must be non-negative with a positive sum for every class")
    return w


def normalized(w: np.ndarray) -> np.ndarray:
    """Weights on the simplex, per class (float64)."""
    w = np.asarray(w, np.float64)
    return w / w.sum(1, keepdims=True)


def weighted_sum(chunks: list[np.ndarray], w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sum, per-class total): chunks are M uint8 arrays (B, C, ...); w is (C, M).

    Integer weights give an int32 sum and the integer totals; other weights are normalised first,
    giving a float32 sum on the 0..255 scale and totals of 1.
    """
    C = w.shape[0]
    integer = is_integer(w)
    ww = np.asarray(w, np.int64) if integer else normalized(w)
    dtype = np.int32 if integer else np.float32
    shape = (1, C) + (1,) * (chunks[0].ndim - 2)
    s = np.zeros(chunks[0].shape, dtype)
    for m, chunk in enumerate(chunks):
        col = ww[:, m]
        if not col.any():
            continue
        if np.all(col == col[0]):  # a global weight: scalar multiply, no broadcast temporary
            s += np.multiply(chunk, dtype(col[0]), dtype=dtype)
        else:
            s += np.multiply(chunk, col.astype(dtype).reshape(shape), dtype=dtype)
    return s, (ww.sum(1) if integer else np.ones(C))


def blend_levels(chunks: list[np.ndarray], w: np.ndarray) -> np.ndarray:
    """Multilabel: uint8 levels q (B, C, ...) of the blend, rounded half up (exact for integer weights)."""
    s, total = weighted_sum(chunks, w)
    shape = (1, -1) + (1,) * (s.ndim - 2)
    if is_integer(w):
        t = total.astype(np.int32).reshape(shape)
        q = (2 * s + t) // (2 * t)
    else:
        q = np.floor(s + np.float32(0.5))
    return np.clip(q, 0, 255).astype(np.uint8)


def with_background(chunk: np.ndarray) -> np.ndarray:
    """(B, C, ...) uint8 class values -> (B, C + 1, ...) with the background first."""
    bg = np.clip(255 - chunk.sum(1, dtype=np.int32), 0, 255).astype(np.uint8)
    return np.concatenate([bg[:, None], chunk], axis=1)


def labels_from_full(fulls: list[np.ndarray], w_row: np.ndarray, axis: int = 1) -> np.ndarray:
    """Argmax label of the blend of (.., C + 1, ..) arrays (background first) with one weight per member."""
    integer = is_integer(w_row)
    ww = np.asarray(w_row, np.int64) if integer else np.asarray(w_row, np.float64) / np.sum(w_row)
    dtype = np.int32 if integer else np.float32
    s = np.zeros(fulls[0].shape, dtype)
    for m, full in enumerate(fulls):
        if ww[m] != 0:
            s += np.multiply(full, dtype(ww[m]), dtype=dtype)
    return s.argmax(axis=axis).astype(np.uint8)


def blend_labels(chunks: list[np.ndarray], w: np.ndarray) -> np.ndarray:
    """Multiclass: uint8 labels (B, ...) of the blend (0 = background); one weight row for all classes."""
    if not np.all(w == w[0]):
        raise ValueError("multiclass blends take one weight per member (argmax couples the classes); "
                         "per-class weights are for multilabel tasks")
    return labels_from_full([with_background(c) for c in chunks], w[0])


def truth_labels(truth: np.ndarray) -> np.ndarray:
    """(B, C, ...) bool -> uint8 labels (B, ...): the last class present, 0 where none (as to_target)."""
    k = np.arange(1, truth.shape[1] + 1, dtype=np.uint8).reshape((1, -1) + (1,) * (truth.ndim - 2))
    return (truth * k).max(axis=1).astype(np.uint8)
