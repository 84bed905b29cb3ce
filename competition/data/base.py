"""The adapter interface every dataset format implements, and the checks they share.

An adapter turns a folder of competition data into: train ids with groups, an image loader, a mask
loader that returns a (C, H, W) uint8 {0, 1} mask *at a requested size*, the test-set listing, and
the sample submission. Everything downstream (folds, training, OOF, submissions) talks to this
interface only, so a new competition format is one new file. With the competition's ``ignore``
key a format also says where its void pixels are (:meth:`Adapter.void_region`); ``load_ignore``
turns that into the ignored pixels the loss and, by ``ignore.metric``, the metric leave out.
"""
from __future__ import annotations

import csv
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from io import StringIO
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from competition.config import CompetitionConfig
from competition.errors import UserError
from competition.io import ReadError, csv_from_text, read_text
from competition.registry import Registry

# format name -> Adapter subclass; each format module registers itself (competition.data.adapters imports them all)
ADAPTERS = Registry("dataset format")


class DataError(UserError, ValueError):
    """Bad input data; the message names the file (and row) and what was expected."""


def _inside(root: Path, p: Path) -> bool:
    return p == root or root in p.parents


def safe_join(root: Path, rel: str | Path, what: str = "path") -> Path:
    """``root / rel``, refusing anything (``..``, absolute paths, symlinks) that escapes ``root``."""
    root = Path(root).resolve()
    p = (root / rel).resolve()
    if not _inside(root, p):
        via = "" if p == Path(os.path.normpath(root / rel)) else f" (it resolves to {p} through a symlink)"
        raise DataError(f"{what} {str(rel)!r} escapes the data root {root}{via}")
    return p


def check_inside(root: Path, path: Path, what: str) -> None:
    """Refuse a listed file or folder whose real location (after symlinks) is outside ``root``.

    A symlink is followed wherever it points, so one link could feed a file from anywhere on the
    machine into training or a submission; links that stay inside the data root are fine.
    """
    root = Path(root).resolve()
    real = Path(path).resolve()
    if not _inside(root, real):
        raise DataError(f"{path}: {what} is a symlink to {real}, outside the data root {root}; "
                        f"copy it into the data root or link to a place inside it")
    if not real.exists():
        raise DataError(f"{path}: {what} is a broken symlink (it points to {real}, which does not exist)")


def walk_files(folder: Path, root: Path, match: Callable[[str], bool] = lambda name: True,
               max_depth: int | None = None) -> Iterator[Path]:
    """Every regular file under ``folder`` whose name ``match``es, as listed (not resolved), sorted.

    Hidden entries (``.DS_Store``, ``._a.png``, our own marker and temp files) are skipped. Symlinked
    files and sub-folders are followed only when they resolve inside ``root`` (else a DataError
    naming them); a sub-folder linking back to one of its own parents is a loop, also an error.
    ``max_depth``: how many folder levels below ``folder`` to enter (None: all).
    """
    root = Path(root).resolve()
    yield from _walk(Path(folder), root, match, max_depth, (Path(folder).resolve(),))


def _walk(folder: Path, root: Path, match, depth: int | None, parents: tuple[Path, ...]) -> Iterator[Path]:
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        if e.name.startswith("."):
            continue
        p = Path(e.path)
        if e.is_dir():
            if depth is not None and depth <= 0:
                continue
            if e.is_symlink():
                check_inside(root, p, "folder")
            real = p.resolve()
            if real in parents:
                raise DataError(f"{p}: symlink loop (it points back to {real}, a folder above it)")
            yield from _walk(p, root, match, None if depth is None else depth - 1, parents + (real,))
        elif match(e.name):
            if e.is_symlink():
                check_inside(root, p, "file")
            if e.is_file():
                yield p


def read_image(path: Path, channels: str = "grayscale", bit_depth: int = 8) -> np.ndarray:
    """(H, W) for grayscale or (H, W, 3) RGB; uint8, or uint16 when ``bit_depth`` is 16."""
    flag = cv2.IMREAD_UNCHANGED
    img = cv2.imread(str(path), flag)
    if img is None:
        if not Path(path).is_file():
            raise DataError(f"{path}: image file not found")
        raise DataError(f"{path}: cannot be decoded as an image (expected a PNG/JPEG/TIFF readable by OpenCV)")
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    if channels == "grayscale" and img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    elif channels == "rgb":
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB) if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if bit_depth == 8 and img.dtype != np.uint8:
        img = (img / (np.iinfo(img.dtype).max / 255.0)).round().astype(np.uint8) if img.dtype.kind == "u" \
            else np.clip(img, 0, 255).astype(np.uint8)
    elif bit_depth == 16 and img.dtype == np.uint8:
        img = img.astype(np.uint16) * 257
    return img


def pil_reason(e: Exception) -> str:
    return "not a recognised image format" if isinstance(e, UnidentifiedImageError) else f"{type(e).__name__}: {e}"


