"""``competition pseudo``: pseudo-labels of the test images from a recipe (their use in training is
:mod:`competition.data.pseudo`).

    runs/_pseudo/<name>/fold<k>/   a store (competition.store.tiles): uint8 probabilities at the original sizes

**One store per fold, from that fold's models only.** Fold k's store is the recipe's blend of each
member's fold-k model: the models that never saw fold k's images. An experiment with
``data.pseudo: {name: NAME}`` adds ``fold<k>``'s pseudo-labelled test images to fold k's *training*
images only, so no information about fold k's held-out images reaches fold k's training through the
pseudo-labels, and its validation score and OOF stay honest. The forward passes are the submission's
(each fold model once per image and view); only the blending is per fold.

The probabilities are stored soft (uint8, the OOF store's format, at each image's original size) with a
per-image confidence; training reads them as hard labels (:mod:`competition.data.pseudo`). Written by
hand: smp, timm and albumentations have no pseudo-labelling.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from competition import locks, paths
from competition.config import ConfigError, load_competition, load_recipe
from competition.data.adapters import make_adapter
from competition.io import file_hash
from competition.predict.infer import EnsemblePredictor, MemberPredictor, TestInputs, batch_size_for
from competition.predict.run import build_predictor, pick_device, recipe_runs, resolve_recipe
from competition.predict.submit import expected_rows
from competition.store import tiles
from competition.store.probs import blend, quantize_tensor


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
    if not 0.0 <= min_confidence <= 1.0:
        raise ConfigError(f"--min-confidence {min_confidence}: expected a number from 0 to 1")
    source = resolve_recipe(ensemble)
    recipe = load_recipe(source)
    name = paths.check_name("pseudo-label set", name or recipe.name)
    comp = load_competition(recipe.competition)
    full_data = [m.experiment for m in recipe.members if m.full_data]
    if full_data:  # fold k's pseudo-labels must come from models that never saw fold k's images
        raise ConfigError(f"{source}: member(s) {full_data} are full-data models, which trained on every fold's "
                          f"images; fold k's pseudo-labels would leak fold k into its own training. Use a recipe of "
                          f"the CV fold models (make ensemble without FULL_DATA=1) for pseudo-labels")
    folds = sorted(set.intersection(*(set(m.folds) for m in recipe.members)))
    if not folds:
        raise ConfigError(f"{source}: its members share no fold, so no fold's pseudo-labels can be made")
    dev = pick_device(device)
    adapter = make_adapter(comp)
    ids, _ = expected_rows(comp, adapter)
    with locks.hold_runs(recipe_runs(recipe)):
        full = build_predictor(recipe, comp, paths.project(), str(source), dev)  # the submission's members
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
    return quantize_tensor(blend(member_probs, weights)).cpu().numpy()
