"""The probability store: uint8 probabilities at each image's ORIGINAL size, kept by uncertain tiles.

One store is one folder (an OOF store ``runs/<exp>/fold<k>/oof[-<variant>]/``, a member's saved test
probabilities, a fold's pseudo-labels)::

    meta.json   format "tiles", version, tile size, classes, task, quantisation, each image's (H, W), ...
    ids.json    the N image ids, in row order
    index.npy   int32 (R, 5): row, class, tile row, tile column, payload (-1: the tile is all 255)
    tiles.bin   uint8 payloads, (K, T, T) C-ordered, no header (K from the file size)
    sums.npy    uint32 (N,): each image's CRC-32 over its index rows and its payload bytes (version 2)

Each image x class is cut into T x T tiles (the last row and column of tiles are completed by repeating
the image's edge, so a constant tile stays constant). A tile whose every pixel is 0 is not written at
all, one whose every pixel is 255 is one index row, and only the rest (boundaries, disagreements,
spurious blobs) keep their T x T bytes. A model's probability map at 2048^2 has a few percent of
such tiles, so a store costs a few percent of the dense array, and every pass over it (the ensemble,
the OOF score) can work on the stored tiles and count the constant ones.

Written by hand, not with zarr v3 (measured in ``benchmarks/bench_store.py``, one 2048^2 hand-bone image
of 29 classes, 2-core machine): zarr keeps one chunk per key and skips only chunks equal to its single
fill value, so all-255 tiles are written like any other, and it returns only dense arrays, so finding
an image's uncertain tiles means decoding the whole image. Sharded, zstd, 32^2 chunks: writing 27.7 s
vs 0.21 s here, reading the uncertain tiles 13.1 s vs 0.9 ms; with 128^2 chunks 2.1 s and 1.05 s (and
3.4x fewer bytes than this uncompressed store, which already meets the disk target). Here the index of
a whole store is one small array, the tiles of an image are one contiguous read, and a pass touches
only stored bytes.

Written image by image (never a fold's array in memory) into a hidden temp folder beside the target,
then renamed, so a reader never sees half a store. :func:`open_store` checks everything it reads
(shapes, dtypes, ranges, the payload file's length) and names the file that is wrong; each image's
bytes are checked against its CRC-32 the first time a process reads them (zlib's crc32 runs at about
1 GB/s here, and an image keeps about 1 MB of tiles, so the check costs ~1 ms an image, once), so a
flipped byte is never blended into a score. Version-1 stores, written before the sums, are read unchecked.
"""
from __future__ import annotations

import json
import re
import shutil
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from competition.errors import ConfigError, UserError
from competition.io import publish_dir, read_text, temp_dir_beside
from competition.paths import OOF_PROBS

FORMAT, VERSION = "tiles", 2
READABLE = (1, 2)  # version 1: the same layout without sums.npy
TILE = 32  # 1 KiB a stored tile: at 64 a boundary tile keeps 2x the bytes (bench_store)
META, IDS, INDEX, PAYLOAD, SUMS = "meta.json", "ids.json", "index.npy", "tiles.bin", "sums.npy"
LEGACY = OOF_PROBS  # the dense store of earlier versions
FULL = -1  # payload id of a tile whose every pixel is 255


class StoreError(UserError, ValueError):
    """A store that cannot be read as written; the message names the file and the remedy."""


