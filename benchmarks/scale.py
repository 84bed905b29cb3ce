"""``python -m benchmarks scale [--images N ...] [--workers W] [--keep DIR]``: the ensemble at the real job's size.

The hand-bone competition: 800 training images x 29 overlapping classes at 2048 x 2048. In a temporary
project, for each N of ``--images`` (default 100 then 200):

1. ``competition folds`` on a copy of ``synthetic-hands-2048`` with N training images (the generator's
   polygons are the truth; 5 group folds);
2. 8 candidate members = 4 experiments x (plain, identity+hflip) written through the store's own
   writer (:class:`competition.store.tiles.StoreWriter`) fold by fold, exactly where training puts them.
   Each member's probabilities look like a model's at 512 -> 2048: the truth rasterised at 512, blurred,
   a smooth per-member logit field (so members disagree along the boundaries), a few spurious blobs,
   a sigmoid, uint8, then bilinear x4 to 2048 (a model's upsampling head). Experiment ``scale-d`` is the
   poor one (wider blur, stronger field, more blobs); a TTA variant is its plain member plus a little
   noise of its own.
3. the whole ``competition ensemble`` in this process (truth store, search view, Caruana with nested CV,
   thresholds, post-processing, recipe, summary), all cores.

It prints, per N: disk per member (and the stored-tile and uncertain fractions), write time, the
ensemble's wall time and the peak resident memory of the process tree (this process and its workers,
their proportional set sizes summed every 0.2 s: a page a forked worker shares with this process counts
once in all). Then the cost per
image from the two largest N (linear: every pass streams image by image; the search view grows with
the uncertain pixels) extrapolated to 800 images, beside the dense store of earlier versions (uint8 at
the model's 2048 output: N x C x H x W bytes per member). The last three lines:

    OOF per member: <x> GB
    ensemble: <x> min
    peak RSS: <x> GB

Not part of ``make bench`` (minutes). No assertion on time; the load average is printed beside every
figure.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import yaml

from benchmarks.harness import load

REPO = Path(__file__).resolve().parent.parent
TARGET_IMAGES, NATIVE, MODEL = 800, 2048, 512
COMP = "scale-hands"
EXPERIMENTS = {  # name -> (blur sigma at 512, logit field amplitude, spurious blobs per image)
    "scale-a": (1.0, 0.8, 1),
    "scale-b": (1.3, 1.0, 1),
    "scale-c": (1.1, 1.2, 2),
    "scale-d": (2.5, 2.5, 6),  # the poor member
}
VARIANTS = ("", "identity+hflip")


# --------------------------------------------------------------------------------------------- #
# Members that look like a model's probabilities
# --------------------------------------------------------------------------------------------- #
def member_probs(mask512: np.ndarray, seed: int, blur: float, field: float, blobs: int,
                 jitter: float = 0.0, jitter_seed: int = 0) -> np.ndarray:
    """(C, 512, 512) bool truth -> (C, 2048, 2048) uint8 probabilities of a plausible member."""
    rng = np.random.default_rng(seed)
    C = mask512.shape[0]
    logit = np.empty(mask512.shape, np.float32)
    for c in range(C):
        soft = cv2.GaussianBlur(mask512[c].astype(np.float32), (0, 0), blur)
        smooth = cv2.resize(rng.normal(0, field, (8, 8)).astype(np.float32), (MODEL, MODEL),
                            interpolation=cv2.INTER_CUBIC)
        logit[c] = 24.0 * (soft - 0.5) + smooth  # about -12 far from a bone: 0 after quantisation, as a trained model
    for _ in range(blobs):
        c = int(rng.integers(C))
        x, y = (int(v) for v in rng.integers(20, MODEL - 20, 2))
        cv2.circle(logit[c], (x, y), int(rng.integers(2, 8)), 10.0, -1)
    if jitter:
        logit += np.random.default_rng(jitter_seed).normal(0, jitter, logit.shape).astype(np.float32)
    q = np.round(255.0 / (1.0 + np.exp(-np.clip(logit, -30, 30)))).astype(np.uint8)
    out = np.empty((C, NATIVE, NATIVE), np.uint8)
    for c in range(C):
        cv2.resize(q[c], (NATIVE, NATIVE), dst=out[c], interpolation=cv2.INTER_LINEAR)
    return out


def _write_store(task: tuple[str, str, int]) -> tuple[int, float]:
    """One member's store for one fold (run in a worker, in the project folder) -> (bytes, seconds)."""
    from competition import paths
    from competition.config import load_competition
    from competition.data.adapters import make_adapter
    from competition.folds import load_folds
    from competition.store import tiles
    exp, variant, fold = task
    t = time.perf_counter()
    comp = load_competition(COMP)
    adapter = make_adapter(comp)
    folds = load_folds(comp, adapter)
    ids = folds.loc[folds["fold"] == fold, "id"].astype(str).tolist()
    blur, field, blobs = EXPERIMENTS[exp]
    e = list(EXPERIMENTS).index(exp)
    w = tiles.StoreWriter(paths.oof_dir(exp, fold, variant), ids, comp.classes,
                          {i: adapter.image_size(i) for i in ids},
                          {"experiment": exp, "fold": fold, "task": comp.task,
                           "tta": variant.split("+") if variant else ["identity"], "tta_scales": [1.0],
                           "variant": variant})
    try:
        for r, i in enumerate(ids):
            seed = 1000 * e + adapter.ids.index(i)
            m = adapter.load_mask(i, (MODEL, MODEL)) != 0
            w.add(r, member_probs(m, seed, blur, field, blobs, jitter=0.3 if variant else 0.0, jitter_seed=seed + 7))
        w.close()
    finally:
        w.abort()
    (paths.run_dir(exp, fold) / "best.pt").write_bytes(f"{exp}-{fold}".encode())  # the recipe hashes it
    return tiles.open_store(paths.oof_dir(exp, fold, variant)).nbytes, time.perf_counter() - t


