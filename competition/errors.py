"""The one marker for expected failures.

A :class:`UserError` is something the user can fix (a config key, a data file, a missing run, a
diverged run, a lock held by a teammate): the CLI prints its message on one line and exits 2. Any
other exception is a bug and keeps its traceback (exit 1), so a ``KeyError`` or ``ValueError`` raised
by our own code is never mistaken for bad input.
"""
from __future__ import annotations


class UserError(Exception):
    """An expected failure; the message names the file, key or row and what to do."""
