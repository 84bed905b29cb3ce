"""The metrics, one definition each, shared by validation, OOF scoring and submission scoring.

Dice of a prediction A and truth B is 2|A n B| / (|A| + |B|); when both are empty it is
``empty_score`` (1.0 on the hand-bone leaderboard: predicting nothing where there is nothing is
perfect). Everything is computed from pixel counts, so callers that accumulate counts (GPU
validation, streamed OOF chunks, run-length scoring) go through :func:`score_counts` with the
competition's :class:`PairMetric` (``metric.name``: dice or iou, from :data:`METRICS`). Metrics that are
not a mean of per-pair counts (``f1_at_iou``, ``hausdorff95``) are reported beside it (``metric.report``).
Written by hand: smp's metrics take whole (N, C, H, W) tensors, and here the counts arrive in streamed
chunks, run-length intervals and threshold histograms.

torch is imported only by the torch paths, so scoring a CSV never pays for it.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import ndimage

# Popcount of every byte, for numpy builds without np.bitwise_count (numpy < 2.0).
_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def dice_from_counts(inter, pred_sum, truth_sum, empty_score: float = 1.0):
    """Dice from intersection and area counts: numpy in, float64 numpy out; torch in, torch out."""
    if _is_torch(inter):
        import torch  # noqa: PLC0415 (torch only on the torch path: scoring a CSV never imports it, see above)

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


def iou_from_counts(inter, pred_sum, truth_sum, empty_score: float = 1.0):
    """IoU (Jaccard) |A n B| / |A u B| from the same counts; ``empty_score`` when both are empty."""
    if _is_torch(inter):
        import torch  # noqa: PLC0415 (torch only on the torch path: scoring a CSV never imports it, see above)
        dtype = torch.float32 if inter.device.type == "mps" else torch.float64
        inter, pred_sum, truth_sum = (torch.as_tensor(v, device=inter.device).to(dtype)
                                      for v in (inter, pred_sum, truth_sum))
        union = pred_sum + truth_sum - inter
        return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, float(empty_score)))
    inter, pred_sum, truth_sum = (np.asarray(v, np.float64) for v in (inter, pred_sum, truth_sum))
    if np.any(inter > np.minimum(pred_sum, truth_sum)):
        raise ValueError("intersection count exceeds a mask's area: the counts are inconsistent")
    union = pred_sum + truth_sum - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), float(empty_score))


# -- the metric registry -------------------------------------------------------------------------
@dataclass(frozen=True)
class MetricInfo:
    """One entry of :data:`METRICS` (data, as timm's ``OptimInfo``).

    ``pairs``: the score is a mean over image x class pairs of a function of pixel counts, so it can
    drive validation, OOF scoring, the ensemble search, thresholds and post-processing (``metric.name``);
    otherwise it is reported beside the competition's metric (``metric.report``).
    """

    name: str
    summary: str
    pairs: bool
    higher_is_better: bool = True
    from_counts: Callable | None = None


METRICS = {m.name: m for m in (
    MetricInfo("dice", "2|A n B| / (|A| + |B|) per image x class, averaged", True, from_counts=dice_from_counts),
    MetricInfo("iou", "|A n B| / |A u B| (Jaccard) per image x class, averaged", True, from_counts=iou_from_counts),
    MetricInfo("f1_at_iou", "image-level detection F1 per class (a hit: IoU >= metric.iou_threshold), "
                            "averaged over classes", False),
    MetricInfo("hausdorff95", "95th percentile of the symmetric boundary distance in pixels per image x class, "
                              "averaged (lower is better)", False, higher_is_better=False),
)}


def metric_info(name: str) -> MetricInfo:
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; valid: {', '.join(METRICS)}") from None


@dataclass(frozen=True)
class PairMetric:
    """The competition's per-pair metric (``metric.name``) and its empty score: what every stage that
    counts pixels (validation, OOF, native CV, the ensemble search, the scorer) scores with."""

    name: str = "dice"
    empty_score: float = 1.0

    def __call__(self, inter, pred_sum, truth_sum):
        return metric_info(self.name).from_counts(inter, pred_sum, truth_sum, self.empty_score)


def pair_metric(spec) -> PairMetric:
    """``competition.config.MetricSpec`` -> :class:`PairMetric`."""
    return PairMetric(spec.name, spec.empty_score)


def score_counts(inter, pred_sum, truth_sum, metric: "PairMetric | float" = 1.0):
    """The per-pair metric from counts. ``metric``: a :class:`PairMetric`, or a float meaning Dice with
    that empty score (the default competition's metric)."""
    if isinstance(metric, PairMetric):
        return metric(inter, pred_sum, truth_sum)
    return dice_from_counts(inter, pred_sum, truth_sum, metric)


def scores_per_class(pred: np.ndarray, truth: np.ndarray, metric: "PairMetric | float" = 1.0) -> np.ndarray:
    """:func:`dice_per_class` for any per-pair metric."""
    return score_counts(*pair_counts(pred, truth), metric)


def f1_at_iou(inter, pred_sum, truth_sum, iou_threshold: float = 0.5, empty_score: float = 1.0) -> dict:
    """Image-level detection F1 per class from (N, C) counts (report 000's "F1@IoU"): an image is a
    true positive for a class when truth and prediction are both non-empty with IoU >= the threshold;
    a prediction that is not a hit is a false positive, a truth that is not a hit a false negative.
    -> ``{"mean": mean over classes, "per_class": [F1 per class]}``; a class with nothing to find and
    nothing predicted scores ``empty_score``. Written by hand: it is a count over images, which smp's
    and torchmetrics' pixel metrics do not give."""
    inter, pred_sum, truth_sum = (np.asarray(v, np.float64) for v in (inter, pred_sum, truth_sum))
    iou = iou_from_counts(inter, pred_sum, truth_sum, 0.0)
    hit = (pred_sum > 0) & (truth_sum > 0) & (iou >= iou_threshold)
    tp = hit.sum(0)
    fp = ((pred_sum > 0) & ~hit).sum(0)
    fn = ((truth_sum > 0) & ~hit).sum(0)
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), float(empty_score))
    return {"mean": float(f1.mean()), "per_class": [float(v) for v in f1]}


