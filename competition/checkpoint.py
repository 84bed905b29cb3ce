"""Atomic checkpoints that load with ``torch.load(weights_only=True)``: tensors and plain data only."""
from __future__ import annotations

import copy
import errno
import os
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from competition.errors import UserError
from competition.io import atomic_path


class CheckpointError(UserError, ValueError):
    pass


def save(obj: dict, path: Path) -> None:
    """Write to a temp file in the same folder, then rename: a crash never leaves half a checkpoint."""
    path = Path(path)
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:
            # torch reports a failed write as "enforce fail at inline_container.cc ..." without the
            # errno ("file write failed", "unexpected pos"); a full disk is told by the space left.
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            code = errno.ENOSPC if _disk_full(path.parent, obj) else errno.EIO
            raise OSError(code, f"{os.strerror(code)} while writing a checkpoint ({first[:160]})", str(path)) from None


def _disk_full(folder: Path, obj) -> bool:
    """Whether ``folder``'s file system has less room than ``obj``'s tensors (plus 1 MiB) need."""
    need = 1 << 20
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            need += x.numel() * x.element_size()
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    try:
        return shutil.disk_usage(folder).free < need
    except OSError:
        return False


def snapshot(obj):
    """A copy of ``obj`` that later training steps cannot change: tensors copied to the CPU, containers
    rebuilt (optimizer state and the history are mutated in place by the next step)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return copy.deepcopy(obj)


class AsyncSaver:
    """Checkpoints written by one background thread from a snapshot taken at once, so the next epoch
    trains while the file is written. ``wait`` before queueing the next epoch's saves keeps at most one
    epoch in flight: after a SIGKILL, ``last.pt`` is complete and at most one epoch behind."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self._pending = []

    def save(self, obj: dict, path: Path) -> None:
        self._pending.append(self._pool.submit(save, snapshot(obj), Path(path)))

    def delete(self, path: Path) -> None:
        """Remove ``path`` after the saves queued before (so a file is never deleted before it is written)."""
        self._pending.append(self._pool.submit(Path(path).unlink, missing_ok=True))

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()  # a failed write (a full disk) surfaces here, naming the file

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def load(path: Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle of a forbidden type, ...
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}: {e}); "
                              f"it may be corrupt or not one of ours") from None


def rng_state() -> dict:
    """Every RNG as tensors and plain data (numpy's state array travels as a tensor)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
