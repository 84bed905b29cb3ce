"""UNet 3+ (Huang et al. 2020, "UNet 3+: A Full-Scale Connected UNet") on any smp / timm encoder.

Written by hand because neither smp nor timm ship it. What is kept from the paper: full-scale skip
connections (every decoder stage receives every encoder stage at or above its resolution, max-pooled
down, plus every coarser decoder stage, upsampled; each through conv3x3-BN-ReLU to ``cat_channels``,
concatenated and fused by conv3x3-BN-ReLU) and deep supervision (a 3x3 conv head per decoder stage
and on the bottleneck). Left out: the classification-guided
module (it gates whole-image "organ present" decisions; our bone classes are present in most images).

Resolution: smp encoders give features at strides 2..2^depth (stride 1 is the raw image, which has no
learned features), so the finest decoder stage is at stride 2 and the final logits are upsampled x2
bilinearly, as smp's own heads do. A full-resolution stage of ``depth * cat_channels`` channels would
cost more memory than the rest of the network at 2048 px.

Forward contract: eval mode -> logits (N, classes, H, W). Training with ``deep_supervision=True`` ->
a list of logits tensors, one per feature level (``depth`` of them for CNN encoders; transformer-style
timm encoders have no stride-2 level), finest first: the final output at (H, W), then each auxiliary
output at its own stage's resolution (stride 4, 8, ...: not upsampled). The loss brings the target
down to each (``competition.losses.SegLoss``, nearest, as nnU-Net does): upsampling four auxiliary
outputs to (H, W) and scoring them there made a 128 px ResNet-10-T training step 1.3x slower on the
CPU (``benchmarks/bench_step.py``), and costs four full-resolution logit tensors of memory at 2048 px.
"""
from __future__ import annotations

from dataclasses import dataclass

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


@dataclass(frozen=True)
class Decoder:
    """The decoder's options: ``model.kwargs`` of a ``unet3plus`` experiment (its fields are the valid keys).

    Args:
        cat_channels: channels of each resampled input of a decoder stage (paper: 64); a stage fuses
            ``n_levels * cat_channels`` channels.
        interpolation: ``bilinear`` (paper) or ``nearest`` (deterministic backward on CUDA).
        upsample_last: a coarser input goes through its conv3x3-BN-ReLU at its own resolution and is
            upsampled afterwards (the paper upsamples first). Same shapes and parameters; a coarse
            branch conv costs 4**(levels apart) less, and training steps measured 1.5x faster at
            128 px (ResNet-10-T encoder, 32 channels per branch, batch 8, CPU).
    """

    cat_channels: int = 64
    interpolation: str = "bilinear"
    upsample_last: bool = False

    def __post_init__(self):
        if self.interpolation not in ("bilinear", "nearest"):
            raise ValueError(f"unet3plus interpolation must be 'bilinear' or 'nearest', got {self.interpolation!r}")


class _DecoderStage(nn.Module):
    """One decoder stage at level ``level``: resamples all ``n_levels`` inputs to its size, fuses them."""

    def __init__(self, level: int, in_channels: list[int], decoder: Decoder):
        super().__init__()
        self.level, self.interpolation, self.upsample_last = level, decoder.interpolation, decoder.upsample_last
        width = decoder.cat_channels
        self.branches = nn.ModuleList(conv_bn_relu(c, width) for c in in_channels)
        self.fuse = conv_bn_relu(width * len(in_channels), width * len(in_channels))

    def forward(self, inputs: list[torch.Tensor], levels: list[int]) -> torch.Tensor:
        """``inputs[i]`` lives at ``levels[i]`` (stride 2**level); finer ones are pooled, coarser upsampled."""
        size = inputs[levels.index(self.level)].shape[-2:]  # the encoder feature at this stage's level
        parts = []
        for x, lvl, branch in zip(inputs, levels, self.branches):
            if lvl < self.level:
                r = 2 ** (self.level - lvl)
                # ceil_mode matches the ceil(n/2) sizes of padded stride-2 convs on odd inputs.
                x = F.max_pool2d(x, r, r, ceil_mode=True)
                if x.shape[-2:] != size:
                    x = F.adaptive_max_pool2d(x, size)
            elif not self.upsample_last:
                x = _resize(x, size, self.interpolation)
            parts.append(_resize(branch(x), size, self.interpolation))  # a no-op unless upsample_last
        return self.fuse(torch.cat(parts, 1))


