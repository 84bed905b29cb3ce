"""``nnunet``: nnU-Net's 2D U-Net (Isensee et al. 2021), built by MIC-DKFZ's own
``dynamic-network-architectures`` (``PlainConvUNet``, or ``ResidualEncoderUNet`` with
``model.kwargs.variant: resenc``) and planned from the network input size the way nnU-Net plans a 2D net.

The plan (:func:`plan`, from ``data.input_size``): stride-2 pooling until the bottleneck's smaller edge
would drop below ``min_edge`` (4) px, so ``n_stages = 1 + floor(log2(min edge / 4))``, the first stage
at stride 1; ``base_features * 2**i`` (32, 64, ...) features per stage, capped at ``max_features``
(512); 3x3 kernels everywhere; conv bias, instance norm (eps 1e-5, affine) and LeakyReLU (0.01); two
convs per stage in the encoder and decoder (``resenc``: nnU-Net ResEnc's 1, 3, 4, 6, 6, ... residual
blocks per encoder stage and one conv per decoder stage); He initialisation (nnU-Net's
``InitWeights_He(1e-2)``). Random init only: nnU-Net trains from scratch, so ``model.encoder*`` and
``model.decoder_channels`` are refused.

Deep supervision (``model.deep_supervision``): one output per decoder stage, finest first (strides 1,
2, 4, ...), as the package returns them. Inputs whose edges are not a multiple of the total stride
(``2**(n_stages - 1)``; e.g. a TTA scale) are zero-padded bottom/right and the outputs cropped back.

The package pins ``timm<1.0.23`` but its U-Nets import only torch and numpy, so it is installed with
``pip install --no-deps`` (``make venv`` does; the ``nnunet`` extra of pyproject.toml).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from competition.config import ConfigError

PACKAGE = "dynamic-network-architectures"
INSTALL = f"pip install --no-deps '{PACKAGE}>=0.4,<0.5' (make venv installs it)"
# nnU-Net ResEnc's residual blocks per encoder stage (nnUNetPlannerResEncM; deeper stages repeat 6).
RESENC_BLOCKS = (1, 3, 4, 6)


@dataclass(frozen=True)
class Options:
    """``model.kwargs`` of an ``nnunet`` experiment (its fields are the valid keys).

    Args:
        variant: ``plain`` (PlainConvUNet, nnU-Net's default) or ``resenc`` (ResidualEncoderUNet).
        base_features: features of the first stage; doubled per stage (nnU-Net: 32).
        max_features: the cap on features per stage (nnU-Net 2D: 512).
        min_edge: the bottleneck feature map's smallest edge in px (nnU-Net: 4).
    """

    variant: str = "plain"
    base_features: int = 32
    max_features: int = 512
    min_edge: int = 4

    def __post_init__(self):
        if self.variant not in ("plain", "resenc"):
            raise ConfigError(f"model.kwargs.variant for nnunet: 'plain' or 'resenc', got {self.variant!r}")
        for name in ("base_features", "max_features", "min_edge"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.kwargs.{name} for nnunet: a positive integer, got {value!r}")


@dataclass(frozen=True)
class Plan:
    """What :func:`plan` decided for one input size (recorded in the dry run's model line)."""

    input_size: tuple[int, int]
    variant: str
    features: tuple[int, ...]
    strides: tuple[int, ...]
    encoder_blocks: tuple[int, ...]
    decoder_convs: tuple[int, ...]

    @property
    def n_stages(self) -> int:
        return len(self.features)

    @property
    def total_stride(self) -> int:
        return math.prod(self.strides)

    def describe(self) -> str:
        h, w = self.input_size
        s = self.total_stride
        net = "PlainConvUNet" if self.variant == "plain" else "ResidualEncoderUNet"
        enc = ("convs" if self.variant == "plain" else "residual blocks") + " per encoder stage"
        return (f"nnU-Net 2D plan for {h}x{w}: {net}, {self.n_stages} stages, features "
                f"{'-'.join(map(str, self.features))}, strides {'-'.join(map(str, self.strides))}, 3x3 kernels, "
                f"{'-'.join(map(str, self.encoder_blocks))} {enc}, {'-'.join(map(str, self.decoder_convs))} convs "
                f"per decoder stage, instance norm + LeakyReLU; bottleneck {math.ceil(h / s)}x{math.ceil(w / s)}")


def plan(input_size: tuple[int, int], options: Options = Options()) -> Plan:
    """nnU-Net's 2D topology for a network input of ``input_size`` (H, W) px (module docstring)."""
    h, w = input_size
    edge = min(h, w)
    if edge < 2 * options.min_edge:
        raise ConfigError(f"data.input_size {h}x{w}: nnunet pools until the bottleneck would drop below "
                          f"{options.min_edge} px and needs an input of at least {2 * options.min_edge} px")
    n_pool = int(math.floor(math.log2(edge / options.min_edge)))
    n = n_pool + 1
    features = tuple(min(options.base_features * 2 ** i, options.max_features) for i in range(n))
    if options.variant == "plain":
        blocks, decoder = (2,) * n, (2,) * (n - 1)
    else:
        blocks = tuple(RESENC_BLOCKS[min(i, len(RESENC_BLOCKS) - 1)] for i in range(n))
        decoder = (1,) * (n - 1)
    return Plan((h, w), options.variant, features, (1,) + (2,) * n_pool, blocks, decoder)


def options_from(kwargs: dict) -> Options:
    valid = [f.name for f in fields(Options)]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ConfigError(f"model.kwargs for nnunet: unknown {unknown}; valid: "
                          + ", ".join(f"{k} (default {v!r})" for k, v in asdict(Options()).items()))
    return Options(**kwargs)


def _unet_classes():
    try:
        from dynamic_network_architectures.architectures.unet import (  # noqa: PLC0415 (optional: nnunet extra)
            PlainConvUNet,
            ResidualEncoderUNet,
        )
    except ModuleNotFoundError as e:
        if e.name is None or not e.name.startswith("dynamic_network_architectures"):
            raise
        raise ConfigError(f"model.arch: nnunet needs the package {PACKAGE} (MIC-DKFZ's nnU-Net networks), which "
                          f"is not installed: {INSTALL}") from None
    return PlainConvUNet, ResidualEncoderUNet


class NNUNet(nn.Module):
    """nnU-Net's 2D U-Net for ``plan`` (the network is ``self.net``, the package's own module)."""

    def __init__(self, p: Plan, in_channels: int, classes: int, deep_supervision: bool = False):
        super().__init__()
        plain, resenc = _unet_classes()
        self.plan, self.deep_supervision = p, deep_supervision
        common = dict(input_channels=in_channels, n_stages=p.n_stages, features_per_stage=list(p.features),
                      conv_op=nn.Conv2d, kernel_sizes=[[3, 3]] * p.n_stages,
                      strides=[[s, s] for s in p.strides], num_classes=classes,
                      n_conv_per_stage_decoder=list(p.decoder_convs), conv_bias=True, norm_op=nn.InstanceNorm2d,
                      norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None, dropout_op_kwargs=None,
                      nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=deep_supervision)
        if p.variant == "plain":
            self.net = plain(n_conv_per_stage=list(p.encoder_blocks), **common)
        else:
            self.net = resenc(n_blocks_per_stage=list(p.encoder_blocks), **common)
        self.net.apply(self.net.initialize)  # nnU-Net's He init (get_network_from_plans does the same)
        if not deep_supervision:
            # The package always builds every stage's head; without deep supervision the auxiliary ones
            # would get no gradient (DDP refuses parameters no loss reaches). The decoder then uses [-1].
            self.net.decoder.seg_layers = nn.ModuleList([self.net.decoder.seg_layers[-1]])

    def summary(self) -> str:
        return self.plan.describe()

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        h, w = x.shape[-2:]
        s = self.plan.total_stride
        ph, pw = -h % s, -w % s
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        ds = self.training and self.deep_supervision
        # Outside training only the final head is needed: the decoder then skips the auxiliary ones
        # (nnU-Net's set_deep_supervision_enabled(False) for inference).
        self.net.decoder.deep_supervision = ds
        out = self.net(x)
        if not ds:
            return out[..., :h, :w]
        return [o[..., :math.ceil(h / 2 ** k), :math.ceil(w / 2 ** k)] for k, o in enumerate(out)]


def build(options: Options, input_size: tuple[int, int] | None, in_channels: int, classes: int,
          deep_supervision: bool) -> NNUNet:
    if input_size is None:
        raise ConfigError("model.arch nnunet plans its network from data.input_size, and none was given to "
                          "build_model (pass input_size=exp.data.input_hw)")
    return NNUNet(plan(tuple(input_size), options), in_channels, classes, deep_supervision)
