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
        sums.npy     uint32 (N, 2): zlib.crc32 of [the image row, the packed mask row]
        meta.json    the key's inputs and the ids (rows follow the adapter's full id list)

Rows follow the adapter's *full* id list of the split, so every fold (a subset of ids) shares one
cache. A folder is built complete in a temp folder and renamed into place, so a process only ever
opens a finished folder; a new key (changed data or settings) builds a new folder and removes the
older ones of the same competition, split and size. Files are mapped lazily in each process (DataLoader
workers included); different processes fill different rows, and a row's flag is set only after its
data has been written and flushed (``msync``), so a reader never sees a flagged row without its data,
even after a crash. Two processes filling the same row write identical bytes.

Nothing read from the cache is trusted blindly. Each row's checksum is written (and flushed) with its
data, before its flag, and checked on the row's first read in each process (:meth:`SampleCache._sound`):
a row that fails it is flagged empty again, decoded from the data and stored anew, never trained on. A
folder whose files are not what its build wrote (truncated, a header that does not parse, wrong
shapes, an index that is not JSON or names other ids) is renamed aside to a hidden
``.<name>.damaged-<random>`` (a process that mapped it keeps its mappings), removed, and built anew,
with one message; where that cannot be done (a read-only disk) the dataset loads without a cache.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import secrets
import shutil
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from competition import paths
from competition.config import to_plain
from competition.errors import UserError
from competition.io import atomic_dir, atomic_write_text, data_fingerprint

FORMAT_VERSION = 2  # 2: per-row checksums (sums.npy); part of the key, so older folders are rebuilt
IMAGES, MASKS, FILLED, SUMS, META = "images.npy", "masks.npy", "filled.npy", "sums.npy", "meta.json"
# Competition-config keys that cannot change a decoded image or a rasterised mask (everything else,
# including keys added later, is part of the key: a stale cache must never be read).
_NOT_SHAPING = ("name", "metric", "submission", "tta", "folds", "fold_seed", "groups", "stratify")
_SMALL_MASK = 32 << 20  # bytes: see unpack_mask
_STALE_BUILD_S = 3600.0  # a temp build folder older than this was left by a killed process
_logged: set[str] = set()


class CacheDamaged(UserError):
    """A cache folder whose files are not what its build wrote; the message names the file and what
    was expected. Handled: the folder is rebuilt, or the dataset loads without a cache."""

    folder_ino: int | None = None  # the folder found damaged (SampleCache._discard leaves any other alone)


def _crc32(data) -> int:
    """A row's checksum. zlib.crc32 runs at ~3.7 GB/s here (zlib 1.2.13, one core): 1.1 ms for a
    2048x2048 uint8 image row, 4.1 ms for a 29x2048x256 packed mask row, against 1.9 and 4.0 ms just
    to copy them out of the mapping; paid once per row and process (the first read), so later epochs
    cost nothing extra."""
    return zlib.crc32(data)


def log_once(msg: str, log: Callable[[str], None] | None = None) -> None:
    """``msg`` once per process (a fold builds a training and a validation dataset)."""
    if msg in _logged:
        return
    _logged.add(msg)
    if log is None:
        log = tqdm.write
    log(msg)


def cache_root() -> Path:
    return paths.runs_root() / "_cache"


def _plain(cfg) -> dict:
    return to_plain(cfg)


