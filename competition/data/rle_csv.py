"""Adapter (b): the Kaggle RLE CSV layout (``format: rle_csv``).

    train_images/<id><image_ext>     the images (sub-folders allowed: id ``s1/img3``)
    train.csv                        id, class, rle columns (names from ``rle_csv``); pixel order
                                     ``rle_csv.pixel_order`` (row-major, or column-major as in
                                     SIIM/TGS-style competitions); one row per id x class x run list
    test_images/<id><image_ext>      optional

Decisions:

* The training ids are **all images in the image folder**, with or without CSV rows: Kaggle's
  train.csv usually lists non-empty masks only, so an image without rows has all-empty masks. A CSV
  id with no image on disk is an error naming the expected file (and the CSV line).
* Several rows for the same id x class are unioned; an empty RLE cell (or ``-1``, SIIM's "no mask")
  contributes nothing. An id may be written with or without ``image_ext`` (``0002cc93b.jpg``).
* Without a class column and with exactly one class, every row is that class (SIIM, Airbus).
* Groups: ``column`` reads ``groups.column`` from ``groups.csv`` when given, else from the train CSV
  (an id whose rows disagree is an error; an image without rows then has no group, also an error);
  ``folder``: the image's sub-folder; ``none``: each image its own group.

The CSV is read and validated once (ids, classes, paths) on first use, vectorised with pandas; masks
are decoded lazily at the image's own size (read from the header, cached) and resized with nearest
neighbour to the requested size. Per-image presence comes from the index without decoding.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from competition.config import ConfigError
from competition.data.base import ADAPTERS, DataError, read_csv_table, resize_mask, safe_join
from competition.data.folder import FolderAdapter, _few, groups_from_table, require_columns, strip_ext
from competition.rle import decode, validate

EMPTY_RLE = ("", "-1")  # cells that mean "no pixels"
VOID = -2  # the class index of an ``ignore.value`` row: its runs are the image's void region


@dataclass(frozen=True)
class _Index:
    path: Path  # the train CSV
    table: pd.DataFrame  # the CSV with its id column normalised into "id" (extension stripped)
    rows: dict[str, np.ndarray]  # id -> positions in rle/cls/line of its non-empty rows
    rle: np.ndarray  # object array of RLE strings (non-empty rows only)
    cls: np.ndarray  # class index per non-empty row (VOID: an ignore.value row)
    line: np.ndarray  # CSV line (header = 1) per non-empty row
    presence: np.ndarray  # (N, C) bool over the training ids


@ADAPTERS.register("rle_csv")
class RleCsvAdapter(FolderAdapter):
    spec_name = "rle_csv"

    @property
    def ids(self) -> list[str]:
        self._index  # noqa: B018  the CSV is validated with the listing: errors surface on first use
        return list(self._train)

    @cached_property
    def _pos(self) -> dict[str, int]:
        return {i: k for k, i in enumerate(self._train)}

    @cached_property
    def _index(self) -> _Index:
        spec = self.spec
        path = safe_join(self.root, spec.csv, "rle_csv.csv")
        df = read_csv_table(path, "train CSV (rle_csv.csv)")
        one_class = spec.class_column not in df.columns and len(self.classes) == 1
        require_columns(df, path, [spec.id_column, spec.rle_column] + ([] if one_class else [spec.class_column]),
                        "train CSV")
        line = np.arange(len(df)) + 2
        ids = strip_ext(df[spec.id_column], spec.image_ext)
        if (ids == "").any():
            raise DataError(f"{path}: empty {spec.id_column!r} (image id) at line(s) "
                            f"{_few(line[(ids == '').to_numpy()])}")

        if one_class:
            cls = np.zeros(len(df), np.int64)
        else:
            names = df[spec.class_column].astype(str).str.strip()
            values = self.cfg.class_values  # rle_csv.class_values (a numeric ClassId), else the names
            cls = pd.Index(values).get_indexer(names).astype(np.int64)  # -1: unknown
            cls[self._void_rows(names)] = VOID
            bad = np.flatnonzero(cls == -1)
            if len(bad):
                rows = [f"{names.iloc[r]!r} (line {line[r]})" for r in bad]
                valid = ", ".join(v if v == c else f"{v} ({c})" for v, c in zip(values, self.classes))
                what = "value(s) (rle_csv.class_values)" if spec.class_values else "name(s)"
                raise DataError(f"{path}: unknown class {what} in column {spec.class_column!r}: {_few(rows)}; "
                                f"valid: {valid}")

        listed = self._train
        known = ids.isin(pd.Index(list(listed))).to_numpy()
        if not known.all():
            absent = pd.DataFrame({"id": ids[~known].to_numpy(), "line": line[~known]}).drop_duplicates("id")
            for i, ln in zip(absent["id"], absent["line"]):  # an id such as ../../etc/passwd stops here
                try:
                    safe_join(self.root, Path(spec.images) / f"{i}{spec.image_ext}")
                except DataError:
                    raise DataError(f"{path} line {ln}: image id {i!r} escapes the data root {self.root} "
                                    f"(an id names the file <id>{spec.image_ext} in {spec.images})") from None
            files = [f"{Path(spec.images) / (i + spec.image_ext)} (line {ln})"
                     for i, ln in zip(absent["id"], absent["line"])]
            raise DataError(f"{path}: image(s) listed in the CSV but not found on disk: {_few(files)} "
                            f"(expected <id>{spec.image_ext} in {self.images_dir})")

        rle = df[spec.rle_column].astype(str).str.strip()
        keep = np.flatnonzero(~rle.isin(EMPTY_RLE).to_numpy())
        kept_ids = ids.to_numpy(dtype=object)[keep]
        rows = pd.DataFrame({"id": kept_ids}).groupby("id", sort=False).indices
        presence = np.zeros((len(listed), len(self.classes)), bool)
        labelled = cls[keep] >= 0  # void rows mark no class
        presence[pd.Index(list(listed)).get_indexer(kept_ids)[labelled], cls[keep][labelled]] = True

        table = df.drop(columns=[c for c in (spec.id_column, "id") if c in df.columns])
        table.insert(0, "id", ids.to_numpy(dtype=object))
        return _Index(path=path, table=table, rows=rows, rle=rle.to_numpy(dtype=object)[keep], cls=cls[keep],
                      line=line[keep], presence=presence)

    def _void_rows(self, names: pd.Series) -> np.ndarray:
        """(rows,) bool: the train CSV rows whose class cell is ``ignore.value`` (the void region)."""
        if self.cfg.ignore is None:
            return np.zeros(len(names), bool)
        v = str(self.cfg.ignore.value).strip()
        if v in self.cfg.class_values:
            raise ConfigError(f"{self.cfg.name}: ignore.value {v!r} is also a class value; the rows whose "
                              f"{self.spec.class_column!r} is ignore.value are the void region, so it must "
                              f"differ from every class")
        return (names == v).to_numpy()

    # -- groups and metadata ----------------------------------------------------------------------
    def column_groups(self) -> dict[str, str]:
        if self.cfg.groups.csv:
            return super().column_groups()
        idx, col = self._index, self.cfg.groups.column
        require_columns(idx.table, idx.path, [col], "train CSV (groups.column)")
        return groups_from_table(idx.table, "id", col, idx.path, self.ids,
                                 hint="; an image without rows in the train CSV has no group there, so give "
                                      "groups.csv (a CSV with id and the group column) instead")

    def metadata(self) -> pd.DataFrame | None:
        """Per-id columns: the train CSV's columns that are constant per id, joined with groups.csv if given."""
        spec, t = self.spec, self._index.table
        extra = [c for c in t.columns if c not in ("id", spec.class_column, spec.rle_column)]
        out = pd.DataFrame({"id": self.ids})
        if extra:
            by_id = t.groupby("id", sort=False)
            constant = [c for c, n in by_id[extra].nunique().max().items() if n <= 1]
            if constant:
                out = out.merge(by_id[constant].first().reset_index(), on="id", how="left")
        meta = super().metadata()
        if meta is not None:
            out = out.drop(columns=[c for c in meta.columns if c != "id" and c in out.columns])
            out = out.merge(meta, on="id", how="left")
        return None if out.shape[1] == 1 else out.fillna("")

    # -- masks ------------------------------------------------------------------------------------
    def presence(self, image_id: str) -> np.ndarray:
        self.image_path(image_id)
        return self._index.presence[self._pos[image_id]].copy()

    def validate_labels(self) -> None:
        """Check every non-empty RLE against its image's size (from the header) now, at ``make folds``.

        Presence comes from the index without decoding, so without this a malformed RLE would count
        its class as present in the folds' stratification and only fail once training decodes it.
        """
        idx = self._index
        for image_id, rows in idx.rows.items():
            shape = self.image_size(image_id)
            for r in rows:
                try:
                    validate(idx.rle[r], shape)
                except ValueError as e:
                    raise self._rle_error(r, image_id, e) from None

    def _rle_error(self, r: int, image_id: str, e: Exception) -> DataError:
        idx = self._index
        h, w = self.image_size(image_id)
        name = self.classes[idx.cls[r]] if idx.cls[r] >= 0 else f"{self.cfg.ignore.value} (ignore.value)"
        return DataError(f"{idx.path} line {idx.line[r]} (id {image_id!r}, class {name!r}): "
                         f"malformed RLE for the {w}x{h} image {self.image_path(image_id).name} ({e}); expected "
                         f"'start length ...' pairs, 1-based, {self.spec.pixel_order}")

    def load_mask(self, image_id: str, size: tuple[int, int] | None = None) -> np.ndarray:
        idx = self._index
        self.image_path(image_id)
        h, w = self.image_size(image_id)
        mask = np.zeros((len(self.classes), h, w), np.uint8)
        for r in idx.rows.get(image_id, ()):
            if idx.cls[r] >= 0:
                mask[idx.cls[r]] |= self._decoded(r, image_id, (h, w))
        return resize_mask(mask, size)

    def _decoded(self, r: int, image_id: str, shape: tuple[int, int]) -> np.ndarray:
        try:
            return decode(self._index.rle[r], shape, order=self.spec.pixel_order) != 0
        except ValueError as e:  # RLEError and anything else the decoder rejects
            raise self._rle_error(r, image_id, e) from None

    def void_region(self, image_id: str, size: tuple[int, int] | None = None) -> np.ndarray:
        """The union of the image's ``ignore.value`` rows."""
        idx = self._index
        self.image_path(image_id)
        shape = self.image_size(image_id)
        void = np.zeros((1, *shape), np.uint8)
        for r in idx.rows.get(image_id, ()):
            if idx.cls[r] == VOID:
                void[0] |= self._decoded(r, image_id, shape)
        return resize_mask(void, size)[0].astype(bool)
