"""``hrnetv2``: the HRNetV2 segmentation head (Wang et al. 2020, "Deep High-Resolution Representation
Learning for Visual Recognition", section 3.3) on timm's HRNet encoders (``tu-hrnet_w18_small``,
``tu-hrnet_w32``, ``tu-hrnet_w48``, ...).

Written by hand because smp has no HRNet decoder (its ``tu-hrnet_*`` encoders only feed U-Net-style
decoders, which throw away HRNet's point: features kept at high resolution throughout). The encoder is
timm's ``features_only`` HRNet with ``feature_location=''``: the four branches of the last stage
(strides 4, 8, 16, 32) as the network computes them, not the classification head's "incre" features.
The head, as in the authors' HRNet-Semantic-Segmentation code: every branch bilinearly upsampled to
the highest-resolution branch (stride 4), concatenated (48 + 96 + 192 + 384 = 720 channels for W48), a
1x1 conv + BN + ReLU mixing them (``head_channels``, default: the concatenation's width), a 1x1 conv to
the classes, and the logits bilinearly upsampled to the input size. An input whose edges are not
multiples of 32 is zero-padded bottom/right and the logits cropped back.

``model.encoder_weights`` as for every ``tu-`` encoder (null, ``imagenet`` through the Hugging Face
hub, or a local file loaded into ``self.encoder``); ``model.encoder_depth`` and
``model.decoder_channels`` do not apply. No deep supervision.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import timm
import torch
import torch.nn.functional as F
from torch import nn

from competition.config import ConfigError


@dataclass(frozen=True)
class Options:
    """``model.kwargs`` of an ``hrnetv2`` experiment.

    Args:
        head_channels: width of the 1x1 conv + BN + ReLU that mixes the concatenated branches
            (null: the concatenation's own width, as the authors' code).
    """

    head_channels: int | None = None

    def __post_init__(self):
        hc = self.head_channels
        if hc is not None and (not isinstance(hc, int) or isinstance(hc, bool) or hc < 1):
            raise ConfigError(f"model.kwargs.head_channels for hrnetv2: a positive integer or null, got {hc!r}")


def options_from(kwargs: dict) -> Options:
    unknown = sorted(set(kwargs) - {f.name for f in fields(Options)})
    if unknown:
        raise ConfigError(f"model.kwargs for hrnetv2: unknown {unknown}; valid: "
                          + ", ".join(f"{k} (default {v!r})" for k, v in asdict(Options()).items()))
    return Options(**kwargs)


def check_encoder(encoder: str) -> None:
    """hrnetv2 takes a timm HRNet (``tu-hrnet_*``); anything else is a ConfigError naming model.encoder."""
    if not (encoder.startswith("tu-hrnet") and timm.is_model(encoder[3:])):
        hrnets = ", ".join(f"tu-{n}" for n in timm.list_models("hrnet*"))
        raise ConfigError(f"model.encoder: hrnetv2 takes a timm HRNet encoder ({hrnets}), got {encoder!r}")


class HRNetV2(nn.Module):
    """(N, in_channels, H, W) -> logits (N, classes, H, W); ``pretrained``: timm's weights for the tag."""

    def __init__(self, encoder: str = "tu-hrnet_w18_small", in_channels: int = 3, classes: int = 1,
                 pretrained: bool = False, options: Options = Options()):
        super().__init__()
        self.encoder = timm.create_model(encoder[3:], features_only=True, feature_location="",
                                         out_indices=(1, 2, 3, 4), in_chans=in_channels, pretrained=pretrained)
        self.branch_channels = list(self.encoder.feature_info.channels())
        self.strides = list(self.encoder.feature_info.reduction())
        width = sum(self.branch_channels)
        head = options.head_channels or width
        self.head = nn.Sequential(nn.Conv2d(width, head, 1, bias=False), nn.BatchNorm2d(head), nn.ReLU(inplace=True),
                                  nn.Conv2d(head, classes, 1))
        self.name = encoder

    def summary(self) -> str:
        return (f"HRNetV2 head on {self.name}: branches {'+'.join(map(str, self.branch_channels))} at strides "
                f"{'-'.join(map(str, self.strides))}, concatenated at stride {self.strides[0]} "
                f"({sum(self.branch_channels)} channels), 1x1 conv-BN-ReLU ({self.head[0].out_channels}), 1x1 conv "
                f"to classes, bilinear x{self.strides[0]}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        s = self.strides[-1]
        ph, pw = -h % s, -w % s
        if ph or pw:  # HRNet's fuse layers upsample by exact powers of 2: pad to the coarsest stride, crop back
            x = F.pad(x, (0, pw, 0, ph))
        feats = self.encoder(x)
        size = feats[0].shape[-2:]
        up = [feats[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats[1:]]
        logits = self.head(torch.cat(up, 1))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)[..., :h, :w]
