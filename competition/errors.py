"""The one marker for expected failures, and the one line the user reads for one (:func:`describe_error`).

A :class:`UserError` is something the user can fix (a config key, a data file, a missing run, a
diverged run, a lock held by a teammate): the CLI prints its message on one line and exits 2. Any
other exception is a bug and keeps its traceback (exit 1), so a ``KeyError`` or ``ValueError`` raised
by our own code is never mistaken for bad input.
"""
from __future__ import annotations

import errno


class UserError(Exception):
    """An expected failure; the message names the file, key or row and what to do."""


class ConfigError(UserError, ValueError):
    """A configuration file, key or name is invalid; the message names the file and the key."""


_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space (old runs/, submissions/, wandb/) and run the command again",
    errno.EDQUOT: "the disk quota is exceeded: free space and run the command again",
    errno.EROFS: "the file system is read-only: run from a writable copy of the project",
    errno.EACCES: "permission denied: check the folder's owner and mode (a teammate's files?)",
    errno.EPERM: "operation not permitted: check the folder's owner and mode",
    errno.ENOENT: "not found",
}


def describe_error(e: BaseException) -> str:
    """One line for an expected failure: the message of a UserError; for an OSError the file, what
    happened and what to do."""
    if isinstance(e, OSError) and not isinstance(e, UserError):
        what = e.strerror or str(e) or type(e).__name__
        hint = _OS_HINTS.get(e.errno)
        return (f"{e.filename}: " if e.filename else "") + what + (f"; {hint}" if hint and hint != what else "")
    return str(e)
