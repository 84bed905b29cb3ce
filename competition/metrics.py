"""Dice, the one definition shared by validation, OOF scoring and submission scoring.

Dice of a prediction A and truth B is 2|A n B| / (|A| + |B|); when both are empty it is
``empty_score`` (1.0 on the hand-bone leaderboard: predicting nothing where there is nothing is
perfect). Everything is computed from pixel counts, so callers that accumulate counts (GPU
validation, streamed OOF chunks, run-length scoring) go through :func:`dice_from_counts` too.

torch is imported only by the torch paths, so scoring a CSV never pays for it.
"""
from __future__ import annotations

import sys

import numpy as np

# Popcount of every byte, for numpy builds without np.bitwise_count (numpy < 2.0).
_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def dice_from_counts(inter, pred_sum, truth_sum, empty_score: float = 1.0):
    """Dice from intersection and area counts: numpy in, float64 numpy out; torch in, torch out."""
    if _is_torch(inter):
        import torch

        # float64 keeps 2*inter/(p+t) exact enough to match numpy; MPS has no float64.
        dtype = torch.float32 if inter.device.type == "mps" else torch.float64
        inter, pred_sum, truth_sum = (torch.as_tensor(v, device=inter.device).to(dtype)
                                      for v in (inter, pred_sum, truth_sum))
        denom = pred_sum + truth_sum
        score = 2 * inter / denom.clamp_min(1)
        return torch.where(denom > 0, score, torch.full_like(score, float(empty_score)))
    inter, pred_sum, truth_sum = (np.asarray(v, np.float64) for v in (inter, pred_sum, truth_sum))
    if np.any(inter > np.minimum(pred_sum, truth_sum)):
        raise ValueError("intersection count exceeds a mask's area: the counts are inconsistent")
    denom = pred_sum + truth_sum
    score = 2 * inter / np.where(denom > 0, denom, 1)
    return np.where(denom > 0, score, float(empty_score))


def dice_per_class(pred: np.ndarray, truth: np.ndarray, empty_score: float = 1.0) -> np.ndarray:
    """Dice per class of (C, H, W) -> (C,) or (N, C, H, W) -> (N, C) binary masks (nonzero = 1)."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction and truth shapes differ: {pred.shape} vs {truth.shape}")
    if pred.ndim not in (3, 4):
        raise ValueError(f"expected (C, H, W) or (N, C, H, W) masks, got shape {pred.shape}")
    # Packing to bits first makes the intersection and the three counts work on 1/8 of the data
    # (measured ~5x faster than bool sums on (4, 29, 512, 512)) and treats any nonzero value as 1.
    lead = pred.shape[:-2]
    p = np.packbits(pred.reshape(*lead, -1), axis=-1)
    t = np.packbits(truth.reshape(*lead, -1), axis=-1)
    return dice_from_counts(_popcount(p & t), _popcount(p), _popcount(t), empty_score)


def dice_torch(pred, truth, empty_score: float = 1.0):
    """(N, C, H, W) masks (bool, or nonzero = 1) -> (N, C) Dice on the tensors' device."""
    import torch

    if pred.shape != truth.shape:
        raise ValueError(f"prediction and truth shapes differ: {tuple(pred.shape)} vs {tuple(truth.shape)}")
    if pred.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) masks, got shape {tuple(pred.shape)}")
    pred = pred if pred.dtype == torch.bool else pred != 0
    truth = truth if truth.dtype == torch.bool else truth != 0

    def count(x):  # int64: a 2048x2048 mask has 4M pixels, beyond int16 and float16's exact range
        return x.sum(dim=(-2, -1), dtype=torch.int64)

    return dice_from_counts(count(pred & truth), count(pred), count(truth), empty_score)


def summarize(scores: np.ndarray, classes: list[str]) -> dict:
    """``{"mean": mean over all image x class pairs, "per_class": {name: mean over images}}``."""
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2 or scores.shape[1] != len(classes):
        raise ValueError(f"expected (N, {len(classes)}) scores for classes {classes}, got shape {scores.shape}")
    if scores.shape[0] == 0:
        raise ValueError("no images to summarize")
    return {"mean": float(scores.mean()),
            "per_class": {name: float(v) for name, v in zip(classes, scores.mean(axis=0))}}


def _popcount(packed: np.ndarray) -> np.ndarray:
    """Set bits along the last axis of a uint8 array, as int64."""
    if hasattr(np, "bitwise_count"):
        if packed.shape[-1] % 8 == 0:
            packed = packed.view(np.uint64)  # 8x fewer elements to count and sum
        return np.bitwise_count(packed).sum(axis=-1, dtype=np.int64)
    return _POPCOUNT8[packed].sum(axis=-1, dtype=np.int64)


def _is_torch(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)
