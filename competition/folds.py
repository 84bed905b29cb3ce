"""``competition folds``: (Stratified)GroupKFold written to ``folds/<competition>.csv``.

The file is committed, so every teammate trains on the same split. A group never spans two folds;
a folds file that no longer matches the dataset is an error listing the ids that differ. The file's
own ``group`` column is never trusted: groups are recomputed from the data, so a hand-edited (or
stale) file cannot smuggle one subject into two folds.

Curated data (``data.exclude``) never changes the file: folds are made on every image, so the split
stays the same whatever a teammate excludes; :func:`training_ids` and :func:`validation_ids` leave the
excluded images out where a model trains or is scored.

Before writing (or keeping) the file, the labels are checked: every RLE against its image's size, and,
on a few sampled square images, whether the masks fit their images better in the other pixel order
(:mod:`competition.data.alignment`). Lopsided folds (the largest over twice the smallest, from uneven
groups) are allowed but warned about in the summary.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from competition import paths
from competition.config import CompetitionConfig
from competition.data.alignment import check_pixel_order
from competition.data.base import Adapter, DataError
from competition.errors import ConfigError
from competition.io import (
    STALE_AFTER_S,
    ReadError,
    atomic_write_text,
    clean_stale_temps,
    csv_from_text,
    read_csv,
    read_text,
)

COLUMNS = ("id", "group", "fold")
_MAX_LISTED = 10
_INT = re.compile(r"^[0-9]{1,9}$")  # 9 digits: far more folds than anyone uses, and no int64 overflow
LOPSIDED = 2.0  # warn when the largest fold holds more than this many times the smallest's images


class FoldsError(DataError):
    """A folds file (or a split) that cannot be used; the message names the file, row or ids."""


def _few(items) -> str:
    items = list(items)
    more = f" ... ({len(items)} in all)" if len(items) > _MAX_LISTED else ""
    return ", ".join(map(str, items[:_MAX_LISTED])) + more


def presence_matrix(adapter: Adapter) -> np.ndarray:
    """(N, C) bool: which classes each training image contains."""
    return np.stack([adapter.presence(i) for i in adapter.ids])


def stratify_key(cfg: CompetitionConfig, adapter: Adapter, k: int) -> np.ndarray | None:
    """One label per image for StratifiedGroupKFold, or None for plain GroupKFold."""
    by = cfg.stratify.by
    if by == "none":
        return None
    if by == "column":
        meta = adapter.metadata()
        col = cfg.stratify.column
        if meta is None or col not in meta.columns:
            raise FoldsError(f"stratify.column {col!r} is not a column of the dataset metadata "
                             f"(available: {[] if meta is None else list(meta.columns)})")
        return meta.set_index("id").loc[adapter.ids, col].astype(str).to_numpy()
    pres = presence_matrix(adapter)
    freq = pres.sum(0)
    # The rarest class an image contains is the most informative single label when signatures are too many.
    order = np.argsort(freq, kind="stable")
    rarest = np.array([next((str(c) for c in order if row[c]), "none") for row in pres])
    if by == "rare_class":
        return rarest
    sig = np.array(["".join("1" if v else "0" for v in row) for row in pres])
    counts = Counter(sig)
    return sig if min(counts.values()) >= k else rarest


def make_folds(cfg: CompetitionConfig, adapter: Adapter, k: int, seed: int) -> pd.DataFrame:
    ids = adapter.ids
    groups_map = adapter.groups()
    groups = np.array([groups_map[i] for i in ids])
    n_groups = len(set(groups))
    if n_groups < k:
        raise FoldsError(f"{cfg.name}: {n_groups} groups cannot fill {k} folds; lower `folds` in the config")
    y = stratify_key(cfg, adapter, k)
    fold = np.full(len(ids), -1)
    if y is None:
        # GroupKFold has no seed of its own: shuffle the group labels so `fold_seed` still decides the split.
        uniq = np.unique(groups)
        perm = dict(zip(uniq, np.random.default_rng(seed).permutation(len(uniq))))
        splits = GroupKFold(n_splits=k).split(ids, groups=[perm[g] for g in groups])
    else:
        splits = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(ids, y, groups)
    for f, (_, val) in enumerate(splits):
        fold[val] = f
    df = pd.DataFrame({"id": ids, "group": groups, "fold": fold})
    if y is not None:
        df["stratum"] = y
    check_groups(df, "the new split")
    return df


def _leaking_groups(df: pd.DataFrame) -> list[str]:
    span = df.groupby("group")["fold"].nunique()
    return list(span.index[span > 1])


def check_groups(df: pd.DataFrame, where: str) -> None:
    bad = _leaking_groups(df)
    if bad:
        raise FoldsError(f"{where}: group(s) {bad[:10]} span more than one fold (leakage)")


def write_folds(df: pd.DataFrame, path: Path, force: bool = False) -> None:
    if path.exists() and not force:
        raise FoldsError(f"{path} exists (teammates share it through git); pass --force (FORCE=1) to overwrite")
    # A killed earlier write leaves a hidden temp beside the file, where `git add folds/` would pick it up.
    clean_stale_temps(path.parent, STALE_AFTER_S)
    atomic_write_text(path, df.to_csv(index=False))


def load_folds(cfg: CompetitionConfig, adapter: Adapter | None = None, path: Path | None = None) -> pd.DataFrame:
    """Read and check the folds file; with an adapter, also check it still matches the dataset.

    With an adapter the returned ``group`` column is the data's own grouping, not the file's.
    """
    path = path or paths.folds_file(cfg.name)
    if not path.is_file():
        raise FoldsError(f"{path}: no folds file; run `make folds COMP={cfg.name}` first")
    df = _read_folds_csv(path)
    dup = df["id"][df["id"].duplicated()]
    if len(dup):
        raise FoldsError(f"{path}: id(s) listed twice: {list(dup[:10])}")
    df["fold"] = _fold_numbers(df, path)
    _check_fold_count(df, path, cfg)
    check_groups(df, str(path))
    if adapter is not None:
        _check_ids_match(df, adapter, path)
        df["group"] = _check_groups_match(df, adapter, path, cfg)
    return df


def _read_folds_csv(path: Path) -> pd.DataFrame:
    expected = f"expected a CSV with columns {','.join(COLUMNS)} (written by `make folds`)"
    try:
        text = read_text(path, "folds file")
    except ReadError as e:
        raise FoldsError(f"{e}; {expected}") from None
    try:
        df = csv_from_text(text)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, ValueError) as e:
        reason = "it is empty" if isinstance(e, pd.errors.EmptyDataError) else f"it is not a readable CSV ({e})"
        raise FoldsError(f"{path}: not a folds file: {reason}; {expected}") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise FoldsError(f"{path}: not a folds file: missing column(s) {missing} (found {list(df.columns)}); "
                         f"{expected}")
    empty = np.flatnonzero((df["id"].str.strip() == "").to_numpy())
    if len(empty):
        raise FoldsError(f"{path}: empty id at line(s) {_few(empty + 2)}; every row names one image")
    return df


def _fold_numbers(df: pd.DataFrame, path: Path) -> pd.Series:
    """The fold column as int64; anything but a non-negative integer is an error naming its rows."""
    text = df["fold"].str.strip()
    bad = np.flatnonzero(~text.str.match(_INT).to_numpy())
    if len(bad):
        rows = [f"line {k + 2} (id {df['id'].iloc[k]!r}, fold {df['fold'].iloc[k]!r})" for k in bad]
        raise FoldsError(f"{path}: fold value(s) that are not integers at {_few(rows)}; folds must be "
                         f"integers 0, 1, ... (regenerate with `make folds FORCE=1`)")
    return text.astype(np.int64)


def _check_fold_count(df: pd.DataFrame, path: Path, cfg: CompetitionConfig) -> None:
    folds = sorted(set(df["fold"]))
    if len(folds) < 2:
        what = "no images" if not folds else f"every image in fold {folds[0]}"
        raise FoldsError(f"{path}: lists {what}; training needs at least 2 folds (one to validate on, "
                         f"the rest to train on). Regenerate it with `make folds COMP={cfg.name} FORCE=1`.")


def _check_ids_match(df: pd.DataFrame, adapter: Adapter, path: Path) -> None:
    have, want = set(df["id"]), set(adapter.ids)
    gone, new = sorted(have - want), sorted(want - have)
    if gone or new:
        raise FoldsError(f"{path} no longer matches the dataset: ids in the file but not in the data: "
                         f"{gone[:20]}{' ...' if len(gone) > 20 else ''}; ids in the data but not in the file: "
                         f"{new[:20]}{' ...' if len(new) > 20 else ''}. Re-run `make folds FORCE=1` "
                         f"(and commit it) if the dataset changed on purpose.")


def _check_groups_match(df: pd.DataFrame, adapter: Adapter, path: Path, cfg: CompetitionConfig) -> pd.Series:
    """The data's groups for ``df``'s ids; refuses a file whose ``group`` column says otherwise."""
    groups_map = adapter.groups()
    data_groups = df["id"].map(groups_map).astype(str)
    differ = np.flatnonzero((data_groups != df["group"].str.strip()).to_numpy())
    if len(differ):
        rows = [f"{df['id'].iloc[k]!r} (file: {df['group'].iloc[k]!r}, data: {data_groups.iloc[k]!r})"
                for k in differ]
        leaks = _leaking_groups(df.assign(group=data_groups))
        leak = (f"; with the data's groups, group(s) {_few(leaks)} span more than one fold (leakage)"
                if leaks else "")
        raise FoldsError(f"{path}: the group column disagrees with the data for image(s) {_few(rows)}{leak}. "
                         f"Groups come from the data, not the folds file; regenerate it with "
                         f"`make folds COMP={cfg.name} FORCE=1` (and commit it).")
    return data_groups


def balance_warning(df: pd.DataFrame, name: str) -> str | None:
    """A warning (one line) when the largest fold holds more than ``LOPSIDED`` times the smallest's
    images, saying what it costs and what to do; None when the folds are balanced enough."""
    sizes = df.groupby("fold").size().sort_index()
    if len(sizes) < 2 or sizes.max() <= LOPSIDED * sizes.min():
        return None
    n, k, big = len(df), len(sizes), sizes.idxmax()
    per_group = df.groupby("group").size()
    group, g_n = per_group.idxmax(), int(per_group.max())
    fewer = f"fewer folds (`-k {k - 1}`, or `folds: {k - 1}` in configs/competitions/{name}.yaml), " if k > 2 else ""
    return (f"warning: lopsided folds: {', '.join(f'fold {f} {s}' for f, s in sizes.items())} images (the largest "
            f"{sizes.max() / sizes.min():.1f}x the smallest), so fold {big} trains on only {n - sizes.max()} of {n} "
            f"images and its validation score will read low against the test score; the groups are uneven (the "
            f"largest, {group!r}, holds {g_n} images). Consider {fewer}finer groups (a different `groups` key: "
            f"groups.column, groups.csv or groups.source), or keep this split knowingly")


def summary(df: pd.DataFrame, adapter: Adapter) -> str:
    """Images, groups and class presence per fold; then a warning line when the folds are lopsided."""
    pres = pd.DataFrame(presence_matrix(adapter), columns=adapter.classes, index=adapter.ids)
    pres = pres.loc[df["id"]].set_axis(df.index)
    table = pd.concat([df.groupby("fold").agg(images=("id", "size"), groups=("group", "nunique")),
                       pres.groupby(df["fold"]).sum()], axis=1)
    warning = balance_warning(df, adapter.cfg.name)
    return table.to_string() + (f"\n{warning}" if warning else "")


def run(cfg: CompetitionConfig, adapter: Adapter, k: int | None = None, seed: int | None = None,
        force: bool = False, label_check: bool = True) -> tuple[Path, pd.DataFrame, bool]:
    """Write the folds file; an existing one that still matches the data is kept (returns created=False).

    ``label_check``: refuse labels that fit their images clearly better in the other pixel order
    (:func:`competition.data.alignment.check_pixel_order`); False skips that check only.
    """
    k = k or cfg.folds
    seed = cfg.fold_seed if seed is None else seed
    path = paths.folds_file(cfg.name)
    # Bad labels fail here, naming their file and row, rather than hours into training.
    adapter.validate_labels()
    if label_check:
        check_pixel_order(cfg, adapter)
    if path.exists() and not force:
        return path, load_folds(cfg, adapter, path), False
    df = make_folds(cfg, adapter, k, seed)
    write_folds(df, path, force=True)
    return path, df, True


# --------------------------------------------------------------------------------------------- #
# Curated data: data.exclude
# --------------------------------------------------------------------------------------------- #
EXCLUDE_COLUMNS = ("id", "reason")


def ids_hash(ids: Iterable[str]) -> str:
    """First 16 hex digits of the SHA-256 of the sorted distinct ids, one per line: the same for a
    list in the YAML and a CSV naming the same images, whatever their order or reasons."""
    return hashlib.sha256("\n".join(sorted(set(ids))).encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Exclusion:
    """The images ``data.exclude`` names, checked against the folds file; ``source``: where they came
    from (the CSV's path, or the YAML list); ``reasons``: id -> the CSV's reason ("" for a list)."""
    ids: frozenset[str] = frozenset()
    source: str = ""
    reasons: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def sha256(self) -> str:
        return ids_hash(self.ids)

    def record(self) -> dict:
        """What a run folder's config and metrics.json say about it (count, hash, source, the ids)."""
        return {"count": len(self.ids), "sha256": self.sha256, "source": self.source, "ids": sorted(self.ids)}


def _read_exclude_csv(path: Path) -> dict[str, str]:
    expected = (f"expected a CSV with columns {', '.join(EXCLUDE_COLUMNS)} (more columns are allowed), one "
                f"image per row, e.g. written by `competition oof EXP --suspects --write-exclude FILE`")
    try:
        df = read_csv(path, "data.exclude file")
    except ReadError as e:
        raise ConfigError(f"data.exclude: {e}; {expected}") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in EXCLUDE_COLUMNS if c not in df.columns]
    if missing:
        raise ConfigError(f"data.exclude: {path}: missing column(s) {missing} (found {list(df.columns)}); {expected}")
    ids = df["id"].str.strip()
    empty = np.flatnonzero((ids == "").to_numpy())
    if len(empty):
        raise ConfigError(f"data.exclude: {path}: empty id at line(s) {_few(empty + 2)}; every row names one image")
    dup = np.flatnonzero(ids.duplicated().to_numpy())
    if len(dup):
        rows = [f"line {k + 2} ({ids.iloc[k]!r})" for k in dup]
        raise ConfigError(f"data.exclude: {path}: id(s) listed twice, at {_few(rows)}; list each image once")
    return dict(zip(ids, df["reason"].str.strip()))


