"""Named encoder weights (``imagenet``, ...) come from the Hugging Face hub, fetched by smp (its
``smp-hub/*`` repos) or timm (``tu-`` encoders). ``download_guard`` builds the model where they can be
had: the hub is reachable, or they are already in the local cache. Otherwise it fails in about a
second with the remedy (a local weights file), where the hub alone would retry for ~25 s.

``HF_HUB_OFFLINE=1`` is the user's to set (the hub reads it at import): it is honoured, so cached
weights load and missing ones fail at once, and nothing here sets it.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
from urllib.parse import urlparse

import segmentation_models_pytorch as smp
import timm
from huggingface_hub import constants, is_offline_mode, try_to_load_from_cache
from huggingface_hub.errors import HfHubHTTPError

from competition.config import ConfigError

REMEDY = ("Put a local weights file on disk and set model.encoder_weights: path/to/weights.pth "
          "(a state_dict of the encoder, .pth/.pt/.safetensors)")


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


def _hub_files(encoder: str, weights: str) -> list[tuple[str, str | None, list[str]]] | None:
    """What building ``encoder`` with ``weights`` fetches from the hub: (repo, revision, files); a file
    list is satisfied by any one of its files. None: the weights do not come from the hub."""
    if not encoder.startswith("tu-"):
        # smp's get_encoder downloads config.json, then model.safetensors, at a pinned commit.
        s = smp.encoders.encoders[encoder]["pretrained_settings"][weights]
        return [(s["repo_id"], s["revision"], ["config.json"]), (s["repo_id"], s["revision"], ["model.safetensors"])]
    try:
        cfg = timm.models.get_pretrained_cfg(encoder[3:])
    except RuntimeError:  # an unknown tag: timm's own error, at build time, says so
        return None
    if cfg is None or not cfg.hf_hub_id:
        return None  # weights from a plain URL (torch.hub's cache), or none: timm's business
    repo, _, revision = cfg.hf_hub_id.partition("@")
    name = cfg.hf_hub_filename or "pytorch_model.bin"
    # timm asks for the safetensors twin of a .bin first and falls back to the .bin (load_state_dict_from_hf).
    twin = {"pytorch_model.bin": "model.safetensors", "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}
    names = [twin.get(name, name[:-4] + ".safetensors"), name] if name.endswith(".bin") else [name]
    return [(repo, revision or None, names)]


def _cached(encoder: str, weights: str) -> bool:
    """Are the files the build fetches all in the local hub cache (so it needs no network)?"""
    files = _hub_files(encoder, weights)
    if files is None:
        return True  # nothing of the hub's to wait for
    return all(any(isinstance(try_to_load_from_cache(repo, f, revision=rev), str) for f in names)
               for repo, rev, names in files)


def download_guard(encoder: str, weights: str, build):
    """Run ``build`` (which fetches ``weights`` for ``encoder``) where the weights can be had; otherwise
    a ConfigError with the remedy, in about a second. A failed download is a ConfigError too."""
    hint = ""
    if is_offline_mode():
        hint = " (HF_HUB_OFFLINE is set; unset it or set HF_HUB_OFFLINE=0 to allow downloads)"
    elif not _hub_reachable():
        hint = f" ({constants.ENDPOINT} could not be reached within 1 s)"
    head = f"encoder_weights {weights!r} could not be downloaded (offline?). {REMEDY}."
    if hint and not _cached(encoder, weights):
        raise ConfigError(f"{head} Cause: not in the Hugging Face cache at {constants.HF_HUB_CACHE}{hint}")
    try:
        return build()
    except (OSError, HfHubHTTPError) as e:
        raise ConfigError(f"{head} Cause: {type(e).__name__}: {str(e)[:200]}{hint}") from None
