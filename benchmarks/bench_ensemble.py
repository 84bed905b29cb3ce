"""Caruana's ensemble search on a synthetic OOF store: ours against two numpy peers.

Store: 3 experiments x N images x 29 classes x 256² (5 folds), written with the store's own writer
(``competition.store.tiles.StoreWriter``);
one bone-sized ellipse per image and class, members with their own blur, gain, boundary shift and
low-frequency noise with a positive bias, the kind of soft, disagreeing predictions real OOF of the
default experiments has (15.5% of its pixel·class pairs were uncertain; the printed fraction here must
be >= 10%). All sides run the same search (global weights, threshold 0.5, 10 greedy steps with
replacement, first index on ties) and must return the same weights and score.

- ours: ``compact.from_images`` (one pass over the stores' tiles, image by image in this process,
  keeping only the pixels whose blend can still change) + ``search.caruana``; timed from the files on
  disk (in the page cache after the warm-up), so reading and pruning are included.
- naive float32: the members as float32 arrays in memory (loaded before, not timed), per candidate
  ``(S + P[m]) / (k + 1) >= 127.5`` and counts with ``np.count_nonzero``: what a notebook writes.
- careful uint16: the members as uint8 in memory (not timed); the running sum S in uint16, each
  candidate ``np.add(S, U[m], out=tmp)`` and an integer cut, bool results in reused buffers: no
  float temporaries, ~6 bytes of working memory per pixel·class whatever the number of members.

The time is linear in the number of images (each side makes the same passes over every image), so
the case is scaled down to fit ``make bench`` and the mins are extrapolated to the hand-bone training
set (800 images). A second, small case replaces one member with uniform noise, which leaves about half
the pixel·class pairs uncertain: the worst case for our pruning.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from benchmarks.harness import compare

N_IMAGES, N_CLASSES, SIZE, N_MEMBERS, FOLDS, STEPS = 15, 29, 256, 3, 5, 10
STRESS_IMAGES, FULL_IMAGES = 5, 800
# (blur sigma, noise amplitude, boundary shift, noise grid, noise bias, gain) per member
SPECS = [(3.0, 0.22, 0, 24, 0.15, 0.85), (5.0, 0.27, 2, 24, 0.20, 0.80), (2.0, 0.27, -2, 24, 0.20, 0.80)]
CUT = 127.5  # threshold 0.5 on the 0..255 scale


def _truth(rng, n: int) -> np.ndarray:
    t = np.zeros((n, N_CLASSES, SIZE, SIZE), np.uint8)
    for i in range(n):
        for c in range(N_CLASSES):
            centre = tuple(int(v) for v in rng.integers(50, SIZE - 50, 2))
            axes = tuple(int(v) for v in rng.integers(12, 50, 2))
            cv2.ellipse(t[i, c], centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return t


def _member(rng, truth: np.ndarray, sigma: float, amp: float, shift: int, grid: int, bias: float,
            gain: float) -> np.ndarray:
    out = np.empty(truth.shape, np.uint8)
    for i in range(len(truth)):
        t = np.roll(truth[i], shift, axis=-1).transpose(1, 2, 0).astype(np.float32)
        p = cv2.GaussianBlur(t, (0, 0), sigma) * gain
        p += cv2.resize(rng.normal(bias, amp, (grid, grid, N_CLASSES)).astype(np.float32), (SIZE, SIZE))
        out[i] = np.clip(np.rint(p * 255), 0, 255).astype(np.uint8).transpose(2, 0, 1)
    return out


def make_store(root: Path, n: int, noise_member: bool = False, seed: int = 0) -> None:
    """Write runs/m<k>/fold<f>/oof/ for each member, folds.csv and the truth store under ``root``."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    ids = [f"img{i:04d}" for i in range(n)]
    folds = pd.DataFrame({"id": ids, "group": ids, "fold": np.arange(n) % FOLDS})
    folds.to_csv(root / "folds.csv", index=False)
    classes = [f"c{c}" for c in range(N_CLASSES)]
    sizes = {i: (SIZE, SIZE) for i in ids}
    truth = _truth(rng, n)
    order = np.argsort(folds["fold"].to_numpy(), kind="stable")  # canonical order
    _write(root / "truth", [ids[r] for r in order], classes, sizes, truth[order].astype(np.uint8) * 255)
    for m, spec in enumerate(SPECS):
        probs = rng.integers(0, 256, truth.shape, dtype=np.uint8) if noise_member and m == 2 \
            else _member(rng, truth, *spec)
        for f in range(FOLDS):
            rows = np.flatnonzero(folds["fold"].to_numpy() == f)
            _write(root / "runs" / f"m{m}" / f"fold{f}" / "oof", [ids[r] for r in rows], classes, sizes, probs[rows])
        del probs


def _write(folder: Path, ids: list, classes: list, sizes: dict, probs: np.ndarray) -> None:
    from competition.store import tiles
    w = tiles.StoreWriter(folder, ids, classes, sizes, {"task": "multilabel"})
    for r in range(len(ids)):
        w.add(r, probs[r])
    w.close()


def _open(root: Path):
    import pandas as pd

    from competition.store import tiles
    from competition.store import views as store
    folds = pd.read_csv(root / "folds.csv", dtype={"id": str, "group": str})
    classes = [f"c{c}" for c in range(N_CLASSES)]
    views = [store.open_experiment(f"m{m}", folds, classes, "multilabel") for m in range(N_MEMBERS)]
    return views, tiles.open_store(root / "truth")


