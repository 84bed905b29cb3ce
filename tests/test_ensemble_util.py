"""Helpers for the ensemble and OOF tests: OOF stores with constructed probabilities (no training).

A member is a function truth (n, C, H, W) uint8 {0,1} + rng -> probabilities uint8 (n, C, H, W) at the
images' original size; it is written fold by fold through the store's own writer
(``competition.store.tiles.StoreWriter``), exactly where training would put it.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import yaml

from competition import paths
from competition.config import load_competition
from competition.data.adapters import make_adapter
from competition.folds import load_folds
from competition.store import tiles

SIZE = 64


def fold_project(project: Path):
    """Write the folds file of tiny-hands; -> (competition, adapter, folds)."""
    from competition.cli import main
    assert main(["folds", "--comp", "tiny-hands"]) == 0
    comp = load_competition("tiny-hands")
    adapter = make_adapter(comp)
    return comp, adapter, load_folds(comp, adapter)


def write_member(project: Path, name: str, make, seed: int = 0, folds_only=None, size: int = SIZE,
                 checkpoint: bool = True) -> None:
    """Experiment YAML (input ``size``) + per-fold OOF at the original size (+ a stand-in best.pt)."""
    comp = load_competition("tiny-hands")
    adapter = make_adapter(comp)
    folds = load_folds(comp, adapter)
    (project / "configs/experiments" / f"{name}.yaml").write_text(
        yaml.safe_dump({"competition": "tiny-hands", "data": {"input_size": size, "workers": 0},
                        "tracking": {"wandb": False}}))
    rng = np.random.default_rng(seed)
    for k in sorted(set(folds["fold"])):
        if folds_only is not None and k not in folds_only:
            continue
        ids = folds.loc[folds["fold"] == k, "id"].tolist()
        truth = np.stack([adapter.load_mask(i) for i in ids])
        probs = np.asarray(make(truth, rng), np.uint8)
        w = tiles.StoreWriter(paths.oof_dir(name, k), ids, comp.classes, {i: adapter.image_size(i) for i in ids},
                              {"experiment": name, "fold": int(k), "task": comp.task})
        for r in range(len(ids)):
            w.add(r, probs[r])
        w.close()
        if checkpoint:
            (paths.run_dir(name, k) / "best.pt").write_bytes(f"{name}-{k}".encode())


# -- constructed members ----------------------------------------------------------------------------
def good(truth, rng, flip: float = 0.03):
    """Confident and mostly right: truth at 230/25 with a few pixels flipped."""
    p = np.where(truth > 0, 230, 25).astype(np.uint8)
    f = rng.random(truth.shape) < flip
    p[f] = 255 - p[f]
    return p


def blurred(truth, rng, sigma: float = 2.0):
    """Right on average but soft at the edges (different errors from ``good``)."""
    out = np.empty(truth.shape, np.uint8)
    for idx in np.ndindex(truth.shape[:2]):
        out[idx] = np.clip(cv2.GaussianBlur(truth[idx].astype(np.float32), (0, 0), sigma) * 255, 0, 255)
    return out


def noise(truth, rng):
    return rng.integers(0, 256, truth.shape).astype(np.uint8)


def underconfident(truth, rng):
    """Ranks perfectly but never reaches 0.5: truth at 100, elsewhere 10."""
    return np.where(truth > 0, 100, 10).astype(np.uint8)


class ArrayView:
    """An in-memory stand-in for OOFView / TruthView (read(a, b), classes, size, len)."""

    def __init__(self, arr: np.ndarray, classes=None):
        self.arr = arr
        self.classes = classes or [f"c{i}" for i in range(arr.shape[1])]
        self.size = tuple(arr.shape[-2:])

    def read(self, start, stop):
        return self.arr[start:stop].copy()

    def __len__(self):
        return len(self.arr)


def brute_counts(members: list[np.ndarray], truth: np.ndarray, w: np.ndarray, threshold: float = 0.5):
    """Reference (float64, per-class weights, multilabel): (inter, pred) (N, C) of blend >= 255 t."""
    w = np.asarray(w, np.float64)
    wn = w / w.sum(1, keepdims=True)
    blend = sum(wn[None, :, m, None, None] * members[m].astype(np.float64) for m in range(len(members)))
    pred = blend >= 255 * threshold - 1e-9
    return (pred & truth).sum((2, 3)), pred.sum((2, 3))


class MemoryStore:
    """In-memory stand-in for an OOF member or the truth store: row i -> (C, H, W) uint8, as stored."""

    def __init__(self, arr: np.ndarray, classes=None, tile: int = 8):
        arr = np.asarray(arr)
        self.arr = arr.view(np.uint8) * np.uint8(255) if arr.dtype == bool else arr.astype(np.uint8)
        self.classes = classes or [f"c{i}" for i in range(arr.shape[1])]
        self.ids = [f"img{i}" for i in range(len(arr))]
        self.tile = tile

    def sparse(self, i):
        return tiles.SparseImage(*tiles.split(self.arr[i], self.tile), self.arr.shape[-2:], self.tile)

    def image(self, i):
        return self.arr[i]

    def __len__(self):
        return len(self.arr)


def memory_images(members: list[np.ndarray], truth: np.ndarray, task: str = "multilabel"):
    """:class:`competition.cv.views.Images` over in-memory (N, C, H, W) arrays (no adapter, nothing ignored)."""
    from competition.cv.views import Images
    return Images([MemoryStore(m) for m in members], MemoryStore(np.asarray(truth, bool)), None, task)
