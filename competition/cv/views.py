"""An experiment's OOF across folds, the cached truth, and the image-by-image passes over both.

Rows follow the *canonical order* of the folds file: fold 0's ids (in file order), then fold 1's, and
so on. Every view (each member, the truth) uses it, so row i is the same image everywhere and one
fold's rows are contiguous, which is what nested CV slices on.

The truth is cached once per competition, split and data (``runs/_truth/<comp>-<key>/``) as a store
of the same format (0 or 255 per pixel, so only the tiles a boundary crosses keep their bytes), keyed by
the folds file's hash and a fingerprint of the data files (names, sizes, modification times): fixing a
label or changing the split rebuilds it.

Every pass is a function of one image (:mod:`competition.cv.sparse`), so :func:`map_images` runs them
on all cores, one image per task, each worker opening the stores itself; only small per-image results
travel back.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import shutil
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import pandas as pd

from competition import paths
from competition.cv import sparse
from competition.errors import UserError
from competition.io import STALE_AFTER_S, data_fingerprint
from competition.store import tiles


class OOFIncomplete(UserError, ValueError):
    """An experiment's OOF does not cover the folds file exactly; the message names the fold or ids."""


class Order(NamedTuple):
    """The canonical order: every row's image id and fold."""
    ids: list[str]
    fold_of: np.ndarray


def canonical_order(folds: pd.DataFrame) -> Order:
    """(ids, fold of each row): folds in ascending order, ids in folds-file order within a fold."""
    df = folds.sort_values("fold", kind="stable")
    return Order(df["id"].astype(str).tolist(), df["fold"].to_numpy(np.int64))


class Variant(NamedTuple):
    """One TTA variant of an OOF: its name ("" for the plain OOF), views and scales."""
    name: str
    tta: list
    tta_scales: list


class MemberOOF:
    """All folds' OOF of one experiment (one TTA variant), image by image in canonical order."""

    def __init__(self, experiment: str, order: Order, parts: list[tuple[Path, np.ndarray]], classes: list[str],
                 task: str, original_sizes: dict, variant: Variant):
        self.experiment = experiment
        self.ids, self.fold_of = order
        self.classes, self.task, self.original_sizes = classes, task, original_sizes
        self.variant, self.tta, self.tta_scales = variant.name, variant.tta, variant.tta_scales
        self.parts = parts  # per fold: (store folder, store row of each canonical row of the fold)
        self._where = [(p, int(r)) for p, (_, rows) in enumerate(parts) for r in rows]
        self._open: dict[int, tiles.Store] = {}

    @property
    def label(self) -> str:
        """``exp`` for the plain OOF, ``exp[variant]`` for a TTA variant (how members are printed)."""
        return f"{self.experiment}[{self.variant}]" if self.variant else self.experiment

    def __len__(self) -> int:
        return len(self.ids)

    def _store(self, p: int) -> tiles.Store:
        if p not in self._open:
            self._open[p] = tiles.open_store(self.parts[p][0])
        return self._open[p]

    def sparse(self, i: int) -> tiles.SparseImage:
        p, r = self._where[i]
        return self._store(p).sparse(r)

    def image(self, i: int) -> np.ndarray:
        """(C, H, W) uint8 probabilities of row ``i`` at its original size."""
        p, r = self._where[i]
        return self._store(p).image(r)

    @property
    def nbytes(self) -> int:
        return sum(self._store(p).nbytes for p in range(len(self.parts)))

    def __getstate__(self):  # a worker opens the stores itself
        return {**self.__dict__, "_open": {}}

    def subset(self, rows: np.ndarray) -> MemberOOF:
        """The same OOF over canonical rows ``rows`` only (ascending), e.g. without the excluded images."""
        rows = np.asarray(rows, np.int64)
        ids = [self.ids[i] for i in rows]
        kept = [[] for _ in self.parts]
        for i in rows:
            p, r = self._where[i]
            kept[p].append(r)
        parts = [(d, np.array(k, np.int64)) for (d, _), k in zip(self.parts, kept)]
        return MemberOOF(self.experiment, Order(ids, self.fold_of[rows]), parts, self.classes, self.task,
                         {i: self.original_sizes[i] for i in ids}, Variant(self.variant, self.tta, self.tta_scales))


