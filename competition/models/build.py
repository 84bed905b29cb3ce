"""The architecture registry and ``build_model``: every ``model.*`` key checked, then the model built.

smp's architectures are registered from smp's own list (a new smp release adds architectures without
code here), ours (``unet3plus``, ``nnunet``, ``hrnetv2``) by hand. A builder is called as
``builder(cfg, out_channels, in_channels, weights, input_size)`` with ``weights`` as smp takes it (None,
a weights name, or True for timm) and ``input_size`` the network input (H, W) (``nnunet`` plans from
it; None where the caller has no experiment). Any other ``model.arch`` is a plug-in
(:mod:`competition.models.plugin`): an import path ``package.module:factory`` or an entry point.

Registry info: ``deep_supervision`` (the architecture can return auxiliary outputs), ``ignores`` (the
``model.*`` keys that do not apply: a non-default value is refused, naming the key, so a config never
says something the model does not do), ``check_encoder`` (how ``model.encoder`` is checked).
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Any

import segmentation_models_pytorch as smp
import timm
from torch import nn

from competition.config import ConfigError, ModelConfig
from competition.models import hrnet, nnunet, plugin
from competition.models.heads import HighResHead
from competition.models.hub import download_guard
from competition.models.unet3plus import Decoder, UNet3Plus
from competition.models.weights import check_named_weights, load_encoder_weights, weights_kind
from competition.registry import Entry, Registry

ARCHITECTURES = Registry("architecture")
# Set by build_model itself; kwargs may not override them (the forward contract depends on them).
_RESERVED = {"encoder_name": "model.encoder", "encoder_weights": "model.encoder_weights",
             "in_channels": "the competition's image.channels", "classes": "the competition's classes",
             "activation": "nothing (models output logits)", "aux_params": "nothing (forward returns logits only)",
             "deep_supervision": "model.deep_supervision"}
# The keys of an smp-style encoder-decoder; architectures without one refuse non-default values.
ENCODER_KEYS = ("encoder", "encoder_weights", "encoder_depth", "decoder_channels")
# A plug-in's factory gets these from the competition, never from model.kwargs.
_PLUGIN_RESERVED = {"in_channels": "the competition's image.channels", "classes": "the competition's classes"}


def _smp_builder(cls):
    def build(cfg: ModelConfig, num_classes: int, in_channels: int, weights, input_size=None):
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


def _unet3plus(cfg: ModelConfig, num_classes: int, in_channels: int, weights, input_size=None) -> UNet3Plus:
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


def _nnunet(cfg: ModelConfig, num_classes: int, in_channels: int, weights, input_size=None) -> nn.Module:
    return nnunet.build(nnunet.options_from(cfg.kwargs), input_size, in_channels, num_classes, cfg.deep_supervision)


def _hrnetv2(cfg: ModelConfig, num_classes: int, in_channels: int, weights, input_size=None) -> nn.Module:
    return hrnet.HRNetV2(cfg.encoder, in_channels, num_classes, bool(weights), hrnet.options_from(cfg.kwargs))


ARCHITECTURES.register("nnunet", _nnunet, source="competition.models.nnunet", deep_supervision=True,
                       ignores=ENCODER_KEYS, why="nnU-Net's 2D U-Net is planned from data.input_size and trained "
                                                 "from scratch (model.init_from starts it from a trained run); "
                                                 "its options are model.kwargs: variant, base_features, "
                                                 "max_features, min_edge")
ARCHITECTURES.register("hrnetv2", _hrnetv2, source="competition.models.hrnet", ignores=ENCODER_KEYS[2:],
                       check_encoder=hrnet.check_encoder,
                       why="the HRNetV2 head uses all four branches of the HRNet encoder; set "
                           "model.kwargs.head_channels for its width")


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


def resolve_arch(arch: str) -> Entry:
    """The registry entry for ``model.arch``: a built-in name, else a plug-in (an import path or an entry
    point), else a ConfigError listing the valid names."""
    if arch in ARCHITECTURES:
        return ARCHITECTURES.get(arch)
    found = plugin.resolve(arch, ARCHITECTURES.names())

    def build(cfg: ModelConfig, num_classes: int, in_channels: int, weights, input_size=None) -> nn.Module:
        return plugin.build(found, in_channels, num_classes, cfg.kwargs, cfg.deep_supervision)
    return Entry(arch, build, {"source": found.target, "plugin": found.kind, "deep_supervision": True,
                               "ignores": ENCODER_KEYS, "reserved": _PLUGIN_RESERVED,
                               "why": f"{arch} is a plug-in: options go in model.kwargs"})


def _refuse_ignored(cfg: ModelConfig, entry: Entry) -> None:
    for key in entry.info.get("ignores", ()):
        default: Any = ModelConfig.model_fields[key].default
        if getattr(cfg, key) != default:
            raise ConfigError(f"model.{key} does not apply to {entry.name} ({entry.info['why']}); remove it "
                              f"(default: {default!r})")


def check_model(cfg: ModelConfig) -> Entry:
    """Every ``model.*`` key checked against the architecture, without building anything; -> its entry."""
    entry = resolve_arch(cfg.arch)
    if cfg.deep_supervision and not entry.info.get("deep_supervision"):
        ds = [n for n in ARCHITECTURES.names() if ARCHITECTURES.get(n).info.get("deep_supervision")]
        raise ConfigError(f"model.deep_supervision is supported by {', '.join(ds)} and plug-ins only, "
                          f"not {entry.name}")
    reserved = entry.info.get("reserved", _RESERVED)
    bad = sorted(set(cfg.kwargs) & set(reserved))
    if bad:
        raise ConfigError(f"model.kwargs may not set {bad}: "
                          + "; ".join(f"{k} comes from {reserved[k]}" for k in bad))
    _refuse_ignored(cfg, entry)
    if "encoder" not in entry.info.get("ignores", ()):
        entry.info.get("check_encoder", check_encoder)(cfg.encoder)
    return entry


def uses_encoder(cfg: ModelConfig) -> bool:
    """Does ``model.encoder`` mean anything for this architecture (False: nnunet, plug-ins)?"""
    return "encoder" not in check_model(cfg).info.get("ignores", ())


def build_model(cfg: ModelConfig, num_classes: int, in_channels: int,
                input_size: tuple[int, int] | None = None) -> nn.Module:
    """The model for ``cfg``; ``num_classes`` = output channels (C, or C + 1 for multiclass);
    ``input_size``: the network input (H, W), ``exp.data.input_hw`` (``nnunet`` plans from it)."""
    entry = check_model(cfg)
    weights, kind = cfg.encoder_weights, weights_kind(cfg.encoder_weights)
    if kind == "named":
        named = check_named_weights(cfg.encoder, weights)
        model = download_guard(cfg.encoder, weights,
                               lambda: entry.obj(cfg, num_classes, in_channels, named, input_size))
    else:
        model = entry.obj(cfg, num_classes, in_channels, None, input_size)
    if kind == "file":
        load_encoder_weights(model.encoder, weights)
    if cfg.output_scale > 1:
        model = HighResHead(model, num_classes, cfg.output_scale)
    return model


def model_summary(model: nn.Module) -> str | None:
    """What an architecture of ours or a plug-in says about itself (nnunet: its plan); None for smp's."""
    inner = model.model if isinstance(model, HighResHead) else model
    summary = getattr(inner, "summary", None)
    return summary() if callable(summary) else None
