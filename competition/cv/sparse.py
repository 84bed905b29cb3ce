"""One image of a multilabel ensemble at its original size, worked on by its uncertain tiles only.

For image i, every member's store and the truth store give, per class x tile, a state: all 0, all 255,
or stored. A tile where every member is all 0 (or every member all 255) has the same blended value
under any weights on the simplex (a convex combination of equal terms), so it is *certain*: it enters
every count as a whole tile. Only the other tiles (a boundary, a disagreement, a blob one member sees)
are gathered, as (M, K, T*T) uint8, and within them the pixels where all members hold the same value
are certain too (their level is that value). Every pass of the ensemble (the search view, the
threshold curves, the connected components) works on what is left, so its cost follows the uncertain
pixels, not the 29 x 2048^2 of an image.

The arithmetic is the submission's: the blend is sum_m float32(u_m) * float32(w_m / 255) in member
order (:func:`competition.store.probs.blend`), a pixel is positive at ``p >= float32(threshold)``,
components are 8-connected (OpenCV) at the original size. Written by hand: no library blends or
labels sparse tiles.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np

from competition.cv.blend import LEVELS
from competition.store.tiles import SparseImage


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


@dataclass
class Stack:
    """The members and the truth of one image, tile by tile (``key = class * ny * nx + row * nx + col``).

    ``ukeys`` (K,) the uncertain tiles; ``vals`` (M, K, P) their members' values (P = T * T);
    ``truth`` (K, P) bool; ``inside`` / ``keep`` (K, P) bool or None (all pixels): in the image / counted
    by the metric. ``fkeys`` the certain all-255 tiles with ``f_inside``/``f_keep``/``f_truth`` pixel
    counts. ``truth_sum`` (C,) the truth pixels the metric counts; ``n_keep`` pixels counted per class.
    ``tkeys``/``ttiles``: every tile holding truth, for the components pass.
    """
    classes: int
    size: tuple[int, int]
    tile: int
    ukeys: np.ndarray
    vals: np.ndarray
    truth: np.ndarray
    inside: np.ndarray | None
    keep: np.ndarray | None
    fkeys: np.ndarray
    f_inside: np.ndarray
    f_keep: np.ndarray
    f_truth: np.ndarray
    truth_sum: np.ndarray
    n_keep: int
    tkeys: np.ndarray
    ttiles: np.ndarray

    @property
    def grid(self) -> tuple[int, int]:
        return -(-self.size[0] // self.tile), -(-self.size[1] // self.tile)

    @property
    def uclass(self) -> np.ndarray:
        ny, nx = self.grid
        return self.ukeys // (ny * nx)


class TileGrid(NamedTuple):
    """An image's tile grid: rows and columns of tiles, and the tile's side in pixels."""
    ny: int
    nx: int
    tile: int


def _keys(s: SparseImage, G: int, nx: int) -> np.ndarray:
    return s.index[:, 0].astype(np.int64) * G + s.index[:, 1] * nx + s.index[:, 2]


def _tile_masks(keys: np.ndarray, size, tile: int, nx: int, G: int, ignore: np.ndarray | None):
    """(inside, keep) (K, P) bool for the tiles ``keys``, or None where every pixel is inside / kept."""
    H, W = size
    ny = -(-H // tile)
    edge = (ny * tile != H) or (nx * tile != W)
    if not edge and ignore is None:
        return None, None
    yy = (keys % G) // nx
    xx = keys % nx
    r = np.arange(tile)
    ins = ((yy[:, None, None] * tile + r[None, :, None]) < H) & ((xx[:, None, None] * tile + r[None, None, :]) < W)
    inside = ins.reshape(len(keys), -1)
    if ignore is None:
        return inside, inside
    pad = np.zeros((ny * tile, nx * tile), bool)
    pad[:H, :W] = ~ignore
    kept = pad.reshape(ny, tile, nx, tile)[yy, :, xx, :].reshape(len(keys), -1)
    return inside, inside & kept


def stack(members: list[SparseImage], truth: SparseImage, classes: int, ignore: np.ndarray | None = None) -> Stack:
    """Gather one image's uncertain tiles; ``ignore`` (H, W) bool: pixels the metric leaves out."""
    T = members[0].tile
    size = tuple(members[0].size)
    if any(m.tile != T or tuple(m.size) != size for m in members) or truth.tile != T or tuple(truth.size) != size:
        raise ValueError(f"members and truth disagree on the image's size or tile ({size}, {T})")
    ny, nx = -(-size[0] // T), -(-size[1] // T)
    G = ny * nx
    M = len(members)
    n_stored = np.zeros(classes * G, np.int16)
    n_full = np.zeros(classes * G, np.int16)
    mkeys = []
    for m in members:
        k = _keys(m, G, nx)
        stored = m.index[:, 3] == 1
        n_stored[k[stored]] += 1
        n_full[k[~stored]] += 1
        mkeys.append((k, stored))
    forced = np.zeros(classes * G, bool)
    if ignore is not None and ignore.any():
        pad = np.zeros((ny * T, nx * T), bool)
        pad[:size[0], :size[1]] = ignore
        touched = pad.reshape(ny, T, nx, T).any(axis=(1, 3)).reshape(-1)
        forced = np.tile(touched, classes)
    uncertain = (n_stored > 0) | ((n_full > 0) & (n_full < M)) | (forced & (n_full + n_stored > 0))
    ukeys = np.flatnonzero(uncertain)
    fkeys = np.flatnonzero((n_full == M) & ~uncertain)
    P = T * T
    vals = np.zeros((M, len(ukeys), P), np.uint8)
    for j, (m, (k, stored)) in enumerate(zip(members, mkeys)):
        pos = np.searchsorted(ukeys, k)
        hit = ((pos < len(ukeys)) & (ukeys[np.minimum(pos, len(ukeys) - 1)] == k) if len(ukeys)
               else np.zeros(len(k), bool))
        full = hit & ~stored
        vals[j, pos[full]] = 255
        st = hit & stored
        if st.any():
            payload = m.payload.reshape(len(m.payload), P)
            vals[j, pos[st]] = payload[np.cumsum(stored)[st] - 1]
    # The truth, tile by tile: every tile that holds some.
    tk = _keys(truth, G, nx)
    tstored = truth.index[:, 3] == 1
    ttiles = np.ones((len(tk), P), bool)
    ttiles[tstored] = truth.payload.reshape(len(truth.payload), P) > 0
    order = np.argsort(tk)
    tk, ttiles = tk[order], ttiles[order]
    t_in, _ = _tile_masks(tk, size, T, nx, G, None)
    if t_in is not None:
        ttiles &= t_in
    tsum = np.bincount(tk // G, weights=ttiles.sum(1), minlength=classes).astype(np.int64)
    inside, keep = _tile_masks(ukeys, size, T, nx, G, ignore)
    truth_u = _lookup(tk, ttiles, ukeys, P)
    f_inside, f_keep = (np.full(len(fkeys), P, np.int64),) * 2
    if len(fkeys):
        fi, fk = _tile_masks(fkeys, size, T, nx, G, ignore)
        if fi is not None:
            f_inside, f_keep = fi.sum(1), fk.sum(1)
    f_truth = _lookup(tk, ttiles, fkeys, P).sum(1)
    n_keep = size[0] * size[1] - (int(ignore.sum()) if ignore is not None else 0)
    return Stack(classes, size, T, ukeys, vals, truth_u, inside, keep, fkeys, f_inside, f_keep, f_truth,
                 tsum, n_keep, tk, ttiles)


def _lookup(keys: np.ndarray, tiles: np.ndarray, want: np.ndarray, P: int) -> np.ndarray:
    """Rows of ``tiles`` (sorted ``keys``) at ``want``; all False where a key has none."""
    out = np.zeros((len(want), P), bool)
    if len(keys) and len(want):
        pos = np.minimum(np.searchsorted(keys, want), len(keys) - 1)
        hit = keys[pos] == want
        out[hit] = tiles[pos[hit]]
    return out


# --------------------------------------------------------------------------------------------- #
# Levels of a blend
# --------------------------------------------------------------------------------------------- #
def agree(st: Stack) -> np.ndarray:
    """(K, P) bool: pixels where every member holds the same value (their level is that value)."""
    v = st.vals
    same = np.ones(v.shape[1:], bool)
    for m in range(1, len(v)):
        same &= v[m] == v[0]
    return same


class Disagreeing:
    """The pixels where members differ, gathered once per image: every blend is computed on these only."""

    def __init__(self, st: Stack, where: np.ndarray):
        self.where = where
        k_idx, _ = np.nonzero(where)
        self.cls = st.uclass[k_idx]
        self.vals = st.vals[:, where]  # (M, D)

    def levels(self, w: np.ndarray, table: np.ndarray) -> np.ndarray:
        """uint8 levels of the blend with weights ``w`` (M, C) (columns sum to 1): the number of
        thresholds (k - 0.5) / 255 that p reaches, p the submission's float32 blend
        (sum_m float32(u_m) * (w_m / 255), in member order)."""
        scale = w.astype(np.float32) / np.float32(255.0)  # (M, C) as blend(): w.float() / 255.0
        p = np.zeros(self.vals.shape[1], np.float32)
        for m in range(len(self.vals)):
            p += self.vals[m].astype(np.float32) * scale[m][self.cls]
        return levels_of(p, table)


def all_levels(st: Stack, w: np.ndarray, dis: Disagreeing, table: np.ndarray) -> np.ndarray:
    """(K, P) uint8 levels of the blend at every gathered pixel (where members agree: their value)."""
    lev = st.vals[0].copy()
    if dis.vals.shape[1]:
        lev[dis.where] = dis.levels(w, table)
    return lev


# --------------------------------------------------------------------------------------------- #
# The three passes, for one image
# --------------------------------------------------------------------------------------------- #
def search_part(st: Stack, hi_level: int):
    """The search view's share of this image at the search threshold: certain counts and the
    uncertain pixels' member values, class by class, truth 1 first.
    -> (vals (M, u), counts (C, 2), inter0 (C,), pred0 (C,), truth_sum (C,))."""
    C, M = st.classes, len(st.vals)
    ge = st.vals >= hi_level
    all_ge, any_ge = ge.all(0), ge.any(0)
    keep = st.keep if st.keep is not None else np.ones(all_ge.shape, bool)
    unc = any_ge & ~all_ge & keep
    pos = all_ge & keep
    cls = st.uclass
    fcls = st.fkeys // (st.grid[0] * st.grid[1])
    pred0 = np.bincount(cls, weights=pos.sum(1), minlength=C) + np.bincount(fcls, weights=st.f_keep, minlength=C)
    inter0 = np.bincount(cls, weights=(pos & st.truth).sum(1), minlength=C) + \
        np.bincount(fcls, weights=st.f_truth, minlength=C)
    k_idx, p_idx = np.nonzero(unc)
    t = st.truth[k_idx, p_idx]
    c = cls[k_idx]
    order = np.lexsort((~t, c))  # by class, truth 1 first
    k_idx, p_idx = k_idx[order], p_idx[order]
    vals = np.stack([st.vals[m][k_idx, p_idx] for m in range(M)]) if M else np.zeros((0, 0), np.uint8)
    counts = np.zeros((C, 2), np.int64)
    np.add.at(counts, (c, (~t).astype(np.int64)), 1)
    return vals, counts, inter0.astype(np.int64), pred0.astype(np.int64), st.truth_sum


def histograms(st: Stack, blends: list[np.ndarray], table: np.ndarray) -> np.ndarray:
    """(J, C, 256, 2) pixel counts per blend x class x level x truth (levels 1..255 exact; level 0 holds
    the rest of the image)."""
    C = st.classes
    same = agree(st)
    keep = st.keep if st.keep is not None else np.ones(same.shape, bool)
    cls = np.broadcast_to(st.uclass[:, None], same.shape)
    base = np.zeros((C, LEVELS, 2), np.int64)
    a = same & keep
    key = (cls[a] * LEVELS + st.vals[0][a]) * 2 + st.truth[a]
    base += np.bincount(key, minlength=C * LEVELS * 2).reshape(C, LEVELS, 2)
    fcls = st.fkeys // (st.grid[0] * st.grid[1])
    base[:, 255, 1] += np.bincount(fcls, weights=st.f_truth, minlength=C).astype(np.int64)
    base[:, 255, 0] += np.bincount(fcls, weights=st.f_keep - st.f_truth, minlength=C).astype(np.int64)
    dis = Disagreeing(st, ~same & keep)
    dkey = dis.cls * (LEVELS * 2) + st.truth[dis.where]
    out = np.empty((len(blends), C, LEVELS, 2), np.int64)
    for j, w in enumerate(blends):
        lev = dis.levels(w, table)
        h = base + np.bincount(dkey + lev.astype(np.int64) * 2, minlength=C * LEVELS * 2).reshape(C, LEVELS, 2)
        # Level 0: whatever is left of the counted pixels (every pixel reaches threshold 0).
        h[:, 0, 1] += st.truth_sum - h[:, :, 1].sum(1)
        h[:, 0, 0] += (st.n_keep - st.truth_sum) - h[:, :, 0].sum(1)
        out[j] = h
    return out


def components(st: Stack, configs: list[tuple[np.ndarray, np.ndarray]], table: np.ndarray):
    """Per configuration (weights (M, C), levels (C,)), per class: arrays (area, inter, scored) of the
    8-connected components of its mask at the original size (scored: the pixels the metric counts).
    A class's mask depends only on its blend and its level, so configurations sharing both share the work."""
    C = st.classes
    ny, nx = st.grid
    G, T = ny * nx, st.tile
    dis = Disagreeing(st, ~agree(st))
    cls = st.uclass
    fcls = st.fkeys // G
    ucls_start = np.searchsorted(cls, np.arange(C + 1))
    fcls_start = np.searchsorted(fcls, np.arange(C + 1))
    tcls = st.tkeys // G
    tcls_start = np.searchsorted(tcls, np.arange(C + 1))
    # A certain tile never touches an ignored pixel (those tiles are gathered), so inside = kept there.
    f_in = _tile_masks(st.fkeys, st.size, T, nx, G, None)[0]
    if f_in is None:
        f_in = np.ones((len(st.fkeys), T * T), bool)
    grid = TileGrid(ny, nx, T)
    blend_of: dict[bytes, int] = {}
    for w, _ in configs:
        blend_of.setdefault(np.ascontiguousarray(w).tobytes(), len(blend_of))
    levels: dict[int, np.ndarray] = {}
    done: dict[tuple[int, int, int], tuple] = {}
    out = []
    for w, lv in configs:
        b = blend_of[np.ascontiguousarray(w).tobytes()]
        per_class = []
        for c in range(C):
            key = (b, c, int(lv[c]))
            if key not in done:
                if b not in levels:
                    levels[b] = all_levels(st, w, dis, table)
                u0, u1 = ucls_start[c], ucls_start[c + 1]
                f0, f1 = fcls_start[c], fcls_start[c + 1]
                umask = levels[b][u0:u1] >= lv[c]
                if st.inside is not None:
                    umask &= st.inside[u0:u1]
                keys = np.concatenate([st.ukeys[u0:u1], st.fkeys[f0:f1]]) - c * G
                tls = np.concatenate([umask, f_in[f0:f1]])
                kept = None if st.keep is None else np.concatenate([st.keep[u0:u1], f_in[f0:f1]])
                any_pos = tls.any(1)
                tk = st.tkeys[tcls_start[c]:tcls_start[c + 1]] - c * G
                tt = st.ttiles[tcls_start[c]:tcls_start[c + 1]]
                done[key] = _label(keys[any_pos], tls[any_pos], None if kept is None else kept[any_pos],
                                   tk, tt, grid)
            per_class.append(done[key])
        out.append(per_class)
    return out


def _label(keys, tiles, kept, tkeys, ttiles, grid: TileGrid):
    """Components of one class's mask given by its positive tiles (``keys`` (n,) on the grid, ``tiles``
    (n, T*T) bool), with ``kept`` (n, T*T) the pixels the metric counts (None: all) and ``tkeys`` /
    ``ttiles`` the class's truth tiles: the tiles are grouped into 8-connected clusters on the tile grid
    (components cannot cross between clusters), and each cluster's bounding box is labelled at full
    resolution."""
    ny, nx, T = grid
    if not len(keys):
        z = np.zeros(0, np.int64)
        return z, z, z
    occ = np.zeros((ny, nx), np.uint8)
    yy, xx = keys // nx, keys % nx
    occ[yy, xx] = 1
    n_cl, cl = cv2.connectedComponents(occ, connectivity=8)
    lab = cl[yy, xx]
    areas, inters, scoreds = [], [], []
    for g in range(1, n_cl):
        sel = np.flatnonzero(lab == g)
        gy, gx = yy[sel], xx[sel]
        y0, x0 = gy.min(), gx.min()
        bh, bw = gy.max() - y0 + 1, gx.max() - x0 + 1
        canvas = np.zeros((bh, T, bw, T), np.uint8)
        canvas[gy - y0, :, gx - x0, :] = tiles[sel].reshape(-1, T, T)
        canvas = canvas.reshape(bh * T, bw * T)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(canvas, connectivity=8)
        areas.append(stats[1:, cv2.CC_STAT_AREA].astype(np.int64))
        truth = np.zeros((bh, T, bw, T), bool)
        if len(tkeys):
            pos = np.minimum(np.searchsorted(tkeys, keys[sel]), len(tkeys) - 1)
            hit = tkeys[pos] == keys[sel]
            truth[gy[hit] - y0, :, gx[hit] - x0, :] = ttiles[pos[hit]].reshape(-1, T, T)
        inters.append(np.bincount(labels[truth.reshape(bh * T, bw * T)], minlength=n)[1:].astype(np.int64))
        if kept is None:
            scoreds.append(areas[-1])
        else:
            km = np.zeros((bh, T, bw, T), bool)
            km[gy - y0, :, gx - x0, :] = kept[sel].reshape(-1, T, T)
            scoreds.append(np.bincount(labels[km.reshape(bh * T, bw * T)], minlength=n)[1:].astype(np.int64))
    return np.concatenate(areas), np.concatenate(inters), np.concatenate(scoreds)
