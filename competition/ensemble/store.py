"""An experiment's OOF as one (N, C, h, w) uint8 view, and the ground truth at the same resolution.

Rows follow the *canonical order* of the folds file: fold 0's ids (in file order), then fold 1's, and
so on. Every view (each member, the truth) uses it, so row i is the same image everywhere and one
fold's rows are contiguous, which is what nested CV slices on.

Nothing is copied: a view reads the per-fold ``probs.npy`` files. :meth:`OOFView.read` reads a range
of rows with plain file reads rather than through a memory map, so a pass over a 97 GB store leaves
the page cache to the kernel instead of growing this process's resident set.

The truth is cached bit-packed (1 bit per pixel and class) under ``runs/_truth/``, keyed by the
competition, the OOF size, the folds file's hash and a fingerprint of the data files (names, sizes,
modification times), so fixing a label or changing the split rebuilds it.
"""
from __future__ import annotations

from competition.errors import UserError

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from competition import oof, paths


class OOFIncomplete(UserError, ValueError):
    """An experiment's OOF does not cover the folds file exactly; the message names the fold or ids."""


def canonical_order(folds: pd.DataFrame) -> tuple[list[str], np.ndarray]:
    """(ids, fold of each row): folds in ascending order, ids in folds-file order within a fold."""
    df = folds.sort_values("fold", kind="stable")
    return df["id"].astype(str).tolist(), df["fold"].to_numpy(np.int64)


@dataclass(frozen=True)
class _Part:
    path: Path
    offset: int  # bytes from the start of the file to row 0
    start: int  # canonical rows [start, stop) come from this file ...
    stop: int
    rows: np.ndarray | None  # ... at these file rows (None: rows 0..stop-start in order)


class _RowFiles:
    """Rows of one or more .npy files laid end to end in canonical order."""

    def __init__(self, parts: list[_Part], row_shape: tuple[int, ...], dtype):
        self.parts, self.row_shape, self.dtype = parts, tuple(row_shape), np.dtype(dtype)
        self.n = parts[-1].stop if parts else 0
        self.row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize

    def read(self, start: int, stop: int) -> np.ndarray:
        start, stop = max(start, 0), min(stop, self.n)
        out = np.empty((max(stop - start, 0), *self.row_shape), self.dtype)
        for p in self.parts:
            lo, hi = max(start, p.start), min(stop, p.stop)
            if lo >= hi:
                continue
            dst = out[lo - start:hi - start]
            if p.rows is None:
                with open(p.path, "rb") as f:
                    f.seek(p.offset + (lo - p.start) * self.row_bytes)
                    got = f.readinto(memoryview(dst.reshape(-1).view(np.uint8)))
                if got != dst.nbytes:
                    raise OOFIncomplete(f"{p.path}: file is shorter than its header says (truncated?)")
            else:
                dst[:] = np.load(p.path, mmap_mode="r")[p.rows[lo - p.start:hi - p.start]]
        return out

    def __getitem__(self, idx) -> np.ndarray:
        if isinstance(idx, (int, np.integer)):
            return self.read(int(idx), int(idx) + 1)[0]
        if isinstance(idx, slice) and idx.step in (None, 1):
            lo, hi, _ = idx.indices(self.n)
            return self.read(lo, hi)
        rows = np.arange(self.n)[idx]
        return np.stack([self.read(int(r), int(r) + 1)[0] for r in rows]) if len(rows) \
            else np.empty((0, *self.row_shape), self.dtype)

    def __len__(self) -> int:
        return self.n


