"""Caruana's ensemble search on a synthetic OOF store: ours against a plain float32 numpy version.

Store: 3 experiments x 200 images x 29 classes x 256² (5 folds), written with ``competition.oof``;
hand-bone-like ellipses per class, members with their own blur, low-frequency noise, boundary shift,
missed and spurious blobs. Both implementations run the same search (global weights, threshold 0.5,
10 greedy steps with replacement, first index on ties) and must return the same weights.

- ours: ``compact.build`` (one streaming pass over the uint8 files) + ``search.caruana``; timed from
  the files on disk, so reading and pruning are included.
- peer: the members loaded as float32 arrays (not timed), then per candidate ``(S + P[m]) / (k + 1)
  >= 127.5`` and counts with ``np.count_nonzero``, i.e. what a notebook would write.

Each runs in a fresh process; memory is its peak resident set (VmHWM) minus the peak after imports
and opening the store, per pixel·class·experiment. A second, smaller case replaces one member with uniform
noise, which makes most pixels uncertain: the worst case for our pruning.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

N_IMAGES, N_CLASSES, SIZE, N_MEMBERS, FOLDS, STEPS = 200, 29, 256, 3, 5, 10
STRESS_IMAGES = 40


def _truth(rng, n: int) -> np.ndarray:
    t = np.zeros((n, N_CLASSES, SIZE, SIZE), np.uint8)
    for i in range(n):
        for c in range(N_CLASSES):
            centre = tuple(int(v) for v in rng.integers(40, SIZE - 40, 2))
            axes = tuple(int(v) for v in rng.integers(6, 30, 2))
            cv2.ellipse(t[i, c], centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return t


def _member(rng, truth: np.ndarray, sigma: float, amp: float, shift: int) -> np.ndarray:
    out = np.empty(truth.shape, np.uint8)
    for i in range(len(truth)):
        t = np.roll(truth[i], shift, axis=-1).transpose(1, 2, 0).astype(np.float32)
        p = cv2.GaussianBlur(t, (0, 0), sigma)
        noise = cv2.resize(rng.normal(0, amp, (16, 16, N_CLASSES)).astype(np.float32), (SIZE, SIZE))
        p = p.reshape(SIZE, SIZE, N_CLASSES) + noise.reshape(SIZE, SIZE, N_CLASSES)
        missed = rng.random(N_CLASSES) < 0.05
        p[:, :, missed] *= 0.4
        for c in np.flatnonzero(rng.random(N_CLASSES) < 0.05):  # a spurious blob
            y, x = (int(v) for v in rng.integers(20, SIZE - 20, 2))
            p[y - 6:y + 6, x - 6:x + 6, c] += 0.7
        out[i] = np.clip(np.rint(p * 255), 0, 255).astype(np.uint8).transpose(2, 0, 1)
    return out


def make_store(root: Path, n: int, noise_member: bool = False, seed: int = 0) -> None:
    """Write runs/m<k>/fold<f>/oof/ for each member, folds.csv and truth.npy under ``root``."""
    import pandas as pd

    from competition import oof
    from competition.ensemble.store import write_truth
    rng = np.random.default_rng(seed)
    ids = [f"img{i:04d}" for i in range(n)]
    folds = pd.DataFrame({"id": ids, "group": ids, "fold": np.arange(n) % FOLDS})
    folds.to_csv(root / "folds.csv", index=False)
    classes = [f"c{c}" for c in range(N_CLASSES)]
    truth = _truth(rng, n)
    write_truth(root / "truth.npy", iter(truth[np.argsort(folds["fold"].to_numpy(), kind="stable")]),
                n, N_CLASSES, (SIZE, SIZE))
    specs = [(2.0, 0.08, 0), (3.5, 0.12, 1), (1.2, 0.10, -1)]
    for m, (sigma, amp, shift) in enumerate(specs):
        probs = rng.integers(0, 256, truth.shape, dtype=np.uint8) if noise_member and m == 2 \
            else _member(rng, truth, sigma, amp, shift)
        for f in range(FOLDS):
            rows = np.flatnonzero(folds["fold"].to_numpy() == f)
            oof.write(root / "runs" / f"m{m}" / f"fold{f}" / "oof", [ids[r] for r in rows],
                      [(list(range(len(rows))), probs[rows])], classes, (SIZE, SIZE), {"task": "multilabel"})
        del probs


def _rss() -> int:
    """Peak resident set of this process image (VmHWM): unlike ru_maxrss, not inherited from the
    parent through fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _open(root: Path):
    import pandas as pd

    from competition.ensemble import store
    os.chdir(root)
    folds = pd.read_csv(root / "folds.csv", dtype={"id": str, "group": str})
    classes = [f"c{c}" for c in range(N_CLASSES)]
    views = [store.open_experiment(f"m{m}", folds, classes, "multilabel") for m in range(N_MEMBERS)]
    truth = store.TruthView(root / "truth.npy", views[0].ids, classes, (SIZE, SIZE))
    return views, truth


