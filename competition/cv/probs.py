"""Logits -> the uint8 probabilities every store holds: the one quantisation of OOF and test predictions."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

QUANT = 255.0


def probabilities(logits: "torch.Tensor", task: str, size: tuple[int, int] | None = None) -> "torch.Tensor":
    """Logits (N, C[+1], H, W) -> class probabilities (N, C, h, w); multiclass drops the background."""
    import torch  # here, not at module level: reading a store must not cost a torch import
    import torch.nn.functional as F
    if size is not None and tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    if task == "multilabel":
        return torch.sigmoid(logits.float())
    return torch.softmax(logits.float(), dim=1)[:, 1:]


def quantize_tensor(probs: "torch.Tensor") -> "torch.Tensor":
    """Probabilities -> uint8 levels round(255 p)."""
    import torch
    return probs.float().clamp(0, 1).mul_(QUANT).round_().to(torch.uint8)
