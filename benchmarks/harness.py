"""The one way every benchmark compares: ``compare(name, ours, peers, ...)``.

Every side runs in this process. After ``warmup`` untimed rounds, ``rounds`` (>= 5) timed rounds
alternate the order of the sides (ours, peer1, peer2 / peer2, peer1, ours / ...), so drift in the
machine's load hits every side alike. For each side it prints the min and the median; for each peer
the ratio of the mins. After the first round (the warm-up), every peer's output is checked against ours with
``check`` (default: identical), which either raises ``AssertionError`` or returns the sentence
printed under the times (what was compared, and any tolerance). The thread counts of torch, OpenCV and
numpy's BLAS (plus any worker threads a side starts itself, declared with :class:`Side`) are recorded
per side; a line says whether they are equal across the sides and names the difference if not. The
load average is printed at the start and the end of every comparison: on a shared machine the ratios
are the result, absolute times are context.
"""
from __future__ import annotations

import contextlib
import gc
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

MIN_ROUNDS = 5


@dataclass
class Side:
    """One side of a comparison: a callable taking no argument and returning its output.

    ``workers``: threads or processes the callable starts itself (e.g. a thread pool), beyond the
    library pools the harness reads; ``note``: printed after the side's times.
    """

    fn: Callable[[], Any]
    workers: int = 1
    note: str = ""


@dataclass
class Result:
    name: str
    labels: list[str]
    times: dict[str, list[float]] = field(default_factory=dict)  # seconds per call, timed rounds
    peak: dict[str, int] = field(default_factory=dict)  # bytes over the baseline, if memory=True
    outputs: dict[str, Any] = field(default_factory=dict)  # the warm-up outputs

    def min(self, label: str) -> float:
        return min(self.times[label])

    def median(self, label: str) -> float:
        return statistics.median(self.times[label])

    def speedup(self, peer: str, ours: str | None = None) -> float:
        """peer's min / ours' min: > 1 means ours is faster."""
        return self.min(peer) / self.min(ours or self.labels[0])


# --------------------------------------------------------------------------------------------- #
# Context: load and threads
# --------------------------------------------------------------------------------------------- #
def load() -> str:
    """``load 1.23 1.50 1.70 /2 cpus`` (1, 5, 15-minute load averages; os.getloadavg())."""
    return "load " + " ".join(f"{v:.2f}" for v in os.getloadavg()) + f" /{os.cpu_count()} cpus"


def thread_counts() -> dict[str, int]:
    """The thread pools a side could use: torch intra-op (and inter-op), OpenCV, numpy's BLAS.

    Only libraries already imported are asked (the harness imports none of them itself).
    """
    out: dict[str, int] = {}
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        out["torch"] = torch.get_num_threads()
    if "cv2" in sys.modules:
        out["cv2"] = sys.modules["cv2"].getNumThreads()
    try:
        from threadpoolctl import threadpool_info

        blas = [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]
        if blas:
            out["numpy BLAS"] = max(blas)
    except Exception:  # threadpoolctl missing or unable to inspect: say nothing rather than guess
        pass
    return out


def _threads_line(per_side: dict[str, dict[str, int]]) -> str:
    first = next(iter(per_side.values()))
    if all(t == first for t in per_side.values()):
        return "threads equal on every side: " + ", ".join(f"{k} {v}" for k, v in first.items())
    parts = []
    for label, t in per_side.items():
        parts.append(f"{label}: " + ", ".join(f"{k} {v}" for k, v in t.items()))
    return "threads DIFFER between sides -> " + "; ".join(parts)


# --------------------------------------------------------------------------------------------- #
# Checks
# --------------------------------------------------------------------------------------------- #
def _as_array(x):
    if "torch" in sys.modules and isinstance(x, sys.modules["torch"].Tensor):
        return x.detach().cpu().numpy()
    return x


def _identical(a, b, where: str = "output") -> None:
    a, b = _as_array(a), _as_array(b)
    if isinstance(a, (tuple, list)):
        assert isinstance(b, (tuple, list)) and len(a) == len(b), f"{where}: different structure"
        for k, (x, y) in enumerate(zip(a, b)):
            _identical(x, y, f"{where}[{k}]")
        return
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: different keys"
        for k in a:
            _identical(a[k], b[k], f"{where}[{k!r}]")
        return
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape, f"{where}: shape {a.shape} vs {b.shape}"
        assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} vs {b.dtype}"
        if not np.array_equal(a, b):
            bad = int(np.count_nonzero(a != b))
            raise AssertionError(f"{where}: {bad} of {a.size} values differ")
        return
    assert a == b, f"{where}: {str(a)[:80]!r} != {str(b)[:80]!r}"


