"""The weight search's view of the OOF: only the pixels whose blended prediction can still change.

At a fixed threshold t, a pixel where every member lies on the same side of t stays there under every
blend with weights on the simplex (a convex combination lies between its smallest and largest term).
In a multiclass task, a pixel where every member's argmax agrees keeps that label (for the agreed
class k and any j, blend_k - blend_j = sum_m w_m (p_mk - p_mj) >= 0). Such *certain* pixels are
counted once per image and class in one streaming pass; only the *uncertain* ones (boundaries,
disagreements) are kept, as uint8, and every Caruana step or optimizer trial touches only those.
Written by hand: no library prunes ensemble selection this way.

Multilabel layout, per class c: ``vals[c]`` (M, U_c) uint8 holds image 0's uncertain pixels whose truth
is 1, then image 0's whose truth is 0, then image 1's, ...; ``bounds[c]`` (2N + 1,) are the offsets of
those 2N runs. The truth is not stored (it is the run a pixel sits in), so even when every pixel is
uncertain this is 1 byte per pixel·class·member.
"""
from __future__ import annotations

import math
import sys
from fractions import Fraction

import numpy as np

from competition.cv import sparse
from competition.cv.blend import (
    is_integer,
    labels_from_full,
    normalized,
    threshold_level,
    truth_labels,
    with_background,
)
from competition.cv.native import exclusive
from competition.cv.views import map_images
from competition.metrics import _POPCOUNT8

MAX_ELEMS = 1 << 22  # uncertain pixels evaluated at once (bounds the per-step temporaries)


def level_cut(threshold: float, total) -> int | float:
    """The smallest blended sum predicted positive: the blend is at least level k = threshold_level(t)
    (sum / total >= k - 0.5, as ``blend_levels`` rounds); exact (an int) for integer totals."""
    k = threshold_level(threshold)
    if isinstance(total, (int, np.integer)):
        return math.ceil(Fraction(2 * k - 1, 2) * int(total))
    return np.float32((k - 0.5) * total)


