"""The whole selection procedure, in-sample and nested, for the ensemble and its two baselines.

A *procedure* turns a set of training images into a choice (weights, thresholds, post-processing):
``search`` (the weight search), ``single`` (the best member alone), ``equal`` (equal weights), each
with its own tuned thresholds and post-processing, so the gains printed are like for like; and
``ensemble``, the one of those three that scores best on the same training images. The search runs
at a fixed threshold, so after tuning a baseline can occasionally win; the recipe then says so.

In-sample: choose on all OOF images, score on the same. Nested: for each fold f, choose on the other
folds' OOF images and score fold f's; every image is scored once, by a choice that never saw it.
Choices are made in stages so each costs one streaming pass however many folds there are: the
searches (on the compact view), then one pass of threshold curves for every distinct blend, then one
pass of connected components for every distinct (blend, thresholds).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from competition.config import PostProcess
from competition.ensemble import postprocess as pp
from competition.ensemble import search as srch
from competition.ensemble.thresholds import at_levels, choose_levels, curves
from competition.metrics import PairMetric, score_counts

PROCEDURES = ("ensemble", "search", "single", "equal")
CANDIDATES = ("search", "single", "equal")  # "ensemble" picks the best of these


@dataclass
class Plan:
    weights: np.ndarray  # (C, M)
    source: str  # the procedure that produced it ("ensemble" copies one of CANDIDATES)
    levels: np.ndarray  # (C,)
    rules: dict[int, PostProcess]
    dice: np.ndarray  # (N, C) per image x class after thresholds and post-processing


@dataclass
class Outcome:
    plans: dict  # (procedure, fold or None) -> Plan
    fold_of: np.ndarray
    search: srch.SearchResult  # the in-sample ensemble search
    singles: np.ndarray  # (M,) each member alone at the search threshold, all images
    in_sample: dict = field(default_factory=dict)  # procedure -> mean Dice
    nested: dict = field(default_factory=dict)  # procedure -> mean Dice of held-out folds
    nested_dice: dict = field(default_factory=dict)  # procedure -> (N, C) held-out Dice
    nested_per_fold: dict = field(default_factory=dict)  # procedure -> {fold: mean}


def _key(w: np.ndarray, *more) -> bytes:
    return b"|".join([str(w.dtype).encode(), np.ascontiguousarray(w).tobytes(),
                      *(np.ascontiguousarray(x).tobytes() for x in more)])


def evaluate(ev, members: list, truth, fold_of: np.ndarray, metric: "PairMetric | float", *, method: str = "caruana",
             per_class: bool = False, steps: int = 50, trials: int = 100, postprocess: bool = True,
             rules: list[PostProcess] | None = None, scale: np.ndarray | None = None, nested: bool = True,
             budget_bytes: int = 128 << 20, log=print) -> Outcome:
    task, N = ev.task, ev.n_images
    folds = sorted(set(fold_of.tolist()))
    keys = [None] + (folds if nested and len(folds) > 1 else [])
    subsets = {k: (np.ones(N, bool) if k is None else fold_of != k) for k in keys}

    weights, in_sample_search = {}, None
    for k in keys:
        sub = subsets[k]
        if method == "caruana":
            res = srch.caruana(ev, sub, metric, per_class=per_class, steps=steps)
        elif method == "optuna":
            res = srch.optuna_weights(ev, sub, metric, per_class=per_class, trials=trials)
        else:
            raise ValueError(f"unknown search method {method!r}; expected caruana or optuna")
        in_sample_search = res if k is None else in_sample_search
        weights[("search", k)] = res.weights
        weights[("single", k)] = srch.best_single(ev, sub, metric).weights
        weights[("equal", k)] = np.ones((ev.n_classes, ev.n_members), np.int64)
    log(f"weights chosen for {len(keys)} selection set(s) (in-sample + {len(keys) - 1} nested folds)")

    distinct = {}
    for w in weights.values():
        distinct.setdefault(_key(w), w)
    curve_list = curves(members, truth, list(distinct.values()), task, metric, budget_bytes)
    curve_of = dict(zip(distinct, curve_list))
    levels = {pk: choose_levels(curve_of[_key(w)], subsets[pk[1]]) for pk, w in weights.items()}
    dice = {pk: at_levels(curve_of[_key(w)], levels[pk]) for pk, w in weights.items()}
    chosen_rules = {pk: {} for pk in weights}
    del curve_list, curve_of

    if postprocess:
        configs = {}
        for pk, w in weights.items():
            configs.setdefault(_key(w, levels[pk]), (w, levels[pk]))
        comps = dict(zip(configs, pp.components(members, truth, list(configs.values()), task, budget_bytes)))
        rules = rules if rules is not None else []
        scale = np.ones(N) if scale is None else scale
        for pk, w in weights.items():
            r, inter, pred = pp.choose(comps[_key(w, levels[pk])], ev.truth_sum, subsets[pk[1]], rules, scale, metric)
            chosen_rules[pk] = r
            dice[pk] = score_counts(inter, pred, ev.truth_sum, metric)
        log(f"post-processing evaluated for {len(configs)} configuration(s)")

    plans = {pk: Plan(weights[pk], pk[0], levels[pk], chosen_rules[pk], dice[pk]) for pk in weights}
    for k in keys:  # the ensemble: the best candidate on the images it may look at (ties: the search)
        best = max(CANDIDATES, key=lambda p: (plans[(p, k)].dice[subsets[k]].mean(), p == "search"))
        plans[("ensemble", k)] = plans[(best, k)]
    out = Outcome(plans, fold_of, in_sample_search,
                  srch.singles(ev, np.ones(N, bool), metric).mean(1))
    for proc in PROCEDURES:
        out.in_sample[proc] = float(plans[(proc, None)].dice.mean())
        if len(keys) > 1:
            held = np.empty_like(plans[(proc, None)].dice)
            for f in folds:
                rows = fold_of == f
                held[rows] = plans[(proc, f)].dice[rows]
            out.nested_dice[proc] = held
            out.nested[proc] = float(held.mean())
            out.nested_per_fold[proc] = {int(f): float(held[fold_of == f].mean()) for f in folds}
    return out