def open_experiment(experiment: str, folds: pd.DataFrame, classes: list[str], task: str,
                    variant: str = "") -> MemberOOF:
    """Check that the experiment's OOF (plain, or one TTA variant) covers every id of the folds file
    exactly once, and open it."""
    order = canonical_order(folds)
    ids, fold_of = order
    fold_list = sorted(set(fold_of.tolist()))
    missing = [k for k in fold_list if not tiles.exists(paths.oof_dir(experiment, k, variant))]
    if missing:
        flag = f" --tta {variant.split('@')[0].replace('+', ' ')}" if variant else ""
        raise OOFIncomplete(
            f"experiment {experiment!r} has no OOF{f' for TTA variant {variant}' if variant else ''} for fold(s) "
            f"{missing} ({paths.oof_dir(experiment, missing[0], variant)} is missing). Train them (make train "
            f"EXP={experiment} FOLD={missing[0]}); for a fold already trained (best.pt present), "
            f"`competition oof {experiment}{flag}` writes its OOF.")
    parts, originals, tta = [], {}, None
    for k in fold_list:
        d = paths.oof_dir(experiment, k, variant)
        st = tiles.open_store(d)
        want = [i for i, f in zip(ids, fold_of) if f == k]
        _check_ids(experiment, k, d, st.ids, want)
        meta = st.meta
        if list(meta.get("classes", [])) != list(classes):
            raise OOFIncomplete(f"{d}/meta.json: classes {meta.get('classes')} differ from the competition's "
                                f"{classes}; the OOF was written for another class list")
        if meta.get("task", task) != task:
            raise OOFIncomplete(f"{d}/meta.json: task {meta.get('task')!r}, the competition's is {task!r}")
        pos = {s: r for r, s in enumerate(st.ids)}
        parts.append((d, np.array([pos[i] for i in want], np.int64)))
        originals.update({i: tuple(st.meta["original_sizes"][i]) for i in want})
        this = (list(meta.get("tta", ["identity"])), [float(x) for x in meta.get("tta_scales", [1.0])])
        if tta is not None and this != tta:
            raise OOFIncomplete(f"{d}/meta.json: TTA {this} differs from fold {fold_list[0]}'s {tta}")
        tta = this
    return MemberOOF(experiment, order, parts, list(classes), task, originals, Variant(variant, *tta))


def _check_ids(experiment: str, fold: int, d: Path, have: list[str], want: list[str]) -> None:
    seen, dup = set(), []
    for s in have:
        (dup.append(s) if s in seen else seen.add(s))
    lost, extra = sorted(set(want) - seen), sorted(seen - set(want))
    problems = []
    if lost:
        problems.append(f"missing id(s) {lost[:10]}{' ...' if len(lost) > 10 else ''}")
    if extra:
        problems.append(f"id(s) not in fold {fold} of the folds file {extra[:10]}{' ...' if len(extra) > 10 else ''}")
    if dup:
        problems.append(f"id(s) listed twice {sorted(set(dup))[:10]}")
    if problems:
        raise OOFIncomplete(f"experiment {experiment!r} fold {fold} ({d}/ids.json): " + "; ".join(problems) +
                            ". The OOF was written for a different split; retrain the fold, or restore the "
                            "folds file it was trained on.")


# --------------------------------------------------------------------------------------------- #
# The truth, as a store
# --------------------------------------------------------------------------------------------- #
def _truth_tiles(adapter, i: str):
    return tiles.split((adapter.load_mask(i) != 0).view(np.uint8) * np.uint8(255))