def grid(size: tuple[int, int], tile: int = TILE) -> tuple[int, int]:
    """Tiles along (height, width) of an image of ``size``."""
    return -(-int(size[0]) // tile), -(-int(size[1]) // tile)


def split(probs: np.ndarray, tile: int = TILE) -> tuple[np.ndarray, np.ndarray]:
    """(C, H, W) uint8 -> (index (R, 4) int32: class, tile row, tile column, stored (1) or all 255 (0);
    payload (K, T, T) uint8 of the stored tiles, in index order). All-0 tiles are left out."""
    C, H, W = probs.shape
    ny, nx = grid((H, W), tile)
    if (ny * tile, nx * tile) != (H, W):
        probs = np.pad(probs, ((0, 0), (0, ny * tile - H), (0, nx * tile - W)), mode="edge")
    t = probs.reshape(C, ny, tile, nx, tile)
    hi = t.max(axis=(2, 4))
    lo = t.min(axis=(2, 4))
    c, y, x = np.nonzero(hi > 0)
    stored = lo[c, y, x] < 255
    index = np.stack([c, y, x, stored], axis=1).astype(np.int32)
    k = stored.nonzero()[0]
    payload = np.ascontiguousarray(t[c[k], y[k], :, x[k], :])  # advanced indices first: (K, T, T)
    return index, payload


def assemble(index: np.ndarray, payload: np.ndarray, classes: int, size: tuple[int, int],
             tile: int = TILE) -> np.ndarray:
    """The inverse of :func:`split`: (C, H, W) uint8 from one image's index rows and payloads."""
    H, W = size
    ny, nx = grid(size, tile)
    out = np.zeros((classes, ny, tile, nx, tile), np.uint8)
    full = index[:, 3] == 0
    out[index[full, 0], index[full, 1], :, index[full, 2], :] = 255
    s = ~full
    out[index[s, 0], index[s, 1], :, index[s, 2], :] = payload
    return out.reshape(classes, ny * tile, nx * tile)[:, :H, :W]


def checksum(image_id: str, size: tuple[int, int], tile: int, classes: list[str], task, rows: np.ndarray,
             payload: bytes | memoryview) -> int:
    """CRC-32 of one image: its id, size, the tile size, the classes and task (so an edited ids.json or
    meta.json cannot pass one image's tiles off as another's, or one class's as another's), its int32
    (R, 5) index rows as stored, then its payload bytes."""
    head = json.dumps([image_id, [int(size[0]), int(size[1])], int(tile), list(classes), task]).encode()
    return zlib.crc32(payload, zlib.crc32(np.ascontiguousarray(rows, np.int32).tobytes(), zlib.crc32(head)))


class StoreWriter:
    """Rows added one image at a time (``add``), published whole (``close``) under ``out_dir``.

    ``workers`` > 1: images are cut into tiles on that many threads while the caller predicts the next
    ones (numpy's reductions release the GIL, and threads share the image instead of copying 121 MB
    per 29 x 2048^2 image to a process); at most two images per thread wait, and they are written in
    the order they were added.
    """

    def __init__(self, out_dir: Path, ids: list[str], classes: list[str], sizes: dict, meta: dict,
                 tile: int = TILE, workers: int = 1):
        self.out_dir, self.ids, self.classes, self.meta, self.tile = Path(out_dir), list(ids), list(classes), meta, tile
        self.sizes = {i: tuple(int(v) for v in sizes[i]) for i in self.ids}
        self.tmp = temp_dir_beside(self.out_dir)
        self._payload = open(self.tmp / PAYLOAD, "wb")
        self._parts: dict[int, np.ndarray] = {}
        self._sums: dict[int, int] = {}
        self._count = 0  # payload tiles written so far
        self.nbytes = 0
        self.workers = max(1, int(workers))
        self._pool, self._pending = None, []

    def add(self, row: int, probs: np.ndarray) -> None:
        """Image ``row``'s (C, H, W) uint8 probabilities at its original size."""
        want = (len(self.classes), *self.sizes[self.ids[int(row)]])
        if tuple(probs.shape) != want or probs.dtype != np.uint8:
            raise ValueError(f"store {self.out_dir}: image {self.ids[row]!r} must be uint8 {want}, "
                             f"got {probs.dtype} {tuple(probs.shape)}")
        if self.workers == 1:
            self.add_split(row, *split(np.asarray(probs), self.tile))
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="store-split")
        self._pending.append((row, self._pool.submit(split, np.asarray(probs), self.tile)))
        while len(self._pending) > 2 * self.workers:
            self._drain_one()

    def _drain_one(self) -> None:
        row, fut = self._pending.pop(0)
        self.add_split(row, *fut.result())

    def add_split(self, row: int, index: np.ndarray, payload: np.ndarray) -> None:
        """Image ``row`` already cut by :func:`split` (in a worker process, say)."""
        row = int(row)
        ids = np.full(len(index), FULL, np.int64)
        k = index[:, 3] == 1
        ids[k] = self._count + np.arange(int(k.sum()))
        data = payload.tobytes()
        self._payload.write(data)
        self._count += len(payload)
        self.nbytes += payload.nbytes
        part = np.ascontiguousarray(np.column_stack([np.full(len(index), row), index[:, :3], ids]).astype(np.int32))
        self._parts[row] = part
        self._sums[row] = checksum(self.ids[row], self.sizes[self.ids[row]], self.tile, self.classes,
                                   self.meta.get("task"), part, data)

    def close(self) -> Path:

        while self._pending:
            self._drain_one()
        self._shutdown()
        self._payload.close()
        missing = [self.ids[r] for r in range(len(self.ids)) if r not in self._parts]
        if missing:
            raise RuntimeError(f"store {self.out_dir} incomplete: image(s) {missing[:10]} never written")
        index = np.concatenate([self._parts[r] for r in range(len(self.ids))]) if self.ids \
            else np.zeros((0, 5), np.int32)
        np.save(self.tmp / INDEX, index)
        np.save(self.tmp / SUMS, np.array([self._sums[r] for r in range(len(self.ids))], np.uint32))
        (self.tmp / IDS).write_text(json.dumps(self.ids))
        meta = {"format": FORMAT, "version": VERSION, "tile": self.tile, "classes": self.classes,
                "quantization": "uint8, p = value / 255", **self.meta,
                "original_sizes": {i: list(self.sizes[i]) for i in self.ids}}
        (self.tmp / META).write_text(json.dumps(meta, indent=1))
        return publish_dir(self.tmp, self.out_dir)

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending = []

    def abort(self) -> None:
        self._shutdown()
        if not self._payload.closed:
            self._payload.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass
