"""The high-resolution head (report 001's "2048 head"): predict at ``scale`` x the input size.

Written by hand (smp's heads only upsample bilinearly). The network runs at the input size and its
logits are upsampled with a learned upsampling (a stride-``scale`` transposed conv, which can mix
classes) refined by a 3x3 depthwise conv, added to the plain bilinear upsampling of the same logits.
The refining conv starts at zero, so at initialisation the head *is* bilinear upsampling and training
only has to learn the correction (sharper bone edges) rather than upsampling from scratch.

It works on logits rather than decoder features so that it wraps every architecture the same way
(smp's heads differ per architecture: FPN upsamples x4 inside its head, UNet 3+ has several).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HighResHead(nn.Module):
    """``HighResHead(model, num_classes, scale)``: (N, in, H, W) -> logits (N, C, H*scale, W*scale).

    A deep-supervision list (training mode, finest first) keeps its contract: the final output goes
    through the head to H*scale x W*scale, the auxiliary outputs pass as they are (at their own
    resolution: the loss brings the target down to them).
    """

    def __init__(self, model: nn.Module, num_classes: int, scale: int):
        super().__init__()
        if scale < 2:
            raise ValueError(f"HighResHead needs scale >= 2, got {scale}")
        self.model, self.scale = model, int(scale)
        self.up = nn.ConvTranspose2d(num_classes, num_classes, kernel_size=scale, stride=scale)
        self.refine = nn.Conv2d(num_classes, num_classes, 3, padding=1, groups=num_classes)
        nn.init.zeros_(self.refine.weight)  # output == bilinear at init (see module docstring)
        nn.init.zeros_(self.refine.bias)

    def _upsample(self, logits: torch.Tensor) -> torch.Tensor:
        return F.interpolate(logits, scale_factor=self.scale, mode="bilinear", align_corners=False)

    def head(self, logits: torch.Tensor) -> torch.Tensor:
        return self._upsample(logits) + self.refine(self.up(logits))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        out = self.model(x)
        if isinstance(out, (list, tuple)):
            return [self.head(out[0]), *out[1:]]
        return self.head(out)
