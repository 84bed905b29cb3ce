"""The polygon mask cache: each label file's polygons rasterised once per size, bit-packed on disk.

A label file with thousands of small polygons costs ~80 ms per mask to parse and rasterise (2,400
polygons, 1024x768 -> 256²), and the dataset asks for that mask again every epoch, in every fold and
run. The adapter rasterises directly at the working size (no full-size raster is resized later), so
what is cached is the mask at the size asked for, one file per (image, size)::

    runs/_cache/_polygons/<comp>/<sha256(image id)[:16]>/<kind>-<h>x<w>-<key>.npy
        uint8 (C, h, ceil(w / 8)): np.packbits of the (C, h, w) {0, 1} mask along w, then 4 bytes:
        the CRC-32 of that data (a flipped bit is a miss, never a wrong mask)
        (kind ``mask``: the class masks; another kind, e.g. the void region, has its own files)

The key hashes everything that decides the mask: the label file's bytes (so a fixed label, however
its time stamp moved, is never served stale, and a cache hit needs no validation: those bytes
passed it when the file was written), the image's size, the target size, the class list and the
other mask-shaping keys of the competition config, the source of ``polygon_json.py`` (a changed
rasteriser invalidates every file) and the OpenCV version. Writing a new key removes the older keys
of the same image, kind and size.

What is cached is decided before any parsing, from two sizes: the label file's and the packed
mask's. Parsing and validating a label costs ~60 ns per byte of JSON (27 ms for the 455 KiB of
2,400 polygons) and rasterising adds more; reading a packed mask back costs ~0.65 ns per byte. So a
mask is cached when its label file has at least :data:`MIN_LABEL_BYTES` (below that, a file of a
few polygons rasterises in a few ms: the 10 KiB of the synthetic hand-bone's 29 bones, 3.5 ms at
1024², against 2.1 ms to read its 3.6 MiB mask back) and its packed mask is at most
:data:`MAX_PACKED_PER_LABEL_BYTE` times the label file (a larger one reads back slower than the
label parses, and would fill the disk: 15 MB per image for 29 classes at 2048²). The opt-in sample
cache (``data.cache``) covers the few-polygon case.

Files are written through :func:`competition.io.atomic_path` (a unique temp file, renamed), so
DataLoader workers and processes writing the same mask at once each rename a complete file with
identical bytes, and the last one wins. An unreadable, truncated, mis-shaped or checksum-failing
file is a miss and is rewritten; a cache that cannot be written (read-only or full disk) is skipped with one message.
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from competition import paths
from competition.data.cache import cache_root, log_once, unpack_mask
from competition.io import STALE_AFTER_S, atomic_path, clean_stale_temps, file_hash

FORMAT_VERSION = 2  # 2: each file ends with its data's CRC-32
FOLDER = "_polygons"  # a leading "_" is not a valid competition name: never a sample-cache folder
MIN_LABEL_BYTES = 32 << 10  # ~150 small polygons
MAX_PACKED_PER_LABEL_BYTE = 64  # below the ~90 at which reading back costs what parsing does
# Competition-config keys that cannot change a mask given its label file's bytes (those are hashed,
# so where the data lives and how it was generated do not matter). Everything else, including keys
# added later, is part of the key: a stale mask must never be read.
_NOT_SHAPING = ("name", "data_root", "synthetic", "image", "groups", "stratify", "metric", "submission", "tta",
                "folds", "fold_seed", "rle_csv", "mask_folders")
_unwritable: set[Path] = set()  # competition folders this process failed to write (logged once)

# The uncached path (parse and rasterise), called only on a miss.
Rasterise = Callable[[], np.ndarray]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class PolygonMaskCache:
    """The cache of one polygon competition; plain data, so it travels to DataLoader workers."""

    def __init__(self, cfg, rasteriser_source: Path):
        comp = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _NOT_SHAPING}
        self.name = paths.check_name("competition", cfg.name)
        self.num_classes = len(cfg.classes)
        self.base = {"version": FORMAT_VERSION, "competition": comp, "opencv": cv2.__version__,
                     "rasteriser": file_hash(rasteriser_source, 64)}

    def folder(self) -> Path:
        """``runs/_cache/_polygons/<comp>/`` of the current project (the cwd, as every artifact)."""
        return cache_root() / FOLDER / self.name

    def path(self, image_id: str, label: bytes, src: tuple[int, int], dst: tuple[int, int],
             kind: str = "mask") -> Path:
        inputs = {**self.base, "kind": kind, "label": _sha(label), "src": list(src), "dst": list(dst)}
        key = _sha(json.dumps(inputs, sort_keys=True).encode())[:16]
        return self.folder() / _sha(image_id.encode())[:16] / f"{kind}-{dst[0]}x{dst[1]}-{key}.npy"

    @staticmethod
    def worth_caching(label_bytes: int, channels: int, dst: tuple[int, int]) -> bool:
        """Whether a label file of ``label_bytes`` parses slower than its packed mask reads back."""
        packed = channels * dst[0] * -(-dst[1] // 8)
        return label_bytes >= MIN_LABEL_BYTES and packed <= MAX_PACKED_PER_LABEL_BYTE * label_bytes

    def load(self, image_id: str, label_path: Path, src: tuple[int, int], dst: tuple[int, int],
             rasterise: Rasterise, kind: str = "mask", channels: int | None = None) -> np.ndarray:
        """The (channels, h, w) uint8 mask at ``dst`` (``channels``: the number of classes unless
        given): read from the cache, or rasterised and, when worth it, cached."""
        channels = self.num_classes if channels is None else channels
        if not kind.isalnum():
            raise ValueError(f"mask cache kind must be letters and digits (it names files), got {kind!r}")
        try:
            if not self.worth_caching(label_path.stat().st_size, channels, dst):
                return rasterise()
            label = label_path.read_bytes()
        except OSError:  # missing or unreadable: the uncached path raises the error that names it
            return rasterise()
        path = self.path(image_id, label, src, dst, kind)
        mask = self.read(path, dst, channels)
        if mask is not None:
            return mask
        mask = rasterise()
        if _fits(mask, channels, dst) and _unchanged(label_path, label):
            self.write(path, mask)
        return mask

    def read(self, path: Path, dst: tuple[int, int], channels: int | None = None) -> np.ndarray | None:
        """The cached mask, or None when absent, not a complete file of the expected layout, or its
        bytes fail their CRC-32 (then with a one-line notice: the mask is rasterised and written again)."""
        channels = self.num_classes if channels is None else channels
        shape = (channels, dst[0], -(-dst[1] // 8))
        try:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                head = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                got, fortran, dtype = head(f)
                if got != shape or fortran or dtype != np.uint8:
                    return None
                data = f.read(int(np.prod(shape)))
                tail = f.read(5)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError):
            return self._damaged(path, "unreadable")
        if len(data) != int(np.prod(shape)) or len(tail) != 4:
            return self._damaged(path, "truncated")
        if zlib.crc32(data) != int.from_bytes(tail, "little"):
            return self._damaged(path, "fails its checksum")
        return unpack_mask(np.frombuffer(data, np.uint8).reshape(shape), dst[1])

    @staticmethod
    def _damaged(path: Path, why: str) -> None:
        log_once(f"polygon mask cache: {path} {why}; rasterising that mask again")
        return None

    def write(self, path: Path, mask: np.ndarray) -> None:
        """The packed mask as a .npy followed by the CRC-32 of its data (4 bytes, little-endian)."""
        root = self.folder()
        if root in _unwritable:
            return
        packed = np.ascontiguousarray(np.packbits(mask, axis=-1))
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.lib.format.write_array(f, packed, allow_pickle=False)
                f.write(zlib.crc32(packed.data).to_bytes(4, "little"))
            _remove_older(path)
        except OSError as e:
            _unwritable.add(root)
            log_once(f"polygon mask cache: not written to {root} ({type(e).__name__}: {e}); masks of this "
                     f"competition are rasterised on every use in this process")


def _fits(mask: np.ndarray, channels: int, dst: tuple[int, int]) -> bool:
    # Bit-packing keeps {0, 1} only; any other mask is returned uncached.
    return mask.dtype == np.uint8 and mask.shape == (channels, *dst) and int(mask.max(initial=0)) <= 1


def _unchanged(label_path: Path, label: bytes) -> bool:
    # The mask must be of the bytes its key hashes: a label edited mid-read is not cached.
    try:
        return label_path.read_bytes() == label
    except OSError:
        return False


def _remove_older(path: Path) -> None:
    """Other keys' files of this image and size, and temps a killed writer left over an hour ago."""
    prefix = path.name.rsplit("-", 1)[0] + "-"  # "<kind>-<h>x<w>-"
    for p in path.parent.iterdir():
        if p != path and p.name.startswith(prefix) and _is_key_file(p.name[len(prefix):]) and not p.is_symlink():
            try:
                os.unlink(p)
            except FileNotFoundError:  # another writer removed it first
                pass
    clean_stale_temps(path.parent, STALE_AFTER_S)


def _is_key_file(rest: str) -> bool:
    return len(rest) == 20 and rest.endswith(".npy") and all(c in "0123456789abcdef" for c in rest[:16])