def hausdorff95(pred: np.ndarray, truth: np.ndarray, empty_score: float = 0.0) -> float:
    """95th-percentile symmetric Hausdorff distance (pixels) of two (H, W) masks, as MONAI's
    ``compute_hausdorff_distance(percentile=95)``: boundary-to-boundary Euclidean distances, both
    directions pooled. Both empty: ``empty_score``; one empty: the image diagonal (the worst case).
    scipy's exact distance transform does the work (MONAI is not a dependency)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if not pred.any() and not truth.any():
        return float(empty_score)
    if not pred.any() or not truth.any():
        return float(np.hypot(*pred.shape))

    def border(m):
        return m & ~ndimage.binary_erosion(m, border_value=0)
    bp, bt = border(pred), border(truth)
    d_to_t = ndimage.distance_transform_edt(~bt)[bp]
    d_to_p = ndimage.distance_transform_edt(~bp)[bt]
    return float(np.percentile(np.concatenate([d_to_t, d_to_p]), 95))


def dice_per_class(pred: np.ndarray, truth: np.ndarray, empty_score: float = 1.0) -> np.ndarray:
    """Dice per class of (C, H, W) -> (C,) or (N, C, H, W) -> (N, C) binary masks (nonzero = 1)."""
    return dice_from_counts(*pair_counts(pred, truth), empty_score)


def pair_counts(pred: np.ndarray, truth: np.ndarray):
    """(intersection, prediction, truth) pixel counts per class of (C, H, W) or (N, C, H, W) masks."""
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
    return _popcount(p & t), _popcount(p), _popcount(t)


def dice_torch(pred, truth, empty_score: float = 1.0):
    """(N, C, H, W) masks (bool, or nonzero = 1) -> (N, C) Dice on the tensors' device."""
    import torch  # noqa: PLC0415 (torch only on the torch path: scoring a CSV never imports it, see above)

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
