"""Which autocast dtype a model runs in, on this device: one rule for training and inference."""
from __future__ import annotations

import warnings

import torch


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None = full precision. ``auto``: bf16 where the GPU has it, else fp16; fp32 on the CPU.
    ``bf16`` on the CPU: bf16 autocast where oneDNN runs bf16 natively (AVX512-BF16 / AMX), else fp32
    with a warning (emulated bf16 is slower than fp32); ``fp16`` on the CPU: fp32."""
    if precision == "fp32":
        return None
    if device.type == "cpu":
        if precision != "bf16":
            return None
        if not cpu_has_bf16():
            # Python's default warning filter shows this once, however many models are built.
            warnings.warn("train.precision: bf16: this CPU has no native bf16 (AVX512-BF16/AMX); using fp32")
            return None
        return torch.bfloat16
    if device.type != "cuda":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def cpu_has_bf16() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN, or an older torch
        return False
