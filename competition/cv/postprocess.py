"""Per-class post-processing chosen on OOF with nnU-Net's acceptance rule.

Candidates per class: keep the largest connected component, or remove components smaller than a
minimum area (a grid of fractions of the median original image area). A rule is kept for a class
only if it raises that class's OOF Dice and lowers no other class's (Isensee et al., nnU-Net,
``determine_postprocessing``). Components are 8-connected (OpenCV), as in ``competition submit``; a rule
sets one of the two (with both, either order gives the same mask). Removed pixels become background.

``min_area`` is in pixels at the ORIGINAL image size, where ``competition submit`` applies it and where
the OOF is kept (``scale`` in :func:`rule_counts` stays 1 for it).

One pass (:func:`competition.cv.native.components`) labels the components of every configuration
(blend + thresholds) and records, per component, its image, area and overlap with the truth; any
rule's Dice then follows from sums.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from competition.config import PostProcess
from competition.metrics import PairMetric, score_counts

AREA_FRACTIONS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)


def candidate_rules(original_areas: np.ndarray) -> list[PostProcess]:
    """Keep-largest plus minimum areas at fixed fractions of the median original image area."""
    area = float(np.median(original_areas))
    mins = sorted({max(1, int(round(f * area))) for f in AREA_FRACTIONS})
    return [PostProcess(keep_largest=True)] + [PostProcess(min_area=a) for a in mins]


@dataclass
class Components:
    """Every connected component of one class's predicted masks: its image, area and true pixels."""

    image: np.ndarray
    area: np.ndarray
    inter: np.ndarray
    scored: np.ndarray | None = None  # pixels the metric counts (ignore.metric exclude); None: the area


def rule_counts(comp: Components, rule: PostProcess | None, scale: np.ndarray, n_images: int):
    """(inter, pred), each (N,), of one class after ``rule`` (None: as predicted)."""
    keep = np.ones(len(comp.area), bool)
    if rule is not None and rule.keep_largest and len(keep):
        order = np.lexsort((-comp.area, comp.image))  # by image, largest first
        first = np.r_[True, comp.image[order][1:] != comp.image[order][:-1]]
        keep[:] = False
        keep[order[first]] = True
    if rule is not None and rule.min_area:
        keep &= comp.area >= rule.min_area * scale[comp.image]
    inter = np.bincount(comp.image[keep], weights=comp.inter[keep], minlength=n_images)
    counted = comp.area if comp.scored is None else comp.scored
    pred = np.bincount(comp.image[keep], weights=counted[keep], minlength=n_images)
    return inter.astype(np.int64), pred.astype(np.int64)


def accept(before: np.ndarray, after: np.ndarray, c: int, tol: float = 1e-12) -> bool:
    """nnU-Net's rule: class ``c`` improves and no other class gets worse (per-class mean Dice).

    Every rule here changes only its own class's mask (a removed pixel becomes background), so the
    second clause holds by construction today; it stays explicit for rules that touch several classes.
    """
    others = np.delete(np.asarray(after) - np.asarray(before), c)
    return bool(after[c] > before[c] + tol and (others >= -tol).all())


def choose(comps: list[Components], truth_sum: np.ndarray, subset: np.ndarray, rules: list[PostProcess],
           scale: np.ndarray, metric: "PairMetric | float") -> tuple[dict[int, PostProcess], np.ndarray, np.ndarray]:
    """Pick each class's best accepted rule on the subset; -> (rules by class, inter, pred (N, C) after)."""
    N, C = truth_sum.shape
    inter, pred = np.zeros((N, C), np.int64), np.zeros((N, C), np.int64)
    for c in range(C):
        inter[:, c], pred[:, c] = rule_counts(comps[c], None, scale, N)
    before = score_counts(inter, pred, truth_sum, metric)[subset].mean(0)
    chosen = {}
    for c in range(C):
        best = None
        for rule in rules:
            ic, pc = rule_counts(comps[c], rule, scale, N)
            after = before.copy()
            after[c] = score_counts(ic, pc, truth_sum[:, c], metric)[subset].mean()
            if accept(before, after, c) and (best is None or after[c] > best[0] + 1e-12):
                best = (after[c], rule, ic, pc)
        if best is not None:
            chosen[c] = best[1]
            inter[:, c], pred[:, c] = best[2], best[3]
    return chosen, inter, pred