def identical(ours, peer) -> str:
    """Exact equality: same shape and dtype and values (arrays, tensors), same strings and bytes."""
    _identical(ours, peer)
    return "identical output"


def allclose(atol: float, rtol: float = 0.0, why: str = "") -> Callable[[Any, Any], str]:
    """Element-wise |ours - peer| <= atol + rtol * |peer| (same shape and dtype), stating the tolerance."""

    def check(ours, peer) -> str:
        a, b = np.asarray(_as_array(ours)), np.asarray(_as_array(peer))
        assert a.shape == b.shape, f"shape {a.shape} vs {b.shape}"
        assert a.dtype == b.dtype, f"dtype {a.dtype} vs {b.dtype}"
        worst = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.size else 0.0
        assert np.allclose(a, b, atol=atol, rtol=rtol), f"max |diff| {worst:.3g} > atol {atol:g} + rtol {rtol:g}"
        return (f"same shape and dtype, values equal within atol {atol:g}" + (f" + rtol {rtol:g}" if rtol else "")
                + f" (max |diff| {worst:.2g})" + (f": {why}" if why else ""))

    return check


# --------------------------------------------------------------------------------------------- #
# Memory
# --------------------------------------------------------------------------------------------- #
def _status(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class _RssPeak(threading.Thread):
    """Peak VmRSS sampled every 10 ms (VmHWM after a reset, where the kernel allows it, is exact)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.base = _status("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.hwm = True
        except OSError:
            self.hwm = False
        self.peak, self._done = self.base, threading.Event()
        self.start()

    def run(self) -> None:
        while not self._done.wait(0.01):
            self.peak = max(self.peak, _status("VmRSS"))

    def stop(self) -> int:
        self._done.set()
        self.join()
        peak = max(self.peak, _status("VmRSS"), _status("VmHWM") if self.hwm else 0)
        return peak - self.base


# --------------------------------------------------------------------------------------------- #
def _fmt(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:8.2f} s "
    if seconds >= 1e-3:
        return f"{seconds * 1e3:8.2f} ms"
    return f"{seconds * 1e6:8.1f} us"


def compare(name: str, ours: Callable[[], Any] | Side, peers: dict[str, Callable[[], Any] | Side], *,
            rounds: int = MIN_ROUNDS, warmup: int = 1,
            check: Callable[[Any, Any], str | None] | dict[str, Callable] = identical,
            ours_label: str = "ours", number: int = 1, memory: bool = False, scaled: str | None = None,
            extrapolate: tuple[float, str] | None = None, note: str = "") -> Result:
    """Time ``ours`` against each peer in alternating rounds; print min/median, ratios, check, threads.

    ``number``: calls per round (for sub-millisecond cases), times are per call. ``memory``: also the
    peak resident memory over the baseline during each call (max over the timed rounds).
    ``scaled``: says the case is scaled down and how; ``extrapolate``: (factor, what) multiplies the
    mins into full-scale estimates. ``check(ours_output, peer_output)`` must raise on a mismatch
    (a dict of them: one per peer).
    """
    if rounds < MIN_ROUNDS:
        raise ValueError(f"at least {MIN_ROUNDS} timed rounds, got {rounds}")
    sides = {ours_label: ours, **peers}
    sides = {k: v if isinstance(v, Side) else Side(v) for k, v in sides.items()}
    labels = list(sides)
    res = Result(name, labels, {k: [] for k in labels}, {k: 0 for k in labels})
    threads: dict[str, dict[str, int]] = {}
    # Objects alive now (modules, the case's data) are never garbage: freezing them makes the
    # gc.collect() before every call cost microseconds instead of ~0.1 s with torch imported.
    gc.collect()
    gc.freeze()
    print(f"-- {name}  [{rounds} rounds x {number} call{'s' if number > 1 else ''} after {warmup} warm-up, "
          f"order alternating; {load()} at start]", flush=True)
    if scaled:
        print(f"   scaled down: {scaled}", flush=True)

    def call(label: str, timed: bool):
        side = sides[label]
        gc.collect()
        sampler = _RssPeak() if memory and timed else None
        t = time.perf_counter()
        for _ in range(number):
            out = side.fn()
        dt = (time.perf_counter() - t) / number
        if sampler is not None:
            res.peak[label] = max(res.peak[label], sampler.stop())
        counts = thread_counts()
        if side.workers != 1:
            counts["own workers"] = side.workers
        threads.setdefault(label, counts)
        return out, dt

    try:
        checks = _rounds(res, labels, call, rounds, warmup, check)
    finally:
        gc.unfreeze()
    width = max(len(k) for k in labels)
    for label in labels:
        side = sides[label]
        line = f"   {label:<{width}}  min {_fmt(res.min(label))}  median {_fmt(res.median(label))}"
        if label != ours_label:
            s = res.speedup(label, ours_label)
            line += f"   {ours_label}: " + (f"{s:.2f}x faster" if s >= 1 else f"{1 / s:.2f}x SLOWER")
        if memory:
            line += f"   peak +{res.peak[label] / 2**20:.0f} MiB"
        if extrapolate:
            line += f"   -> {_fmt(res.min(label) * extrapolate[0]).strip()} {extrapolate[1]}"
        if side.note:
            line += f"   ({side.note})"
        print(line, flush=True)
    for label in labels[1:]:
        print(f"   check vs {label}: {checks[label]}", flush=True)
    print(f"   {_threads_line(threads)}", flush=True)
    if note:
        print(f"   {note}", flush=True)
    print("   ratios of mins (peer / ours, > 1: ours faster): " + ", ".join(
        f"{label} {res.speedup(label, ours_label):.2f}" for label in labels[1:]) + f"  [{load()} at end]", flush=True)
    return res


def _rounds(res: Result, labels: list[str], call, rounds: int, warmup: int, check) -> dict[str, str]:
    checks: dict[str, str] = {}
    for r in range(warmup + rounds):
        order = labels if r % 2 == 0 else labels[::-1]
        for label in order:
            out, dt = call(label, r >= warmup)
            if r >= warmup:
                res.times[label].append(dt)
            if label not in res.outputs:
                res.outputs[label] = out
        if r == max(warmup, 1) - 1:  # after the first full round: check before anything timed counts
            checks = _run_checks(check, res.outputs, labels)
    return checks


def _run_checks(check, outputs: dict[str, Any], labels: list[str]) -> dict[str, str]:
    out = {}
    for label in labels[1:]:
        fn = check[label] if isinstance(check, dict) else check
        try:
            said = fn(outputs[labels[0]], outputs[label])
        except AssertionError as e:
            raise AssertionError(f"{labels[0]} and {label} give different outputs: {e}") from None
        out[label] = said or "checked"
    return out


def measure(name: str, fn: Callable[[], Any], *, rounds: int = MIN_ROUNDS, warmup: int = 1) -> list[float]:
    """A measurement without a peer (context, not a comparison): min and median of ``rounds`` calls."""
    gc.collect()
    gc.freeze()
    try:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(rounds):
            gc.collect()
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    finally:
        gc.unfreeze()
    print(f"   {name}: min {_fmt(min(times)).strip()}, median {_fmt(statistics.median(times)).strip()} "
          f"({rounds} rounds; no peer) [{load()}]", flush=True)
    return times


def rates(res: Result, n: int) -> str:
    """Each side's items per second in its best round (``n`` items per call)."""
    return "samples/s (best round): " + ", ".join(f"{k} {n / res.min(k):.1f}" for k in res.labels)


@contextlib.contextmanager
def temp_project():
    """A temporary project folder as the current directory (the project's caches live in its runs/)."""
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(cwd)


def cached_vs_uncached(name: str, cached: Side, uncached: Side, n: int) -> tuple[Result, float]:
    """:func:`compare` of a cache against the work it saves (5 rounds); prints the rates -> (result,
    uncached/cached ratio of the mins)."""
    res = compare(name, cached, {"uncached": uncached}, ours_label="cached", rounds=5)
    ratio = res.speedup("uncached", "cached")
    print(f"   {rates(res, n)}; cached/uncached {ratio:.2f}x", flush=True)
    return res, ratio
