"""Atomic writes, file hashes and reading text, JSON and CSV files: the one place the project does these.

Every artifact teammates share (folds files, configs, ledgers, generated data) is written through
:func:`atomic_path`, and every folder written as one artifact (a probability store, the sample cache, a
bundle) through :func:`atomic_dir` (or :func:`temp_dir_beside` + :func:`publish_dir` when the writer
is an object), so a reader, or a run killed half-way, never sees half a file or folder, and two
processes writing the same target never share a temp.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from io import StringIO
from pathlib import Path
from typing import Any

import pandas as pd

from competition.errors import UserError

_CHUNK = 1 << 20
# ``.<target name>.<tempfile's 8 random characters>.tmp``: what atomic_path creates, and the only
# names clean_stale_temps may remove.
_TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


# Temps older than this in a shared output folder (folds/, ensembles/, submissions/) are a killed
# writer's: every such file is written in well under an hour.
STALE_AFTER_S = 3600


class ReadError(UserError, ValueError):
    """A file could not be read as text; the message names the file and what was wrong."""


# --------------------------------------------------------------------------------------------- #
# Modes
# --------------------------------------------------------------------------------------------- #
def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (os.umask can only set)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: set and restore at once (not thread-safe, but only here)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode ``open()`` or ``mkdir()`` would give a new file or folder under the current umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def _target_mode(path: Path) -> int:
    # An existing file keeps its permissions, as when it is rewritten in place; a new one follows
    # the umask. mkstemp's own 0600 would hide shared artifacts from teammates on the same machine.
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return default_mode()


# --------------------------------------------------------------------------------------------- #
# Atomic writes
# --------------------------------------------------------------------------------------------- #
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; some file systems cannot open a folder, which is not an error.
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """A fresh temp path beside ``path`` to write to; on success it replaces ``path`` atomically.

    The temp file (``.<name>.<random>.tmp``, created exclusively by tempfile, so concurrent writers
    never share one) is fsynced, given the mode a normally written file would have, and
    ``os.replace``d onto the target. On any failure it is removed and the target is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TEMP_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync_file(tmp)
        os.chmod(tmp, _target_mode(path))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def temp_dir_beside(path: Path | str) -> Path:
    """A fresh hidden folder ``.<name>.<random>.tmp`` beside ``path`` (created exclusively, so
    concurrent writers never share one) to build a folder in before :func:`publish_dir`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=_TEMP_SUFFIX, dir=path.parent))


def publish_dir(tmp: Path, path: Path, replace: bool = True) -> Path:
    """Rename the finished folder ``tmp`` to ``path``.

    An existing ``path`` is renamed aside to ``<tmp>.old`` first and deleted only once the new one is
    in place (renamed back if the second rename fails), so a reader finds the old folder whole, or
    nothing for an instant, or the new one whole; never a mix. ``replace=False``: an existing
    ``path`` is another writer's finished folder and ``FileExistsError`` is raised (``tmp`` is kept
    for the caller to remove).
    """
    tmp, path = Path(tmp), Path(path)
    os.chmod(tmp, default_mode(directory=True))  # mkdtemp's 0700 would hide the folder from teammates
    old = None
    if path.exists():
        if not replace:
            raise FileExistsError(f"{path}: already written by another process")
        old = tmp.with_name(tmp.name + ".old")
        path.rename(old)
    try:
        tmp.rename(path)
    except OSError as e:
        if old is not None and not path.exists():
            old.rename(path)
        elif old is None and path.exists() and not replace:
            raise FileExistsError(f"{path}: already written by another process") from e
        raise
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


@contextmanager
def atomic_dir(path: Path | str, replace: bool = True) -> Iterator[Path]:
    """A temp folder beside ``path`` to build a whole folder in; on success it becomes ``path``
    (:func:`publish_dir`), on any failure it is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = temp_dir_beside(path)
    try:
        yield tmp
        publish_dir(tmp, path, replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write ``text`` as UTF-8 to ``path`` atomically, byte for byte (no newline translation)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def is_temp_name(name: str) -> bool:
    """Whether ``name`` has the shape of a temp file made by :func:`atomic_path`."""
    return bool(_TEMP_NAME.match(name))


def clean_stale_temps(folder: Path | str, max_age_s: float) -> list[Path]:
    """Remove temp files left in ``folder`` by killed writers, older than ``max_age_s``; returns them.

    Only regular files named like :func:`atomic_path`'s temps are touched (never folders, links or
    anything else); a younger one may belong to a writer that is still running.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    cutoff = time.time() - max_age_s
    removed = []
    with os.scandir(folder) as entries:
        for e in entries:
            if not is_temp_name(e.name) or not e.is_file(follow_symlinks=False):
                continue
            try:
                if e.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(e.path)
                    removed.append(Path(e.path))
            except FileNotFoundError:  # its writer finished (or another cleaner was faster)
                continue
    return removed


# --------------------------------------------------------------------------------------------- #
# Reading and hashing
# --------------------------------------------------------------------------------------------- #
def file_hash(path: Path | str, n: int = 16) -> str:
    """The first ``n`` hex digits of the file's SHA-256, read in chunks (files may be large)."""
    if not 1 <= n <= 64:
        raise ValueError(f"file_hash: n must be between 1 and 64 hex digits, got {n}")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()[:n]


def read_text(path: Path | str, what: str = "file") -> str:
    """A UTF-8 text file's contents, or a :class:`ReadError` naming the file and the problem.

    A leading byte-order mark (Excel and Notepad write one) is dropped: JSON and CSV readers would
    otherwise take it for part of the first key or column name.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ReadError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise ReadError(f"{path}: {what} is a folder, expected a file") from None
    except OSError as e:
        raise ReadError(f"{path}: {what} cannot be read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ReadError(f"{path}: {what} is not UTF-8 text (undecodable byte 0x{data[e.start]:02x} on line "
                        f"{line}); save it as UTF-8") from None


def read_json(path: Path | str, what: str = "file") -> Any:
    """A JSON file's value, or a :class:`ReadError` naming the file, the line and what was wrong."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ReadError(f"{path}: {what} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def csv_from_text(text: str, **kw) -> pd.DataFrame:
    """A CSV's cells as strings (empty cells are ""); a row with more cells than the header is a ParserError.

    By default pandas would silently turn the surplus leading cells of such a row into an index,
    shifting every value one column over.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.ParserWarning)
        try:
            return pd.read_csv(StringIO(text), dtype=str, keep_default_na=False, index_col=False, **kw)
        except pd.errors.ParserWarning:
            raise pd.errors.ParserError(_surplus_row(text)) from None


def _surplus_row(text: str) -> str:
    rows = csv.reader(StringIO(text))
    width = len(next(rows, []))
    for line, row in enumerate(rows, 2):
        if len(row) > width:
            return f"line {line} has {len(row)} cells but the header has {width}"
    return f"a row has more cells than the header's {width}"


def read_csv(path: Path | str, what: str = "CSV file", **kw) -> pd.DataFrame:
    """A CSV's cells as strings (empty cells ""), or a :class:`ReadError` naming the file: missing,
    not UTF-8, empty, or not parseable (pandas' own message, or the row with surplus cells)."""
    text = read_text(path, what)
    try:
        return csv_from_text(text, **kw)
    except pd.errors.EmptyDataError:
        raise ReadError(f"{path}: {what} is empty (expected a header row)") from None
    except pd.errors.ParserError as e:
        raise ReadError(f"{path}: {what} is not a valid CSV ({str(e).strip()})") from None


def data_fingerprint(root: Path | str) -> str:
    """A cheap hash of a data folder's file names, sizes and modification times (no file is read)."""
    h = hashlib.sha256()
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            st = os.stat(os.path.join(dirpath, name))
            h.update(f"{os.path.relpath(os.path.join(dirpath, name), root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]
