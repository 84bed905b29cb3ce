"""``competition folds``: (Stratified)GroupKFold written to ``folds/<competition>.csv``.

The file is committed, so every teammate trains on the same split. A group never spans two folds;
a folds file that no longer matches the dataset is an error listing the ids that differ.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from competition import paths
from competition.config import CompetitionConfig, atomic_write_text
from competition.data.base import Adapter


class FoldsError(ValueError):
    pass


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


def check_groups(df: pd.DataFrame, where: str) -> None:
    span = df.groupby("group")["fold"].nunique()
    bad = span[span > 1]
    if len(bad):
        raise FoldsError(f"{where}: group(s) {list(bad.index[:10])} span more than one fold (leakage)")


def write_folds(df: pd.DataFrame, path: Path, force: bool = False) -> None:
    if path.exists() and not force:
        raise FoldsError(f"{path} exists (teammates share it through git); pass --force (FORCE=1) to overwrite")
    atomic_write_text(path, df.to_csv(index=False))


def load_folds(cfg: CompetitionConfig, adapter: Adapter | None = None, path: Path | None = None) -> pd.DataFrame:
    """Read and check the folds file; with an adapter, also check it still matches the dataset."""
    path = path or paths.folds_file(cfg.name)
    if not path.is_file():
        raise FoldsError(f"{path}: no folds file; run `make folds COMP={cfg.name}` first")
    df = pd.read_csv(path, dtype={"id": str, "group": str})
    missing_cols = {"id", "group", "fold"} - set(df.columns)
    if missing_cols:
        raise FoldsError(f"{path}: missing column(s) {sorted(missing_cols)}; expected id,group,fold")
    dup = df["id"][df["id"].duplicated()]
    if len(dup):
        raise FoldsError(f"{path}: id(s) listed twice: {list(dup[:10])}")
    check_groups(df, str(path))
    if adapter is not None:
        have, want = set(df["id"]), set(adapter.ids)
        gone, new = sorted(have - want), sorted(want - have)
        if gone or new:
            raise FoldsError(f"{path} no longer matches the dataset: ids in the file but not in the data: "
                             f"{gone[:20]}{' ...' if len(gone) > 20 else ''}; ids in the data but not in the file: "
                             f"{new[:20]}{' ...' if len(new) > 20 else ''}. Re-run `make folds FORCE=1` "
                             f"(and commit it) if the dataset changed on purpose.")
    return df


def summary(df: pd.DataFrame, adapter: Adapter) -> str:
    pres = pd.DataFrame(presence_matrix(adapter), columns=adapter.classes, index=adapter.ids)
    pres = pres.loc[df["id"]].set_axis(df.index)
    table = pd.concat([df.groupby("fold").agg(images=("id", "size"), groups=("group", "nunique")),
                       pres.groupby(df["fold"]).sum()], axis=1)
    return table.to_string()


def run(cfg: CompetitionConfig, adapter: Adapter, k: int | None = None, seed: int | None = None,
        force: bool = False) -> tuple[Path, pd.DataFrame, bool]:
    """Write the folds file; an existing one that still matches the data is kept (returns created=False)."""
    k = k or cfg.folds
    seed = cfg.fold_seed if seed is None else seed
    path = paths.folds_file(cfg.name)
    if path.exists() and not force:
        return path, load_folds(cfg, adapter, path), False
    df = make_folds(cfg, adapter, k, seed)
    write_folds(df, path, force=True)
    return path, df, True
