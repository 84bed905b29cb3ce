"""RLE encode/decode of one 2048² class mask (a few bone-sized blobs) against the Kaggle snippets.

Peers, timed in the same run, interleaved round by round, best of the rounds: the snippets nearly every
Kaggle kernel copies, and a plain 4 MB ``mask.copy()`` as the memory-bandwidth yardstick. Absolute
times swing with machine load; the ratios are the result.
"""
from __future__ import annotations

import time

import cv2
import numpy as np

from competition import rle

SIZE, ROUNDS = 2048, 30


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


def best_times(cases: dict, rounds: int = ROUNDS) -> dict[str, float]:
    """Best wall time (ms) of each case; rounds interleave the cases so drift hits them alike."""
    times = {name: float("inf") for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name] = min(times[name], (time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    mask = make_mask()
    shape = mask.shape
    row, col = rle.encode(mask), rle.encode(mask, "column-major")
    assert row == kaggle_encode(mask), "rle.encode disagrees with the Kaggle snippet (row-major)"
    assert col == kaggle_encode(mask, "F"), "rle.encode disagrees with the Kaggle snippet (column-major)"
    assert np.array_equal(rle.decode(row, shape), kaggle_decode(row, shape)), "rle.decode disagrees"
    n_runs = len(row.split()) // 2
    # Encoders and decoders are timed in separate groups: a decoder's fresh 4 MB output makes the
    # allocator hand memory back to the OS, and the next case would pay its page faults.
    t = best_times({
        "ours": lambda: rle.encode(mask),
        "kaggle": lambda: kaggle_encode(mask),
        "ours_col": lambda: rle.encode(mask, "column-major"),
        "kaggle_col": lambda: kaggle_encode(mask, "F"),
        "memcpy": lambda: mask.copy(),
    })
    t.update(best_times({
        "decode": lambda: rle.decode(row, shape),
        "kaggle_decode": lambda: kaggle_decode(row, shape),
        "decode_col": lambda: rle.decode(col, shape, "column-major"),
    }))
    print(f"mask {SIZE}x{SIZE} uint8, {mask.mean():.1%} foreground, {n_runs} runs; best of {ROUNDS} rounds")
    print(f"rle.encode {SIZE}^2: ours {t['ours']:.3f} ms, kaggle snippet {t['kaggle']:.3f} ms -> "
          f"speed-up {t['kaggle'] / t['ours']:.1f}x (target >=10x); ours / 4 MB memcpy = "
          f"{t['ours'] / t['memcpy']:.1f}x")
    print(f"rle.encode {SIZE}^2 column-major: ours {t['ours_col']:.3f} ms, kaggle snippet (flatten order=F) "
          f"{t['kaggle_col']:.3f} ms -> speed-up {t['kaggle_col'] / t['ours_col']:.1f}x")
    print(f"rle.decode {SIZE}^2: ours {t['decode']:.3f} ms (validates), "
          f"kaggle snippet {t['kaggle_decode']:.3f} ms -> speed-up {t['kaggle_decode'] / t['decode']:.1f}x; "
          f"column-major {t['decode_col']:.3f} ms")

    # A raw model prediction is speckled: thousands of runs, where per-run Python work dominates.
    speckled = mask ^ (np.random.default_rng(1).random(shape) < 0.002).astype(np.uint8)
    text = rle.encode(speckled)
    assert text == kaggle_encode(speckled)
    s = best_times({"ours": lambda: rle.encode(speckled), "kaggle": lambda: kaggle_encode(speckled)}, ROUNDS // 3)
    s.update(best_times({"decode": lambda: rle.decode(text, shape),
                         "kaggle_decode": lambda: kaggle_decode(text, shape)}, ROUNDS // 3))
    print(f"speckled prediction ({len(text.split()) // 2} runs): encode ours {s['ours']:.3f} ms vs "
          f"{s['kaggle']:.3f} ms -> {s['kaggle'] / s['ours']:.1f}x; decode ours {s['decode']:.3f} ms vs "
          f"{s['kaggle_decode']:.3f} ms -> {s['kaggle_decode'] / s['decode']:.1f}x")


if __name__ == "__main__":
    main()
