"""``competition pseudo``: pseudo-labels of the test images from a recipe, and their use in training.

    runs/_pseudo/<name>/fold<k>/   a store (competition.cv.tiles): uint8 probabilities at the original sizes

**One store per fold, from that fold's models only.** Fold k's store is the recipe's blend of each
member's fold-k model: the models that never saw fold k's images. An experiment with
``data.pseudo: {name: NAME}`` adds ``fold<k>``'s pseudo-labelled test images to fold k's *training*
images only, so no information about fold k's held-out images reaches fold k's training through the
pseudo-labels, and its validation score and OOF stay honest. The forward passes are the submission's
(each fold model once per image and view); only the blending is per fold.

The probabilities are stored soft (uint8, the OOF store's format, at each image's original size) with a
per-image confidence; training reads them as hard labels, binarised exactly as the submission
binarises (resized to the working size, then the recipe's thresholds or the argmax), so they flow
through the same mask pipeline, augmentations and batch mixing as real labels. Written by hand: smp,
timm and albumentations have no pseudo-labelling.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader

from competition import locks, paths
from competition.config import ConfigError, ExperimentConfig, load_competition, load_recipe
from competition.data.adapters import make_adapter
from competition.errors import UserError

PREFIX = "pseudo:"  # pseudo-labelled ids never collide with training ids


def confidence(u: np.ndarray, task: str) -> float:
    """Mean certainty of one image's uint8 (C, h, w) probabilities, in [0, 1]: multilabel, the mean of
    |2p - 1| over classes and pixels; multiclass, the mean over pixels of the winning probability
    (the background's being 1 - sum), rescaled so that a uniform guess is 0."""
    p = u.astype(np.float32) / 255.0
    if task == "multilabel":
        return float(np.abs(2 * p - 1).mean())
    full = np.concatenate([np.clip(1 - p.sum(0, keepdims=True), 0, 1), p])
    k = len(full)
    return float(((full.max(0) - 1 / k) / (1 - 1 / k)).mean())


def produce(ensemble: str | None, name: str | None = None, min_confidence: float = 0.0, device: str = "auto",
            log=print) -> list[Path]:
    """Write ``runs/_pseudo/<name>/fold<k>/`` for every fold all the recipe's members cover."""
    from competition.cv import tiles
    from competition.predict.infer import EnsemblePredictor, MemberPredictor, TestInputs, batch_size_for
    from competition.predict.run import build_predictor, pick_device, recipe_runs, resolve_recipe
    from competition.predict.submit import expected_rows
    from competition.train.checkpoint import file_hash

    if not 0.0 <= min_confidence <= 1.0:
        raise ConfigError(f"--min-confidence {min_confidence}: expected a number from 0 to 1")
    source = resolve_recipe(ensemble)
    recipe = load_recipe(source)
    name = paths.check_name("pseudo-label set", name or recipe.name)
    comp = load_competition(recipe.competition)
    folds = sorted(set.intersection(*(set(m.folds) for m in recipe.members)))
    if not folds:
        raise ConfigError(f"{source}: its members share no fold, so no fold's pseudo-labels can be made")
    dev = pick_device(device)
    adapter = make_adapter(comp)
    ids, _ = expected_rows(comp, adapter)
    with locks.hold_runs(recipe_runs(recipe)):
        full = build_predictor(recipe, comp, Path.cwd(), str(source), dev)  # the submission's members
        per_fold = {}
        for k in folds:  # fold k: every member's fold-k model alone, the recipe's weights
            members = [MemberPredictor([mp.models[m.folds.index(k)]], comp.task, mp.views, mp.scales, dev)
                       for mp, m in zip(full.members, recipe.members)]
            per_fold[k] = EnsemblePredictor(members, full.weights, comp.task, recipe.thresholds, dev)
        first = per_fold[folds[0]]
        loader = DataLoader(TestInputs(adapter, ids, first.inputs, comp.task),
                            batch_size=batch_size_for([m.experiment for m in first.members]), shuffle=False,
                            num_workers=0)
        meta = {"recipe": recipe.name, "recipe_sha256": file_hash(source), "task": comp.task,
                "thresholds": list(recipe.thresholds), "split": "test", "min_confidence": min_confidence}
        sizes = {i: tuple(adapter.image_size(i, "test")) for i in ids}
        tiles.check_space(paths.pseudo_dir(name), len(folds) * tiles.estimate_sizes(list(sizes.values()),
                                                                                  len(comp.classes)),
                          f"pseudo-labels {name!r}", "competition pseudo")
        writers = {k: tiles.StoreWriter(paths.pseudo_store(name, k), ids, comp.classes, sizes, {**meta, "fold": k})
                   for k in folds}
        conf = {k: {} for k in folds}
        t0 = time.time()
        try:
            for batch in loader:
                rows = batch["index"].tolist()
                for k, pred in per_fold.items():
                    member_probs = pred.member_probs(batch["inputs"], batch["size"])
                    for j, r in enumerate(rows):
                        p = _quantized_blend([mp[j] for mp in member_probs], pred.weights)
                        writers[k].add(r, p)
                        conf[k][ids[r]] = round(confidence(p, comp.task), 6)
            out = []
            for k, w in writers.items():
                kept = [i for i in ids if conf[k][i] >= min_confidence]
                w.meta = {**w.meta, "confidence": conf[k], "kept": kept}
                out.append(w.close())
        finally:
            for w in writers.values():
                w.abort()
    kept = {k: sum(c >= min_confidence for c in conf[k].values()) for k in folds}
    log(f"pseudo-labels {name!r} from recipe {recipe.name!r}: {len(ids)} test images, folds {folds}, "
        f"{time.time() - t0:.1f} s; kept (confidence >= {min_confidence:g}): "
        + ", ".join(f"fold {k}: {n}" for k, n in kept.items()))
    log(f"use them in an experiment with `data: {{pseudo: {{name: {name}, weight: 1.0}}}}` -> {paths.pseudo_dir(name)}")
    return out


def _quantized_blend(member_probs: list[torch.Tensor], weights: torch.Tensor) -> np.ndarray:
    from competition.cv.probs import quantize_tensor
    from competition.predict.infer import blend
    return quantize_tensor(blend(member_probs, weights)).cpu().numpy()


class PseudoLabels:
    """One fold's pseudo-labelled test images, seen as training images of an adapter: ``load_image``
    and ``image_size`` read the test image; ``load_mask`` binarises the stored probabilities at the
    requested size as the submission would. Every other attribute is the competition's adapter's."""

    def __init__(self, adapter, name: str, fold: int, classes: list[str], task: str):
        from competition.cv import tiles
        d = paths.pseudo_store(name, fold)
        if tiles.exists(d):
            store = tiles.open_store(d)
            probs, ids, meta = store, store.ids, store.meta
        else:
            raise UserError(f"data.pseudo: no pseudo-labels {name!r} for fold {fold} ({d}); make them with "
                            f"`competition pseudo --ensemble RECIPE --name {name}` (a recipe covering fold {fold})") from None
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
        from competition.predict.infer import binarize, to_size
        u = torch.from_numpy(self.probs.image(self.row[self._test_id(image_id)]))
        size = tuple(size) if size is not None else self.image_size(image_id)
        return binarize(to_size(u.float() / 255.0, size), self.task, self.thresholds).numpy()


def _check_meta(d: Path, meta: dict, ids: list[str], n_classes: int) -> None:
    """What training takes from a set's meta.json, checked: ``kept`` (distinct ids of the store) and
    the ``thresholds`` that binarise it (one per class, each strictly inside (0, 1))."""
    where = f"{d}/meta.json"
    kept, t = meta.get("kept"), meta.get("thresholds")
    if not isinstance(kept, list) or not all(isinstance(i, str) for i in kept) or len(set(kept)) != len(kept):
        raise UserError(f"{where}: `kept` must list distinct test image ids; make the set again with `competition pseudo`")
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
    from competition.data.dataset import SegDataset
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