def write_truth(folder: Path, adapter, ids: list[str], classes: list[str], meta: dict | None = None,
                workers: int | None = None) -> tiles.Store:
    """Every image's (C, H, W) truth (nonzero = 1) at its original size, as 0/255 tiles (masks
    rasterised or decoded on every core, written here in row order)."""
    sizes = {i: tuple(adapter.image_size(i)) for i in ids}
    w = tiles.StoreWriter(folder, ids, classes, sizes, {"truth": True, **(meta or {})})
    try:
        for r, (index, payload) in map_pool(_truth_tiles, (adapter,), ids, workers):
            w.add_split(r, index, payload)
        w.close()
    finally:
        w.abort()
    return tiles.open_store(folder)


def truth_store(comp, adapter, ids: list[str], folds_sha: str, log=print) -> tiles.Store:
    """The truth of ``ids`` at their original sizes, built once into ``runs/_truth/`` and reused while
    nothing changed (the split, the data files)."""
    key = f"{folds_sha[:12]}-{data_fingerprint(comp.root())}"
    folder = paths.truth_store(comp.name, key)
    if tiles.exists(folder):
        try:
            st = tiles.open_store(folder)
            if st.ids == list(ids) and st.classes == list(comp.classes):
                st.verify_all()  # a cache: a damaged one is rebuilt, never scored against
                return st
        except tiles.StoreError as e:
            log(f"the truth store is damaged, rebuilding it: {e}".split("; delete the folder")[0])
        shutil.rmtree(folder, ignore_errors=True)  # ours (runs/_truth), damaged or for other ids: rebuilt
    tiles.clean_stale(paths.truth_dir(), STALE_AFTER_S)  # the temp folders of killed builds
    log(f"building the truth store {folder.relative_to(paths.project())} ({len(ids)} images) ...")
    st = write_truth(folder, adapter, ids, list(comp.classes), {"competition": comp.name, "key": key})
    for old in paths.truth_dir().glob(f"{comp.name}-*"):  # earlier keys of this competition
        if old.name != folder.name and old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
    return st


class MemoryTruth:
    """A few images' truth (one fold, at the end of training) held in memory, read like a truth store."""

    def __init__(self, adapter, ids: list[str], classes: list[str], tile: int = tiles.TILE):
        self.tile, self.n_classes, self.ids = tile, len(classes), list(ids)
        self._split, self.sizes = [], []
        for i in ids:
            m = (adapter.load_mask(i) != 0).view(np.uint8) * np.uint8(255)
            self._split.append(tiles.split(m, tile))
            self.sizes.append(tuple(m.shape[1:]))

    def sparse(self, i: int) -> tiles.SparseImage:
        index, payload = self._split[i]
        return tiles.SparseImage(index, payload, self.sizes[i], self.tile)

    def image(self, i: int) -> np.ndarray:
        index, payload = self._split[i]
        return tiles.assemble(index, payload, self.n_classes, self.sizes[i], self.tile)


