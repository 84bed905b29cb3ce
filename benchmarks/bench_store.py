"""The probability store (``competition.store.tiles``) against zarr v3, the format the bio-imaging field uses
for large sparse arrays.

Case: one hand-bone-sized image (2048^2) of one plausible member from ``benchmarks/scale.py`` (a model's
probabilities at 512, upsampled x4: ~1 % of the 32^2 tiles are neither all 0 nor all 255), scaled down
to its first 4 of 29 classes so that zarr's side fits this benchmark's minute (x29/4 per image is
printed beside each time).

zarr side, as a careful user would set it up for this: one (N, C, 2048, 2048) uint8 array, fill value
0 with empty chunks not written, sharded one shard per image x class (one file each, not one per
chunk), zarr's default compressor (zstd); chunks of 32^2 (our tiles) or 128^2 (fewer, larger chunks:
faster in zarr, more bytes on disk).

1. write the image (as OOF is written while predicting);
2. read it back dense (what ``competition submit --from-probs`` and ``--csv`` need);
3. read it as its non-constant tiles (what every ensemble pass needs): ours reads the index and the
   stored tiles; zarr can only give the dense image, which is then cut into tiles.
Disk per image beside each, and our tile size against 64 and 128 (disk only). Same output asserted.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.harness import compare, load

N_IMAGES, C, SIZE, ALL_CLASSES = 1, 4, 2048, 29


def _case() -> list[np.ndarray]:
    import cv2

    from benchmarks.scale import MODEL, member_probs
    from competition.data import synthetic
    out = []
    for k in range(N_IMAGES):
        rng = np.random.default_rng(k)
        polys = synthetic._pose(synthetic._hand_29(rng), rng, MODEL, bool(k % 2))
        names = list(dict.fromkeys(n for n, _ in polys))
        m = np.zeros((ALL_CLASSES, MODEL, MODEL), np.uint8)
        for name, p in polys:
            cv2.fillPoly(m[names.index(name)], [np.round(p * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)
        out.append(np.ascontiguousarray(member_probs(m[:C] > 0, k, 1.0, 0.8, 0)))
    return out


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main() -> None:
    import zarr

    from competition.store import tiles
    probs = _case()
    root = Path(tempfile.mkdtemp(prefix="bench-store-"))
    ids = [f"img{k}" for k in range(N_IMAGES)]
    classes = [f"c{c}" for c in range(C)]
    counter = [0]

    def ours_write():
        counter[0] += 1
        d = root / f"ours{counter[0]}"
        w = tiles.StoreWriter(d, ids, classes, {i: (SIZE, SIZE) for i in ids}, {})
        for r, p in enumerate(probs):
            w.add(r, p)
        return w.close()

    def zarr_write(chunk: int):
        def fn():
            counter[0] += 1
            d = root / f"zarr{counter[0]}"
            arr = zarr.create_array(str(d), shape=(N_IMAGES, C, SIZE, SIZE), dtype="uint8",
                                    chunks=(1, 1, chunk, chunk), shards=(1, 1, SIZE, SIZE), fill_value=0,
                                    compressors="auto", config={"write_empty_chunks": False})
            for r, p in enumerate(probs):
                arr[r] = p
            return d
        return fn

    def same_store(ours_dir, peer_dir) -> str:
        st, arr = tiles.open_store(ours_dir), zarr.open_array(str(peer_dir), mode="r")
        for r in range(N_IMAGES):
            if not (np.array_equal(st.image(r), probs[r]) and np.array_equal(arr[r], probs[r])):
                raise AssertionError(f"image {r} differs after the round trip")
        return f"both read back the {N_IMAGES} images exactly"

    per_image = (ALL_CLASSES / C, "per 29-class image")
    print(f"case: {N_IMAGES} image x {C} of {ALL_CLASSES} classes x {SIZE}^2 uint8 "
          f"({N_IMAGES * C * SIZE * SIZE / 1e6:.0f} MB dense)  [{load()}]", flush=True)
    try:
        compare("store: write one image", ours_write,
                {"zarr v3 32^2 chunks": zarr_write(32), "zarr v3 128^2 chunks": zarr_write(128)},
                check=same_store, extrapolate=per_image)
        ours_dir = ours_write()
        z_zstd, z_raw = zarr_write(32)(), zarr_write(128)()
        st = tiles.open_store(ours_dir)
        az, ar = zarr.open_array(str(z_zstd), mode="r"), zarr.open_array(str(z_raw), mode="r")
        print(f"   disk: ours {_du(ours_dir) / 1e6:.3f} MB, zarr 32^2 {_du(z_zstd) / 1e6:.3f} MB, zarr 128^2 "
              f"{_du(z_raw) / 1e6:.3f} MB (dense {N_IMAGES * C * SIZE * SIZE / 1e6:.0f} MB); files: ours "
              f"{len(os.listdir(ours_dir))} per store, zarr {sum(1 for f in Path(z_zstd).rglob('*') if f.is_file())} "
              f"({C} shards + metadata)", flush=True)
        for t in (64, 128):
            b = sum(len(tiles.split(p, t)[1]) * t * t for p in probs) / N_IMAGES
            print(f"   our payload at tile {t}: {b / 1e6:.3f} MB (at {tiles.TILE}: "
                  f"{st.n_payload * tiles.TILE ** 2 / N_IMAGES / 1e6:.3f} MB)", flush=True)
        compare("store: read one image dense", lambda: st.image(0),
                {"zarr v3 32^2 chunks": lambda: az[0], "zarr v3 128^2 chunks": lambda: ar[0]}, extrapolate=per_image)

        def as_tiles(s):
            return s.index, s.payload

        def same_tiles(a, b):
            if not (np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])):
                raise AssertionError("different tiles")
            return "same index and tiles"
        compare("store: read one image's non-constant tiles (every ensemble pass)", lambda: as_tiles(st.sparse(0)),
                {"zarr v3 32^2 + split": lambda: tiles.split(az[0]),
                 "zarr v3 128^2 + split": lambda: tiles.split(ar[0])},
                check=same_tiles, extrapolate=per_image)
    finally:
        shutil.rmtree(root, ignore_errors=True)
