"""Advisory locks on run folders, so two processes never mix one run.

``train`` holds an exclusive lock on ``runs/<exp>/fold<k>/.lock`` while it writes the folder; ``oof``
takes it while it writes a fold's OOF; ``ensemble`` and ``submit`` hold shared locks on what they
read. ``flock`` locks belong to the open file, so the kernel releases them when the process dies
(a SIGKILL leaves no stale lock); the holder's PID, host and command are written into the lock file
so the refusal can name them.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from competition.errors import UserError


class Locked(UserError):
    """Another process holds the lock; the message names it and what to do."""


def _command() -> str:
    if not sys.argv:
        return "?"
    prog = Path(sys.argv[0]).name
    if prog in ("__main__.py", "-m", "-c"):  # python -m competition ...
        prog = "competition"
    return " ".join([prog, *sys.argv[1:]])


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": _command()}


def _describe(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process (one reading it: competition oof, ensemble or submit)"
    return f"PID {info.get('pid')} on {info.get('host')} since {info.get('since')} (`{info.get('command')}`)"


@contextmanager
def hold(path: Path, exclusive: bool, what: str):
    """Hold the lock at ``path`` (created if needed) for the duration, or raise :class:`Locked` at once."""
    from competition.io import default_mode
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, default_mode())
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Locked(f"{what} is in use by {_describe(fd)}; wait for it to finish, or stop it, "
                         f"then run this again") from None
        if exclusive:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def hold_runs(runs, exclusive: bool = False):
    """Locks on several run folders (``paths.RunPaths``), taken in a fixed order."""
    with ExitStack() as stack:
        for rp in sorted(runs, key=lambda r: (r.experiment, r.fold)):
            stack.enter_context(hold(rp.lock, exclusive, f"run folder {rp.root}"))
        yield
