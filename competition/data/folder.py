"""What the folder-based formats (``mask_folders``, ``rle_csv``) share: recursive image listings,
CSV reading, groups from a column or a sub-folder, cached image sizes, metadata."""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from competition.data.base import Adapter, DataError, read_csv_table, safe_join, walk_files

# Extensions that count as "an image file" when looking for the same id stored twice (a.png + a.jpg).
IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".jp2", ".dcm"})
MAX_LISTED = 10  # how many offending ids/rows an error message lists


def _few(items) -> str:
    items = list(items)
    more = f" ... ({len(items)} in all)" if len(items) > MAX_LISTED else ""
    return ", ".join(map(str, items[:MAX_LISTED])) + more


def list_images(folder: Path, ext: str, required: bool = False, root: Path | None = None) -> dict[str, Path]:
    """id -> file for every ``<id><ext>`` under ``folder`` (recursively), sorted by id.

    The id is the path relative to ``folder``, without the extension, with ``/`` separators. An id
    stored under two image extensions (``a.png`` and ``a.jpg``) is an error naming both files;
    hidden files (``.DS_Store``, ``._a.png``) are skipped. A missing folder is an empty listing unless
    ``required``. Symlinked files and sub-folders must resolve inside ``root`` (the data root;
    default ``folder`` itself), else a DataError naming them.
    """
    if not folder.is_dir():
        if required:
            raise DataError(f"{folder}: image folder not found (expected <id>{ext} files)")
        return {}
    ext_l = ext.lower()
    by_id: dict[str, list[Path]] = {}
    def is_image(name: str) -> bool:
        low = name.lower()
        return bool(ext_l) and low.endswith(ext_l) or Path(low).suffix in IMAGE_EXTS

    for p in walk_files(folder, root or folder, is_image):
        rel = p.relative_to(folder)
        name = rel.as_posix()
        if ext_l and name.lower().endswith(ext_l):  # also multi-part extensions such as .nii.gz
            by_id.setdefault(name[: -len(ext_l)], []).append(p)
        elif p.suffix.lower() in IMAGE_EXTS:
            by_id.setdefault(rel.with_suffix("").as_posix(), []).append(p)
    found: dict[str, Path] = {}
    dup = []
    for key in sorted(by_id):
        files = by_id[key]
        if len(files) > 1:
            dup.append(f"{key!r} ({', '.join(sorted(f.name for f in files))})")
            continue
        if str(files[0]).lower().endswith(ext_l):
            found[key] = files[0]
    if dup:
        raise DataError(f"{folder}: the same image id is stored more than once: {_few(dup)}; "
                        f"every id must be exactly one <id>{ext} file")
    if required and not found:
        others = sorted({p.suffix.lower() for files in by_id.values() for p in files})
        hint = f"; found {', '.join(others)} files instead (set image_ext)" if others else ""
        raise DataError(f"{folder}: no training images found (expected <id>{ext} files{hint})")
    return found