class OOFView(_RowFiles):
    """All folds' OOF of one experiment: ``view[i]`` / ``view.read(a, b)`` give uint8 (., C, h, w)."""

    def __init__(self, experiment: str, ids: list[str], fold_of: np.ndarray, parts: list[_Part],
                 classes: list[str], size: tuple[int, int], task: str, original_sizes: dict):
        super().__init__(parts, (len(classes), *size), np.uint8)
        self.experiment, self.ids, self.fold_of = experiment, ids, fold_of
        self.classes, self.size, self.task = classes, tuple(size), task
        self.original_sizes = original_sizes  # id -> (H, W) of the image the OOF was predicted from
        self.variant, self.tta, self.tta_scales = "", ["identity"], [1.0]  # set by open_experiment

    @property
    def label(self) -> str:
        """``exp`` for the plain OOF, ``exp[variant]`` for a TTA variant (how members are printed)."""
        return f"{self.experiment}[{self.variant}]" if self.variant else self.experiment

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n, *self.row_shape)


def _npy_offset(path: Path) -> tuple[int, tuple, np.dtype]:
    """(header length in bytes, shape, dtype) of a C-ordered .npy file."""
    mm = np.load(path, mmap_mode="r")
    if not mm.flags.c_contiguous:
        raise OOFIncomplete(f"{path}: not C-ordered; expected the layout oof.write produces")
    info = (int(mm.offset), tuple(mm.shape), mm.dtype)
    del mm
    return info


def open_experiment(experiment: str, folds: pd.DataFrame, classes: list[str], task: str,
                    variant: str = "") -> OOFView:
    """Check that the experiment's OOF (plain, or one TTA variant) covers every id of the folds file
    exactly once, and open it."""
    ids, fold_of = canonical_order(folds)
    fold_list = sorted(set(fold_of.tolist()))
    missing = [k for k in fold_list if not (paths.oof_dir(experiment, k, variant) / paths.OOF_PROBS).is_file()]
    if missing:
        flag = f" --tta {variant.split('@')[0].replace('+', ' ')}" if variant else ""
        raise OOFIncomplete(
            f"experiment {experiment!r} has no OOF{f' for TTA variant {variant}' if variant else ''} for fold(s) "
            f"{missing} ({paths.oof_dir(experiment, missing[0], variant)} is missing). Train them (make train "
            f"EXP={experiment} FOLD={missing[0]}); for a fold already trained (best.pt present), "
            f"`competition oof {experiment}{flag}` writes its OOF.")
    parts, size, originals, start, tta = [], None, {}, 0, None
    for k in fold_list:
        d = paths.oof_dir(experiment, k, variant)
        probs, sids, meta = oof.read(d)
        want = [i for i, f in zip(ids, fold_of) if f == k]
        _check_ids(experiment, k, d, [str(s) for s in sids], want)
        if list(meta.get("classes", [])) != list(classes):
            raise OOFIncomplete(f"{d}/meta.json: classes {meta.get('classes')} differ from the competition's "
                                f"{classes}; the OOF was written for another class list")
        if meta.get("task", task) != task:
            raise OOFIncomplete(f"{d}/meta.json: task {meta.get('task')!r}, the competition's is {task!r}")
        if size is None:
            size = tuple(probs.shape[-2:])
        elif tuple(probs.shape[-2:]) != size:
            raise OOFIncomplete(f"{d}: OOF is {probs.shape[-2]}x{probs.shape[-1]} but fold {fold_list[0]}'s is "
                                f"{size[0]}x{size[1]}; every fold of an experiment must share oof.size")
        offset, _, _ = _npy_offset(d / paths.OOF_PROBS)
        pos = {s: r for r, s in enumerate(sids)}
        rows = np.array([pos[i] for i in want], np.int64)
        parts.append(_Part(d / paths.OOF_PROBS, offset, start, start + len(want),
                           None if np.array_equal(rows, np.arange(len(rows))) else rows))
        start += len(want)
        originals.update({i: tuple(v) for i, v in meta.get("original_sizes", {}).items()})
        this = (list(meta.get("tta", ["identity"])), [float(x) for x in meta.get("tta_scales", [1.0])])
        if tta is not None and this != tta:
            raise OOFIncomplete(f"{d}/meta.json: TTA {this} differs from fold {fold_list[0]}'s {tta}")
        tta = this
        del probs
    view = OOFView(experiment, ids, fold_of, parts, list(classes), size, task, originals)
    view.variant, view.tta, view.tta_scales = variant, tta[0], tta[1]
    return view


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
# Ground truth at the OOF resolution, bit-packed and cached
# --------------------------------------------------------------------------------------------- #
class TruthView(_RowFiles):
    """Truth masks as bool (., C, h, w) in canonical order; stored packed along the width."""

    def __init__(self, path: Path, ids: list[str], classes: list[str], size: tuple[int, int]):
        offset, shape, _ = _npy_offset(path)
        h, w = size
        if tuple(shape) != (len(ids), len(classes), h, (w + 7) // 8):
            raise OOFIncomplete(f"{path}: shape {shape} does not match {len(ids)} ids x {len(classes)} classes "
                                f"at {h}x{w}; delete it to rebuild")
        super().__init__([_Part(path, offset, 0, len(ids), None)], shape[1:], np.uint8)
        self.path, self.ids, self.classes, self.size = path, ids, classes, (h, w)

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.unpackbits(super().read(start, stop), axis=-1, count=self.size[1]).view(bool)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n, len(self.classes), *self.size)


