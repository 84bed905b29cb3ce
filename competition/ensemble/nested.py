"""The whole selection procedure, in-sample and nested, for the ensemble and its two baselines.

A *procedure* turns a set of training images into a choice (weights, thresholds, post-processing):
``search`` (the weight search), ``single`` (the best member alone), ``equal`` (equal weights), each
with its own tuned thresholds and post-processing, so the gains printed are like for like; and
``ensemble``, the one of those three that scores best on the same training images. The search runs
at a fixed threshold, so after tuning a baseline can occasionally win; the recipe then says so.

In-sample: choose on all OOF images, score on the same. Nested: for each fold f, choose on the other
folds' OOF images and score fold f's; every image is scored once, by a choice that never saw it.
Choices are made in stages so each costs one streaming pass however many folds there are: the
searches (here, on the compact view), then (:mod:`competition.cv.native`) one pass of threshold
curves for every distinct blend and one pass of connected components for every distinct (blend,
thresholds), all at the images' original sizes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from competition.ensemble import search as srch
from competition.ensemble.options import SearchOptions
from competition.metrics import PairMetric

PROCEDURES = ("ensemble", "search", "single", "equal")
CANDIDATES = ("search", "single", "equal")  # "ensemble" picks the best of these


@dataclass
class Searched:
    weights: dict  # (candidate, fold or None) -> (C, M) weights chosen on that selection set
    fold_of: np.ndarray
    search: srch.SearchResult  # the in-sample ensemble search
    singles: np.ndarray  # (M,) each member alone at the search threshold, all images


def search_all(ev, fold_of: np.ndarray, metric: "PairMetric | float", options: SearchOptions = SearchOptions(),
               log=print) -> Searched:
    """Every candidate's weights on every selection set (all images, and each fold's complement when
    ``options.nested``)."""
    N = ev.n_images
    folds = sorted(set(fold_of.tolist()))
    keys = [None] + (folds if options.nested and len(folds) > 1 else [])
    weights, in_sample = {}, None
    for k in keys:
        sub = np.ones(N, bool) if k is None else fold_of != k
        if options.method == "caruana":
            res = srch.caruana(ev, sub, metric, per_class=options.per_class, steps=options.steps)
        elif options.method == "optuna":
            res = srch.optuna_weights(ev, sub, metric, per_class=options.per_class, trials=options.trials)
        else:
            raise ValueError(f"unknown search method {options.method!r}; expected caruana or optuna")
        in_sample = res if k is None else in_sample
        weights[("search", k)] = res.weights
        weights[("single", k)] = srch.best_single(ev, sub, metric).weights
        weights[("equal", k)] = np.ones((ev.n_classes, ev.n_members), np.int64)
    log(f"weights chosen for {len(keys)} selection set(s) (in-sample + {len(keys) - 1} nested folds)")
    return Searched(weights, fold_of, in_sample, srch.singles(ev, np.ones(N, bool), metric).mean(1))
