"""``build_model(cfg, num_classes, in_channels)``: any smp architecture, or ours (``unet3plus``), on any
smp encoder or timm ``tu-<name>`` encoder, optionally wrapped by the high-resolution head.

Forward contract (every architecture): (N, in_channels, H, W) -> logits (N, num_classes, H*s, W*s)
with ``s = model.output_scale``. ``num_classes`` is the number of OUTPUT CHANNELS: the caller passes
``C`` for multilabel and ``C + 1`` for multiclass (channel 0 = background). With
``model.deep_supervision`` (unet3plus only) the training-mode forward returns a list of logits, finest
(the final output, at (H*s, W*s)) first, then the auxiliary outputs at their own, coarser resolutions
(the loss brings the target down to them); eval mode returns the final logits tensor only.

Encoder weights: null -> random init; a weights name (``imagenet``, ``ssl``, ...) -> downloaded by
smp/timm through the Hugging Face hub, failing within about a second when offline; a path -> random
init, then the file is loaded into the encoder (see ``load_encoder_weights``).
"""
from __future__ import annotations

import contextlib
import difflib
import inspect
import os
import socket
import threading
import warnings
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

import segmentation_models_pytorch as smp
import timm
import torch
from huggingface_hub import constants
from huggingface_hub.errors import HfHubHTTPError
from safetensors.torch import load_file
from torch import nn

from competition.config import ConfigError, ModelConfig
from competition.models.heads import HighResHead
from competition.models.unet3plus import UNet3Plus
from competition.registry import Registry

__all__ = ["ARCHITECTURES", "build_model", "load_encoder_weights", "HighResHead", "UNet3Plus"]

ARCHITECTURES = Registry("architecture")
# Set by build_model itself; kwargs may not override them (the forward contract depends on them).
_RESERVED = {"encoder_name": "model.encoder", "encoder_weights": "model.encoder_weights",
             "in_channels": "the competition's image.channels", "classes": "the competition's classes",
             "activation": "nothing (models output logits)", "aux_params": "nothing (forward returns logits only)",
             "deep_supervision": "model.deep_supervision"}
_WEIGHT_SUFFIXES = {".pth", ".pt", ".safetensors", ".bin", ".ckpt"}
_REMEDY = ("Put a local weights file on disk and set model.encoder_weights: path/to/weights.pth "
           "(a state_dict of the encoder, .pth/.pt/.safetensors)")


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
    if cfg.decoder_channels is not None:
        raise ConfigError("model.decoder_channels does not apply to unet3plus; set model.kwargs.cat_channels "
                          "(channels per full-scale skip, default 64)")
    allowed = {"cat_channels", "interpolation", "upsample_last"}
    if set(cfg.kwargs) - allowed:
        raise ConfigError(f"model.kwargs for unet3plus: unknown {sorted(set(cfg.kwargs) - allowed)}; "
                          f"valid: {', '.join(sorted(allowed))}")
    return UNet3Plus(cfg.encoder, in_channels, num_classes, cfg.encoder_depth, weights,
                     deep_supervision=cfg.deep_supervision, **cfg.kwargs)


# The architecture list is smp's own, so a new smp release adds architectures without code here.
for _cls in dict.fromkeys(smp.MODEL_ARCHITECTURES_MAPPING.values()):
    ARCHITECTURES.register(_cls.__name__, _smp_builder(_cls), source="smp",
                           own_depth=_cls.__name__ == "DPT",  # its decoder is built for ViT depth 4
                           upsampling_from_depth=_cls.__name__ == "PSPNet")
ARCHITECTURES.register("unet3plus", _unet3plus, source="competition.models.unet3plus", deep_supervision=True)


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
    _check_encoder(cfg.encoder)
    weights, kind = cfg.encoder_weights, _weights_kind(cfg.encoder_weights)
    if kind == "named":
        named = _check_named_weights(cfg.encoder, weights)
        model = _download_guard(weights, lambda: entry.obj(cfg, num_classes, in_channels, named))
    else:
        model = entry.obj(cfg, num_classes, in_channels, None)
    if kind == "file":
        load_encoder_weights(model.encoder, weights)
    if cfg.output_scale > 1:
        model = HighResHead(model, num_classes, cfg.output_scale)
    return model


# --------------------------------------------------------------------------------------------- #
# Encoders and their weights
# --------------------------------------------------------------------------------------------- #
def _check_encoder(name: str) -> None:
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


def _weights_kind(w: str | None) -> str | None:
    if w is None:
        return None
    p = Path(w).expanduser()
    return "file" if (p.suffix in _WEIGHT_SUFFIXES or "/" in w or os.sep in w or p.exists()) else "named"