def chunk_images(n_classes: int, pixels: int, n_members: int, budget_bytes: int) -> int:
    """Images per streamed chunk so that inputs and temporaries stay within ``budget_bytes``."""
    return max(1, int(budget_bytes // max(n_classes * pixels * (n_members + 8), 1)))


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return _POPCOUNT8[x]  # numpy < 2.0: bytes only


def _segment_sums(pred: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """(K, u) bool and run offsets (r + 1,) from 0 to u -> (K, r) count of True per run.

    The bools are packed into 64-bit words (little bit order, so bit j of word i is element 64 i + j)
    and popcounted; a run's count is a difference of prefix counts, each the whole words before it
    plus the masked low bits of its word. About 20x faster than ``np.add.reduceat`` over the bools.
    """
    K, u = pred.shape
    if u == 0:
        return np.zeros((K, len(bounds) - 1), np.int64)
    packed = np.packbits(pred, axis=1, bitorder="little")
    if hasattr(np, "bitwise_count") and sys.byteorder == "little":
        words = np.zeros((K, -(-packed.shape[1] // 8) * 8), np.uint8)
        words[:, :packed.shape[1]] = packed
        words, bits = words.view(np.uint64), 64
    else:
        words, bits = packed, 8
    cum = np.zeros((K, words.shape[1] + 1), np.int64)
    np.cumsum(_popcount(words), axis=1, out=cum[:, 1:])
    wi, rem = bounds // bits, (bounds % bits).astype(words.dtype)
    low = (words.dtype.type(1) << rem) - words.dtype.type(1)  # the bits before the boundary
    prefix = cum[:, wi] + _popcount(words[:, np.minimum(wi, words.shape[1] - 1)] & low)
    return prefix[:, 1:] - prefix[:, :-1]


class Compact:
    """Counts (intersection, predicted area) per image x class for any blend, from the uncertain pixels."""

    task: str

    def __init__(self, n_members: int, truth_sum, inter0, pred0, threshold: float, uncertain: int):
        self.n_members, self.threshold = n_members, threshold
        self.truth_sum, self.inter0, self.pred0 = truth_sum, inter0, pred0
        self.n_images, self.n_classes = truth_sum.shape
        self.uncertain = uncertain  # pixel·class pairs kept (multiclass: pixels)

    def counts(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(inter, pred), each (N, C), of the blend with weights ``w`` (C, M) at the search threshold."""
        raise NotImplementedError

    def candidates(self, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(inter, pred), each (M, N, C): the blend with integer counts ``n`` (C, M) plus one of member m."""
        raise NotImplementedError


class MultilabelCompact(Compact):
    task = "multilabel"

    def __init__(self, vals: list[np.ndarray], bounds: list[np.ndarray], **kw):
        super().__init__(**kw)
        self.vals, self.bounds = vals, bounds
        self.spans = [self._spans(b) for b in bounds]

    @staticmethod
    def _spans(bounds: np.ndarray) -> list[tuple[int, int]]:
        """Image ranges whose uncertain pixels number at most MAX_ELEMS (one image at least)."""
        n = (len(bounds) - 1) // 2
        img_start = bounds[0::2]
        spans, i = [], 0
        while i < n:
            j = int(np.searchsorted(img_start, img_start[i] + MAX_ELEMS, side="right")) - 1
            j = min(max(j, i + 1), n)
            spans.append((i, j))
            i = j
        return spans

    def _class_counts(self, c: int, predict) -> tuple[np.ndarray, np.ndarray]:
        """predict(lo, hi) -> (K, hi - lo) bool for class c's uncertain pixels lo..hi, plus an optional
        (hi - lo,) bool of pixels positive in every row; -> (inter, pred), each (K, N)."""
        b = self.bounds[c]
        inter, pred = None, None
        for i, j in self.spans[c]:
            lo, hi = int(b[2 * i]), int(b[2 * j])
            rows, common = predict(lo, hi)
            r = _segment_sums(rows, b[2 * i:2 * j + 1] - lo)
            if common is not None:
                r += _segment_sums(common[None], b[2 * i:2 * j + 1] - lo)
            if inter is None:
                K = r.shape[0]
                inter = np.repeat(self.inter0[None, :, c], K, 0)
                pred = np.repeat(self.pred0[None, :, c], K, 0)
            inter[:, i:j] += r[:, 0::2]
            pred[:, i:j] += r[:, 0::2] + r[:, 1::2]
        if inter is None:  # no images at all
            inter = pred = np.zeros((1, 0), np.int64)
        return inter, pred

    def _sum(self, c: int, w_row: np.ndarray, lo: int, hi: int, signed: bool = False):
        """The blend's sum over class c's uncertain pixels lo..hi, in the narrowest exact dtype
        (``signed``: room for cut - 1 - sum as well)."""
        v = self.vals[c][:, lo:hi]
        if is_integer(w_row):
            top = 255 * (int(w_row.sum()) + 1)
            dtype = (np.int16 if top < 32767 else np.int32) if signed else (np.uint16 if top < 65536 else np.int32)
            s = np.zeros(hi - lo, dtype)
            for m in np.flatnonzero(w_row):
                s += np.multiply(v[m], dtype(w_row[m]), dtype=dtype)
            return s
        s = np.zeros(hi - lo, np.float32)
        for m in np.flatnonzero(w_row):
            s += np.multiply(v[m], np.float32(w_row[m]), dtype=np.float32)
        return s

    def counts(self, w):
        w = np.asarray(w) if is_integer(w) else normalized(w)
        inter = np.empty((self.n_images, self.n_classes), np.int64)
        pred = np.empty_like(inter)
        for c in range(self.n_classes):
            total = int(w[c].sum()) if is_integer(w) else 1.0
            cut = level_cut(self.threshold, total)
            ic, pc = self._class_counts(c, lambda lo, hi: ((self._sum(c, w[c], lo, hi) >= cut)[None], None))
            inter[:, c], pred[:, c] = ic[0], pc[0]
        return inter, pred

    def candidates(self, n):
        n = np.asarray(n, np.int64)
        M, N, C = self.n_members, self.n_images, self.n_classes
        inter = np.empty((M, N, C), np.int64)
        pred = np.empty_like(inter)
        for c in range(C):
            cut = level_cut(self.threshold, int(n[c].sum()) + 1)

            def predict(lo, hi):
                # Member m is positive where v_m >= cut - s, i.e. v_m > cut - 1 - s: clipped to [-1, 255]
                # and cast to uint8, -1 wraps to 255 (never exceeded), so one uint8 comparison per
                # member decides; the pixels already at the cut (s >= cut) are counted apart.
                s = self._sum(c, n[c], lo, hi, signed=True)
                np.subtract(s.dtype.type(cut - 1), s, out=s)
                np.clip(s, -1, 255, out=s)
                return self.vals[c][:, lo:hi] > s.astype(np.uint8), s == -1
            inter[:, :, c], pred[:, :, c] = self._class_counts(c, predict)
        return inter, pred


class MulticlassCompact(Compact):
    task = "multiclass"

    def __init__(self, vals: np.ndarray, truth_label: np.ndarray, image: np.ndarray, **kw):
        super().__init__(**kw)
        self.vals, self.truth_label, self.image = vals, truth_label, image  # (M, C+1, U), (U,), (U,)

    def _label_counts(self, rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """For each weight row (M,), (inter, pred) (N, C) of its blend."""
        N, C = self.n_images, self.n_classes
        U = self.vals.shape[-1]
        step = max(1, MAX_ELEMS // (C + 1))
        out = []
        for row in rows:
            inter, pred = self.inter0.copy(), self.pred0.copy()
            for lo in range(0, U, step):
                hi = min(U, lo + step)
                lab = labels_from_full([self.vals[m, :, lo:hi] for m in range(self.n_members)], row, axis=0)
                key = self.image[lo:hi].astype(np.int64) * (C + 1) + lab
                pred += np.bincount(key, minlength=N * (C + 1)).reshape(N, C + 1)[:, 1:]
                hit = lab == self.truth_label[lo:hi]
                inter += np.bincount(key[hit], minlength=N * (C + 1)).reshape(N, C + 1)[:, 1:]
            out.append((inter, pred))
        return out

    def _row(self, w) -> np.ndarray:
        w = np.asarray(w)
        if not np.all(w == w[0]):
            raise ValueError("multiclass ensembles take one weight per member (argmax couples the classes); "
                             "per-class weights are for multilabel tasks")
        return w[0]

    def counts(self, w):
        return self._label_counts([self._row(w)])[0]

    def candidates(self, n):
        row = self._row(np.asarray(n, np.int64))
        res = self._label_counts([row + np.eye(self.n_members, dtype=np.int64)[m] for m in range(self.n_members)])
        return np.stack([r[0] for r in res]), np.stack([r[1] for r in res])


def _multilabel_chunk(members, truth, rows: slice, hi_level: int, parts, counts, args) -> int:
    """Count the images ``rows``' certain pixels into ``args`` and append their uncertain ones to ``parts``."""
    C, HW = len(truth.classes), int(np.prod(truth.size))
    s, e = rows.start, rows.stop
    P = [m.read(s, e).reshape(e - s, C, HW) for m in members]
    T = truth.read(s, e).reshape(e - s, C, HW)
    all_ge = P[0] >= hi_level
    unc = all_ge.copy()  # becomes "any member >= the cut"
    for p in P[1:]:
        g = p >= hi_level
        all_ge &= g
        unc |= g
    unc &= ~all_ge
    args["truth_sum"][s:e] = np.count_nonzero(T, axis=-1)
    args["pred0"][s:e] = np.count_nonzero(all_ge, axis=-1)
    args["inter0"][s:e] = np.count_nonzero(all_ge & T, axis=-1)
    key, kept = np.empty((e - s, 2, HW), bool), 0
    for c in range(C):
        np.logical_and(unc[:, c], T[:, c], out=key[:, 0])
        np.logical_and(unc[:, c], ~T[:, c], out=key[:, 1])
        idx = np.flatnonzero(key)
        flat = (idx // (2 * HW)) * (C * HW) + c * HW + idx % HW
        kept += len(idx)
        counts[c, s:e] = np.count_nonzero(key, axis=-1)
        parts[c].append(np.stack([p.reshape(-1)[flat] for p in P]))
    return kept


def build(members: list, truth, task: str, threshold: float = 0.5, budget_bytes: int = 128 << 20) -> Compact:
    """One streaming pass over the members' OOF views and the truth view (same rows, same size)."""
    N, C = len(truth), len(truth.classes)
    HW = int(np.prod(truth.size))
    M = len(members)
    B = chunk_images(C, HW, M, budget_bytes)
    truth_sum, inter0, pred0 = (np.zeros((N, C), np.int64) for _ in range(3))
    args = dict(n_members=M, truth_sum=truth_sum, inter0=inter0, pred0=pred0, threshold=threshold)
    if task == "multilabel":
        hi_level = threshold_level(threshold)  # a member alone is positive at v >= its level
        parts, counts, kept = [[] for _ in range(C)], np.zeros((C, N, 2), np.int64), 0
        for s in range(0, N, B):
            kept += _multilabel_chunk(members, truth, slice(s, min(N, s + B)), hi_level, parts, counts, args)
        vals = []
        for c in range(C):  # join class by class, freeing the parts, so the peak stays near the result
            vals.append(np.concatenate(parts[c], axis=1) if parts[c] else np.zeros((M, 0), np.uint8))
            parts[c] = None
        bounds = [np.concatenate([[0], np.cumsum(counts[c].reshape(-1))]) for c in range(C)]
        return MultilabelCompact(vals, bounds, uncertain=kept, **args)
    if task != "multiclass":
        raise ValueError(f"unknown task {task!r}; expected multilabel or multiclass")
    vparts, tparts, iparts = [], [], []
    for s in range(0, N, B):
        e = min(N, s + B)
        fulls = [with_background(m.read(s, e).reshape(e - s, C, HW)) for m in members]
        labs = [f.argmax(1) for f in fulls]
        agree = np.ones(labs[0].shape, bool)
        for lab in labs[1:]:
            agree &= lab == labs[0]
        tl = truth_labels(truth.read(s, e).reshape(e - s, C, HW))
        img = np.arange(e - s)[:, None] * (C + 1)
        key = (img + labs[0])[agree]
        pred0[s:e] = np.bincount(key, minlength=(e - s) * (C + 1)).reshape(e - s, C + 1)[:, 1:]
        inter0[s:e] = np.bincount(key[(labs[0] == tl)[agree]],
                                  minlength=(e - s) * (C + 1)).reshape(e - s, C + 1)[:, 1:]
        truth_sum[s:e] = np.bincount((img + tl).ravel(), minlength=(e - s) * (C + 1)).reshape(e - s, C + 1)[:, 1:]
        bi, pi = np.nonzero(~agree)
        vparts.append(np.stack([f[bi, :, pi].T for f in fulls]))
        tparts.append(tl[bi, pi])
        iparts.append((s + bi).astype(np.int32))
    vals = np.concatenate(vparts, axis=2) if vparts else np.zeros((M, C + 1, 0), np.uint8)
    tl = np.concatenate(tparts) if tparts else np.zeros(0, np.uint8)
    image = np.concatenate(iparts) if iparts else np.zeros(0, np.int32)
    return MulticlassCompact(vals, tl, image, uncertain=int(vals.shape[-1]), **args)


# --------------------------------------------------------------------------------------------- #
# From the stores at the original sizes, image by image
# --------------------------------------------------------------------------------------------- #
class _OneImage:
    """One image's dense arrays read like a one-row view (``read``, ``classes``, ``size``, ``len``)."""

    def __init__(self, arr: np.ndarray, classes: list[str]):
        self.arr, self.classes, self.size = arr[None], classes, arr.shape[1:]

    def read(self, s: int, e: int) -> np.ndarray:
        return self.arr[s:e]

    def __len__(self) -> int:
        return 1


def _search_image(images, i: int, hi_level: int):
    return sparse.search_part(images.stack(i), hi_level)


def from_images(images, threshold: float = 0.5, workers: int | None = None) -> Compact:
    """The search view of every member's OOF against the truth, at each image's original size.

    Multilabel: the uncertain tiles of each image (:func:`competition.cv.sparse.search_part`), on every
    core; multiclass: each image's dense arrays through :func:`build`.
    """
    N, M = len(images), len(images.members)
    classes = images.members[0].classes
    C = len(classes)
    truth_sum, inter0, pred0 = (np.zeros((N, C), np.int64) for _ in range(3))
    args = dict(n_members=M, truth_sum=truth_sum, inter0=inter0, pred0=pred0, threshold=threshold)
    if images.task == "multilabel":
        # Each image's uncertain pixels are split by class as they arrive (the image's array freed at
        # once), and a class's pieces joined and freed in turn: the peak stays near the result.
        pieces, counts = [[None] * N for _ in range(C)], np.zeros((C, N, 2), np.int64)
        for i, (vals, cnt, i0, p0, ts) in map_images(images, _search_image, (threshold_level(threshold),), workers):
            at = np.concatenate([[0], np.cumsum(cnt.sum(1))])
            for c in range(C):
                pieces[c][i] = vals[:, at[c]:at[c + 1]].copy()
            del vals
            counts[:, i] = cnt
            inter0[i], pred0[i], truth_sum[i] = i0, p0, ts
        vals, kept = [], 0
        for c in range(C):
            vals.append(np.concatenate(pieces[c], axis=1) if N else np.zeros((M, 0), np.uint8))
            pieces[c] = None
            kept += vals[-1].shape[1]
        bounds = [np.concatenate([[0], np.cumsum(counts[c].reshape(-1))]) for c in range(C)]
        return MultilabelCompact(vals, bounds, uncertain=kept, **args)
    vparts, tparts, iparts = [], [], []
    for i in range(N):
        rows, truth = images.dense(i)
        one = build([_OneImage(r, classes) for r in rows], _OneImage(exclusive(truth), classes), "multiclass",
                    threshold, budget_bytes=1 << 62)
        inter0[i], pred0[i], truth_sum[i] = one.inter0[0], one.pred0[0], one.truth_sum[0]
        vparts.append(one.vals)
        tparts.append(one.truth_label)
        iparts.append(np.full(len(one.truth_label), i, np.int32))
    return MulticlassCompact(np.concatenate(vparts, axis=2), np.concatenate(tparts), np.concatenate(iparts),
                             uncertain=int(sum(len(t) for t in tparts)), **args)
