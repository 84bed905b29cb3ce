"""Adapter (c): image folder + mask PNGs (``format: mask_folders``).

    images/<id><image_ext>          the training images (sub-folders allowed: the id is the path
                                    relative to ``images`` without the extension, e.g. ``s1/img3``)
    masks/<id>.png                  mask_mode binary:    0/255 (or 0/1), exactly one class
    masks/<id>.png                  mask_mode index:     pixel value = class index + 1, 0 = background
                                                         (8/16-bit grey or palette PNG)
    masks/<id>/<class>.png          mask_mode per_class: 0/255 (or 0/1) per class; a missing file is empty
    meta.csv                        optional: ``id`` + per-image columns (groups, stratification)

Void pixels (``ignore.value``): in binary and index masks, the pixels of that value (e.g. 255);
in per_class mode, the 0/255 file ``masks/<id>/<value>.png`` (a missing file: no void pixels).

Masks are decoded at the image's own size (a mask of another size is an error) and resized with
nearest neighbour to a requested size. In binary/index mode a missing mask file is an error (a
typo'd folder must not train on empty masks); in per_class mode a missing class file (or a missing
``masks/<id>/`` folder) means that class is absent, but a file whose name is not a class is an error.

"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from competition.config import CompetitionConfig, ConfigError
from competition.data.base import ADAPTERS, DataError, pil_reason, resize_mask, safe_join
from competition.data.folder import FolderAdapter, _few


def read_mask_png(path: Path) -> np.ndarray:
    """(H, W) integer array of a mask PNG: grey 8/16-bit values or palette indices (not colours)."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.asarray(im)
    except FileNotFoundError:
        raise DataError(f"{path}: mask file not found") from None
    except Exception as e:
        raise DataError(f"{path}: cannot be decoded as a mask image ({pil_reason(e)}; expected a PNG)") from None
    if arr.ndim == 3:
        if mode == "LA":
            arr = arr[..., 0]
        elif arr.shape[2] in (3, 4) and (arr[..., :3] == arr[..., :1]).all():
            arr = arr[..., 0]
        else:
            raise DataError(f"{path}: mask is a colour ({mode}) image; expected a single-channel PNG "
                            f"(grey values or palette indices)")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    return arr


def binary_values(arr: np.ndarray, path: Path) -> np.ndarray:
    """A 0/255 (or 0/1) mask as uint8 {0, 1}; any other value is an error naming the file."""
    vals = np.unique(arr)
    if not (set(vals.tolist()) <= {0, 255} or set(vals.tolist()) <= {0, 1}):
        raise DataError(f"{path}: binary mask has value(s) {_few(vals.tolist())}; expected only 0 and 255 "
                        f"(or 0 and 1)")
    return (arr > 0).astype(np.uint8)


