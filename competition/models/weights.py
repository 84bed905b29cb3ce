"""``model.encoder_weights``: which kind a value is (null, a weights name, a local file), a name checked
against the encoder's list, and a local file loaded into the encoder (downloads: ``models.hub``)."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import segmentation_models_pytorch as smp
import timm
import torch
from safetensors.torch import load_file
from torch import nn

from competition.config import ConfigError

_WEIGHT_SUFFIXES = {".pth", ".pt", ".safetensors", ".bin", ".ckpt"}


def weights_kind(w: str | None) -> str | None:
    """None (random init), ``"named"`` (``imagenet``, ``ssl``, ...: downloaded) or ``"file"`` (a local path)."""
    if w is None:
        return None
    p = Path(w).expanduser()
    return "file" if (p.suffix in _WEIGHT_SUFFIXES or "/" in w or os.sep in w or p.exists()) else "named"


def check_named_weights(encoder: str, weights: str) -> str | bool:
    """The ``weights`` argument smp takes for ``encoder``; a name the encoder does not have is a ConfigError."""
    if encoder.startswith("tu-"):
        return True  # timm picks the weights from the name's tag (tu-resnet18.a1_in1k); smp wants a bool
    valid = list(smp.encoders.encoders[encoder]["pretrained_settings"])
    if weights not in valid:
        raise ConfigError(f"model.encoder_weights: {encoder} has no weights {weights!r}; valid: {valid}, "
                          f"null (random init) or a path to a local file")
    return weights


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
