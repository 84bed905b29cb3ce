"""Native-resolution CV: a recipe scored as the leaderboard scores it.

The weight search runs on the OOF at its stored size (fast). Everything the leaderboard sees is then
redone at each training image's ORIGINAL size, through the submission's own functions
(:func:`competition.predict.infer.blend`, ``to_size``, ``binarize`` and the writer's post-processing):
members' uint8 OOF rows -> blended probabilities -> bilinear resize to (H, W) -> thresholds ->
post-processing -> Dice against the truth decoded/rasterised at (H, W).

Choices made here, for every plan (candidate x selection set: in-sample and each nested fold):
1. thresholds, from one pass that histograms every blend's resized probabilities per image x class x
   level (the Dice at all 255 thresholds at once, as ``thresholds.curves`` does at the OOF size);
2. post-processing, from one pass that labels the components of each (blend, thresholds) at native
   size; nnU-Net's acceptance rule then picks the rules on the selection set.
Both passes stream image by image (classes in chunks), so memory is bounded by one image's
probabilities whatever the number of images; the cost is linear in images x classes x pixels x blends.
The per-image Dice that comes out equals what ``competition score`` computes from the CSV that
:func:`write_csv` writes for the same plan (a test asserts it to 1e-9).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from competition import rle
from competition.config import PostProcess
from competition.ensemble import postprocess as pp
from competition.ensemble.blend import LEVELS, normalized, threshold_table, threshold_value, truth_labels
from competition.ensemble.thresholds import at_levels, choose_levels
from competition.metrics import PairMetric, score_counts
from competition.predict.infer import binarize, blend, to_size
from competition.predict.submit import postprocess as apply_rule

CHUNK_PIXELS = 8 << 20  # class x pixel elements per chunk: bounds memory at ~40 bytes per element


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


class Images:
    """Image by image, in canonical order: the members' uint8 OOF rows and the native truth."""

    def __init__(self, members: list, adapter, ids: list[str], task: str | None = None):
        self.members, self.adapter, self.ids = members, adapter, list(ids)
        self.task = task or members[0].task

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self):
        for i, image_id in enumerate(self.ids):
            rows = [torch.from_numpy(m.read(i, i + 1)[0]) for m in self.members]
            yield i, rows, native_truth(self.adapter, image_id, self.task)

    def keep(self, i: int) -> np.ndarray | None:
        """(H, W) bool: the pixels of image ``i`` the metric counts, or None for all of them. With
        ``ignore.metric: exclude`` the ignored pixels are left out (the truth has no class there, so
        leaving them out = dropping the predictions there); the submission itself is not changed."""
        ig = getattr(getattr(self.adapter, "cfg", None), "ignore", None)
        if ig is None or ig.metric != "exclude":
            return None
        return ~self.adapter.load_ignore(self.ids[i])


