"""The ensemble's one resolution: every choice and score at each training image's ORIGINAL size.

The OOF stores hold each member's uint8 probabilities at the original size (what the submission
blends), so the search, the thresholds, the post-processing and the nested CV all run at the size
the leaderboard scores, through the submission's arithmetic (:func:`competition.store.probs.blend`,
``binarize`` and the writer's post-processing).

Choices made here, for every plan (candidate x selection set: in-sample and each nested fold):
1. thresholds, from one pass that histograms every blend's levels per image x class (the Dice at all
   255 thresholds at once);
2. post-processing, from one pass that labels the components of each (blend, thresholds); nnU-Net's
   acceptance rule then picks the rules on the selection set.
Multilabel passes work on the uncertain tiles only (:mod:`competition.cv.sparse`), on every core
(:func:`competition.cv.views.map_images`); multiclass tasks (the argmax couples the classes) work on
each image's dense arrays. The per-image Dice that comes out equals what ``competition score``
computes from the CSV that :func:`write_csv` writes for the same plan (a test asserts it to 1e-9).
"""
from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from competition import rle
from competition.config import PostProcess
from competition.cv import postprocess as pp
from competition.cv import sparse
from competition.cv.blend import LEVELS, normalized, threshold_table, threshold_value, truth_labels
from competition.cv.thresholds import at_levels, choose_levels
from competition.cv.views import Images, map_images
from competition.io import atomic_path
from competition.metrics import PairMetric, score_counts
from competition.predict.submit import SubmissionWriter
from competition.predict.submit import postprocess as apply_rule
from competition.store.probs import binarize, blend


def member_weights(w: np.ndarray) -> torch.Tensor:
    """(C, M) weights (counts or floats) -> the (M, C) float32 per-class simplex the submission uses."""
    return torch.as_tensor(normalized(w).T.copy(), dtype=torch.float32)


def thresholds_of(levels: np.ndarray) -> list[float]:
    """Per-class probability thresholds of levels, as the recipe stores them (unrounded)."""
    return [threshold_value(int(k)) for k in levels]


def native_truth(adapter, image_id: str, task: str) -> np.ndarray:
    """(C, H, W) bool truth at the image's original size. Multiclass classes are exclusive: where
    labels overlap the last class wins, as in training's target (``to_target``)."""
    m = adapter.load_mask(image_id) != 0
    if task == "multiclass":
        lab = truth_labels(m[None])[0]
        m = lab[None] == np.arange(1, len(m) + 1, dtype=np.uint8).reshape(-1, 1, 1)
    return m


# --------------------------------------------------------------------------------------------- #
# The mask path: exactly what a submission writes
# --------------------------------------------------------------------------------------------- #
def exclusive(truth: np.ndarray) -> np.ndarray:
    """Multiclass truth: where (C, H, W) masks overlap the last class wins, as in training's target."""
    lab = truth_labels(truth[None])[0]
    return lab[None] == np.arange(1, len(truth) + 1, dtype=np.uint8).reshape(-1, 1, 1)


def _dense(images: Images, i: int) -> tuple[list[torch.Tensor], np.ndarray]:
    rows, truth = images.dense(i)
    return [torch.from_numpy(r) for r in rows], (exclusive(truth) if images.task == "multiclass" else truth)


def native_masks(rows: list[torch.Tensor], w: torch.Tensor, thresholds: torch.Tensor, rules: list,
                 task: str) -> np.ndarray:
    """(C, H, W) uint8 masks of one image: blend, binarise, post-process (the writer's rule)."""
    out = binarize(blend(rows, w), task, thresholds).numpy()
    for c in range(len(out)):
        out[c] = apply_rule(out[c], rules[c])
    return out


