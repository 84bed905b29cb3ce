"""Compact samples for DataLoader workers: what crosses from a worker process to the trainer.

A worker hands each sample to the trainer through shared memory, and at full size that hand-over is
the cost: a 1024² sample with 29 classes is a 4 MiB float32 image plus a 29 MiB uint8 mask, which
alone capped one worker at about 33 samples/s, below the sample cache's rate. With
``SegDataset.compact`` a sample travels as

    image_raw    the augmented image as decoded, uint8 or uint16 (H, W[, 3]): normalised on the device
    mask_bits    multilabel: the classes bit-packed along the width, (C, H, ceil(W/8)) uint8
    ignore_bits  multilabel: the ignored pixels, bit-packed the same way, (H, ceil(W/8))
    mask_u8      multiclass: the class index (0 = background, IGNORE_INDEX where ignored), uint8

(8x less for the mask, 4x less for an 8-bit image) and :func:`unpack` rebuilds exactly the float
image and the target ``SegDataset`` would have returned, on the trainer's device (a GPU, or the CPU,
where this measured 2.6x faster than receiving plain samples). A cached row that nothing transforms
goes out as stored (``from_bits``), without unpacking the mask. Used only when the loader has worker
processes; in-process loading (``data.workers: 0``) keeps the plain samples.
Written by hand: torch's DataLoader has no compact transport.
"""
from __future__ import annotations

import numpy as np
import torch

from competition.config import IGNORE_INDEX

# ImageNet statistics (grayscale: their mean), the one normalisation of every network input.
MEAN, STD = {1: [0.449], 3: [0.485, 0.456, 0.406]}, {1: [0.226], 3: [0.229, 0.224, 0.225]}


def pack(image: np.ndarray, target: torch.Tensor | None, task: str) -> dict:
    """One sample's compact form: ``image`` as decoded (H, W[, 3]), ``target`` as ``to_target`` gives it."""
    out = {"image_raw": torch.from_numpy(np.ascontiguousarray(image))}
    if target is None:
        return out
    if task == "multiclass":
        out["mask_u8"] = target.to(torch.uint8)  # indices <= 254 classes and IGNORE_INDEX fit a byte
        return out
    m = target.numpy()
    ignore = np.packbits(m[0] == IGNORE_INDEX, axis=-1) if len(m) else None
    # The target's width: output_scale may make it the image's k-fold.
    return from_bits(image, np.packbits(m == 1, axis=-1), m.shape[-1], ignore)


def from_bits(image: np.ndarray, bits: np.ndarray, width: int, ignore_bits: np.ndarray | None = None) -> dict:
    """A multilabel sample's compact form from its bit-packed (C, H, ceil(W/8)) mask, e.g. a sample-cache
    row as stored (no unpacking first); ``ignore_bits`` (H, ceil(W/8)), None: nothing ignored."""
    if ignore_bits is None:
        ignore_bits = np.zeros(bits.shape[1:], np.uint8)
    return {"image_raw": torch.from_numpy(np.ascontiguousarray(image)), "mask_width": torch.tensor(width),
            "mask_bits": torch.from_numpy(bits), "ignore_bits": torch.from_numpy(ignore_bits)}


def _unpackbits(packed: torch.Tensor, width: int) -> torch.Tensor:
    """np.unpackbits along the last axis (big bit order), on any device -> uint8 {0, 1}, cut to ``width``."""
    if packed.device.type == "cpu":  # numpy's C loop: several times faster than the shifts below
        return torch.from_numpy(np.unpackbits(packed.numpy(), axis=-1, count=width))
    shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2)[..., :width]


def normalize(raw: torch.Tensor) -> torch.Tensor:
    """uint8/uint16 (B, H, W[, 3]) images -> the normalised float32 (B, C, H, W) network input, on
    their device: the one normalisation (``SegDataset``'s samples and compact batches alike)."""
    scale = 65535.0 if raw.dtype == torch.uint16 else 255.0
    x = raw.float().div_(scale)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    c = x.shape[1]
    mean = torch.tensor(MEAN[c], device=x.device).view(1, c, 1, 1)
    return (x - mean) / torch.tensor(STD[c], device=x.device).view(1, c, 1, 1)


def images(batch: dict, device: torch.device) -> torch.Tensor:
    """The batch's normalised float32 (B, C, H, W) network input on ``device``, compact or plain."""
    if "image_raw" not in batch:
        return batch["image"].to(device, non_blocking=True)
    return normalize(batch["image_raw"].to(device, non_blocking=True))


def unpack(batch: dict, device: torch.device, task: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch of compact samples -> (normalised float32 (B, C, H, W) image, target) on ``device``,
    equal to what the plain samples would give."""
    x = images(batch, device)
    if "mask_u8" in batch:
        return x, batch["mask_u8"].to(device, non_blocking=True).long()
    if "mask_bits" not in batch:
        return x, None
    width = int(batch["mask_width"][0])
    y = _unpackbits(batch["mask_bits"].to(device, non_blocking=True), width)
    if not batch["ignore_bits"].any():  # the usual case; the broadcast fill costs more than the unpack
        return x, y
    ignore = _unpackbits(batch["ignore_bits"].to(device, non_blocking=True), width).bool()
    return x, y.masked_fill_(ignore.unsqueeze(1), IGNORE_INDEX)