def _chunks(n_classes: int, hw: int, task: str) -> list[tuple[int, int]]:
    if task == "multiclass":  # the argmax couples the classes
        return [(0, n_classes)]
    step = max(1, CHUNK_PIXELS // max(hw, 1))
    return [(c, min(n_classes, c + step)) for c in range(0, n_classes, step)]


def probs_chunk(blended: torch.Tensor, c0: int, c1: int, size) -> torch.Tensor:
    """Classes [c0, c1) of the blended probabilities (at the OOF size) resized to the native size:
    the submission's arithmetic (resizing is per channel, so chunks give the same values)."""
    return to_size(blended[c0:c1], size)


def levels_of(p: np.ndarray, table: np.ndarray) -> np.ndarray:
    """uint8 level of every float32 probability: the number of thresholds ``t`` with ``p >= t``
    (exactly the submission's compare). ``floor(255 p + 0.5)`` is that count except within float
    error of a threshold, where the exact search decides."""
    x = p * np.float32(255.0) + np.float32(0.5)
    lev = np.floor(x)
    frac = x - lev
    near = (frac < 1e-3) | (frac > 1 - 1e-3)
    if near.any():
        lev[near] = np.searchsorted(table, p[near], side="right")
    return np.clip(lev, 0, LEVELS - 1).astype(np.uint8)


# --------------------------------------------------------------------------------------------- #
# The mask path: exactly what a submission writes
# --------------------------------------------------------------------------------------------- #
def native_masks(rows: list[torch.Tensor], w: torch.Tensor, thresholds: torch.Tensor, rules: list,
                 task: str, size) -> np.ndarray:
    """(C, H, W) uint8 masks of one image: blend, resize, binarise, post-process (the writer's rule)."""
    C = rows[0].shape[0]
    out = np.empty((C, *size), np.uint8)
    blended = blend(rows, w)
    for c0, c1 in _chunks(C, size[0] * size[1], task):
        p = probs_chunk(blended, c0, c1, size)
        out[c0:c1] = binarize(p, task, thresholds[c0:c1]).numpy()
    for c in range(C):
        out[c] = apply_rule(out[c], rules[c])
    return out


def score_plan(images: Images, weights: np.ndarray, thresholds: list[float], rules: dict, task: str,
               metric: "PairMetric | float") -> np.ndarray:
    """(N, C) Dice of a plan through the mask path."""
    w = member_weights(weights)
    t = torch.as_tensor(thresholds, dtype=torch.float32)
    C = len(thresholds)
    rl = [rules.get(c) for c in range(C)]
    out = np.empty((len(images), C))
    for i, rows, truth in images:
        m = native_masks(rows, w, t, rl, task, truth.shape[1:]).view(bool)
        if (keep := images.keep(i)) is not None:
            m = m & keep
        flat_m, flat_t = m.reshape(C, -1), truth.reshape(C, -1)
        inter = np.array([np.count_nonzero(np.logical_and(flat_m[c], flat_t[c])) for c in range(C)])
        out[i] = score_counts(inter, np.count_nonzero(flat_m, 1), np.count_nonzero(flat_t, 1), metric)
    return out


# --------------------------------------------------------------------------------------------- #
# Choosing at native resolution
# --------------------------------------------------------------------------------------------- #
def curves(images: Images, blends: list[np.ndarray], task: str, metric: "PairMetric | float", log=print):
    """(per blend: (N, C, 256) Dice at every level, or (N, C, 1) for multiclass; truth sums (N, C))."""
    N = len(images)
    table = threshold_table()
    ws = [member_weights(b) for b in blends]
    out, tsum = None, None
    t0 = time.time()
    for i, rows, truth in images:
        C = truth.shape[0]
        size = truth.shape[1:]
        if out is None:
            out = [np.empty((N, C, LEVELS if task == "multilabel" else 1)) for _ in blends]
            tsum = np.zeros((N, C), np.int64)
        flat_t = truth.reshape(C, -1)
        tsum[i] = np.count_nonzero(flat_t, axis=1)
        keep = images.keep(i)
        keep = None if keep is None else keep.reshape(-1)
        for j, w in enumerate(ws):
            blended = blend(rows, w)
            for c0, c1 in _chunks(C, size[0] * size[1], task):
                p = probs_chunk(blended, c0, c1, size).numpy()
                if task == "multilabel":
                    for c in range(c0, c1):  # a 512-bin histogram per class: level x truth
                        key = (levels_of(p[c - c0], table).astype(np.uint16) * 2 + truth[c]).reshape(-1)
                        h = np.bincount(key if keep is None else key[keep], minlength=LEVELS * 2).reshape(LEVELS, 2)
                        inter = np.cumsum(h[::-1, 1])[::-1]
                        pred = np.cumsum(h[::-1].sum(-1))[::-1]
                        out[j][i, c] = score_counts(inter, pred, tsum[i, c], metric)
                else:
                    m = binarize(torch.from_numpy(p), task, torch.zeros(c1 - c0)).numpy().view(bool)
                    fm = m.reshape(c1 - c0, -1) if keep is None else m.reshape(c1 - c0, -1) & keep
                    inter = np.array([np.count_nonzero(fm[k] & flat_t[c0 + k]) for k in range(c1 - c0)])
                    out[j][i, c0:c1, 0] = score_counts(inter, np.count_nonzero(fm, 1), tsum[i, c0:c1], metric)
        if i == 0 or (i + 1) % 50 == 0:
            log(f"  native thresholds: image {i + 1}/{N} ({time.time() - t0:.1f}s)")
    return out, tsum


def components(images: Images, configs: list[tuple[np.ndarray, np.ndarray]], task: str) -> list[list[pp.Components]]:
    """Per (weights, levels) configuration, per class: the native-size components of its masks.

    A multilabel class's mask depends only on its own weights and level, so configurations that
    agree on a class share that class's work: each distinct blend is blended once per image and each
    class resized once, then labelled once per distinct level (multiclass couples the classes, so
    each configuration is labelled whole).
    """
    if task != "multilabel":
        return _components_whole(images, configs, task)
    ws = [member_weights(w) for w, _ in configs]
    blend_of, blends = [], {}  # config -> index of its distinct blend
    for w in ws:
        blend_of.append(blends.setdefault(w.numpy().tobytes(), len(blends)))
    blend_w = {j: ws[blend_of.index(j)] for j in range(len(blends))}
    shared = None
    for i, rows, truth in images:
        C = truth.shape[0]
        size = truth.shape[1:]
        if shared is None:
            # (blend, class, level) -> stats lists; a config reads its (blend, c, level[c]) entry.
            shared = {(blend_of[j], c, int(configs[j][1][c])): ([], [], [], []) for j in range(len(configs)) for c in range(C)}
        keep = images.keep(i)
        for b, w in blend_w.items():
            wanted = sorted({(c, lv) for (bb, c, lv) in shared if bb == b})
            if not wanted:
                continue
            blended = blend(rows, w)
            for c0, c1 in _chunks(C, size[0] * size[1], task):
                p = probs_chunk(blended, c0, c1, size).numpy()
                for c, lv in wanted:
                    if not c0 <= c < c1:
                        continue
                    m = (p[c - c0] >= np.float32(threshold_value(lv))).view(np.uint8)
                    _add_components(shared[(b, c, lv)], m, truth[c], i, keep)
    C = len(configs[0][1]) if configs else 0
    return [[_joined(shared[(blend_of[j], c, int(configs[j][1][c]))]) if shared else _joined(([], [], [], []))
             for c in range(C)] for j in range(len(configs))]


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


def _components_whole(images: Images, configs, task: str) -> list[list[pp.Components]]:
    acc = None
    ws = [member_weights(w) for w, _ in configs]
    t = torch.full((len(configs[0][1]),), 0.5) if configs else None
    for i, rows, truth in images:
        C = truth.shape[0]
        if acc is None:
            acc = [[([], [], [], []) for _ in range(C)] for _ in configs]
        keep = images.keep(i)
        for j, w in enumerate(ws):
            masks = native_masks(rows, w, t, [None] * C, task, truth.shape[1:])
            for c in range(C):
                _add_components(acc[j][c], masks[c], truth[c], i, keep)
    C = len(acc[0]) if acc else 0
    return [[_joined(acc[j][c]) for c in range(C)] for j in range(len(configs))]


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


def _key(w: np.ndarray, *more) -> bytes:
    """Identity of a blend (counts [2, 2] and [1, 1] are the same blend) and optional levels."""
    return b"|".join([member_weights(w).numpy().tobytes(), *(np.ascontiguousarray(a).tobytes() for a in more)])


def evaluate(images: Images, weights: dict, fold_of: np.ndarray, task: str, metric: "PairMetric | float", *,
             postprocess: bool, rules: list[PostProcess], candidates=("search", "single", "equal"),
             log=print) -> NativeOutcome:
    """Re-choose thresholds and post-processing at native size for every plan's weights, and score.

    ``weights``: (candidate, fold or None) -> (C, M) weights chosen at the OOF size.
    """
    t0 = time.time()
    N = len(images)
    folds = sorted(set(fold_of.tolist()))
    keys = sorted({k for _, k in weights}, key=lambda k: -1 if k is None else k)
    subsets = {k: (np.ones(N, bool) if k is None else fold_of != k) for k in keys}
    distinct = {}
    for w in weights.values():
        distinct.setdefault(_key(w), w)
    log(f"native resolution: {N} images, {len(distinct)} distinct blend(s)")
    curve_list, tsum = curves(images, list(distinct.values()), task, metric, log)
    curve_of = dict(zip(distinct, curve_list))
    levels = {pk: choose_levels(curve_of[_key(w)], subsets[pk[1]]) for pk, w in weights.items()}
    dice = {pk: at_levels(curve_of[_key(w)], levels[pk]) for pk, w in weights.items()}
    chosen = {pk: {} for pk in weights}
    if postprocess:
        configs = {}
        for pk, w in weights.items():
            configs.setdefault(_key(w, levels[pk]), (w, levels[pk]))
        log(f"native resolution: components of {len(configs)} configuration(s)")
        comps = dict(zip(configs, components(images, list(configs.values()), task)))
        for pk, w in weights.items():
            r, inter, pred = pp.choose(comps[_key(w, levels[pk])], tsum, subsets[pk[1]], rules, np.ones(N), metric)
            chosen[pk] = r
            dice[pk] = score_counts(inter, pred, tsum, metric)
    out = NativeOutcome({pk: NativePlan(w, levels[pk], chosen[pk], dice[pk]) for pk, w in weights.items()})
    procs = list(candidates) + ["ensemble"]
    for k in keys:  # "ensemble": the candidate best on the images its selection set may look at
        best = max(candidates, key=lambda p: (out.plans[(p, k)].dice[subsets[k]].mean(), p == "search"))
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
    from competition.io import atomic_path
    from competition.predict.submit import SubmissionWriter
    w = member_weights(weights)
    t = torch.as_tensor(thresholds, dtype=torch.float32)
    C = len(comp.classes)
    by_name = {comp.classes[c]: r for c, r in rules.items()}
    with atomic_path(path) as tmp:
        with SubmissionWriter(tmp, comp, by_name) as writer:
            for i, rows, truth in images:
                masks = native_masks(rows, w, t, [None] * C, comp.task, truth.shape[1:])
                writer.add(images.adapter.submission_id(images.ids[i], "train"), masks)
        return writer.rows


def write_truth_csv(path, adapter, ids: list[str], comp) -> int:
    """The training truth at native size in the competition's format, with ``height``/``width``."""
    import csv

    from competition.io import atomic_path
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