def score_plan(images: Images, weights: np.ndarray, thresholds: list[float], rules: dict, task: str,
               metric: "PairMetric | float") -> np.ndarray:
    """(N, C) Dice of a plan through the mask path (dense, image by image)."""
    w = member_weights(weights)
    t = torch.as_tensor(thresholds, dtype=torch.float32)
    C = len(thresholds)
    rl = [rules.get(c) for c in range(C)]
    out = np.empty((len(images), C))
    for i in range(len(images)):
        rows, truth = _dense(images, i)
        m = native_masks(rows, w, t, rl, task).view(bool)
        if (keep := images.keep(i)) is not None:
            m = m & keep
        flat_m, flat_t = m.reshape(C, -1), truth.reshape(C, -1)
        inter = np.array([np.count_nonzero(np.logical_and(flat_m[c], flat_t[c])) for c in range(C)])
        out[i] = score_counts(inter, np.count_nonzero(flat_m, 1), np.count_nonzero(flat_t, 1), metric)
    return out


# --------------------------------------------------------------------------------------------- #
# Choosing at native resolution
# --------------------------------------------------------------------------------------------- #
def _np_weights(w: np.ndarray) -> np.ndarray:
    """(C, M) -> the (M, C) float32 simplex the submission blends with (as :func:`member_weights`)."""
    return normalized(w).T.astype(np.float32)


def _hist_image(images: Images, i: int, blends: list[np.ndarray], table: np.ndarray):
    st = images.stack(i)
    return sparse.histograms(st, blends, table), st.truth_sum


def _mc_image(images: Images, i: int, ws: list[torch.Tensor]):
    """Multiclass: per blend, (inter, pred) (C,) of the argmax, and the truth sums (C,)."""
    rows, truth = _dense(images, i)
    C = truth.shape[0]
    keep = images.keep(i)
    flat_t = truth.reshape(C, -1)
    res = []
    for w in ws:
        m = binarize(blend(rows, w), "multiclass", torch.zeros(C)).numpy().view(bool).reshape(C, -1)
        if keep is not None:
            m = m & keep.reshape(-1)
        res.append((np.array([np.count_nonzero(m[c] & flat_t[c]) for c in range(C)]), np.count_nonzero(m, 1)))
    return res, np.count_nonzero(flat_t, 1)


def curves(images: Images, blends: list[np.ndarray], task: str, metric: "PairMetric | float", log=print,
           workers: int | None = None):
    """(per blend: (N, C, 256) Dice at every level, or (N, C, 1) for multiclass; truth sums (N, C))."""
    N = len(images)
    C = len(images.members[0].classes)
    out = [np.empty((N, C, LEVELS if task == "multilabel" else 1)) for _ in blends]
    tsum = np.zeros((N, C), np.int64)
    t0, done = time.time(), 0
    if task == "multilabel":
        ws = [_np_weights(b) for b in blends]
        it = map_images(images, _hist_image, (ws, threshold_table()), workers)
    else:
        it = map_images(images, _mc_image, ([member_weights(b) for b in blends],), 1)
    for i, (res, ts) in it:
        tsum[i] = ts
        for j in range(len(blends)):
            if task == "multilabel":
                h = res[j]
                inter = np.cumsum(h[:, ::-1, 1], axis=1)[:, ::-1]
                pred = np.cumsum(h[:, ::-1].sum(-1), axis=1)[:, ::-1]
                out[j][i] = score_counts(inter, pred, ts[:, None], metric)
            else:
                out[j][i, :, 0] = score_counts(res[j][0], res[j][1], ts, metric)
        done += 1
        if done == 1 or done % 50 == 0 or done == N:
            log(f"  native thresholds: image {done}/{N} ({time.time() - t0:.1f}s)")
    return out, tsum


def _comp_image(images: Images, i: int, configs: list, table: np.ndarray):
    return sparse.components(images.stack(i), configs, table)