@ADAPTERS.register("mask_folders")
class MaskFoldersAdapter(FolderAdapter):
    spec_name = "mask_folders"

    def __init__(self, cfg: CompetitionConfig):
        super().__init__(cfg)
        if cfg.mask_folders.mask_mode == "binary" and len(self.classes) != 1:
            raise ConfigError(f"{cfg.name}: mask_folders.mask_mode 'binary' holds exactly one class, but "
                              f"classes lists {len(self.classes)} ({', '.join(self.classes)}); "
                              f"use mask_mode index or per_class")
        self.void = self._void_value()
        self._last: tuple[str, np.ndarray] | None = None  # see _read

    def _void_value(self) -> int | str | None:
        """``ignore.value`` checked against the mask mode: a pixel value no class uses, or (per_class)
        a file name that is not a class."""
        if self.cfg.ignore is None:
            return None
        v, mode, n = self.cfg.ignore.value, self.spec.mask_mode, len(self.classes)
        if mode == "per_class":
            if str(v) in self.classes:
                raise ConfigError(f"{self.cfg.name}: ignore.value {v!r} is a class name; in mask_mode per_class it "
                                  f"names the void file masks/<id>/<value>.png, so it must not be a class")
            return str(v)
        if isinstance(v, str) and not v.isdigit():
            raise ConfigError(f"{self.cfg.name}: ignore.value {v!r}: mask_mode {mode} marks void pixels by a "
                              f"pixel value, an integer such as 255")
        v = int(v)  # binary masks with a void value: 0/1 with void 255, or 0/255 with another value
        if v == 0 or (mode == "index" and v <= n):
            raise ConfigError(f"{self.cfg.name}: ignore.value {v} is a pixel value the {mode} masks use for "
                              f"{'background' if v == 0 else 'a class'}; choose another (e.g. 255)")
        return v

    @cached_property
    def masks_dir(self) -> Path:
        path = safe_join(self.root, self.spec.masks, "mask_folders.masks")
        if not path.is_dir():
            raise DataError(f"{path}: mask folder not found (mask_folders.masks)")
        return path

    def meta_path(self) -> Path | None:
        # meta.csv in the data root is picked up by default when groups.csv is not set.
        if self.cfg.groups.csv:
            return super().meta_path()
        path = safe_join(self.root, "meta.csv", "metadata CSV")
        return path if path.is_file() else None

    def mask_path(self, image_id: str, class_name: str | None = None) -> Path:
        rel = f"{image_id}.png" if class_name is None else f"{image_id}/{class_name}.png"
        self.masks_dir  # noqa: B018  checks the folder itself first
        return safe_join(self.root, Path(self.spec.masks) / rel, "mask file")

    def _checked(self, arr: np.ndarray, path: Path, image_id: str) -> np.ndarray:
        want = self.image_size(image_id)
        if arr.shape != want:
            raise DataError(f"{path}: mask is {arr.shape[1]}x{arr.shape[0]} (WxH) but its image "
                            f"{self.image_path(image_id).name} is {want[1]}x{want[0]}; they must match")
        return arr

    def _read(self, path: Path, image_id: str) -> np.ndarray:
        """The checked mask PNG; the last one read is kept, so its mask and void region decode it once."""
        try:
            key = f"{path}|{path.stat().st_mtime_ns}"
        except OSError:
            key = None
        if key is not None and self._last is not None and self._last[0] == key:
            return self._last[1]
        arr = self._checked(read_mask_png(path), path, image_id)
        self._last = (key, arr) if key is not None else None
        return arr

    def void_region(self, image_id: str, size: tuple[int, int] | None = None) -> np.ndarray:
        self.image_path(image_id)
        if self.spec.mask_mode == "per_class":
            path = self.mask_path(image_id, self.void)
            if not path.is_file():
                return np.zeros(size or self.image_size(image_id), bool)
            void = binary_values(self._read(path, image_id), path)
        else:
            void = (self._read(self.mask_path(image_id), image_id) == self.void).astype(np.uint8)
        return resize_mask(void[None], size)[0].astype(bool)

    def load_mask(self, image_id: str, size: tuple[int, int] | None = None) -> np.ndarray:
        self.image_path(image_id)  # unknown ids fail here, before any mask path is built
        mode, n = self.spec.mask_mode, len(self.classes)
        if mode == "per_class":
            h, w = self.image_size(image_id)
            mask = np.zeros((n, h, w), np.uint8)
            self.masks_dir  # noqa: B018  checks the folder itself first
            folder = safe_join(self.root, Path(self.spec.masks) / image_id, "mask folder")
            if folder.is_dir():
                valid = set(self.classes) | ({self.void} if self.void is not None else set())
                strays = sorted(p.name for p in folder.iterdir()
                                if p.suffix.lower() == ".png" and p.stem not in valid and not p.name.startswith("."))
                if strays:
                    raise DataError(f"{folder}: mask file(s) {strays} name no class; valid: "
                                    f"{', '.join(self.classes)} (masks/<id>/<class>.png)")
            for k, c in enumerate(self.classes):
                path = self.mask_path(image_id, c)
                if path.is_file():
                    mask[k] = binary_values(self._read(path, image_id), path)
            return resize_mask(mask, size)
        path = self.mask_path(image_id)
        if not path.is_file():
            raise DataError(f"{path}: mask file not found for image {image_id!r} "
                            f"(mask_mode {mode}: masks/<id>.png)")
        arr = self._read(path, image_id)
        if self.void is not None:  # void pixels are no class: background in the mask, the ignore region apart
            arr = np.where(arr == self.void, 0, arr)
        if mode == "binary":
            mask = binary_values(arr, path)[None]
        else:
            top = int(arr.max()) if arr.size else 0
            if top > n or (arr.dtype.kind == "i" and int(arr.min()) < 0):
                bad = sorted(v for v in np.unique(arr).tolist() if v > n or v < 0)
                raise DataError(f"{path}: index mask has value(s) {_few(bad)} but the competition has {n} "
                                f"class(es); expected 0 (background) to {n} (class index + 1)")
            mask = (arr[None] == np.arange(1, n + 1)[:, None, None]).astype(np.uint8)
        return resize_mask(mask, size)
