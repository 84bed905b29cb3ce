"""The data folder's files, and the CSV readings ``competition init`` decides from."""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pandas as pd

from competition.data.base import DataError, read_csv_table, walk_files
from competition.data.folder import IMAGE_EXTS
from competition.init.common import _CLASS_HINT, _GROUP_HINT, _NAME_HINT, _RLE_CELL, _RLE_HINT, SAMPLE, InitError
from competition.io import ReadError, read_text

# A plain list of class names, one per line, beside the data.
_NAMES_TXT = re.compile(r"^(classes|class[_-]?names|categories)\.txt$", re.I)
_BACKGROUND = {"background", "_background_", "__background__", "bg"}


# --------------------------------------------------------------------------------------------- #
# The folder's files
# --------------------------------------------------------------------------------------------- #
@dataclass
class Files:
    root: Path
    images: list[str]  # paths relative to root, posix
    jsons: list[str]
    csvs: list[str]
    txts: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)  # CSV -> why it could not be read (one line)

    @cached_property
    def by_folder(self) -> dict[str, dict[str, str]]:
        """folder (relative, "" = root) -> {id: image path} for every image below it (id: the path
        under the folder without its extension, as the adapters name images)."""
        out: dict[str, dict[str, str]] = {}
        for rel in self.images:
            parts = rel[: len(rel) - len(Path(rel).suffix)].split("/")
            for k in range(len(parts)):
                out.setdefault("/".join(parts[:k]), {})["/".join(parts[k:])] = rel
        return out

    @cached_property
    def _folders_of(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for folder, ids in self.by_folder.items():
            for i in ids:
                out.setdefault(i, []).append(folder)
        return out

    def best_folder(self, ids, exclude=()) -> tuple[str | None, int]:
        """The folder holding images named by the most of ``ids`` (ties: not a test folder, shallower)."""
        count = Counter(f for i in set(ids) for f in self._folders_of.get(i, ()) if f not in exclude)
        if not count:
            return None, 0
        folder = max(count, key=lambda f: (count[f], not _is_test(f), -f.count("/")))
        return folder, count[folder]


def scan(root: Path) -> Files:
    images, jsons, csvs, txts = [], [], [], []
    for p in walk_files(root, root):
        rel = p.relative_to(root).as_posix()
        suffix = p.suffix.lower()
        (images if suffix in IMAGE_EXTS else jsons if suffix == ".json" else csvs if suffix == ".csv"
         else txts if suffix == ".txt" else []).append(rel)
    return Files(root, images, jsons, csvs, txts)


def _spread(items: list, n: int = SAMPLE) -> list:
    """Up to ``n`` items spread evenly over the list (deterministic)."""
    if len(items) <= n:
        return list(items)
    return [items[round(k * (len(items) - 1) / (n - 1))] for k in range(n)]


def _ext(paths: list[str]) -> str:
    return Counter(Path(p).suffix for p in paths).most_common(1)[0][0]


def _strip_any_ext(values: pd.Series) -> pd.Series:
    v = values.astype(str).str.strip()
    low = v.str.lower()
    for ext in IMAGE_EXTS:
        has = low.str.endswith(ext)
        v, low = v.where(~has, v.str.slice(0, -len(ext))), low.where(~has, low.str.slice(0, -len(ext)))
    return v


def _is_test(folder: str) -> bool:
    return bool(re.search(r"test", folder, re.I))


def _test_folder(index: dict, exclude: list[str], depth: int | None = None) -> str | None:
    """The folder with "test" in its name holding the most images outside the training folders."""
    best = None
    for folder, ids in index.items():
        if not folder or not _is_test(folder) or any(folder == e or folder.startswith(e + "/") or
                                                     e.startswith(folder + "/") or e == "" for e in exclude):
            continue
        n = sum(1 for i in ids if depth is None or i.count("/") == depth)
        if n and (best is None or n > best[0] or (n == best[0] and folder.count("/") > best[1].count("/"))):
            best = (n, folder)
    return best[1] if best else None


# --------------------------------------------------------------------------------------------- #
# CSV helpers
# --------------------------------------------------------------------------------------------- #
def _read(files: Files, rel: str) -> pd.DataFrame | None:
    """The CSV's cells as strings; None for a CSV that cannot be read (not UTF-8, not a CSV), whose
    reason is kept in ``files.unreadable`` for init to report."""
    try:
        return read_csv_table(files.root / rel, "CSV")
    except DataError as e:
        files.unreadable.setdefault(rel, str(e))
        return None


def _is_sample(rel: str) -> bool:
    name = Path(rel).name.lower()
    return "sample" in name or "submission" in name


def _rle_column(df: pd.DataFrame) -> str | None:
    best = None
    for col in df.columns:
        cells = [c for c in df[col].head(2000) if c.strip() not in ("", "-1")]
        if not cells:
            continue
        ok = [bool(_RLE_CELL.match(c.strip())) and len(c.split()) % 2 == 0 for c in cells]
        score = sum(ok) / len(ok) + (0.5 if _RLE_HINT.search(col) else 0)
        if sum(ok) / len(ok) >= 0.9 and (best is None or score > best[0]):
            best = (score, col)
    return best[1] if best else None


def _id_column(df: pd.DataFrame, ids: set, skip=()) -> tuple[str | None, int]:
    """The column whose values (extensions stripped) name the most of ``ids``."""
    best = (None, 0)
    for col in df.columns:
        if col in skip:
            continue
        n = len(set(_strip_any_ext(df[col])) & ids)
        if n > best[1]:
            best = (col, n)
    return best


def _constant_per_id(df: pd.DataFrame, id_col: str, col: str) -> bool:
    return bool((df.groupby(id_col, sort=False)[col].nunique() <= 1).all())


def _group_column(df: pd.DataFrame, id_col: str, skip=()) -> tuple[str | None, bool]:
    """(a column constant per id with 2..n-1 values, whether its name says it is a group)."""
    n_ids = df[id_col].nunique()
    found = []
    for col in df.columns:
        if col == id_col or col in skip or not _constant_per_id(df, id_col, col):
            continue
        k = df.drop_duplicates(id_col)[col].nunique()
        if 2 <= k < n_ids:
            found.append((bool(_GROUP_HINT.search(col)), -k, col))
    if not found:
        return None, False
    hint, _, col = max(found)
    return col, hint


def _sort_values(values) -> list[str]:
    values = list(values)
    if all(re.fullmatch(r"-?\d+", v) for v in values):
        return sorted(values, key=int)
    return sorted(values)


def _names_csv(files: Files, values: list[str], skip: set) -> tuple[dict, str] | None:
    """{value: name} from a small CSV with a column holding ``values`` and a column of unique names.

    A class table (a small CSV of value and name columns) that repeats a value or a name is an
    :class:`InitError` naming the file, the line and the repeated entry: it cannot say which name a
    value has."""
    for rel in files.csvs:
        if rel in skip or _is_sample(rel):
            continue
        df = _read(files, rel)
        if df is None or len(df) > 10000:
            continue
        for vcol in df.columns:
            vals = df[vcol].str.strip()
            if not set(values) <= set(vals):
                continue
            for ncol in sorted(df.columns, key=lambda c: not _NAME_HINT.search(c)):
                names = df[ncol].str.strip()
                if ncol == vcol or names.str.fullmatch(r"-?\d+").all():
                    continue
                if names.is_unique and vals.is_unique:
                    return dict(zip(vals, names)), rel
                if _is_class_table(rel, df, vcol, ncol) and (not vals.is_unique or _NAME_HINT.search(ncol)):
                    raise InitError(_repeated(files.root / rel, df, vcol if not vals.is_unique else None, ncol))
    return None


def _is_class_table(rel: str, df: pd.DataFrame, vcol: str, ncol: str) -> bool:
    """A small table mapping class values to names (repeats and all), not a per-image table."""
    hinted = _CLASS_HINT.search(Path(rel).stem) or _CLASS_HINT.search(vcol) or _NAME_HINT.search(ncol)
    return bool(hinted) and len(df) <= 2 * df[vcol].str.strip().nunique()


def _repeated(path: Path, df: pd.DataFrame, vcol: str | None, ncol: str) -> str:
    """The first repeated class value (``vcol``; None: none repeats) else name of a class table, with
    the line it repeats and the line it first appears on."""
    col, what = (vcol, "class value") if vcol is not None else (ncol, "class name")
    cells = df[col].str.strip()
    k = int(cells.duplicated().to_numpy().argmax())
    first = int((cells == cells.iloc[k]).to_numpy().argmax())
    return (f"{path} line {k + 2}: {what} {cells.iloc[k]!r} (column {col!r}) is listed twice, also at line "
            f"{first + 2}; a class table gives each class one value and one name")


def names_txt(files: Files) -> tuple[list[str], str] | None:
    """(class names, file) from a ``classes.txt`` (or class_names.txt, categories.txt) in the data folder,
    one name per line, blank lines ignored; the shallowest such file. A repeated name is an
    :class:`InitError` naming the file and both lines."""
    found = sorted((rel for rel in files.txts if _NAMES_TXT.match(Path(rel).name)), key=lambda r: (r.count("/"), r))
    if not found:
        return None
    rel = found[0]
    try:
        text = read_text(files.root / rel, "class names file")
    except ReadError as e:
        raise InitError(str(e)) from None
    names, seen = [], {}
    for line, raw in enumerate(text.splitlines(), 1):
        name = raw.strip()
        if not name:
            continue
        if name in seen:
            raise InitError(f"{files.root / rel} line {line}: class name {name!r} is listed twice (also on line "
                            f"{seen[name]}); list each class once, one name per line")
        seen[name] = line
        names.append(name)
    if not names:
        raise InitError(f"{files.root / rel}: no class names in it (expected one name per line)")
    return names, rel


def without_background(names: list[str], n: int) -> list[str]:
    """``names`` without a leading background entry when that leaves exactly ``n`` names."""
    if len(names) == n + 1 and names[0].lower() in _BACKGROUND:
        return names[1:]
    return names


def _find_groups_csv(files: Files, ids: set, skip: set) -> tuple[str, str, str, bool] | None:
    """(csv, id column, group column, named like a group) from a CSV naming the training images."""
    best = None
    for rel in files.csvs:
        if rel in skip or _is_sample(rel):
            continue
        df = _read(files, rel)
        if df is None or df.empty:
            continue
        id_col, n = _id_column(df, ids)
        if id_col is None or n < max(2, 0.9 * len(ids)):
            continue
        d = df.assign(**{id_col: _strip_any_ext(df[id_col])})
        col, hint = _group_column(d, id_col)
        if col and (best is None or hint > best[3]):
            best = (rel, id_col, col, hint)
    return best