def _check_named_weights(encoder: str, weights: str):
    if encoder.startswith("tu-"):
        return True  # timm picks the weights from the name's tag (tu-resnet18.a1_in1k); smp wants a bool
    valid = list(smp.encoders.encoders[encoder]["pretrained_settings"])
    if weights not in valid:
        raise ConfigError(f"model.encoder_weights: {encoder} has no weights {weights!r}; valid: {valid}, "
                          f"null (random init) or a path to a local file")
    return weights


def _hub_reachable(timeout: float = 1.0) -> bool:
    """Can we open a TCP connection to the hub (or the HTTPS proxy)? Bounded even if DNS hangs."""
    url = urlparse(os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    ok = []

    def probe():
        with contextlib.suppress(OSError), socket.create_connection((url.hostname, port), timeout=timeout):
            ok.append(True)
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.2)
    return bool(ok)


def _download_guard(weights: str, build):
    """Run ``build`` (which downloads ``weights``); offline, fail in about a second with the remedy.

    The hub retries for ~25 s when the network is down. When HF_HUB_OFFLINE is set, or a 1 s probe
    cannot reach the hub, we put the hub in offline mode for this build: cached weights still load,
    missing ones fail at once.
    """
    hint = ""
    if constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        hint = " (HF_HUB_OFFLINE is set; set HF_HUB_OFFLINE=0 to allow downloads)"
    elif not _hub_reachable():
        hint = f" ({constants.ENDPOINT} could not be reached within 1 s)"
    ctx = mock.patch.object(constants, "HF_HUB_OFFLINE", True) if hint else contextlib.nullcontext()
    try:
        with ctx:
            return build()
    except (OSError, HfHubHTTPError) as e:
        raise ConfigError(f"encoder_weights {weights!r} could not be downloaded (offline?). {_REMEDY}. "
                          f"Cause: {type(e).__name__}: {str(e)[:200]}{hint}") from None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # a truncated file, a pickle of a forbidden type, not a weights file
        raise ConfigError(f"model.encoder_weights: {path} cannot be read as weights ({type(e).__name__}: {e}); "
                          f"expected a state_dict saved with torch.save or safetensors") from None
    # Tolerate checkpoint wrappers: {"state_dict": ...}, {"model": ...} (our own best.pt is one).
    while isinstance(sd, dict) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        inner = next((sd[k] for k in ("state_dict", "model", "model_state_dict", "encoder")
                      if isinstance(sd.get(k), dict)), None)
        if inner is None:
            break
        sd = inner
    if not isinstance(sd, dict):
        raise ConfigError(f"model.encoder_weights: {path} holds a {type(sd).__name__}, not a state_dict")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Load a local state_dict into ``encoder``; returns {"loaded", "missing", "unexpected", "mismatched"}.

    Key prefixes are matched automatically (``encoder.``, ``module.``, ``model.``: a whole-model
    checkpoint, a DDP one, or a plain timm model for a ``tu-`` encoder). A first conv saved for 3
    input channels is adapted to the encoder's (timm's ``adapt_input_conv``: summed for grayscale).
    Missing or unexpected keys are warned about; nothing matching at all is an error.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"model.encoder_weights: file not found: {str(path)!r} (looked at {p.resolve()})")
    sd = _read_state_dict(p)
    own = encoder.state_dict()
    best, best_score = {}, -1
    for strip in ("", "module.", "encoder.", "model.", "backbone.", "module.encoder.", "model.encoder."):
        for add in ("", "model."):
            mapped = {add + k[len(strip):]: v for k, v in sd.items() if k.startswith(strip)}
            score = len(mapped.keys() & own.keys())
            if score > best_score:
                best, best_score = mapped, score
    load, mismatched = {}, []
    for k, v in best.items():
        if k not in own:
            continue
        if (v.shape != own[k].shape and v.ndim == 4 and v.shape[0] == own[k].shape[0]
                and v.shape[2:] == own[k].shape[2:]):
            v = timm.models.adapt_input_conv(own[k].shape[1], v)  # first conv: 3 -> 1 (or n) input channels
        if v.shape == own[k].shape:
            load[k] = v.to(own[k].dtype)
        else:
            mismatched.append(f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}")
    if not load:
        raise ConfigError(f"model.encoder_weights: nothing in {p} matches the encoder; file keys look like "
                          f"{list(sd)[:4]}, the encoder expects {list(own)[:4]}")
    encoder.load_state_dict(load, strict=False)
    report = {"loaded": sorted(load), "mismatched": mismatched,
              "missing": sorted(k for k in own if k not in load and not k.endswith("num_batches_tracked")),
              "unexpected": sorted(k for k in best if k not in own)}
    if report["missing"] or report["unexpected"] or mismatched:
        warnings.warn(f"model.encoder_weights {p}: loaded {len(load)}/{len(own)} tensors; "
                      f"missing {len(report['missing'])} {report['missing'][:5]}, unexpected "
                      f"{len(report['unexpected'])} {report['unexpected'][:5]}, shape mismatch {mismatched[:5]}",
                      stacklevel=2)
    return report
