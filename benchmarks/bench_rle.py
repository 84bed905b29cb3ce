"""RLE encode/decode of one 2048² class mask (a few bone-sized blobs), ours against two peers.

Peers (installed with the ``bench`` extra, not copied): pytorch-toolbelt's ``pytorch_toolbelt.utils.rle``
(``rle_encode`` + ``rle_to_string``, ``rle_decode``; column-major natively, row-major through the
transposed view, as its users call it), and the snippet nearly every Kaggle kernel copies (whose
``np.concatenate([[0], p, [0]])`` upcasts the 4 MiB mask to a 32 MiB int64 array). Encoders must give
identical strings. Decoders must give identical values; layouts differ and are named: ours is always
C-contiguous, the column-major peers return a Fortran-ordered transposed view, which is free to make
and expensive to use from C-ordered code, so a second decode comparison times what the RLE-CSV loader
does with the result (``stack[c] |= m != 0`` into a C-ordered (C, H, W) stack).
"""
from __future__ import annotations

import cv2
import numpy as np

from benchmarks.harness import compare, identical
from competition import rle

SIZE, ROUNDS, NUMBER = 2048, 7, 5


def make_mask(seed: int = 0) -> np.ndarray:
    """Three rotated ellipses and a polygon, ~30 to ~300 px semi-axes like hand bones at 2048²."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    for _ in range(3):
        center = tuple(int(v) for v in rng.uniform(300, 1750, 2))
        axes = (int(rng.uniform(30, 150)), int(rng.uniform(45, 300)))
        cv2.ellipse(mask, center, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    t = np.linspace(0, 2 * np.pi, 9, endpoint=False)
    radius = rng.uniform(60, 160, t.size)
    poly = np.c_[1000 + radius * np.cos(t), 1000 + radius * np.sin(t)].astype(np.int32)
    cv2.fillPoly(mask, [poly], 1)
    return mask


def kaggle_encode(mask: np.ndarray, order: str = "C") -> str:
    p = mask.flatten(order=order)
    p = np.concatenate([[0], p, [0]])
    runs = np.where(p[1:] != p[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


def kaggle_decode(mask_rle: str, shape: tuple[int, int]) -> np.ndarray:
    s = mask_rle.split()
    starts, lengths = [np.asarray(x, dtype=int) for x in (s[0:][::2], s[1:][::2])]
    starts -= 1
    ends = starts + lengths
    img = np.zeros(shape[0] * shape[1], dtype=np.uint8)
    for lo, hi in zip(starts, ends):
        img[lo:hi] = 1
    return img.reshape(shape)


def same_values(ours: np.ndarray, peer: np.ndarray) -> str:
    """Same shape, dtype and values; the layout is reported, not required."""
    assert ours.shape == peer.shape and ours.dtype == peer.dtype, (
        f"{ours.shape} {ours.dtype} vs {peer.shape} {peer.dtype}")
    assert np.array_equal(ours, peer), f"{np.count_nonzero(ours != peer)} pixels differ"

    def layout(a):
        return "C-contiguous" if a.flags.c_contiguous else "Fortran-ordered view" if a.flags.f_contiguous else "strided"
    return f"identical values (ours {layout(ours)}, peer {layout(peer)})"


def main() -> None:
    from pytorch_toolbelt.utils.rle import rle_decode as tb_decode
    from pytorch_toolbelt.utils.rle import rle_encode as tb_encode
    from pytorch_toolbelt.utils.rle import rle_to_string

    mask = make_mask()
    shape, (h, w) = mask.shape, mask.shape
    row, col = rle.encode(mask), rle.encode(mask, "column-major")
    print(f"mask {SIZE}x{SIZE} uint8, {mask.mean():.1%} foreground, {len(row.split()) // 2} row-major runs, "
          f"{len(col.split()) // 2} column-major runs", flush=True)

    compare("encode row-major", lambda: rle.encode(mask), {
        "toolbelt": lambda: rle_to_string(tb_encode(mask.T)),
        "kaggle": lambda: kaggle_encode(mask),
    }, rounds=ROUNDS, number=NUMBER, check=identical)
    compare("encode column-major", lambda: rle.encode(mask, "column-major"), {
        "toolbelt": lambda: rle_to_string(tb_encode(mask)),
        "kaggle": lambda: kaggle_encode(mask, "F"),
    }, rounds=ROUNDS, number=NUMBER, check=identical)
    compare("decode row-major (validates; peers do not)", lambda: rle.decode(row, shape), {
        "toolbelt": lambda: tb_decode(row, (w, h), np.uint8).T,
        "kaggle": lambda: kaggle_decode(row, shape),
    }, rounds=ROUNDS, number=NUMBER, check=same_values)
    compare("decode column-major (validates; peers do not)", lambda: rle.decode(col, shape, "column-major"), {
        "toolbelt": lambda: tb_decode(col, shape, np.uint8),
        "kaggle": lambda: kaggle_decode(col, (w, h)).T,
    }, rounds=ROUNDS, number=NUMBER, check=same_values)

    stack = np.zeros((2, h, w), np.uint8)

    def into_stack(m: np.ndarray) -> np.ndarray:
        stack[0] = 0
        stack[0] |= m != 0
        return stack[0].copy()

    compare("decode column-major + the loader's `stack[c] |= m != 0` (C-ordered stack)",
            lambda: into_stack(rle.decode(col, shape, "column-major")), {
                "toolbelt": lambda: into_stack(tb_decode(col, shape, np.uint8)),
                "kaggle": lambda: into_stack(kaggle_decode(col, (w, h)).T),
            }, rounds=5, number=1, check=identical)

    # A raw model prediction is speckled: thousands of runs, where per-run Python work dominates.
    speckled = mask ^ (np.random.default_rng(1).random(shape) < 0.002).astype(np.uint8)
    srow, scol = rle.encode(speckled), rle.encode(speckled, "column-major")
    print(f"speckled prediction: {len(srow.split()) // 2} row-major runs, {len(scol.split()) // 2} column-major",
          flush=True)
    compare("speckled encode row-major", lambda: rle.encode(speckled), {
        "toolbelt": lambda: rle_to_string(tb_encode(speckled.T)),
        "kaggle": lambda: kaggle_encode(speckled),
    }, rounds=5, check=identical)
    compare("speckled decode row-major", lambda: rle.decode(srow, shape), {
        "toolbelt": lambda: tb_decode(srow, (w, h), np.uint8).T,
        "kaggle": lambda: kaggle_decode(srow, shape),
    }, rounds=5, check=same_values)
    compare("speckled decode column-major", lambda: rle.decode(scol, shape, "column-major"), {
        "toolbelt": lambda: tb_decode(scol, shape, np.uint8),
        "kaggle": lambda: kaggle_decode(scol, (w, h)).T,
    }, rounds=5, check=same_values)


if __name__ == "__main__":
    main()