def worker(which: str, root: str) -> None:
    """Run one implementation in this (fresh) process and print a JSON line."""
    from competition.ensemble import compact, search
    from competition.metrics import dice_from_counts
    root = Path(root)
    views, truth = _open(root)
    base = _rss()
    if which == "ours":
        t = time.perf_counter()
        ev = compact.build(views, truth, "multilabel", 0.5)
        res = search.caruana(ev, np.ones(len(truth), bool), 1.0, steps=STEPS, patience=STEPS)
        seconds, n, score = time.perf_counter() - t, res.weights[0].tolist(), res.score
        extra = {"uncertain": ev.uncertain / (len(truth) * N_CLASSES * SIZE * SIZE)}
    else:
        N = len(truth)
        P = [v.read(0, N).reshape(N, N_CLASSES, -1).astype(np.float32) for v in views]
        T = truth.read(0, N).reshape(N, N_CLASSES, -1)
        t = time.perf_counter()
        tsum = np.count_nonzero(T, axis=-1)
        S, k = np.zeros_like(P[0]), 0
        counts, best, best_n = np.zeros(N_MEMBERS, int), -np.inf, None
        for _ in range(STEPS):
            scores = []
            for m in range(N_MEMBERS):
                pred = (S + P[m]) / (k + 1) >= 127.5
                d = dice_from_counts(np.count_nonzero(pred & T, axis=-1), np.count_nonzero(pred, axis=-1), tsum)
                scores.append(d.mean())
            m = int(np.argmax(scores))
            S += P[m]
            k += 1
            counts[m] += 1
            if scores[m] > best + 1e-12:
                best, best_n = scores[m], counts.copy()
        seconds, n, score, extra = time.perf_counter() - t, best_n.tolist(), float(best), {}
    print(json.dumps({"seconds": seconds, "peak": _rss(), "base": base, "weights": n, "score": score, **extra}))


def _run(which: str, root: Path) -> dict:
    repo = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", f"from benchmarks.bench_ensemble import worker; "
                        f"worker({which!r}, {str(root)!r})"], cwd=repo, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(repo)})
    if r.returncode != 0:
        raise RuntimeError(f"{which} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _compare(label: str, n: int, noise_member: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_ensemble_") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        make_store(root, n, noise_member)
        elems = n * N_CLASSES * SIZE * SIZE * N_MEMBERS
        print(f"{label}: {N_MEMBERS} experiments x {n} images x {N_CLASSES} classes x {SIZE}² "
              f"({elems / 1e9:.2f} G pixel·class·experiment; store written in {time.perf_counter() - t:.0f} s)",
              flush=True)
        ours = _run("ours", root)
        peer = _run("peer", root)
    same = ours["weights"] == peer["weights"] and abs(ours["score"] - peer["score"]) < 1e-9
    print(f"  ours  {ours['seconds']:7.2f} s  {(ours['peak'] - ours['base']) / elems:5.3f} B/elem "
          f"(peak RSS {ours['peak'] / 2**20:.0f} MiB; {ours['uncertain']:.1%} of pixel·class pairs uncertain)")
    print(f"  peer  {peer['seconds']:7.2f} s  {(peer['peak'] - peer['base']) / elems:5.3f} B/elem "
          f"(peak RSS {peer['peak'] / 2**20:.0f} MiB; float32 in memory, load not timed)")
    print(f"  speed-up {peer['seconds'] / ours['seconds']:.1f}x (target >= 4x); memory "
          f"{(ours['peak'] - ours['base']) / elems:.3f} B per pixel·class·experiment (target <= 1); "
          f"same weights {ours['weights']} and score {ours['score']:.6f}: {'yes' if same else 'NO'}", flush=True)


def main() -> None:
    _compare("typical members", N_IMAGES, noise_member=False)
    _compare("worst case for pruning (one member is uniform noise)", STRESS_IMAGES, noise_member=True)


if __name__ == "__main__":
    main()