def components(images: Images, configs: list[tuple[np.ndarray, np.ndarray]], task: str,
               workers: int | None = None) -> list[list[pp.Components]]:
    """Per (weights, levels) configuration, per class: the native-size components of its masks."""
    C = len(images.members[0].classes)
    acc = [[([], [], [], []) for _ in range(C)] for _ in configs]
    if task == "multilabel":
        cfgs = [(_np_weights(w), np.asarray(lv)) for w, lv in configs]
        for i, per_config in map_images(images, _comp_image, (cfgs, threshold_table()), workers):
            for j, per_class in enumerate(per_config):
                for c, (area, inter, scored) in enumerate(per_class):
                    if len(area):
                        img, a, it, sc = acc[j][c]
                        img.append(np.full(len(area), i, np.int64))
                        a.append(area)
                        it.append(inter)
                        sc.append(scored)
    else:
        ws = [member_weights(w) for w, _ in configs]
        t = torch.full((C,), 0.5)
        for i in range(len(images)):
            rows, truth = _dense(images, i)
            keep = images.keep(i)
            for j, w in enumerate(ws):
                masks = native_masks(rows, w, t, [None] * C, task)
                for c in range(C):
                    _add_components(acc[j][c], masks[c], truth[c], i, keep)
    return [[_joined(acc[j][c]) for c in range(C)] for j in range(len(configs))]


def _add_components(acc, mask: np.ndarray, truth: np.ndarray, i: int, keep: np.ndarray | None = None) -> None:
    """Append each component's image, area, true pixels and scored pixels (those in ``keep``: the
    metric's; a rule still judges the whole area, as the submission's post-processing does)."""
    if not mask.any():
        return
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    img, area, inter, scored = acc
    img.append(np.full(n - 1, i, np.int64))
    area.append(stats[1:, cv2.CC_STAT_AREA].astype(np.int64))
    inter.append(np.bincount(labels[truth], minlength=n)[1:].astype(np.int64))
    scored.append(area[-1] if keep is None else np.bincount(labels[keep], minlength=n)[1:].astype(np.int64))


def _joined(acc) -> pp.Components:
    return pp.Components(*(np.concatenate(x) if x else np.zeros(0, np.int64) for x in acc))


@dataclass
class NativePlan:
    weights: np.ndarray  # (C, M)
    levels: np.ndarray  # (C,) chosen at native size (zeros for multiclass)
    rules: dict  # class index -> PostProcess
    dice: np.ndarray  # (N, C) native Dice of every image under this plan

    @property
    def thresholds(self) -> list[float]:
        return thresholds_of(self.levels)


@dataclass
class NativeOutcome:
    plans: dict  # (candidate, fold or None) -> NativePlan
    in_sample: dict = field(default_factory=dict)  # candidate -> mean Dice
    nested: dict = field(default_factory=dict)
    nested_dice: dict = field(default_factory=dict)  # candidate -> (N, C)
    nested_per_fold: dict = field(default_factory=dict)
    seconds: float = 0.0
    truth_share: np.ndarray | None = None  # (C,) share of the images whose truth holds the class


CANDIDATES = ("search", "single", "equal")  # "ensemble" is whichever of these is best on its selection set


def _key(w: np.ndarray, *more) -> bytes:
    """Identity of a blend (counts [2, 2] and [1, 1] are the same blend) and optional levels."""
    return b"|".join([member_weights(w).numpy().tobytes(), *(np.ascontiguousarray(a).tobytes() for a in more)])


