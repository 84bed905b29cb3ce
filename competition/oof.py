"""Out-of-fold predictions on disk: ``runs/<exp>/fold<k>/oof/``.

    probs.npy   uint8 (N, C, h, w), p = value / 255; open with np.load(..., mmap_mode="r")
    ids.json    the N image ids, in row order
    meta.json   resolution, classes, task, quantisation, each image's original (H, W)

Written into a hidden temp folder beside it (unique per process) and renamed, so a reader never
sees a half-written store and two writers never share a temp folder.

The plain store ``oof/`` is predicted without TTA; ``oof-<variant>/`` holds the same images
predicted with a TTA variant (``competition oof EXP --tta ...``). Both come from the submission's
own inference path (:mod:`competition.predict.heldout`).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

from competition.paths import OOF_IDS, OOF_META, OOF_PROBS

if TYPE_CHECKING:
    import torch

QUANT = 255.0


def _json(path: Path):
    from competition.io import ReadError, read_text
    try:
        return json.loads(read_text(path, "OOF store file"))
    except json.JSONDecodeError as e:
        raise ReadError(f"{path}: not valid JSON ({e}); the OOF store is damaged: delete it and run "
                        f"`competition oof` to predict it again") from None


def store_size(exp) -> tuple[int, int]:
    """(h, w) an experiment's OOF is stored at: ``oof.size``, else the model's output size.

    A row holds the whole image stretched to this size whatever ``data.resize`` is: letterboxed
    predictions are unpadded before they are resized here (:class:`~competition.predict.infer.MemberPredictor`),
    so members of any geometry blend pixel for pixel and one bilinear resize reaches the native size.
    """
    from competition.config import size_hw
    if exp.oof.size:
        return size_hw(exp.oof.size)
    h, w = exp.data.input_hw
    return h * exp.model.output_scale, w * exp.model.output_scale


class IgnoreView:
    """The ignored pixels of some images at one size, read like a truth view: (n, h, w) bool."""

    def __init__(self, adapter, ids: list[str], size: tuple[int, int]):
        self.adapter, self.ids, self.size = adapter, list(ids), tuple(size)

    def read(self, start: int, stop: int) -> np.ndarray:
        rows = [self.adapter.load_ignore(i, self.size) for i in self.ids[start:stop]]
        return np.stack(rows) if rows else np.zeros((0, *self.size), bool)

    def __len__(self) -> int:
        return len(self.ids)


def ignore_view(comp, adapter, ids: list[str], size: tuple[int, int]) -> IgnoreView | None:
    """What OOF scoring leaves out: the ignored pixels of ``ids`` at ``size`` when the competition's
    metric excludes them (``ignore.metric: exclude``), else None (nothing is left out)."""
    ig = getattr(comp, "ignore", None)
    return IgnoreView(adapter, ids, size) if ig is not None and ig.metric == "exclude" else None


def probabilities(logits: torch.Tensor, task: str, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Logits (N, C[+1], H, W) -> class probabilities (N, C, h, w); multiclass drops the background."""
    import torch  # here, not at module level: reading an OOF store must not cost a torch import
    import torch.nn.functional as F
    if size is not None and tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    if task == "multilabel":
        return torch.sigmoid(logits.float())
    return torch.softmax(logits.float(), dim=1)[:, 1:]


def quantize_tensor(probs: torch.Tensor) -> torch.Tensor:
    """Probabilities -> uint8 levels round(255 p): the one quantisation of OOF and test predictions."""
    import torch
    return probs.float().clamp(0, 1).mul_(QUANT).round_().to(torch.uint8)


class StoreWriter:
    """A store filled row by row (``add``) and published whole (``close``) under ``out_dir``: written in
    a hidden temp folder beside it (unique per process), then renamed, so a reader never sees half."""

    def __init__(self, out_dir: Path, ids: list[str], classes: list[str], size: tuple[int, int], meta: dict):
        import tempfile
        self.out_dir, self.ids, self.classes, self.size, self.meta = Path(out_dir), list(ids), classes, size, meta
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.", suffix=".tmp", dir=self.out_dir.parent))
        self.arr = np.lib.format.open_memmap(self.tmp / OOF_PROBS, mode="w+", dtype=np.uint8,
                                             shape=(len(ids), len(classes), *size))
        self.filled = np.zeros(len(ids), bool)

    def add(self, rows, probs: np.ndarray) -> None:
        self.arr[rows] = probs
        self.filled[rows] = True

    def close(self) -> Path:
        from competition.io import default_mode
        self.arr.flush()
        del self.arr
        if not self.filled.all():
            raise RuntimeError(f"store incomplete: rows {np.flatnonzero(~self.filled)[:10].tolist()} never written")
        (self.tmp / OOF_IDS).write_text(json.dumps(self.ids))
        full = {"size": list(self.size), "classes": self.classes, "quantization": "uint8, p = value / 255", **self.meta}
        (self.tmp / OOF_META).write_text(json.dumps(full, indent=1))
        os.chmod(self.tmp, default_mode(directory=True))  # mkdtemp's 0700 would hide the store from teammates
        if self.out_dir.exists():
            old = self.out_dir.with_name(f"{self.tmp.name}.old")
            self.out_dir.rename(old)
            self.tmp.rename(self.out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.tmp.rename(self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def write(out_dir: Path, ids: list[str], batches: Iterable[tuple[list[int], np.ndarray]],
          classes: list[str], size: tuple[int, int], meta: dict) -> Path:
    """Stream uint8 batches (row indices, (B, C, h, w)) into a memory-mapped store, then publish it."""
    w = StoreWriter(out_dir, ids, classes, size, meta)
    try:
        for rows, probs in batches:
            w.add(rows, probs)
        return w.close()
    finally:
        w.abort()


def clean_stale_stores(run_dir: Path) -> list[Path]:
    """Remove the hidden temp folders of OOF writes that were killed (``.oof*.<random>.tmp[.old]``) in
    a run folder whose lock the caller holds; each is a whole copy of a store."""
    out = []
    for p in Path(run_dir).glob(".oof*.tmp*"):
        if p.is_dir() and not p.is_symlink() and (p.name.endswith(".tmp") or p.name.endswith(".tmp.old")):
            shutil.rmtree(p, ignore_errors=True)
            out.append(p)
    return out


def read(oof_dir: Path) -> tuple[np.ndarray, list[str], dict]:
    """(memory-mapped uint8 probs, ids, meta) of one fold's store."""
    oof_dir = Path(oof_dir)
    for name in (OOF_PROBS, OOF_IDS, OOF_META):
        if not (oof_dir / name).is_file():
            raise FileNotFoundError(f"{oof_dir / name}: missing; the OOF store is incomplete")
    probs = np.load(oof_dir / OOF_PROBS, mmap_mode="r")
    ids = _json(oof_dir / OOF_IDS)
    meta = _json(oof_dir / OOF_META)
    if probs.shape[0] != len(ids):
        raise ValueError(f"{oof_dir}: probs.npy has {probs.shape[0]} rows but ids.json lists {len(ids)} ids")
    return probs, ids, meta