class SparseImage:
    """One image of one store, as stored: ``index`` (R, 4) class, tile row, tile column, stored (1) or
    all 255 (0); ``payload`` (K, T, T) the stored tiles in index order; all other tiles are 0."""
    index: np.ndarray
    payload: np.ndarray
    size: tuple[int, int]
    tile: int


class Store:
    """A published store, opened and checked: ``image(i)`` (dense) or ``sparse(i)`` (as stored)."""

    def __init__(self, folder: Path, ids: list[str], meta: dict, index: np.ndarray, offsets: np.ndarray,
                 n_payload: int, sums: np.ndarray | None = None):
        self.folder, self.ids, self.meta, self.index, self.offsets = folder, ids, meta, index, offsets
        self.sums, self._checked = sums, set()  # rows whose CRC matched in this process
        self.classes = list(meta["classes"])
        self.tile = int(meta["tile"])
        self.sizes = [tuple(meta["original_sizes"][i]) for i in ids]
        self.n_payload = n_payload

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        """Bytes on disk of the payload and the index (what the store costs)."""
        return self.n_payload * self.tile * self.tile + self.index.nbytes

    def sparse(self, i: int) -> SparseImage:
        rows = self.index[self.offsets[i]:self.offsets[i + 1]]
        pid = rows[:, 4]
        k = pid != FULL
        stored = pid[k]
        tt = self.tile * self.tile
        if len(stored):
            lo, hi = int(stored.min()), int(stored.max()) + 1
            buf = np.empty((hi - lo) * tt, np.uint8)
            with open(self.folder / PAYLOAD, "rb") as f:  # a plain read: no page of the file stays mapped
                f.seek(lo * tt)
                got = f.readinto(memoryview(buf))
            if got != buf.nbytes:
                raise StoreError(f"{self.folder / PAYLOAD}: shorter than its index says (truncated?); "
                                 f"{_REMEDY}")
            payload = buf.reshape(hi - lo, self.tile, self.tile)
            if not np.array_equal(stored, np.arange(lo, hi)):
                payload = payload[stored - lo]
        else:
            payload = np.zeros((0, self.tile, self.tile), np.uint8)
        self._verify(i, rows, payload)
        index = np.column_stack([rows[:, 1:4], k]).astype(np.int32)
        return SparseImage(index, payload, self.sizes[i], self.tile)

    def _verify(self, i: int, rows: np.ndarray, payload: np.ndarray) -> None:
        if self.sums is None or i in self._checked:
            return
        got = checksum(self.ids[i], self.sizes[i], self.tile, self.classes, self.meta.get("task"), rows,
                       np.ascontiguousarray(payload).data)
        if got != int(self.sums[i]):
            raise StoreError(f"{self.folder}: image {self.ids[i]!r} fails its checksum in {SUMS} (its tiles, index "
                             f"rows, id, size, classes or task were changed or damaged after the store was written); "
                             f"{_REMEDY}")
        self._checked.add(i)

    def verify_all(self) -> None:
        """Check every image's checksum now (a StoreError names the first that fails)."""
        for i in range(len(self.ids)):
            if i not in self._checked:
                self.sparse(i)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_checked": set()}  # a worker process checks what it reads itself

    def image(self, i: int) -> np.ndarray:
        """(C, H, W) uint8 probabilities of row ``i`` at its original size."""
        s = self.sparse(i)
        return assemble(s.index, s.payload, len(self.classes), s.size, s.tile)