def require_columns(df: pd.DataFrame, path: Path, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{path}: {what} has no column(s) {missing}; columns found: {list(df.columns)}")


def strip_ext(ids: pd.Series, ext: str) -> pd.Series:
    """Ids as written in a CSV, with a trailing ``ext`` (``0002cc93b.jpg``) removed: Kaggle writes both."""
    ids = ids.astype(str).str.strip()
    if not ext:
        return ids
    has = ids.str.lower().str.endswith(ext.lower())
    return ids.where(~has, ids.str.slice(0, -len(ext)))


def groups_from_table(df: pd.DataFrame, id_col: str, group_col: str, path: Path, ids: list[str],
                      line_offset: int = 2, hint: str = "") -> dict[str, str]:
    """id -> group from a table that may repeat ids; conflicting or missing assignments are errors.

    ``line_offset``: the file line of the table's first data row (header = line 1).
    """
    sub = pd.DataFrame({"id": df[id_col].to_numpy(dtype=object), "group": df[group_col].to_numpy(dtype=object),
                        "line": np.arange(len(df)) + line_offset})
    empty = sub[sub["group"].astype(str).str.strip() == ""]
    if len(empty):
        rows = [f"line {ln} (id {i!r})" for i, ln in zip(empty["id"], empty["line"])]
        raise DataError(f"{path}: empty {group_col!r} (group) value at {_few(rows)}")
    n = sub.groupby("id", sort=False)["group"].nunique()
    bad = n[n > 1].index
    if len(bad):
        details = []
        for i in bad[:MAX_LISTED]:
            rows = sub[sub["id"] == i]
            details.append(f"{i!r}: " + ", ".join(f"{g!r} (line {ln})" for g, ln in zip(rows["group"], rows["line"])))
        raise DataError(f"{path}: conflicting {group_col!r} values for the same id: {'; '.join(details)}"
                        f"{' ...' if len(bad) > MAX_LISTED else ''}; each image belongs to exactly one group")
    first = sub.drop_duplicates("id").set_index("id")["group"]
    missing = [i for i in ids if i not in first.index]
    if missing:
        raise DataError(f"{path}: no {group_col!r} (group) for training image(s) {_few(missing)}; "
                        f"every training image needs a row with id and {group_col}{hint}")
    return {i: str(first[i]) for i in ids}


def folder_groups(ids: list[str], folder: Path) -> dict[str, str]:
    """``groups.source: folder``: the image's parent folder under the images folder (``<group>/<img>``)."""
    flat = [i for i in ids if "/" not in i]
    if flat:
        raise DataError(f"{folder}: groups.source 'folder' needs the images in <group>/ sub-folders, but "
                        f"{_few(flat)} lie directly in it; use groups.source column or none")
    return {i: i.rsplit("/", 1)[0].rsplit("/", 1)[-1] for i in ids}



class FolderAdapter(Adapter):
    """What the folder-based formats share: image listings, cached image sizes, groups, metadata."""

    spec_name = ""  # "mask_folders" / "rle_csv": the config section

    @property
    def spec(self):
        return getattr(self.cfg, self.spec_name)

    @cached_property
    def images_dir(self) -> Path:
        return safe_join(self.root, self.spec.images, f"{self.spec_name}.images")

    @cached_property
    def _train(self) -> dict[str, Path]:
        return list_images(self.images_dir, self.spec.image_ext, required=True, root=self.root)

    @cached_property
    def _test(self) -> dict[str, Path]:
        rel = self.spec.test_images
        if not rel:
            return {}
        return list_images(safe_join(self.root, rel, f"{self.spec_name}.test_images"), self.spec.image_ext,
                           root=self.root)

    # -- groups and metadata ----------------------------------------------------------------------
    def meta_path(self) -> Path | None:
        """The per-image CSV named by ``groups.csv`` (which must then exist), else None."""
        rel = self.cfg.groups.csv
        if not rel:
            return None
        path = safe_join(self.root, rel, "groups.csv")
        if not path.is_file():
            raise DataError(f"{path}: groups.csv not found (expected a CSV with an "
                            f"{self.cfg.groups.id_column!r} column, groups.id_column)")
        return path

    @cached_property
    def _meta(self) -> pd.DataFrame | None:
        path = self.meta_path()
        if path is None:
            return None
        df = read_csv_table(path, "metadata CSV")
        id_col = self.cfg.groups.id_column
        require_columns(df, path, [id_col], "metadata CSV (groups.id_column)")
        ids = strip_ext(df[id_col], self.spec.image_ext)
        # Normalised to an "id" column, as every metadata table downstream reads it.
        df = df.drop(columns=[c for c in (id_col, "id") if c in df.columns])
        df.insert(0, "id", ids.to_numpy(dtype=object))
        return df

    def column_groups(self) -> dict[str, str]:
        path, col = self.meta_path(), self.cfg.groups.column
        if path is None:
            raise DataError(f"groups.source 'column' needs groups.csv (a CSV in the data root with "
                            f"{self.cfg.groups.id_column!r} and {col!r} columns) for the {self.spec_name} format")
        require_columns(self._meta, path, [col], "metadata CSV (groups.column)")
        return groups_from_table(self._meta, "id", col, path, self.ids)

    def groups(self) -> dict[str, str]:
        src = self.cfg.groups.source
        if src == "none":
            return {i: i for i in self.ids}
        if src == "folder":
            return folder_groups(self.ids, self.images_dir)
        return self.column_groups()

    def metadata(self) -> pd.DataFrame | None:
        """The metadata CSV's rows for the training ids, one per id, in ``ids`` order ("" where absent)."""
        if self._meta is None:
            return None
        meta = self._meta.drop_duplicates("id").set_index("id")
        return meta.reindex(self.ids).fillna("").rename_axis("id").reset_index()
