"""Probability maps, the one way: logits -> the uint8 probabilities every store holds, and back to
masks (resize, blend of members, binarisation) exactly as the submission does for OOF, test and
pseudo-labelled images alike."""
from __future__ import annotations

import torch
import torch.nn.functional as F

QUANT = 255.0


def probabilities(logits: torch.Tensor, task: str, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Logits (N, C[+1], H, W) -> class probabilities (N, C, h, w); multiclass drops the background."""
    if size is not None and tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    if task == "multilabel":
        return torch.sigmoid(logits.float())
    return torch.softmax(logits.float(), dim=1)[:, 1:]


def quantize_tensor(probs: torch.Tensor) -> torch.Tensor:
    """Probabilities -> uint8 levels round(255 p)."""
    return probs.float().clamp(0, 1).mul_(QUANT).round_().to(torch.uint8)


def blend(members: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """uint8 (..., C, H, W) member probabilities and (M, C) weights (each class's column sums to 1)
    -> float32 probabilities, summed in member order: the same arithmetic for OOF and test images
    (:mod:`competition.cv.sparse` repeats it on gathered tiles)."""
    total = None
    for u, w in zip(members, weights):
        term = u.float().mul_((w.float() / 255.0).view(-1, 1, 1))
        total = term if total is None else total.add_(term)
    return total


def to_size(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, h, w) -> (C, H, W), bilinear (half-pixel centres), as the submission resizes."""
    if tuple(probs.shape[-2:]) == tuple(size):
        return probs
    return F.interpolate(probs[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


def binarize(probs: torch.Tensor, task: str, thresholds: torch.Tensor) -> torch.Tensor:
    """(C, H, W) probabilities -> (C, H, W) uint8 {0, 1}: ``>=`` per-class thresholds (multilabel), or
    the argmax against the implicit background ``1 - sum`` (multiclass; thresholds unused)."""
    if task == "multilabel":
        return (probs >= thresholds.view(-1, 1, 1)).to(torch.uint8)
    background = (1 - probs.sum(0, keepdim=True)).clamp_min_(0)
    winner = torch.cat([background, probs]).argmax(0)
    k = torch.arange(1, len(probs) + 1, device=probs.device).view(-1, 1, 1)
    return (winner.unsqueeze(0) == k).to(torch.uint8)
