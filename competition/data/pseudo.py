"""Pseudo-labelled test images as training data (``data.pseudo: {name, weight}``): one fold's set,
written by ``competition pseudo`` (:mod:`competition.pseudo`), read here as extra training images.

The probabilities are stored soft (uint8, the store's format, at each image's original size); training
reads them as hard labels, binarised exactly as the submission binarises (resized to the working
size, then the recipe's thresholds or the argmax), so they flow through the same mask pipeline,
augmentations and batch mixing as real labels. Fold k's set comes from fold k's models only, so
fold k's held-out images never inform its training (see :mod:`competition.pseudo`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset

from competition import paths
from competition.config import ExperimentConfig
from competition.data.dataset import SegDataset
from competition.errors import UserError
from competition.store import tiles
from competition.store.probs import binarize, to_size

PREFIX = "pseudo:"  # pseudo-labelled ids never collide with training ids


class PseudoLabels:
    """One fold's pseudo-labelled test images, seen as training images of an adapter: ``load_image``
    and ``image_size`` read the test image; ``load_mask`` binarises the stored probabilities at the
    requested size as the submission would. Every other attribute is the competition's adapter's."""

    def __init__(self, adapter, name: str, fold: int, classes: list[str], task: str):
        d = paths.pseudo_store(name, fold)
        if tiles.exists(d):
            store = tiles.open_store(d)
            probs, ids, meta = store, store.ids, store.meta
        else:
            raise UserError(f"data.pseudo: no pseudo-labels {name!r} for fold {fold} ({d}); make them with "
                            f"`competition pseudo --ensemble RECIPE --name {name}` "
                            f"(a recipe covering fold {fold})") from None
        if meta.get("classes") != list(classes) or meta.get("task") != task:
            raise UserError(f"{d}: made for classes {meta.get('classes')} ({meta.get('task')}), not this "
                            f"competition's {list(classes)} ({task})")
        _check_meta(d, meta, ids, len(classes))
        missing = [i for i in meta["kept"] if i not in adapter.test_ids]
        if missing:
            raise UserError(f"{d}: test image(s) {missing[:5]} are not in the competition's test set")
        self.adapter, self.probs, self.meta, self.task = adapter, probs, meta, task
        self.row = {i: r for r, i in enumerate(ids)}
        self.ids = [PREFIX + i for i in meta["kept"]]
        self.thresholds = torch.tensor(meta["thresholds"], dtype=torch.float32)

    def __getattr__(self, item):
        return getattr(self.adapter, item)

    @staticmethod
    def _test_id(image_id: str) -> str:
        return image_id[len(PREFIX):]

    def load_image(self, image_id: str, split: str = "train") -> np.ndarray:
        return self.adapter.load_image(self._test_id(image_id), "test")

    def image_size(self, image_id: str, split: str = "train") -> tuple[int, int]:
        return self.adapter.image_size(self._test_id(image_id), "test")

    def load_ignore(self, image_id: str, size=None, mask=None):
        return None  # pseudo-labels mark no void pixels: every pixel has the recipe's answer

    def load_mask(self, image_id: str, size: tuple[int, int] | None = None) -> np.ndarray:
        u = torch.from_numpy(self.probs.image(self.row[self._test_id(image_id)]))
        size = tuple(size) if size is not None else self.image_size(image_id)
        return binarize(to_size(u.float() / 255.0, size), self.task, self.thresholds).numpy()


def _check_meta(d: Path, meta: dict, ids: list[str], n_classes: int) -> None:
    """What training takes from a set's meta.json, checked: ``kept`` (distinct ids of the store) and
    the ``thresholds`` that binarise it (one per class, each strictly inside (0, 1))."""
    where = f"{d}/meta.json"
    kept, t = meta.get("kept"), meta.get("thresholds")
    if not isinstance(kept, list) or not all(isinstance(i, str) for i in kept) or len(set(kept)) != len(kept):
        raise UserError(f"{where}: `kept` must list distinct test image ids; "
                        f"make the set again with `competition pseudo`")
    stray = sorted(set(kept) - set(ids))
    if stray:
        raise UserError(f"{where}: `kept` names image(s) {stray[:5]} the store does not hold; make the set again")
    if (not isinstance(t, list) or len(t) != n_classes
            or not all(isinstance(x, float | int) and not isinstance(x, bool) and 0 < x < 1 for x in t)):
        raise UserError(f"{where}: `thresholds` must be {n_classes} numbers strictly between 0 and 1, got {t!r}; "
                        f"make the set again with `competition pseudo`")


class TrainingSet(ConcatDataset):
    """A fold's labelled images followed by its pseudo-labelled ones; ``set_epoch`` reaches both."""

    def set_epoch(self, epoch: int) -> None:
        for ds in self.datasets:
            ds.set_epoch(epoch)

    # Batch mixing's rare-class rule counts on the labelled images only.
    @property
    def adapter(self):
        return self.datasets[0].adapter

    @property
    def ids(self) -> list[str]:
        return self.datasets[0].ids

    split = "train"


def add_pseudo(train_ds, weights: np.ndarray | None, exp: ExperimentConfig, comp, adapter, fold: int):
    """(dataset, sampling weights) with ``data.pseudo`` added: the pseudo-labelled images drawn with
    ``weight`` relative to a labelled image (an epoch has as many draws as both sets hold images)."""
    spec = exp.data.pseudo
    if spec is None:
        return train_ds, weights
    pl = PseudoLabels(adapter, spec.name, fold, comp.classes, comp.task)
    if not pl.ids:
        raise UserError(f"data.pseudo: {spec.name!r} fold {fold} keeps no image (every confidence is below "
                        f"{pl.meta.get('min_confidence')}); make them again with a lower --min-confidence")
    # The sample cache is keyed by the adapter's images; pseudo images are few: load them uncached.
    plain = exp.model_copy(update={"data": exp.data.model_copy(update={"cache": False})})
    pseudo_ds = SegDataset(pl, pl.ids, plain, comp.task, "train")
    pseudo_ds.seed = exp.train.seed + 7_919  # augmentation draws of their own, not the labelled images'
    base = np.ones(len(train_ds)) if weights is None else np.asarray(weights, np.float64)
    return TrainingSet([train_ds, pseudo_ds]), np.concatenate([base, np.full(len(pseudo_ds), spec.weight)])
