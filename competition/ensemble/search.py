"""Soft-voting weights on the simplex that maximise the competition metric on OOF.

``caruana``: greedy forward selection with replacement (Caruana, Niculescu-Mizil, Crew & Ksikes,
"Ensemble selection from libraries of models", ICML 2004): start empty, repeatedly add the member
whose addition scores best, keep the best ensemble seen along the path. Weights are the selection
counts, so the blend is exact in integers. Written by hand: scikit-learn and Optuna have no ensemble
selection, and nnU-Net only averages unweighted.

``optuna``: a continuous search, one TPE study per class (per-class weights, independent in a
multilabel task) or one for all, seeded with equal weights and every single member.

Both score a subset of images (nested CV passes the training folds) through a
:class:`~competition.cv.compact.Compact`, at its fixed search threshold.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from competition.metrics import PairMetric, score_counts


@dataclass
class SearchResult:
    weights: np.ndarray  # (C, M): integer counts (Caruana, one-hot, equal) or floats; not normalised
    score: float  # mean Dice over the subset's image x class pairs at the search threshold
    per_class: np.ndarray  # (C,)
    path: list = field(default_factory=list)  # Caruana: one dict per step


def scores(ev, inter: np.ndarray, pred: np.ndarray, subset: np.ndarray, metric: "PairMetric | float") -> np.ndarray:
    """Mean Dice per class over the subset's images: (..., N, C) counts -> (..., C)."""
    d = score_counts(inter[..., subset, :], pred[..., subset, :], ev.truth_sum[subset], metric)
    return d.mean(axis=-2)


def singles(ev, subset: np.ndarray, metric: "PairMetric | float") -> np.ndarray:
    """(M, C): each member alone, mean Dice per class over the subset."""
    inter, pred = ev.candidates(np.zeros((ev.n_classes, ev.n_members), np.int64))
    return scores(ev, inter, pred, subset, metric)


def best_single(ev, subset: np.ndarray, metric: "PairMetric | float") -> SearchResult:
    s = singles(ev, subset, metric)
    m = int(s.mean(1).argmax())
    w = np.zeros((ev.n_classes, ev.n_members), np.int64)
    w[:, m] = 1
    return SearchResult(w, float(s[m].mean()), s[m])


def equal(ev, subset: np.ndarray, metric: "PairMetric | float") -> SearchResult:
    w = np.ones((ev.n_classes, ev.n_members), np.int64)
    per_class = scores(ev, *ev.counts(w), subset, metric)
    return SearchResult(w, float(per_class.mean()), per_class)


def caruana(ev, subset: np.ndarray, metric: "PairMetric | float", per_class: bool = False, steps: int = 50,
            patience: int = 10) -> SearchResult:
    """Greedy selection with replacement; ``per_class`` runs an independent selection for every class."""
    if per_class and ev.task == "multiclass":
        raise ValueError("per-class weights are for multilabel tasks (argmax couples the classes)")
    C, M = ev.n_classes, ev.n_members
    n = np.zeros((C, M), np.int64)
    best_n, best = n.copy(), np.full(C, -np.inf)
    path, stale = [], 0
    for step in range(1, steps + 1):
        cand = scores(ev, *ev.candidates(n), subset, metric)  # (M, C)
        if per_class:
            pick = cand.argmax(0)
            n[np.arange(C), pick] += 1
            now = cand[pick, np.arange(C)]
            better = now > best + 1e-12
            best_n[better], best[better] = n[better], now[better]
            improved = bool(better.any())
            path.append({"step": step, "added": pick.tolist(), "score": float(now.mean())})
        else:
            m = int(cand.mean(1).argmax())
            n[:, m] += 1
            now = cand[m]
            improved = now.mean() > best.mean() + 1e-12
            if improved:
                best_n, best = n.copy(), now.copy()
            path.append({"step": step, "added": m, "score": float(now.mean())})
        stale = 0 if improved else stale + 1
        if stale >= patience:
            break
    return SearchResult(best_n, float(best.mean()), best, path)


def optuna_weights(ev, subset: np.ndarray, metric: "PairMetric | float", per_class: bool = False, trials: int = 100,
                   seed: int = 0) -> SearchResult:
    """TPE over weights in [0, 1]^M (normalised per class); equal and one-hot weights are tried first."""
    import optuna  # noqa: PLC0415 (optuna: the tune extra; ensemble --method optuna only)
    if per_class and ev.task == "multiclass":
        raise ValueError("per-class weights are for multilabel tasks (argmax couples the classes)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    C, M = ev.n_classes, ev.n_members
    G = C if per_class else 1
    studies = [optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed + g))
               for g in range(G)]
    for study in studies:
        study.enqueue_trial({f"w{m}": 1.0 for m in range(M)})
        for k in range(M):
            study.enqueue_trial({f"w{m}": float(m == k) for m in range(M)})
    best_w, best = np.ones((C, M)), np.full(C, -np.inf)
    for _ in range(max(trials, M + 1)):
        asked = [s.ask() for s in studies]
        w = np.array([[t.suggest_float(f"w{m}", 0.0, 1.0) for m in range(M)] for t in asked])
        w[w.sum(1) <= 0] = 1.0  # all zero: treat as equal weights
        W = w if per_class else np.repeat(w, C, 0)
        per = scores(ev, *ev.counts(W), subset, metric)
        for g, (study, t) in enumerate(zip(studies, asked)):
            study.tell(t, float(per[g] if per_class else per.mean()))
        if per_class:
            better = per > best + 1e-12
            best_w[better], best[better] = W[better], per[better]
        elif per.mean() > best.mean() + 1e-12:
            best_w, best = W.copy(), per.copy()
    return SearchResult(best_w / best_w.sum(1, keepdims=True), float(best.mean()), best)