def cache_key(adapter, split: str, work: tuple[int, int], resize: str = "stretch") -> tuple[str, dict]:
    """(12 hex digits, the inputs they hash) for ``adapter``'s ``split`` at working size ``work``,
    images brought there by ``resize`` (``data.resize``)."""
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
    """A .npy file mapped read-write (MAP_SHARED: what one process writes, every other sees), after
    checking that it holds exactly a C-ordered ``dtype`` array of ``shape`` (:class:`CacheDamaged` if
    not; an OSError such as a permission error is not damage and propagates)."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype, dir_fd: int):
        shape, dtype = tuple(shape), np.dtype(dtype)
        try:
            f = open(path.name, "r+b", opener=_at(dir_fd))
        except (FileNotFoundError, IsADirectoryError):
            raise CacheDamaged(f"{_shown(path)}: missing (expected a {dtype} {shape} .npy)") from None
        with f:
            offset = _data_offset(f, path, shape, dtype)
            size, want = os.fstat(f.fileno()).st_size, offset + _bytes(dtype, shape)
            if size != want:  # checked here: numpy would raise TypeError ("buffer is too small")
                cut = " (truncated)" if size < want else ""
                raise CacheDamaged(f"{_shown(path)}: {size} bytes{cut}, expected {want} for a {dtype} {shape} array")
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_WRITE)
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


def _data_offset(f, path: Path, shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Where the data of the open .npy ``f`` starts, once its header is found to describe ``shape``
    and ``dtype`` in C order."""
    try:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):  # the cache writes 1.0; 2.0 is numpy's form for huge headers
            raise ValueError(f"format version {version}")
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        got_shape, fortran, got_dtype = read(f)
    except Exception as e:  # noqa: BLE001 -- untrusted bytes: numpy raises ValueError, TypeError, SyntaxError...
        raise CacheDamaged(f"{_shown(path)}: the .npy header does not parse ({_one_line(e)})") from None
    if fortran or tuple(got_shape) != shape or got_dtype != dtype:
        order = "Fortran" if fortran else "C"
        raise CacheDamaged(f"{_shown(path)}: a {got_dtype} {tuple(got_shape)} {order}-ordered array, expected "
                           f"{dtype} {shape} in C order")
    return f.tell()