def evaluate(images: Images, weights: dict, fold_of: np.ndarray, metric: "PairMetric | float", *,
             rules: list[PostProcess] | None, log=print, workers: int | None = None) -> NativeOutcome:
    """Re-choose thresholds and post-processing at native size for every plan's weights, and score.

    ``weights``: (candidate, fold or None) -> (C, M) weights chosen by the search (:mod:`compact`'s view),
    for every candidate of :data:`CANDIDATES`. ``rules``: the post-processing each class may take
    (None: no post-processing).
    """
    task = images.task
    t0 = time.time()
    N = len(images)
    folds = sorted(set(fold_of.tolist()))
    keys = sorted({k for _, k in weights}, key=lambda k: -1 if k is None else k)
    subsets = {k: (np.ones(N, bool) if k is None else fold_of != k) for k in keys}
    distinct = {}
    for w in weights.values():
        distinct.setdefault(_key(w), w)
    log(f"native resolution: {N} images, {len(distinct)} distinct blend(s)")
    curve_list, tsum = curves(images, list(distinct.values()), task, metric, log, workers)
    curve_of = dict(zip(distinct, curve_list))
    levels = {pk: choose_levels(curve_of[_key(w)], subsets[pk[1]]) for pk, w in weights.items()}
    dice = {pk: at_levels(curve_of[_key(w)], levels[pk]) for pk, w in weights.items()}
    chosen = {pk: {} for pk in weights}
    if rules is not None:
        configs = {}
        for pk, w in weights.items():
            configs.setdefault(_key(w, levels[pk]), (w, levels[pk]))
        log(f"native resolution: components of {len(configs)} configuration(s)")
        comps = dict(zip(configs, components(images, list(configs.values()), task, workers)))
        for pk, w in weights.items():
            r, inter, pred = pp.choose(comps[_key(w, levels[pk])], tsum, subsets[pk[1]], rules, np.ones(N), metric)
            chosen[pk] = r
            dice[pk] = score_counts(inter, pred, tsum, metric)
    out = NativeOutcome({pk: NativePlan(w, levels[pk], chosen[pk], dice[pk]) for pk, w in weights.items()},
                        truth_share=(tsum > 0).mean(0))
    procs = list(CANDIDATES) + ["ensemble"]
    for k in keys:  # "ensemble": the candidate best on the images its selection set may look at
        best = max(CANDIDATES, key=lambda p: (out.plans[(p, k)].dice[subsets[k]].mean(), p == "search"))
        out.plans[("ensemble", k)] = out.plans[(best, k)]
    for proc in procs:
        out.in_sample[proc] = float(out.plans[(proc, None)].dice.mean())
        if len(keys) > 1:
            held = np.empty_like(out.plans[(proc, None)].dice)
            for f in folds:
                rows = fold_of == f
                held[rows] = out.plans[(proc, f)].dice[rows]
            out.nested_dice[proc] = held
            out.nested[proc] = float(held.mean())
            out.nested_per_fold[proc] = {int(f): float(held[fold_of == f].mean()) for f in folds}
    out.seconds = time.time() - t0
    return out


# --------------------------------------------------------------------------------------------- #
# The closed loop: OOF as a submission, and the training truth, in the competition's format
# --------------------------------------------------------------------------------------------- #
def write_csv(path, images: Images, weights: np.ndarray, thresholds: list[float], rules: dict, comp) -> int:
    """The plan's native predictions of the training images as a CSV in the competition's exact
    format (the submission writer, so post-processing and RLE are the submission's own)."""
    w = member_weights(weights)
    t = torch.as_tensor(thresholds, dtype=torch.float32)
    C = len(comp.classes)
    by_name = {comp.classes[c]: r for c, r in rules.items()}
    with atomic_path(path) as tmp:
        with SubmissionWriter(tmp, comp, by_name) as writer:
            for i in range(len(images)):
                rows, _ = _dense(images, i)
                masks = native_masks(rows, w, t, [None] * C, comp.task)
                writer.add(images.adapter.submission_id(images.ids[i], "train"), masks)
        return writer.rows


def write_truth_csv(path, adapter, ids: list[str], comp) -> int:
    """The training truth at native size in the competition's format, with ``height``/``width``."""
    spec = comp.submission
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        out = csv.writer(f, lineterminator="\n")
        out.writerow([spec.id_column, spec.class_column, spec.rle_column, "height", "width"])
        for i in ids:
            m = native_truth(adapter, i, comp.task)
            sid = adapter.submission_id(i, "train")
            for c, value in enumerate(comp.class_values):  # the competition's class values, as submissions
                out.writerow([sid, value, rle.encode(m[c] > 0, spec.pixel_order), m.shape[1], m.shape[2]])
                n += 1
            if comp.ignore is not None:  # the void region, one row per image, as the scorer reads it
                ign = adapter.load_ignore(i)
                out.writerow([sid, str(comp.ignore.value), rle.encode(ign, spec.pixel_order), *ign.shape])
                n += 1
    return n
