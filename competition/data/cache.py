"""The opt-in sample cache (``data.cache: true``): decoded, resized images and bit-packed masks at the
working size, in memory-mapped files reused by every epoch, validation, OOF and fold.

What is cached is the expensive *deterministic* part of :meth:`SegDataset.__getitem__`: the image
decoded (``adapter.load_image``) and resized to the working size (``resize_image``), and the mask
rasterised at that size (``adapter.load_mask``). ``augment.preprocess`` and ``augment.train`` still run
on every access: both are seeded by (seed, epoch, index), so a cached sample is bit-identical to an
uncached one.

One folder per (competition, adapter split, working size), named by a key over everything that
shapes its contents (the data's fingerprint: file names, sizes and modification times; the
competition config that decides decoding and rasterising: format, classes, image channels and bit
depth, ...; the OpenCV version; a format version)::

    runs/_cache/<comp>-<split>-<h>x<w>-<key>/
        images.npy   uint8/uint16 (N, H, W[, 3])         sparse until filled
        masks.npy    uint8 (N, C, H, ceil(W / 8))         np.packbits along W (train split only); with
                                                          the competition's ``ignore``, C + 1 channels:
                                                          the last is the ignore region
        filled.npy   uint8 (N, 2): [image written, mask written]
        meta.json    the key's inputs and the ids (rows follow the adapter's full id list)

Rows follow the adapter's *full* id list of the split, so every fold (a subset of ids) shares one
cache. A folder is built complete in a temp folder and renamed into place, so a process only ever
opens a finished folder; a new key (changed data or settings) builds a new folder and removes the
older ones of the same competition, split and size. Files are mapped lazily in each process (DataLoader
workers included); different processes fill different rows, and a row's flag is set only after its
data has been written and flushed (``msync``), so a reader never sees a flagged row without its data,
even after a crash. Two processes filling the same row write identical bytes.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from competition import paths
from competition.io import atomic_write_text, read_text

FORMAT_VERSION = 1
IMAGES, MASKS, FILLED, META = "images.npy", "masks.npy", "filled.npy", "meta.json"
# Competition-config keys that cannot change a decoded image or a rasterised mask (everything else,
# including keys added later, is part of the key: a stale cache must never be read).
_NOT_SHAPING = ("name", "metric", "submission", "tta", "folds", "fold_seed", "groups", "stratify")
_SMALL_MASK = 32 << 20  # bytes: see unpack_mask
_STALE_BUILD_S = 3600.0  # a temp build folder older than this was left by a killed process
_logged: set[str] = set()


def log_once(msg: str, log: Callable[[str], None] | None = None) -> None:
    """``msg`` once per process (a fold builds a training and a validation dataset)."""
    if msg in _logged:
        return
    _logged.add(msg)
    if log is None:
        from tqdm import tqdm
        log = tqdm.write
    log(msg)


def cache_root() -> Path:
    return paths.runs_root() / "_cache"


def _plain(cfg) -> dict:
    from competition.config import to_plain
    return to_plain(cfg)


def cache_key(adapter, split: str, work: tuple[int, int], resize: str = "stretch") -> tuple[str, dict]:
    """(12 hex digits, the inputs they hash) for ``adapter``'s ``split`` at working size ``work``,
    images brought there by ``resize`` (``data.resize``)."""
    from competition.io import data_fingerprint
    comp = {k: v for k, v in _plain(adapter.cfg).items() if k not in _NOT_SHAPING}
    inputs = {"version": FORMAT_VERSION, "fingerprint": data_fingerprint(adapter.cfg.root()), "split": split,
              "work": list(work), "channels": adapter.cfg.image.channels, "bit_depth": adapter.cfg.image.bit_depth,
              "classes": list(adapter.classes), "opencv": cv2.__version__, "competition": comp}
    if resize != "stretch":  # only when set, so the keys of existing stretched caches stay valid
        inputs["resize"] = resize
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12], inputs


def uniform_work_size(adapter, split: str, ids: list[str], whole, scale: int) -> tuple[int, int] | None:
    """The working size every image of ``ids`` is brought to, or None when sizes differ.

    ``whole(native)`` is :meth:`Geometry.whole`; with ``policy: crop`` and no ``crop_from`` it is
    the image's native size, so every header is read (cheap: no pixel is decoded).
    """
    sizes = {whole(adapter.image_size(i, split)) for i in ids} if ids else set()
    if len(sizes) != 1:
        return None
    h, w = sizes.pop()
    return h * scale, w * scale


# --------------------------------------------------------------------------------------------- #
# .npy files mapped by hand: numpy's memmap cannot flush one row's pages
# --------------------------------------------------------------------------------------------- #
class _Mapped:
    """A .npy file mapped read-write (MAP_SHARED: what one process writes, every other sees)."""

    def __init__(self, path: Path):
        with open(path, "r+b") as f:
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0(f))
            offset = f.tell()
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_WRITE)
        if fortran:
            raise ValueError(f"{path}: Fortran-ordered array; not a cache file")
        self.offset, self.array = offset, np.ndarray(shape, dtype, buffer=self.mm, offset=offset)
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    def flush_row(self, row: int) -> None:
        start = self.offset + row * self.row_bytes
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        self.mm.flush(aligned, start + self.row_bytes - aligned)

    def close(self) -> None:
        self.array = None
        try:
            self.mm.close()
        except BufferError:  # a row view is still alive somewhere; the mapping goes with it
            pass


def _create_npy(path: Path, dtype, shape: tuple[int, ...]) -> None:
    """A zero-filled .npy of ``shape`` without writing its bytes (a sparse file)."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    del arr


