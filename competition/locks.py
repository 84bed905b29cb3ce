"""Advisory locks on run folders, so two processes never mix one run.

``train`` holds an exclusive lock on ``runs/<exp>/fold<k>/.lock`` while it writes the folder; ``oof``
takes it while it writes a fold's OOF; ``ensemble``, ``submit`` and ``pseudo`` hold shared locks on
what they read. ``flock`` locks belong to the open file, so the kernel releases them when the process
dies (a SIGKILL leaves no stale lock).

Who holds it, so that a refusal can name them: the lock file is a small log of JSON lines, one record
per holder (``id``, ``pid``, ``host``, ``start`` -- the process's start time, against PID reuse --
``since``, ``command``, ``mode``). An exclusive holder, alone by definition, replaces the whole file
with its record the moment it has the lock (written over the old content before the tail is cut, so
the file is never empty meanwhile); a shared holder appends its record. On release an exclusive
holder empties the file; a shared one empties it when it turns out to be the last holder, else appends
``{"released": id}``. A refusal names the records that are still live: not released and, on this
host, of a running process with the recorded start time -- so what a killed process left behind is
never reported as a holder. :func:`probe` (``train --check``) holds the lock only when it is free, for
an instant, and empties the file on release: it never erases a holder's record and leaves none of its
own behind, which would later be named as the holder of a lock a reader holds.

An attempt that finds the lock taken retries for :data:`GRACE_S` before it is refused: a probe, or a
reader's release, holds the lock exclusively for microseconds, and must not refuse another process.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path

from competition.errors import UserError
from competition.io import default_mode

GRACE_S = 0.3  # how long a taken lock is retried before the refusal
_MAX_READ = 1 << 20


class Locked(UserError):
    """Another process holds the lock; the message names it and what to do."""


def _command() -> str:
    if not sys.argv:
        return "?"
    prog = Path(sys.argv[0]).name
    if prog in ("__main__.py", "-m", "-c"):  # python -m competition ...
        prog = "competition"
    return " ".join([prog, *sys.argv[1:]])


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, /proc/<pid>/stat field 22), or None where
    there is no /proc; it tells a live holder from another process that got a dead holder's PID."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        return stat[stat.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return None


def _holder(mode: str) -> dict:
    return {"id": uuid.uuid4().hex, "pid": os.getpid(), "host": socket.gethostname(),
            "start": _start_time(os.getpid()), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": _command(), "mode": mode}


def _alive(rec: dict) -> bool:
    """False when the record's process is known to be gone (on this host); True when it runs, or
    when it cannot be told (another host)."""
    if rec.get("host") != socket.gethostname():
        return True
    try:
        pid = int(rec.get("pid"))
        if pid <= 0:
            return False
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another user
    except (TypeError, ValueError, OSError):
        return False
    start = rec.get("start")
    now = _start_time(pid)
    return start is None or now is None or str(start) == now


def holders(content: str) -> list[dict]:
    """The live holder records in a lock file's ``content`` (see the module docstring), in order."""
    records, released = {}, set()
    for n, line in enumerate(content.splitlines()):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line being written
        if not isinstance(rec, dict):
            continue
        if "released" in rec:
            released.add(rec["released"])
        elif "pid" in rec:
            records[rec.get("id", f"line{n}")] = rec  # a record of an older version has no id
    return [r for k, r in records.items() if k not in released and _alive(r)]


def _read(fd: int) -> str:
    try:
        return os.pread(fd, _MAX_READ, 0).decode(errors="replace")
    except OSError:
        return ""


def _name(rec: dict) -> str:
    where = "" if rec.get("host") == socket.gethostname() else f" on {rec.get('host')}"
    return f"PID {rec.get('pid')}{where} since {rec.get('since')} (`{rec.get('command')}`)"


def _describe(fd: int) -> str:
    live = holders(_read(fd))
    if not live:
        return ("another process that left no record of itself (an older version of competition, or one "
                "that has just finished)")
    exclusive = [r for r in live if r.get("mode", "exclusive") == "exclusive"]
    if exclusive:
        return _name(exclusive[-1])
    shown = "; ".join(_name(r) for r in live[:3])
    more = f"; and {len(live) - 3} more" if len(live) > 3 else ""
    return f"{len(live)} process{'es' if len(live) > 1 else ''} reading it: {shown}{more}"


def _acquire(fd: int, exclusive: bool, what: str) -> None:
    op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    deadline = time.monotonic() + GRACE_S
    while True:
        try:
            fcntl.flock(fd, op)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise Locked(f"{what} is in use by {_describe(fd)}; wait for it to finish, or stop it, "
                             f"then run this again") from None
            time.sleep(0.02)


def _append(path: Path, rec: dict) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, (json.dumps(rec) + "\n").encode())  # one write: appended whole
    finally:
        os.close(fd)


@contextmanager
def hold(path: Path, exclusive: bool, what: str):
    """Hold the lock at ``path`` (created if needed) for the duration, or raise :class:`Locked` (after
    at most :data:`GRACE_S`) naming its holders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, default_mode())
    try:
        _acquire(fd, exclusive, what)
        rec = _holder("exclusive" if exclusive else "shared")
        if exclusive:
            # Over the old content, then cut: a refused process reading now sees a whole record.
            data = (json.dumps(rec) + "\n").encode()
            old = os.fstat(fd).st_size
            os.pwrite(fd, data + b" " * max(0, old - len(data)), 0)
            os.ftruncate(fd, len(data))
        else:
            _append(path, rec)
        try:
            yield
        finally:
            _release(fd, path, rec, exclusive)
    finally:
        os.close(fd)  # releases the lock


def _release(fd: int, path: Path, rec: dict, exclusive: bool) -> None:
    try:
        if exclusive:
            os.ftruncate(fd, 0)
            return
        try:
            # The last reader gets it exclusively (a conversion: our shared lock goes either way)
            # and empties the log; otherwise the release is appended.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _append(path, {"released": rec["id"]})
        else:
            os.ftruncate(fd, 0)
    except OSError:
        pass  # the record is then reported until its process ends (see _alive)


def probe(path: Path, what: str) -> None:
    """Raise :class:`Locked` naming the holder if ``path`` is locked. A free lock is taken for an
    instant (with this process's record, emptied on release: there was no other holder whose record
    it could erase); a missing lock file is a free lock, and is not created."""
    if not Path(path).is_file():
        return
    with hold(path, True, what):
        pass


@contextmanager
def hold_runs(runs, exclusive: bool = False):
    """Locks on several run folders (``paths.RunPaths``), taken in a fixed order."""
    with ExitStack() as stack:
        for rp in sorted(runs, key=lambda r: (r.experiment, str(r.fold))):  # "all-data" beside int folds
            stack.enter_context(hold(rp.lock, exclusive, f"run folder {rp.root}"))
        yield