def ours(views, truth, stats: dict):
    from competition.cv import compact
    from competition.cv.views import Images
    from competition.ensemble import search
    ev = compact.from_images(Images(views, truth, None, "multilabel"), 0.5, workers=1)
    res = search.caruana(ev, np.ones(len(truth), bool), 1.0, steps=STEPS, patience=STEPS)
    stats["uncertain"] = ev.uncertain / (len(truth) * N_CLASSES * SIZE * SIZE)
    return res.weights[0].tolist(), float(res.score)


def _greedy(score_of, add, n_members: int) -> tuple[list[int], float]:
    """The Caruana loop both peers share: ``score_of(m, k)`` scores the sum S plus member m as the mean
    of k + 1 members; ``add(m)`` adds member m to S."""
    counts, best, best_n = np.zeros(n_members, int), -np.inf, None
    for k in range(STEPS):
        scores = [score_of(m, k) for m in range(n_members)]
        m = int(np.argmax(scores))
        add(m)
        counts[m] += 1
        if scores[m] > best + 1e-12:
            best, best_n = scores[m], counts.copy()
    return best_n.tolist(), float(best)


def naive(P: list[np.ndarray], T: np.ndarray):
    from competition.metrics import dice_from_counts
    tsum = np.count_nonzero(T, axis=-1)
    S = np.zeros_like(P[0])

    def score_of(m: int, k: int) -> float:
        pred = (S + P[m]) / (k + 1) >= CUT
        return dice_from_counts(np.count_nonzero(pred & T, axis=-1), np.count_nonzero(pred, axis=-1), tsum).mean()

    def add(m: int) -> None:
        S.__iadd__(P[m])

    return _greedy(score_of, add, len(P))


def careful(U: list[np.ndarray], T: np.ndarray):
    """uint16 running sum, integer cut, every temporary preallocated (6 bytes per pixel·class)."""
    from competition.metrics import dice_from_counts
    tsum = np.count_nonzero(T, axis=-1)
    S = np.zeros(U[0].shape, np.uint16)
    tmp = np.empty_like(S)
    pred, both = np.empty(S.shape, bool), np.empty(S.shape, bool)

    def score_of(m: int, k: int) -> float:
        np.add(S, U[m], out=tmp)
        # (S + u) / (k + 1) >= 127.5  <=>  S + u >= 127.5 (k + 1), an integer: ceil(255 (k + 1) / 2)
        np.greater_equal(tmp, (255 * (k + 1) + 1) // 2, out=pred)
        np.logical_and(pred, T, out=both)
        return dice_from_counts(np.count_nonzero(both, axis=-1), np.count_nonzero(pred, axis=-1), tsum).mean()

    def add(m: int) -> None:
        np.add(S, U[m], out=S)

    return _greedy(score_of, add, len(U))


def same_search(a, b) -> str:
    assert a[0] == b[0], f"weights {a[0]} vs {b[0]}"
    assert abs(a[1] - b[1]) < 1e-9, f"score {a[1]:.12f} vs {b[1]:.12f}"
    return f"same weights {a[0]} and score {a[1]:.6f} (|diff| {abs(a[1] - b[1]):.1e} < 1e-9)"


def _case(label: str, n: int, noise_member: bool) -> None:
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="bench_ensemble_") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        make_store(root, n, noise_member)
        os.chdir(root)  # the store resolves runs/<exp>/ from the project folder
        try:
            views, truth = _open(root)
            N = len(truth)
            T = np.stack([truth.image(i) > 0 for i in range(N)]).reshape(N, N_CLASSES, -1)
            U = [np.stack([v.image(i) for i in range(N)]).reshape(N, N_CLASSES, -1) for v in views]
            P = [u.astype(np.float32) for u in U]
            elems = N * N_CLASSES * SIZE * SIZE * N_MEMBERS
            stats: dict = {}
            ours(views, truth, stats)
            print(f"{label}: {N_MEMBERS} experiments x {n} images x {N_CLASSES} classes x {SIZE}² "
                  f"({elems / 1e6:.0f} M pixel·class·experiment; store written in {time.perf_counter() - t:.0f} s); "
                  f"{stats['uncertain']:.1%} of pixel·class pairs uncertain (realistic: >= 10%)", flush=True)
            res = compare(
                f"Caruana search, {label}", lambda: ours(views, truth, stats),
                {"naive float32": lambda: naive(P, T), "careful uint16": lambda: careful(U, T)},
                rounds=5, check=same_search, memory=True,
                scaled=f"{n} of the hand-bone set's {FULL_IMAGES} images; every side's cost is linear in images, "
                       f"so the mins x {FULL_IMAGES / n:.0f} estimate the full set",
                extrapolate=(FULL_IMAGES / n, f"at {FULL_IMAGES} images"),
                note="inputs: ours reads the OOF files (page cache), naive holds float32 copies (4 B/elem) and "
                     "careful uint8 arrays (1 B/elem) loaded before timing")
            print("   peak working memory per pixel·class·experiment (over the inputs): " + ", ".join(
                f"{k} {v / elems:.2f} B" for k, v in res.peak.items()), flush=True)
        finally:
            os.chdir(cwd)


def main() -> None:
    _case("typical members", N_IMAGES, noise_member=False)
    _case("worst case for pruning (one member is uniform noise)", STRESS_IMAGES, noise_member=True)


if __name__ == "__main__":
    main()