def excluded(spec: list[str] | str | None, folds: pd.DataFrame) -> Exclusion:
    """``data.exclude`` (a list of ids, or a CSV path relative to the project folder) read and checked:
    every id must be an image of the folds file (a typo would otherwise exclude nothing, silently)."""
    if not spec:
        return Exclusion()
    if isinstance(spec, str):
        path = paths.project() / spec
        reasons, source = _read_exclude_csv(path), spec
    else:
        reasons, source = {str(i).strip(): "" for i in spec}, "data.exclude (list)"
    known = set(folds["id"].astype(str))
    unknown = sorted(set(reasons) - known)
    if unknown:
        where = f" ({source})" if isinstance(spec, str) else ""
        raise ConfigError(f"data.exclude{where}: {len(unknown)} id(s) not in the folds file (not images of the "
                          f"training data): {_few(unknown)}")
    return Exclusion(frozenset(reasons), source, reasons)


def _kept(ids: pd.Series, exclude: Collection[str], what: str) -> list[str]:
    out = [i for i in ids.astype(str) if i not in exclude]
    if len(ids) and not out:
        raise ConfigError(f"data.exclude leaves out all {len(ids)} of {what}; nothing is left to train or score on")
    return out


def training_ids(folds: pd.DataFrame, fold: int | None, exclude: Collection[str] = frozenset()) -> list[str]:
    """The ids a model trains on, in folds-file order: every fold but ``fold`` (None: every image, the
    all-data run), less the excluded ones. The one place a training set is chosen."""
    if fold is None:
        return _kept(folds["id"], exclude, "the images")
    return _kept(folds.loc[folds["fold"] != fold, "id"], exclude, f"fold {fold}'s training images")


def validation_ids(folds: pd.DataFrame, fold: int, exclude: Collection[str] = frozenset()) -> list[str]:
    """Fold ``fold``'s ids that are scored (each epoch's validation Dice, the OOF score), in folds-file
    order: its held-out images less the excluded ones (which are still predicted into its OOF)."""
    return _kept(folds.loc[folds["fold"] == fold, "id"], exclude, f"fold {fold}'s held-out images")