def _bytes(dtype, shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


# --------------------------------------------------------------------------------------------- #
class SampleCache:
    """One cache folder: rows of images (and masks) at one working size, filled on first access.

    Picklable (DataLoader workers): the mappings are opened lazily in each process.
    """

    def __init__(self, folder: Path, ids: list[str], image_shape: tuple[int, ...], image_dtype,
                 n_classes: int | None, meta: dict, log=None):
        self.folder, self.ids = Path(folder), list(ids)
        self.row_of = {i: k for k, i in enumerate(self.ids)}
        self.image_shape, self.image_dtype = tuple(image_shape), np.dtype(image_dtype)
        self.n_classes, self.meta, self.log = n_classes, meta, log
        self.work = tuple(self.image_shape[:2])
        self.packed_w = -(-self.work[1] // 8)
        self._maps: dict[str, _Mapped] | None = None
        self._pid = None

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def for_dataset(cls, adapter, split: str, work: tuple[int, int], log=None,
                    resize: str = "stretch") -> "SampleCache | None":
        """The cache of ``adapter``'s ``split`` at ``work`` (not yet created on disk), or None
        (with a message) when it cannot be kept there."""
        ids = adapter.ids if split == "train" else adapter.test_ids
        key, inputs = cache_key(adapter, split, work, resize)
        comp = paths.check_name("competition", adapter.cfg.name)
        tag = "" if resize == "stretch" else f"-{resize}"  # its own folder: stretched caches are not stale
        folder = paths.inside(cache_root(), cache_root() / f"{comp}-{split}-{work[0]}x{work[1]}{tag}-{key}")
        rgb = adapter.cfg.image.channels == "rgb"
        shape = (*work, 3) if rgb else tuple(work)
        dtype = np.uint16 if adapter.cfg.image.bit_depth == 16 else np.uint8
        # Mask channels: the classes, and the ignore region as one more when the competition has one.
        n_classes = len(adapter.classes) + (adapter.cfg.ignore is not None) if split == "train" else None
        meta = {**inputs, "key": key, "ids": list(ids)}
        cache = cls(folder, ids, shape, dtype, n_classes, meta, log)
        rel = cache.display()
        if (folder / META).is_file():
            log_once(f"data.cache: reusing {rel} ({cache.filled_count()} of {len(ids)} {split} images filled)", log)
            return cache
        need = cache.nbytes()
        free = shutil.disk_usage(_existing_parent(folder)).free
        if free < need * 1.05:
            log_once(f"data.cache: skipped: {rel} needs {need / 2**30:.1f} GiB when full but the disk has "
                     f"{free / 2**30:.1f} GiB free; loading without a cache", log)
            return None
        log_once(f"data.cache: {rel} is filled during the first epoch ({len(ids)} {split} images at "
                 f"{work[0]}x{work[1]}, {need / 2**30:.2f} GiB when full)", log)
        return cache

    def display(self) -> str:
        try:
            return str(self.folder.relative_to(paths.project()))
        except ValueError:
            return str(self.folder)

    def nbytes(self) -> int:
        n = len(self.ids)
        total = _bytes(self.image_dtype, (n, *self.image_shape)) + n * 2
        if self.n_classes is not None:
            total += _bytes(np.uint8, (n, self.n_classes, self.work[0], self.packed_w))
        return total

    def filled_count(self) -> int:
        try:
            return int(np.load(self.folder / FILLED, mmap_mode="r")[:, 0].sum())
        except (OSError, ValueError):
            return 0

    def _build(self) -> None:
        """Create the folder (complete, then renamed into place) and remove older keys' folders."""
        root = self.folder.parent
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{self.folder.name}.", suffix=".tmp"))
        try:
            n = len(self.ids)
            _create_npy(tmp / IMAGES, self.image_dtype, (n, *self.image_shape))
            if self.n_classes is not None:
                _create_npy(tmp / MASKS, np.uint8, (n, self.n_classes, self.work[0], self.packed_w))
            np.save(tmp / FILLED, np.zeros((n, 2), np.uint8))
            atomic_write_text(tmp / META, json.dumps(self.meta))  # last: a folder with meta.json is complete
            os.chmod(tmp, 0o777 & ~_umask())
            try:
                os.rename(tmp, self.folder)
            except OSError:  # another process (a worker, a DDP rank, a teammate) was first: use theirs
                if not (self.folder / META).is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._remove_stale()

    def _remove_stale(self) -> None:
        prefix = self.folder.name[: -len(self.meta["key"])]  # "<comp>-<split>-<h>x<w>-"
        now = time.time()
        for p in self.folder.parent.iterdir():
            name = p.name
            if p == self.folder or p.is_symlink() or not p.is_dir():
                continue
            if name.startswith(prefix) and _is_key(name[len(prefix):]):
                shutil.rmtree(p, ignore_errors=True)  # an older key: changed data or settings
            elif name.startswith("." + prefix) and name.endswith(".tmp"):
                try:
                    if now - p.stat().st_mtime > _STALE_BUILD_S:
                        shutil.rmtree(p, ignore_errors=True)
                except FileNotFoundError:
                    pass

    # -- mapping --------------------------------------------------------------------------------
    def _arrays(self) -> dict[str, _Mapped]:
        if self._maps is not None and self._pid == os.getpid():
            return self._maps
        self._maps, self._pid = None, os.getpid()  # a forked worker maps the files itself
        if not (self.folder / META).is_file():
            self._build()
        else:
            self._check_meta()
        maps = {"images": _Mapped(self.folder / IMAGES), "filled": _Mapped(self.folder / FILLED)}
        if self.n_classes is not None:
            maps["masks"] = _Mapped(self.folder / MASKS)
        want = {"images": (len(self.ids), *self.image_shape), "filled": (len(self.ids), 2),
                "masks": (len(self.ids), self.n_classes, self.work[0], self.packed_w)}
        for name, m in maps.items():
            if m.array.shape != want[name]:
                raise ValueError(f"{self.folder / name}: shape {m.array.shape}, expected {want[name]}")
        self._maps = maps
        return maps

    def _check_meta(self) -> None:
        meta = json.loads(read_text(self.folder / META, "cache index"))
        if meta.get("key") != self.meta["key"] or meta.get("ids") != self.ids:
            raise ValueError(f"{self.folder / META}: the cache index does not match its folder name; remove "
                             f"{self.folder} (it is rebuilt)")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"], state["_pid"] = None, None
        return state

    def close(self) -> None:
        if self._maps is not None and self._pid == os.getpid():
            for m in self._maps.values():
                m.close()
        self._maps = None

    # -- rows -----------------------------------------------------------------------------------
    def image(self, row: int) -> np.ndarray | None:
        """A private copy of the row's image (transforms may write in place), or None if not filled."""
        a = self._arrays()
        if not a["filled"].array[row, 0]:
            return None
        return np.array(a["images"].array[row])

    def mask(self, row: int) -> np.ndarray | None:
        """The row's (C, H, W) uint8 {0, 1} mask, or None if not filled."""
        a = self._arrays()
        if not a["filled"].array[row, 1]:
            return None
        return unpack_mask(a["masks"].array[row], self.work[1])

    def mask_bits(self, row: int) -> np.ndarray | None:
        """A private copy of the row's bit-packed (C, H, ceil(W/8)) mask, or None if not filled."""
        a = self._arrays()
        if not a["filled"].array[row, 1]:
            return None
        return np.array(a["masks"].array[row])

    def put_image(self, row: int, img: np.ndarray) -> bool:
        """Store the row's image; False (nothing written) when it does not fit the cache's layout."""
        if img.shape != self.image_shape or img.dtype != self.image_dtype:
            return False
        a = self._arrays()
        a["images"].array[row] = img
        a["images"].flush_row(row)  # the data reaches the file before its flag does
        a["filled"].array[row, 0] = 1
        return True

    def put_mask(self, row: int, mask: np.ndarray) -> bool:
        """Store the row's mask bit-packed; False when it is not a (C, H, W) {0, 1} uint8 mask."""
        if (self.n_classes is None or mask.shape != (self.n_classes, *self.work) or mask.dtype != np.uint8
                or mask.max(initial=0) > 1):
            return False
        a = self._arrays()
        a["masks"].array[row] = np.packbits(mask, axis=-1)
        a["masks"].flush_row(row)
        a["filled"].array[row, 1] = 1
        return True


def unpack_mask(packed: np.ndarray, width: int) -> np.ndarray:
    """(C, H, ceil(W/8)) bits -> (C, H, W) uint8 {0, 1}.

    A large mask is written only inside each class's bounding box: the rest stays as ``np.zeros``
    leaves it, pages the kernel maps on first touch (a bone covers a few percent of a 2048² image,
    so this writes a fraction of the 121 MB a full unpack would; 7.6 vs 33 ms measured). A small one
    (<= 32 MiB, glibc's largest mmap threshold: the allocation reuses warm heap memory) is unpacked
    whole, which is faster there (1.8 vs 2.1 ms at 29 x 1024²).
    """
    c, h, _ = packed.shape
    if c * h * width <= _SMALL_MASK:
        return np.unpackbits(packed, axis=-1, count=width)
    out = np.zeros((c, h, width), np.uint8)
    rows = packed.any(axis=2)  # (C, H)
    for k in range(c):
        ys = np.flatnonzero(rows[k])
        if not ys.size:
            continue
        y0, y1 = ys[0], ys[-1] + 1
        band = packed[k, y0:y1]
        xs = np.flatnonzero(band.any(axis=0))
        b0, b1 = xs[0], xs[-1] + 1
        x0, x1 = b0 * 8, min(b1 * 8, width)
        out[k, y0:y1, x0:x1] = np.unpackbits(band[:, b0:b1], axis=-1, count=x1 - x0)
    return out


def _is_key(s: str) -> bool:
    return len(s) == 12 and all(c in "0123456789abcdef" for c in s)


def _existing_parent(p: Path) -> Path:
    while not p.exists():
        p = p.parent
    return p


def _umask() -> int:
    from competition.io import current_umask
    return current_umask()