def _create_npy(path: Path, dtype, shape: tuple[int, ...]) -> None:
    """A zero-filled .npy of ``shape`` without writing its bytes, its blocks reserved.

    Reserved because rows are written through a mapping: a page of a sparse file that finds the disk
    full when it is flushed kills the process with SIGBUS, mid-epoch and without a message. With the
    blocks reserved a full disk fails here, as an OSError the dataset turns into "loading without a
    cache" (posix_fallocate: 3 ms for 2 GiB on ext4; file systems without it get zeros written).
    """
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    del arr
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


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
        self._verified: set[tuple[int, int]] = set()  # (row, 0 image / 1 mask) whose checksum passed here

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
        if os.path.lexists(folder):
            try:
                filled = cache._reuse()
            except (OSError, ValueError, CacheDamaged) as e:  # unreadable, or damaged and cannot be moved aside
                log_once(f"data.cache: not used ({e}); loading without a cache", log)
                return None
            if filled is not None:
                log_once(f"data.cache: reusing {rel} ({filled} of {len(ids)} {split} images filled)", log)
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
        return _shown(self.folder)

    def _layout(self) -> dict[str, tuple[str, np.dtype, tuple[int, ...]]]:
        """name -> (file, dtype, shape) of each array the folder holds."""
        n = len(self.ids)
        out = {"images": (IMAGES, self.image_dtype, (n, *self.image_shape)),
               "filled": (FILLED, np.dtype(np.uint8), (n, 2)),
               "sums": (SUMS, np.dtype(np.uint32), (n, 2))}
        if self.n_classes is not None:
            out["masks"] = (MASKS, np.dtype(np.uint8), (n, self.n_classes, self.work[0], self.packed_w))
        return out

    def nbytes(self) -> int:
        return sum(_bytes(dtype, shape) for _, dtype, shape in self._layout().values())

    def filled_count(self) -> int:
        try:
            return int(np.load(self.folder / FILLED, mmap_mode="r")[:, 0].sum())
        except (OSError, ValueError, TypeError):  # numpy's errors for a damaged file; 0 for a message
            return 0

    def _reuse(self) -> int | None:
        """The rows filled in the existing folder, or None when it was damaged (then moved aside and
        removed, with a message: the folder is built anew on first use)."""
        try:
            maps = self._open()
        except CacheDamaged as e:
            self._discard(e)
            return None
        try:
            return int(maps["filled"].array[:, 0].sum())
        finally:  # the parent of DataLoader workers keeps no mapping: each worker maps the files itself
            for m in maps.values():
                m.close()

    def _build(self) -> None:
        """Create the folder (complete, then renamed into place) and remove older keys' folders."""
        try:
            with atomic_dir(self.folder, replace=False) as tmp:
                for file, dtype, shape in self._layout().values():
                    _create_npy(tmp / file, dtype, shape)
                atomic_write_text(tmp / META, json.dumps(self.meta))  # last: a folder with meta.json is complete
        except FileExistsError:  # another process (a worker, a DDP rank, a teammate) was first: use theirs
            if not (self.folder / META).is_file():
                raise
        self._remove_stale()

    def _discard(self, damage: CacheDamaged) -> None:
        """Rename the damaged folder aside and remove it, with one message, so that it is built anew.

        Renamed first: a process that has the old files mapped keeps its mappings (the files go
        when it unmaps them), and none can open a half-removed folder. Only the folder found
        damaged is moved: another one there is another process's rebuild. A folder that cannot be
        renamed (read-only disk) raises :class:`CacheDamaged`: the caller loads without a cache.
        """
        aside = self.folder.with_name(f".{self.folder.name}.damaged-{secrets.token_hex(4)}")
        if damage.folder_ino is None or _inode(self.folder) != damage.folder_ino:
            return  # already moved aside by another process, which said so
        try:
            os.rename(self.folder, aside)
        except FileNotFoundError:
            return
        except OSError as e:
            raise CacheDamaged(f"{damage}; {self.display()} cannot be moved aside to rebuild it "
                               f"({e.strerror or e})") from None
        log_once(f"data.cache: {damage}; rebuilding {self.display()} (the damaged one is removed)", self.log)
        _remove(aside)

    def _remove_stale(self) -> None:
        prefix = self.folder.name[: -len(self.meta["key"])]  # "<comp>-<split>-<h>x<w>-"
        now = time.time()
        for p in self.folder.parent.iterdir():
            name = p.name
            if p == self.folder or p.is_symlink() or not p.is_dir():
                continue
            if name.startswith(prefix) and _is_key(name[len(prefix):]):
                shutil.rmtree(p, ignore_errors=True)  # an older key: changed data or settings
            elif name.startswith("." + prefix) and ".damaged-" in name:
                shutil.rmtree(p, ignore_errors=True)  # left by a process killed while removing it
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
        # A forked worker maps the files itself, and checks each row it reads once more: the rows
        # verified before belong to mappings it does not have.
        self._maps, self._pid, self._verified = None, os.getpid(), set()
        if not os.path.lexists(self.folder):
            self._build()
        try:
            maps = self._open()
        except CacheDamaged as e:
            self._discard(e)
            if not os.path.lexists(self.folder):
                self._build()
            maps = self._open()  # damaged again right after a build: the caller loads uncached
        self._maps = maps
        return maps

    def _open(self) -> dict[str, _Mapped]:
        """The folder's arrays, mapped once its index and every file's layout are as built
        (:class:`CacheDamaged` if not; a permission error is not damage and propagates).

        Every file is opened through one handle on the folder: another process that moves the folder
        aside and rebuilds it meanwhile cannot leave this one with files of both (its fills would
        go to the old images and the new flags).
        """
        try:
            dir_fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):  # moved aside meanwhile, or a file in its place
            damage = CacheDamaged(f"{self.display()}: missing, or not a folder")
            damage.folder_ino = _inode(self.folder)
            raise damage from None
        try:
            return self._map_files(dir_fd)
        except CacheDamaged as e:
            e.folder_ino = os.fstat(dir_fd).st_ino
            raise
        finally:
            os.close(dir_fd)

    def _map_files(self, dir_fd: int) -> dict[str, _Mapped]:
        self._check_meta(dir_fd)
        maps: dict[str, _Mapped] = {}
        try:
            for name, (file, dtype, shape) in self._layout().items():
                maps[name] = _Mapped(self.folder / file, shape, dtype, dir_fd)
        except BaseException:
            for m in maps.values():
                m.close()
            raise
        return maps

    def _check_meta(self, dir_fd: int) -> None:
        path = self.folder / META
        try:
            with open(META, "rb", opener=_at(dir_fd)) as f:
                meta = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            raise CacheDamaged(f"{_shown(path)}: missing (a folder is complete only with its index)") from None
        except PermissionError:
            raise
        except (OSError, ValueError) as e:  # a folder in its place, not UTF-8, not JSON
            raise CacheDamaged(f"{_shown(path)}: not a JSON cache index ({_one_line(e)})") from None
        if not isinstance(meta, dict) or meta.get("key") != self.meta["key"] or meta.get("ids") != self.ids:
            raise CacheDamaged(f"{_shown(path)}: the cache index does not match its folder (expected key "
                               f"{self.meta['key']} and the split's {len(self.ids)} ids)")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"], state["_pid"], state["_verified"] = None, None, set()
        return state

    def close(self) -> None:
        if self._maps is not None and self._pid == os.getpid():
            for m in self._maps.values():
                m.close()
        self._maps, self._verified = None, set()

    # -- rows -----------------------------------------------------------------------------------
    def image(self, row: int) -> np.ndarray | None:
        """A private copy of the row's image (transforms may write in place), or None if not filled."""
        a = self._arrays()
        if not a["filled"].array[row, 0]:
            return None
        img = np.array(a["images"].array[row])
        return img if self._sound(a, row, 0, img) else None

    def mask(self, row: int) -> np.ndarray | None:
        """The row's (C, H, W) uint8 {0, 1} mask, or None if not filled."""
        a = self._arrays()
        if not a["filled"].array[row, 1]:
            return None
        bits = a["masks"].array[row]
        return unpack_mask(bits, self.work[1]) if self._sound(a, row, 1, bits) else None

    def mask_bits(self, row: int) -> np.ndarray | None:
        """A private copy of the row's bit-packed (C, H, ceil(W/8)) mask, or None if not filled."""
        a = self._arrays()
        if not a["filled"].array[row, 1]:
            return None
        bits = np.array(a["masks"].array[row])
        return bits if self._sound(a, row, 1, bits) else None

    def _sound(self, a: dict[str, _Mapped], row: int, col: int, data: np.ndarray) -> bool:
        """Whether ``data``, the row's image (``col`` 0) or packed mask (1), matches the checksum
        stored with it; hashed once per row and process (see :func:`_crc32` for the cost).

        A mismatch flags the row empty again, so the caller decodes it from the data and stores it
        anew (a process that read the flag just before a refill may see a half-written row: it
        fails too, and the row is only filled once more).
        """
        if (row, col) in self._verified:
            return True
        if _crc32(data) == int(a["sums"].array[row, col]):
            self._verified.add((row, col))
            return True
        a["filled"].array[row, col] = 0
        what = "image" if col == 0 else "mask"
        log_once(f"data.cache: {self.display()}: row for image {self.ids[row]!r} failed its {what} checksum; "
                 f"re-reading it from the data", self.log)
        return False

    def _store(self, a: dict[str, _Mapped], name: str, row: int, col: int) -> None:
        """Checksum the row just written to ``name`` and flag it, the data and the checksum reaching
        the files before the flag does (a crash leaves an unflagged row, filled again)."""
        a["sums"].array[row, col] = _crc32(a[name].array[row])
        a[name].flush_row(row)
        a["sums"].flush_row(row)
        a["filled"].array[row, col] = 1
        self._verified.add((row, col))

    def put_image(self, row: int, img: np.ndarray) -> bool:
        """Store the row's image; False (nothing written) when it does not fit the cache's layout."""
        if img.shape != self.image_shape or img.dtype != self.image_dtype:
            return False
        a = self._arrays()
        a["images"].array[row] = img
        self._store(a, "images", row, 0)
        return True

    def put_mask(self, row: int, mask: np.ndarray) -> bool:
        """Store the row's mask bit-packed; False when it is not a (C, H, W) {0, 1} uint8 mask."""
        if (self.n_classes is None or mask.shape != (self.n_classes, *self.work) or mask.dtype != np.uint8
                or mask.max(initial=0) > 1):
            return False
        a = self._arrays()
        a["masks"].array[row] = np.packbits(mask, axis=-1)
        self._store(a, "masks", row, 1)
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


def _shown(p: Path) -> str:
    """``p`` relative to the project where it lies inside it (messages stay short)."""
    try:
        return str(Path(p).relative_to(paths.project()))
    except ValueError:
        return str(p)


def _at(dir_fd: int):
    """An ``opener`` for :func:`open`: the name relative to the folder ``dir_fd``."""
    return lambda name, flags: os.open(name, flags, dir_fd=dir_fd)


def _one_line(e: BaseException, limit: int = 160) -> str:
    """``e`` for a one-line message: numpy's header errors quote the whole (here damaged) header."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _inode(p: Path) -> int | None:
    try:
        return os.stat(p).st_ino  # followed, as os.open follows it: a damaged symlinked folder is replaced too
    except FileNotFoundError:
        return None


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _existing_parent(p: Path) -> Path:
    while not p.exists():
        p = p.parent
    return p

