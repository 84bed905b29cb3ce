"""The ensemble's per-image passes at hand-bone size (``competition.cv.sparse``) against careful dense
numpy/OpenCV peers doing the same work.

Case: one image of the hand-bone size (29 classes x 2048^2), 4 members that look like a model's
probabilities at 512 -> 2048 (``benchmarks/scale.py``: ~1 % of the tiles are neither all 0 nor all 255),
the truth rasterised at 2048 from the same polygons. Both sides start from what they need in memory:
ours from the stores' tiles (:class:`competition.cv.sparse.Stack`, built inside the timing), the peers
from the members' dense uint8 arrays and the dense truth (loaded before timing: 4 x 121 MB + 121 MB).

1. threshold histograms of 3 blends: per class, the pixel count at each blend level (255 thresholds)
   for truth 0 and 1 -> (3, 29, 256, 2). Peer: per class, the float32 blend in member order (the
   submission's arithmetic), ``floor(255 p + 0.5)``, one ``np.bincount`` of level x truth, in reused
   buffers.
2. connected components of 2 plans (blend + per-class level) -> per class, every component's (area,
   true pixels). Peer: per class the float32 blend, ``p >= t``, ``cv2.connectedComponentsWithStats`` on
   the whole 2048^2 mask, ``np.bincount`` of the labels over the truth.
Same output asserted (histograms equal; components equal as sorted lists). The whole ensemble at this
size is ``python -m benchmarks scale``.
"""
from __future__ import annotations

import cv2
import numpy as np

from benchmarks.harness import compare

C, SIZE, MODEL, M = 29, 2048, 512, 4


def _case():
    from benchmarks.scale import member_probs
    from competition.data import synthetic
    from competition.store import tiles
    rng = np.random.default_rng(3)
    polys = synthetic._pose(synthetic._hand_29(rng), rng, SIZE, False)
    names = list(dict.fromkeys(n for n, _ in polys))
    truth = np.zeros((C, SIZE, SIZE), np.uint8)
    for name, p in polys:
        cv2.fillPoly(truth[names.index(name)], [np.round(p * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)
    small = np.stack([cv2.resize(t, (MODEL, MODEL), interpolation=cv2.INTER_NEAREST) for t in truth]) > 0
    members = [member_probs(small, 11 + m, 1.0 + 0.2 * m, 0.8 + 0.3 * m, 1 + m) for m in range(M)]
    sparse_m = [tiles.SparseImage(*tiles.split(u), (SIZE, SIZE), tiles.TILE) for u in members]
    sparse_t = tiles.SparseImage(*tiles.split(truth * np.uint8(255)), (SIZE, SIZE), tiles.TILE)
    return members, truth.astype(bool), sparse_m, sparse_t


def _weights(k: int) -> np.ndarray:
    w = np.random.default_rng(k).random((M, C)) + 0.2
    return (w / w.sum(0)).astype(np.float32)


class Dense:
    """The careful dense peer: one class at a time, buffers reused."""

    def __init__(self, members, truth):
        self.members, self.truth = members, truth
        self.p = np.empty((SIZE, SIZE), np.float32)
        self.tmp = np.empty((SIZE, SIZE), np.float32)

    def blend(self, w: np.ndarray, c: int) -> np.ndarray:
        scale = w / np.float32(255.0)
        self.p[:] = 0
        for m, u in enumerate(self.members):
            np.multiply(u[c], scale[m, c], out=self.tmp, dtype=np.float32)
            self.p += self.tmp
        return self.p

    def histograms(self, blends):
        out = np.empty((len(blends), C, 256, 2), np.int64)
        for j, w in enumerate(blends):
            for c in range(C):
                p = self.blend(w, c)
                lev = np.floor(p * np.float32(255.0) + np.float32(0.5)).astype(np.int64)
                out[j, c] = np.bincount((lev * 2 + self.truth[c]).ravel(), minlength=512).reshape(256, 2)
        return out

    def components(self, plans):
        out = []
        for w, lv in plans:
            per = []
            for c in range(C):
                mask = (self.blend(w, c) >= np.float32((lv[c] - 0.5) / 255)).view(np.uint8)
                n, lab, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
                per.append(sorted(zip(stats[1:, cv2.CC_STAT_AREA].tolist(),
                                      np.bincount(lab[self.truth[c]], minlength=n)[1:].tolist())))
            out.append(per)
        return out


def main() -> None:
    from competition.cv import sparse
    from competition.cv.blend import threshold_table
    from competition.store import tiles
    members, truth, sm, st = _case()
    table = threshold_table()
    blends = [_weights(k) for k in range(3)]
    plans = [(blends[0], np.full(C, 128)), (blends[1], np.full(C, 100))]
    stack = sparse.stack(sm, st, C)
    print(f"case: 1 image x {C} classes x {SIZE}^2, {M} members; {stack.vals.shape[1]} of "
          f"{C * (SIZE // tiles.TILE) ** 2} tiles gathered "
          f"({stack.vals.shape[1] * tiles.TILE ** 2 / (C * SIZE * SIZE):.2%} "
          f"of the pixels)", flush=True)
    dense = Dense(members, truth)

    def ours_hist():
        return sparse.histograms(sparse.stack(sm, st, C), blends, table)

    def same_hist(a, b):
        # The dense peer rounds floor(255 p + 0.5); ours counts thresholds exactly (p >= (k - 0.5) / 255).
        # They differ only where p lies within float error of a threshold: allow those few pixels.
        diff = int(np.abs(a - b).sum())
        if diff > 1e-6 * a.sum():
            raise AssertionError(f"histograms differ in {diff} counts")
        return f"equal histograms ({diff} of {int(a.sum())} counts at a float-error boundary)"

    compare("native pass: threshold histograms of 3 blends, one 29 x 2048^2 image", ours_hist,
            {"dense numpy": lambda: dense.histograms(blends)}, check=same_hist,
            extrapolate=(800, "for 800 images"))

    def ours_comp():
        res = sparse.components(sparse.stack(sm, st, C), plans, table)
        return [[sorted(zip(a.tolist(), i.tolist())) for a, i, _ in per] for per in res]

    def same_comp(a, b):
        if a != b:
            raise AssertionError("different components")
        return f"same components ({sum(len(x) for per in a for x in per)} in all)"

    compare("native pass: components of 2 plans, one 29 x 2048^2 image", ours_comp,
            {"dense numpy + OpenCV": lambda: dense.components(plans)}, check=same_comp,
            extrapolate=(800, "for 800 images"))