def header_size(path: Path) -> tuple[int, int]:
    """(H, W) from the image header (no pixel decoding)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except Exception as e:  # PIL raises many types for corrupt files
        raise DataError(f"{path}: cannot be decoded as an image ({pil_reason(e)})") from None
    return int(h), int(w)


def read_data_text(path: Path, what: str) -> str:
    """A UTF-8 text file, with a DataError naming the file when it is missing or not UTF-8."""
    try:
        return read_text(path, what)
    except ReadError as e:
        raise DataError(str(e)) from None


def read_csv_table(path: Path, what: str) -> pd.DataFrame:
    """A CSV as strings (empty cells are ""), with a DataError naming the file when it cannot be read."""
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    text = read_data_text(path, what)
    try:
        df = csv_from_text(text, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
        raise DataError(f"{path}: {what} is not a readable CSV ({e})") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def resize_mask(mask: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Nearest-neighbour resize of a (C, H, W) uint8 mask to ``size`` = (h, w)."""
    if size is None or tuple(mask.shape[1:]) == tuple(size):
        return mask
    h, w = size
    return np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST) for m in mask]) if len(mask) \
        else np.zeros((0, h, w), np.uint8)


def check_unique(ids: list[str], where: str) -> None:
    seen, dup = set(), []
    for i in ids:
        (dup.append(i) if i in seen else seen.add(i))
    if dup:
        raise DataError(f"{where}: duplicate image id(s) {sorted(set(dup))[:10]}; every id must be unique")


class Adapter(ABC):
    """One competition's data on disk. Subclasses list their files in ``_train`` and ``_test``
    (id -> path, sorted by id, computed lazily) and say how masks and groups are read."""

    def __init__(self, cfg: CompetitionConfig):
        self.cfg = cfg
        self.root = cfg.root()
        self.classes = list(cfg.classes)
        self._sizes: dict[tuple[str, str], tuple[int, int]] = {}

    # -- listing --------------------------------------------------------------------------------
    @property
    @abstractmethod
    def _train(self) -> dict[str, Path]:
        """Training image id -> file."""

    @property
    @abstractmethod
    def _test(self) -> dict[str, Path]:
        """Test image id -> file (empty when the competition ships no test images)."""

    @abstractmethod
    def groups(self) -> dict[str, str]:
        """id -> group (subject, patient, imaging type)."""

    @property
    def ids(self) -> list[str]:
        """Training image ids, sorted."""
        return list(self._train)

    @property
    def test_ids(self) -> list[str]:
        """Test image ids (no masks), sorted."""
        return list(self._test)

    def image_path(self, image_id: str, split: str = "train") -> Path:
        """The file holding this image."""
        table = self._train if split == "train" else self._test
        try:
            return table[image_id]
        except KeyError:
            raise DataError(f"unknown {split} image id {image_id!r}") from None

    # -- loading --------------------------------------------------------------------------------
    def load_image(self, image_id: str, split: str = "train") -> np.ndarray:
        return read_image(self.image_path(image_id, split), self.cfg.image.channels, self.cfg.image.bit_depth)

    def image_size(self, image_id: str, split: str = "train") -> tuple[int, int]:
        """(H, W) from the file header, cached: sizes are asked for far more often than pixels."""
        key = (split, image_id)
        if key not in self._sizes:
            self._sizes[key] = header_size(self.image_path(image_id, split))
        return self._sizes[key]

    @abstractmethod
    def load_mask(self, image_id: str, size: tuple[int, int] | None = None) -> np.ndarray:
        """(C, H, W) uint8 in {0, 1} at ``size`` = (h, w), or at the image's own size when None."""

    def void_region(self, image_id: str, size: tuple[int, int] | None = None) -> np.ndarray:
        """(h, w) bool: the pixels the labels mark void (``ignore.value``) at ``size``; formats override."""
        raise DataError(f"{self.cfg.name}: format {self.cfg.format} has no void labels; remove the `ignore` key")

    def load_ignore(self, image_id: str, size: tuple[int, int] | None = None,
                    mask: np.ndarray | None = None) -> np.ndarray | None:
        """(h, w) bool: the ignored pixels at ``size`` (the image's own size when None), or None when
        the competition has no ``ignore`` key.

        Ignored = marked void and labelled with no class: a labelled pixel is never ignored, so the
        truth (``load_mask``) and the ignore region are disjoint and, for the metric, excluding void
        pixels is the same as dropping predictions there. ``mask``: this image's ``load_mask`` at
        ``size``, when the caller has it already.
        """
        if self.cfg.ignore is None:
            return None
        void = self.void_region(image_id, size)
        if mask is None:
            mask = self.load_mask(image_id, size)
        return void & ~mask.any(0) if len(mask) else void

    def validate_labels(self) -> None:
        """Check every training label now (``make folds``), not mid-training.

        The default does nothing: formats whose :meth:`presence` reads the labels (polygons, mask
        files) already check them when folds are stratified or summarised; a format that derives
        presence from an index without decoding (RLE CSV) overrides this.
        """

    def presence(self, image_id: str) -> np.ndarray:
        """(C,) bool: which classes this training image contains (for stratified folds, samplers)."""
        return self.load_mask(image_id).reshape(len(self.classes), -1).any(1)

    def metadata(self) -> pd.DataFrame | None:
        """Extra per-image columns (``id`` plus anything else) used for groups or stratification."""
        return None

    def submission_id(self, image_id: str, split: str = "test") -> str:
        """How this image is named in a submission CSV (``submission.id_format``)."""
        fmt = self.cfg.submission.id_format
        if fmt == "id":
            return image_id
        p = self.image_path(image_id, split)
        return p.name if fmt == "filename" else p.stem

    def sample_submission(self) -> pd.DataFrame | None:
        """The competition's sample submission, or None when it ships none."""
        rel = self.cfg.submission.sample_submission
        if not rel:
            return None
        path = safe_join(self.root, rel, "submission.sample_submission")
        if not path.is_file():
            raise DataError(f"{path}: sample submission not found (submission.sample_submission)")
        return read_csv_table(path, "sample submission")
