"""The architecture registry and ``build_model``: every ``model.*`` key checked, then the model built.

smp's architectures are registered from smp's own list (a new smp release adds architectures without
code here), ours (``unet3plus``) by hand. A builder is called as ``builder(cfg, out_channels,
in_channels, weights)`` with ``weights`` as smp takes it (None, a weights name, or True for timm).
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect

import segmentation_models_pytorch as smp
import timm
from torch import nn

from competition.config import ConfigError, ModelConfig
from competition.models.heads import HighResHead
from competition.models.hub import download_guard
from competition.models.unet3plus import Decoder, UNet3Plus
from competition.models.weights import check_named_weights, load_encoder_weights, weights_kind
from competition.registry import Registry

ARCHITECTURES = Registry("architecture")
# Set by build_model itself; kwargs may not override them (the forward contract depends on them).
_RESERVED = {"encoder_name": "model.encoder", "encoder_weights": "model.encoder_weights",
             "in_channels": "the competition's image.channels", "classes": "the competition's classes",
             "activation": "nothing (models output logits)", "aux_params": "nothing (forward returns logits only)",
             "deep_supervision": "model.deep_supervision"}


def _smp_builder(cls):
    def build(cfg: ModelConfig, num_classes: int, in_channels: int, weights):
        info = ARCHITECTURES.get(cls.__name__).info
        params = inspect.signature(cls.__init__).parameters
        kw = {}
        if not info.get("own_depth"):
            kw["encoder_depth"] = cfg.encoder_depth
        default_dc = params["decoder_channels"].default if "decoder_channels" in params else None
        if cfg.decoder_channels is not None:
            if not isinstance(default_dc, (list, tuple)):
                raise ConfigError(f"model.decoder_channels (a list) does not apply to {cls.__name__}; "
                                  f"set its own decoder options in model.kwargs (it accepts: {_arch_params(cls)})")
            kw["decoder_channels"] = list(cfg.decoder_channels)
        elif isinstance(default_dc, (list, tuple)) and cfg.encoder_depth < len(default_dc):
            # U-Net-style decoders need one channel count per stage; keep smp's defaults, shortened.
            kw["decoder_channels"] = list(default_dc)[:cfg.encoder_depth]
        if info.get("upsampling_from_depth"):
            kw["upsampling"] = 2 ** cfg.encoder_depth  # PSPNet assumes depth 3 (x8) otherwise
        unknown = sorted(set(cfg.kwargs) - set(params))
        if unknown and not cfg.encoder.startswith("tu-"):
            # smp silently drops unknown kwargs for its own encoders (only timm encoders take extras).
            raise ConfigError(f"model.kwargs: {cls.__name__} does not take {unknown}; it accepts: {_arch_params(cls)}")
        kw.update(cfg.kwargs)
        try:
            return cls(encoder_name=cfg.encoder, encoder_weights=weights, in_channels=in_channels,
                       classes=num_classes, **kw)
        except TypeError as e:
            raise ConfigError(f"model.kwargs for {cls.__name__}: {e}; it accepts: {_arch_params(cls)} "
                              f"(other keys go to the encoder)") from None
    return build


def _arch_params(cls) -> str:
    names = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")]
    return ", ".join(p for p in names if p not in _RESERVED)


def _unet3plus(cfg: ModelConfig, num_classes: int, in_channels: int, weights) -> UNet3Plus:
    # model.kwargs are the decoder's options: its dataclass fields are the valid keys and their defaults.
    fields = dataclasses.fields(Decoder)
    if cfg.decoder_channels is not None:
        raise ConfigError("model.decoder_channels does not apply to unet3plus; set model.kwargs.cat_channels "
                          "(channels per full-scale skip, default 64)")
    unknown = sorted(set(cfg.kwargs) - {f.name for f in fields})
    if unknown:
        raise ConfigError(f"model.kwargs for unet3plus: unknown {unknown}; valid: "
                          + ", ".join(f"{f.name} (default {f.default!r})" for f in fields))
    return UNet3Plus(cfg.encoder, in_channels, num_classes, cfg.encoder_depth, weights,
                     decoder=Decoder(**cfg.kwargs), deep_supervision=cfg.deep_supervision)


for _cls in dict.fromkeys(smp.MODEL_ARCHITECTURES_MAPPING.values()):
    ARCHITECTURES.register(_cls.__name__, _smp_builder(_cls), source="smp",
                           own_depth=_cls.__name__ == "DPT",  # its decoder is built for ViT depth 4
                           upsampling_from_depth=_cls.__name__ == "PSPNet")
ARCHITECTURES.register("unet3plus", _unet3plus, source="competition.models.unet3plus", deep_supervision=True)


def check_encoder(name: str) -> None:
    """A ConfigError naming close matches unless ``name`` is an smp encoder or ``tu-<timm model>``."""
    if name.startswith("tu-"):
        if not timm.is_model(name[3:]):
            close = difflib.get_close_matches(name[3:], timm.list_models(), n=5)
            raise ConfigError(f"model.encoder: unknown timm model {name[3:]!r} (from {name!r}); close: {close}. "
                              f"List timm models with: python -c \"import timm; print(timm.list_models('*resnet*'))\"")
        return
    names = smp.encoders.get_encoder_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5)
        raise ConfigError(f"model.encoder: unknown encoder {name!r}; close smp encoders: {close}. List them with: "
                          f"python -c \"import segmentation_models_pytorch as smp; "
                          f"print(smp.encoders.get_encoder_names())\", or use any timm model as 'tu-<name>'")


def build_model(cfg: ModelConfig, num_classes: int, in_channels: int) -> nn.Module:
    """The model for ``cfg``; ``num_classes`` = output channels (C, or C + 1 for multiclass)."""
    try:
        entry = ARCHITECTURES.get(cfg.arch)
    except KeyError as e:
        raise ConfigError(f"model.arch: {e.args[0]}") from None
    if cfg.deep_supervision and not entry.info.get("deep_supervision"):
        ds = [n for n in ARCHITECTURES.names() if ARCHITECTURES.get(n).info.get("deep_supervision")]
        raise ConfigError(f"model.deep_supervision is supported by {', '.join(ds)} only, not {entry.name}")
    bad = sorted(set(cfg.kwargs) & set(_RESERVED))
    if bad:
        raise ConfigError(f"model.kwargs may not set {bad}: "
                          + "; ".join(f"{k} comes from {_RESERVED[k]}" for k in bad))
    check_encoder(cfg.encoder)
    weights, kind = cfg.encoder_weights, weights_kind(cfg.encoder_weights)
    if kind == "named":
        named = check_named_weights(cfg.encoder, weights)
        model = download_guard(cfg.encoder, weights, lambda: entry.obj(cfg, num_classes, in_channels, named))
    else:
        model = entry.obj(cfg, num_classes, in_channels, None)
    if kind == "file":
        load_encoder_weights(model.encoder, weights)
    if cfg.output_scale > 1:
        model = HighResHead(model, num_classes, cfg.output_scale)
    return model