_REMEDY = "delete the folder and predict it again (an OOF store: `competition oof EXP`)"


def _json(path: Path):

    try:
        return json.loads(read_text(path, "store file"))
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}: not valid JSON ({e}); {_REMEDY}") from None


def exists(folder: Path) -> bool:
    """A published store of any version is there (its ``meta.json``)."""
    return (Path(folder) / META).is_file()


def open_store(folder: Path) -> Store:
    """Open and check a store; refuses a dense store of earlier versions with the way to re-predict it."""
    folder = Path(folder)
    if (folder / LEGACY).is_file() and not (folder / INDEX).is_file():
        raise StoreError(f"{folder}: a dense store ({LEGACY}) from an earlier version, which kept "
                         f"probabilities at the model's output size; this version keeps them at each image's "
                         f"original size: {_REMEDY}")
    for name in (META, IDS, INDEX, PAYLOAD):  # SUMS: only version 2 has it (checked below)
        if not (folder / name).is_file():
            raise StoreError(f"{folder / name}: missing; the store is incomplete: {_REMEDY}")
    meta, ids = _json(folder / META), _json(folder / IDS)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") not in READABLE:
        raise StoreError(f"{folder / META}: not a version-{VERSION} {FORMAT!r} store; {_REMEDY}")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or len(set(ids)) != len(ids):
        raise StoreError(f"{folder / IDS}: expected a list of distinct image ids; {_REMEDY}")
    sizes = meta.get("original_sizes")
    lost = [i for i in ids if not isinstance(sizes, dict) or i not in sizes]
    if lost:
        raise StoreError(f"{folder / META}: no original size for id(s) {lost[:5]} of {IDS}: the two files do not "
                         f"belong together; {_REMEDY}")
    try:
        tile, classes = int(meta["tile"]), list(meta["classes"])
        hw = np.array([sizes[i] for i in ids], np.int64).reshape(len(ids), 2)
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"{folder / META}: {type(e).__name__} {e} (tile, classes and every id's original_sizes "
                         f"are expected); {_REMEDY}") from None
    try:
        index = np.load(folder / INDEX, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise StoreError(f"{folder / INDEX}: unreadable ({e}); {_REMEDY}") from None
    if index.dtype != np.int32 or index.ndim != 2 or index.shape[1] != 5:
        raise StoreError(f"{folder / INDEX}: expected int32 (R, 5), got {index.dtype} {index.shape}; {_REMEDY}")
    payload_bytes = (folder / PAYLOAD).stat().st_size
    tt = tile * tile
    if tile < 1 or payload_bytes % tt:
        raise StoreError(f"{folder / PAYLOAD}: {payload_bytes} bytes is not a whole number of {tile}x{tile} "
                         f"tiles (truncated?); {_REMEDY}")
    K = payload_bytes // tt
    row, c, y, x, pid = index.T
    if len(index):
        ny, nx = -(-hw[:, 0] // tile), -(-hw[:, 1] // tile)
        r_ok = (row >= 0) & (row < len(ids))
        rr = np.where(r_ok, row, 0)
        bad = ~r_ok | (c < 0) | (c >= len(classes)) | (y < 0) | (y >= ny[rr]) | (x < 0) | (x >= nx[rr]) \
            | (pid < FULL) | (pid >= K)
        if bad.any() or (np.diff(row) < 0).any():
            r = int(np.flatnonzero(bad)[0]) if bad.any() else int(np.flatnonzero(np.diff(row) < 0)[0])
            raise StoreError(f"{folder / INDEX}: row {r} {index[r].tolist()} is out of range or out of order "
                             f"({len(ids)} images, {len(classes)} classes, {K} payload tiles); {_REMEDY}")
    offsets = np.searchsorted(row, np.arange(len(ids) + 1)).astype(np.int64)
    return Store(folder, ids, meta, index, offsets, K, _sums(folder, len(ids)) if meta["version"] >= 2 else None)


def _sums(folder: Path, n: int) -> np.ndarray:
    try:
        sums = np.load(folder / SUMS, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise StoreError(f"{folder / SUMS}: unreadable ({e}); {_REMEDY}") from None
    if sums.dtype != np.uint32 or sums.shape != (n,):
        raise StoreError(f"{folder / SUMS}: expected uint32 ({n},), got {sums.dtype} {sums.shape}; {_REMEDY}")
    return sums


def estimate_bytes(n_images: int, n_classes: int, size: tuple[int, int], stored_fraction: float,
                   tile: int = TILE) -> int:
    """Bytes of a store when ``stored_fraction`` of its tiles keep their pixels."""
    ny, nx = grid(size, tile)
    tiles = n_images * n_classes * ny * nx
    return int(tiles * stored_fraction * tile * tile + tiles * stored_fraction * 1.5 * 20)


def clean_stale(folder: Path, max_age_s: float = 0.0) -> list[Path]:
    """Remove the hidden temp folders of store writes that were killed (``.<name>.<random>.tmp[.old]``)
    in a folder whose lock the caller holds, or older than ``max_age_s`` (a younger one may belong to
    a writer that is still running); each is a whole copy of a store."""
    ours = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.old)?$")  # mkdtemp's names in StoreWriter
    out = []
    for p in Path(folder).glob(".*.tmp*"):
        if p.is_dir() and not p.is_symlink() and ours.match(p.name) and \
                (max_age_s <= 0 or p.stat().st_mtime < time.time() - max_age_s):
            shutil.rmtree(p, ignore_errors=True)
            out.append(p)
    return out


# A model's probability map keeps a few percent of its tiles (1.2 % for a 512 -> 2048 hand-bone model,
# benchmarks/scale.py); the estimate before writing assumes this much, so it errs on the safe side.
ESTIMATE_FRACTION = 0.10


def estimate_sizes(sizes: list[tuple[int, int]], n_classes: int, fraction: float = ESTIMATE_FRACTION,
                   tile: int = TILE) -> int:
    """Bytes of a store of images of ``sizes`` when ``fraction`` of the tiles keep their pixels."""
    return sum(estimate_bytes(1, n_classes, hw, fraction, tile) for hw in sizes)


def check_space(target: Path, need: int, what: str, remedy_cmd: str) -> None:
    """Refuse, before any work, when ``need`` bytes would not fit on the disk holding ``target``."""

    folder = Path(target).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if need > free:
        raise ConfigError(f"{what} needs about {need / 1e9:.2f} GB (estimated at {ESTIMATE_FRACTION:.0%} of the "
                          f"dense size) but {folder} has {free / 1e9:.2f} GB free; free some space (old runs/, "
                          f"runs/_truth, unused OOF variants) and run `{remedy_cmd}` again")