def _resize(x: torch.Tensor, size, mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode=mode, align_corners=False if mode == "bilinear" else None)


class UNet3Plus(nn.Module):
    """UNet 3+ decoder on ``smp.encoders.get_encoder(encoder_name, in_channels, depth)``.

    Args:
        decoder: the decoder's options (:class:`Decoder`; None: the paper's).
        deep_supervision: training-mode forward returns one output per decoder stage, the auxiliary
            ones at their own resolution (see module doc).
        encoder_weights: passed to smp (None = random init); local files are loaded by ``build_model``.
    """

    def __init__(self, encoder_name: str = "resnet18", in_channels: int = 3, classes: int = 1,
                 encoder_depth: int = 5, encoder_weights: str | bool | None = None, decoder: Decoder | None = None,
                 deep_supervision: bool = False):
        super().__init__()
        decoder = decoder or Decoder()
        self.encoder = smp.encoders.get_encoder(encoder_name, in_channels=in_channels, depth=encoder_depth,
                                                weights=encoder_weights)
        self.interpolation, self.deep_supervision = decoder.interpolation, deep_supervision
        out_ch = list(self.encoder.out_channels)
        # Feature i is at stride 2**i; index 0 is the raw image and transformer-style timm encoders give
        # a zero-channel placeholder at stride 2: neither carries learned features.
        self.levels = [i for i in range(1, len(out_ch)) if out_ch[i] > 0]
        if len(self.levels) < 2:
            raise ValueError(f"unet3plus needs at least 2 feature levels; encoder {encoder_name!r} at depth "
                             f"{encoder_depth} gives {self.levels}")
        n = len(self.levels)
        up = decoder.cat_channels * n
        # Stage at level L receives encoder features at levels <= L and decoder outputs at levels > L
        # (the deepest "decoder output" is the bottleneck encoder feature itself).
        self.stages = nn.ModuleList()
        for k in range(n - 2, -1, -1):
            in_ch = [out_ch[lvl] for lvl in self.levels[:k + 1]] + [up] * (n - 2 - k) + [out_ch[self.levels[-1]]]
            self.stages.append(_DecoderStage(self.levels[k], in_ch, decoder))
        # Heads finest first: one per decoder stage, then the bottleneck. Without deep supervision only
        # the final head exists: parameters no loss reaches would break DDP (unused parameters).
        self.heads = nn.ModuleList([nn.Conv2d(up, classes, 3, padding=1)])
        if deep_supervision:
            self.heads.extend(nn.Conv2d(up, classes, 3, padding=1) for _ in range(n - 2))
            self.heads.append(nn.Conv2d(out_ch[self.levels[-1]], classes, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        size = x.shape[-2:]
        feats = self.encoder(x)
        enc = [feats[lvl] for lvl in self.levels]
        decoded = [enc[-1]]  # coarsest first while building
        n = len(self.levels)
        for j, stage in enumerate(self.stages):
            k = n - 2 - j  # this stage's position in self.levels
            inputs = enc[:k + 1] + decoded[::-1]
            levels = self.levels[:k + 1] + self.levels[k + 1:]
            decoded.append(stage(inputs, levels))
        finest_first = decoded[::-1]
        final = _resize(self.heads[0](finest_first[0]), size, "bilinear")
        if not (self.training and self.deep_supervision):
            return final
        return [final] + [head(d) for head, d in zip(self.heads[1:], finest_first[1:])]