# --------------------------------------------------------------------------------------------- #
# Peak memory of this process and its workers
# --------------------------------------------------------------------------------------------- #
def _rss(pid: int) -> int:
    """Proportional set size: a page shared by k processes (a forked worker's inherited memory) counts
    1/k in each, so the sum over the process tree is the memory the job really holds."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) << 10
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def tree_rss(pid: int | None = None) -> int:
    pid = os.getpid() if pid is None else pid
    return _rss(pid) + sum(tree_rss(c) for c in _children(pid))


class TreePeak:
    def __init__(self):
        self.peak, self._stop = tree_rss(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, tree_rss())

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return max(self.peak, tree_rss())


# --------------------------------------------------------------------------------------------- #
# One size
# --------------------------------------------------------------------------------------------- #
def _project(root: Path, n_images: int) -> None:
    (root / "configs/competitions").mkdir(parents=True)
    (root / "configs/experiments").mkdir(parents=True)
    comp = yaml.safe_load((REPO / "configs/competitions/synthetic-hands-2048.yaml").read_text())
    comp.update(name=COMP, data_root=f"data/{COMP}", folds=5)
    comp["synthetic"] = {**comp["synthetic"], "subjects": n_images // 2, "test_subjects": 1, "images_per_subject": 2}
    (root / f"configs/competitions/{COMP}.yaml").write_text(yaml.safe_dump(comp, sort_keys=False))
    for name in EXPERIMENTS:
        (root / f"configs/experiments/{name}.yaml").write_text(yaml.safe_dump(
            {"name": name, "competition": COMP, "data": {"input_size": MODEL, "workers": 0},
             "tracking": {"wandb": False}}))


def run_size(n_images: int, workers: int, keep: Path | None) -> dict:
    from competition.cv.views import default_workers
    root = Path(tempfile.mkdtemp(prefix="scale-")) if keep is None else keep / f"n{n_images}"
    if root.exists() and keep is not None:
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    here = os.getcwd()
    os.chdir(root)
    try:
        _project(root, n_images)
        from competition.cli import main
        t = time.perf_counter()
        assert main(["folds", "--comp", COMP]) == 0
        print(f"  data + folds: {time.perf_counter() - t:.0f} s  [{load()}]", flush=True)
        import multiprocessing as mp
        tasks = [(e, v, k) for e in EXPERIMENTS for v in VARIANTS for k in range(5)]
        t = time.perf_counter()
        ctx = mp.get_context("fork")
        with ctx.Pool(workers or default_workers()) as pool:
            written = pool.map(_write_store, tasks, chunksize=1)
        write_s = time.perf_counter() - t
        members = len(EXPERIMENTS) * len(VARIANTS)
        per_member = sum(b for b, _ in written) / members
        member_image_s = sum(s for _, s in written) / (members * n_images)
        print(f"  {members} members written: {write_s:.0f} s wall, {member_image_s:.2f} s per member-image in one "
              f"process; {per_member / 1e6:.1f} MB per member  [{load()}]", flush=True)
        from competition import ensemble
        peak = TreePeak()
        base = tree_rss()
        t = time.perf_counter()
        _, _, res = ensemble.run("scale", list(EXPERIMENTS), ensemble.EnsembleOptions(workers=workers or None),
                                 log=lambda m: print("  | " + m, flush=True))
        ens_s = time.perf_counter() - t
        top = peak.stop()
        rec = res["recipe"]
        dense = n_images * 29 * NATIVE * NATIVE
        out = {"images": n_images, "per_member": per_member, "write_s": write_s, "member_image_s": member_image_s,
               "ensemble_s": ens_s, "peak": top, "base": base, "dense": dense,
               "uncertain": rec.scores["search"]["uncertain_fraction"], "stored": per_member / dense,
               "cv": rec.scores["nested"], "load": load()}
        print(f"  N={n_images}: OOF {per_member / 1e9:.3f} GB per member ({out['stored']:.2%} of the dense "
              f"{dense / 1e9:.1f} GB), search view {out['uncertain']:.3%} of pixel x class pairs, ensemble "
              f"{ens_s:.0f} s, peak RSS {top / 2**30:.2f} GiB (process tree, PSS; {base / 2**30:.2f} before), "
              f"nested CV {out['cv']:.4f}  [{out['load']}]", flush=True)
        return out
    finally:
        os.chdir(here)
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)


def _extrapolate(a: dict, b: dict, key: str, n: int = TARGET_IMAGES) -> float:
    slope = (b[key] - a[key]) / (b["images"] - a["images"])
    return b[key] + slope * (n - b["images"])


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, nargs="+", default=[100, 200],
                   help="training images per run (default 100 200: the second shows the cost is linear)")
    p.add_argument("--workers", type=int, default=0, help="processes (default: every core)")
    p.add_argument("--keep", type=Path, default=None, help="keep each run's project under this folder")
    args = p.parse_args(argv)
    sizes = sorted(set(args.images))
    if any(n < 10 or n % 2 for n in sizes):
        p.error("--images: even numbers >= 10 (two hands per subject)")
    print(f"scale: {sizes} images x 29 classes x {NATIVE}^2, {len(EXPERIMENTS) * len(VARIANTS)} members, "
          f"{os.cpu_count()} cpus  [{load()}]", flush=True)
    runs = []
    for n in sizes:
        print(f"\n== {n} images  [{load()}]", flush=True)
        runs.append(run_size(n, args.workers, args.keep))
    print("\nper run: images, GB per member, write s, ensemble s, peak RSS GiB, load")
    for r in runs:
        print(f"  {r['images']:4d}  {r['per_member'] / 1e9:.3f}  {r['write_s']:6.0f}  {r['ensemble_s']:6.0f}  "
              f"{r['peak'] / 2**30:5.2f}  [{r['load']}]")
    last = runs[-1]
    if last["images"] >= TARGET_IMAGES or len(runs) == 1:
        scale = TARGET_IMAGES / last["images"]
        per_member, ens_s, peak = last["per_member"] * scale, last["ensemble_s"] * scale, last["peak"]
        how = ("measured" if last["images"] >= TARGET_IMAGES
               else f"x{scale:g} from {last['images']} images (peak RSS as measured)")
    else:
        a, b = runs[-2], runs[-1]
        for key in ("per_member", "ensemble_s", "peak", "write_s"):
            ratio = b[key] / max(a[key], 1e-9)
            print(f"linearity {key}: {a['images']} -> {b['images']} images: x{ratio:.2f} "
                  f"(x{b['images'] / a['images']:.2f} images)")
        per_member, ens_s = _extrapolate(a, b, "per_member"), _extrapolate(a, b, "ensemble_s")
        peak = _extrapolate(a, b, "peak")
        how = f"extrapolated linearly from {a['images']} and {b['images']} images"
    dense = TARGET_IMAGES * 29 * NATIVE * NATIVE
    print(f"\nat {TARGET_IMAGES} images ({how}):")
    print(f"  the dense store of earlier versions (uint8 at the 2048 output): {dense / 1e9:.1f} GB per member "
          f"(computed), {dense * 8 / 1e9:.0f} GB for these 8 members")
    write_min = (_extrapolate(runs[-2], runs[-1], "write_s") / 60 if len(runs) > 1
                 else last["write_s"] * TARGET_IMAGES / last["images"] / 60)
    print(f"  writing the 8 members: {write_min:.1f} min "
          f"on this machine (a GPU run writes each fold's OOF while predicting it)")
    print(f"OOF per member: {per_member / 1e9:.2f} GB")
    print(f"ensemble: {ens_s / 60:.1f} min")
    print(f"peak RSS: {peak / 2**30:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