class TruthRows:
    """Some rows of a truth store (or :class:`MemoryTruth`), read like it: the truth is built once for
    every image of the folds file, whichever of them a pass scores."""

    def __init__(self, truth, rows: np.ndarray):
        self.truth, self.rows = truth, [int(r) for r in rows]
        self.ids = [truth.ids[r] for r in self.rows]
        self.sizes = [tuple(truth.sizes[r]) for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def sparse(self, i: int) -> tiles.SparseImage:
        return self.truth.sparse(self.rows[i])

    def image(self, i: int) -> np.ndarray:
        return self.truth.image(self.rows[i])


# --------------------------------------------------------------------------------------------- #
# Images: what every pass reads
# --------------------------------------------------------------------------------------------- #
@dataclass
class Images:
    """The members' OOF, the truth store and (for ``ignore.metric: exclude``) the adapter, in canonical order."""
    members: list
    truth: tiles.Store
    adapter: object = None
    task: str = "multilabel"

    @property
    def ids(self) -> list[str]:
        return self.members[0].ids

    def __len__(self) -> int:
        return len(self.ids)

    def ignore(self, i: int) -> np.ndarray | None:
        """(H, W) bool: pixels of image ``i`` the metric leaves out, or None. With ``ignore.metric:
        exclude`` the ignored pixels are left out (the truth has no class there); the submission
        itself is not changed."""
        ig = getattr(getattr(self.adapter, "cfg", None), "ignore", None)
        if ig is None or ig.metric != "exclude":
            return None
        return np.asarray(self.adapter.load_ignore(self.ids[i]), bool)

    def keep(self, i: int) -> np.ndarray | None:
        ig = self.ignore(i)
        return None if ig is None else ~ig

    def stack(self, i: int) -> sparse.Stack:
        return sparse.stack([m.sparse(i) for m in self.members], self.truth.sparse(i), len(self.members[0].classes),
                            self.ignore(i))

    def dense(self, i: int) -> tuple[list[np.ndarray], np.ndarray]:
        """(members' (C, H, W) uint8, (C, H, W) bool truth) of image ``i``."""
        return [m.image(i) for m in self.members], self.truth.image(i) > 0

    def without(self, exclude) -> Images:
        """These images less the ids in ``exclude`` (``data.exclude``): what is scored and chosen on.
        Their OOF stays in the stores; only the rows read here change."""
        rows = np.array([r for r, i in enumerate(self.ids) if i not in exclude], np.int64)
        if len(rows) == len(self.ids):
            return self
        if not len(rows):
            raise UserError(f"data.exclude leaves out all {len(self.ids)} images: nothing is left to score")
        return Images([m.subset(rows) for m in self.members], TruthRows(self.truth, rows), self.adapter, self.task)

_WORKER: dict = {}


def _init(fn, first: tuple, items: list) -> None:
    _WORKER.update(fn=fn, first=first, items=items)


def _call(k: int):
    return k, _WORKER["fn"](*_WORKER["first"], _WORKER["items"][k])


def default_workers() -> int:
    """Every core this process may use (``os.sched_getaffinity`` where the OS has it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def map_pool(fn, first: tuple, items: list, workers: int | None = None):
    """Yield (k, fn(*first, items[k])) for every item, in order of completion when ``workers`` > 1.

    Processes (forked where the OS allows: the arguments are inherited, not pickled) over the items,
    at most two in flight per worker, so memory is bounded by a few items' work whatever their number;
    only the results travel back. A worker that dies (killed, out of memory) raises at once
    (``BrokenProcessPool``) instead of leaving the pass waiting for it.
    """
    n = len(items)
    workers = default_workers() if workers is None else max(1, int(workers))
    if workers == 1 or n < 2:
        for k in range(n):
            yield k, fn(*first, items[k])
        return
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    # OpenCV's thread pool does not survive a fork: a child that touches it (even to resize it) can wait
    # forever on a lock held by a thread that no longer exists. With the pool off while the workers are
    # forked, they start without one; one process per core is the parallelism here anyway.
    threads = cv2.getNumThreads()
    cv2.setNumThreads(0)
    try:
        with ProcessPoolExecutor(min(workers, n), mp_context=ctx, initializer=_init,
                                 initargs=(fn, first, items)) as pool:
            pending, nxt = set(), 0
            while nxt < n or pending:
                while nxt < n and len(pending) < 2 * workers:
                    pending.add(pool.submit(_call, nxt))
                    nxt += 1
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    yield f.result()
    finally:
        cv2.setNumThreads(threads)


def map_images(images: Images, fn, args: tuple = (), workers: int | None = None):
    """Yield (i, fn(images, i, *args)) for every image (:func:`map_pool` over the image indices)."""
    yield from map_pool(_image_call, (images, fn, args), list(range(len(images))), workers)


def _image_call(images: Images, fn, args: tuple, i: int):
    return fn(images, i, *args)