class MemoryTruth:
    """The truth of a few images (one fold) held in memory, read like a :class:`TruthView`."""

    def __init__(self, adapter, ids: list[str], classes: list[str], size: tuple[int, int]):
        self.ids, self.classes, self.size = list(ids), list(classes), tuple(size)
        self._masks = np.stack([adapter.load_mask(i, self.size) != 0 for i in ids]) if ids else \
            np.zeros((0, len(classes), *self.size), bool)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self._masks[start:stop]

    def __len__(self) -> int:
        return len(self.ids)


def write_truth(path: Path, masks, n: int, n_classes: int, size: tuple[int, int]) -> Path:
    """Stream ``masks`` ((C, h, w) arrays, nonzero = 1, one per row) into a packed .npy, atomically."""
    from competition.io import atomic_path
    h, w = size
    path = Path(path)
    with atomic_path(path) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, n_classes, h, (w + 7) // 8))
        count = 0
        for i, m in enumerate(masks):
            arr[i] = np.packbits(np.asarray(m) != 0, axis=-1)
            count += 1
        if count != n:
            raise ValueError(f"write_truth: got {count} masks for {n} rows")
        arr.flush()
        del arr
    return path


def data_fingerprint(root: Path) -> str:
    """A cheap hash of the data folder's file names, sizes and modification times (no file is read)."""
    h = hashlib.sha256()
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            st = os.stat(os.path.join(dirpath, name))
            h.update(f"{os.path.relpath(os.path.join(dirpath, name), root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def truth_cache(comp, adapter, ids: list[str], size: tuple[int, int], folds_sha: str, log=print) -> TruthView:
    """The truth of ``ids`` at ``size``, built once into ``runs/_truth/`` and reused while nothing changed."""
    h, w = size
    key = f"{folds_sha[:12]}-{data_fingerprint(comp.root())}"
    folder = paths.truth_dir()
    path = paths.truth_cache(comp.name, (h, w), key)
    if not path.is_file():
        log(f"building the truth cache {path.relative_to(paths.project())} ({len(ids)} images at {h}x{w}) ...")
        write_truth(path, (adapter.load_mask(i, (h, w)) for i in ids), len(ids), len(comp.classes), size)
        for old in folder.glob(f"{comp.name}-{h}x{w}-*"):  # earlier keys of this competition and size
            if old.stem != path.stem:
                old.unlink(missing_ok=True)
    index = folder / f"{path.stem}.json"
    if not index.is_file():  # written after the .npy, so a kill between the two is repaired here
        from competition.io import atomic_write_text
        atomic_write_text(index, json.dumps({"ids": ids, "classes": list(comp.classes)}))
    return TruthView(path, ids, list(comp.classes), size)
