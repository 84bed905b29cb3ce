"""Submission writing and batched TTA, each against the usual peer, timed in the same run.

(i) A hand-bone-sized submission: 288 test images x 29 classes of 2048² masks, from given float32
probability maps (two distinct images' maps, reused in turn, so the maps themselves cost nothing).
Ours: ``SubmissionWriter`` (per-class threshold + RLE in a thread pool, rows streamed in order).
Peer, the snippet path of most Kaggle kernels: a per-mask numpy threshold, the common RLE snippet,
rows appended to a list of dicts, then one DataFrame written with ``to_csv``. Both files must be
byte-identical before any time counts.

(ii) Four TTA views of a batch through one forward vs a loop of one forward per view, on a tiny CPU
model (a U-Net on timm's ``test_resnet`` at 64 px); both must give the same probabilities.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

from benchmarks.bench_rle import kaggle_encode, make_mask
from competition.config import CompetitionConfig
from competition.predict.submit import SubmissionWriter
from competition.predict.tta import augment, deaugment, tta_predict

N_IMAGES, N_CLASSES, SIZE = 288, 29, 2048
THRESHOLD = 0.5
VIEWS = ["identity", "hflip", "vflip", "rot180"]


def probability_maps(seed: int) -> np.ndarray:
    """(29, 2048, 2048) float32: bone-sized blobs with soft, blurred edges (values k/255, never 0.5)."""
    out = np.empty((N_CLASSES, SIZE, SIZE), np.float32)
    for c in range(N_CLASSES):
        soft = cv2.GaussianBlur(make_mask(seed * 1000 + c) * 255, (0, 0), 6)
        np.multiply(soft, np.float32(1 / 255), out=out[c], casting="unsafe")
    return out


def snippet_submission(path: Path, ids: list[str], maps: list[np.ndarray], classes: list[str]) -> None:
    rows = []
    for i, image in enumerate(ids):
        probs = maps[i % len(maps)]
        for c, cls in enumerate(classes):
            mask = (probs[c] > THRESHOLD).astype(np.uint8)
            rows.append({"image_name": image, "class": cls, "rle": kaggle_encode(mask)})
    pd.DataFrame(rows).to_csv(path, index=False)


def our_submission(path: Path, ids: list[str], maps: list[np.ndarray], cfg: CompetitionConfig) -> None:
    thresholds = np.full(N_CLASSES, THRESHOLD, np.float32)
    with SubmissionWriter(path, cfg, workers=os.cpu_count()) as writer:
        for i, image in enumerate(ids):
            writer.add(image, maps[i % len(maps)], thresholds)


def bench_writing(n_images: int = N_IMAGES) -> float:
    classes = [f"bone{c:02d}" for c in range(N_CLASSES)]
    cfg = CompetitionConfig(name="bench", data_root=".", format="polygon_json", classes=classes)
    maps = [probability_maps(0), probability_maps(1)]
    ids = [f"image{i:05d}.png" for i in range(n_images)]
    with tempfile.TemporaryDirectory() as tmp:
        ours_csv, peer_csv = Path(tmp) / "ours.csv", Path(tmp) / "peer.csv"
        t = time.perf_counter()
        our_submission(ours_csv, ids, maps, cfg)
        ours = time.perf_counter() - t
        t = time.perf_counter()
        snippet_submission(peer_csv, ids, maps, classes)
        peer = time.perf_counter() - t
        same = ours_csv.read_bytes() == peer_csv.read_bytes()
        mib = ours_csv.stat().st_size / 2**20
    assert same, "the two submissions differ"
    print(f"(i) submission of {n_images} images x {N_CLASSES} classes at {SIZE}^2 ({mib:.1f} MiB CSV, identical "
          f"bytes): ours {ours:.1f} s ({n_images / ours:.1f} img/s, {os.cpu_count()} RLE threads), snippet path "
          f"{peer:.1f} s ({n_images / peer:.2f} img/s) -> speed-up {peer / ours:.1f}x (target >=5x)")
    return peer / ours


def bench_tta(rounds: int = 20) -> float:
    from competition.models import build_model
    from competition.config import ModelConfig
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="Unet", encoder="tu-test_resnet", decoder_channels=[16] * 5), 12, 1).eval()
    x = torch.randn(2, 1, 64, 64)

    def fn(batch):
        return torch.sigmoid(model(batch))

    def per_view_loop(t):
        return sum(deaugment(fn(augment(t, v)), v) for v in VIEWS) / len(VIEWS)

    with torch.no_grad():
        torch.testing.assert_close(tta_predict(fn, x, VIEWS), per_view_loop(x), atol=1e-5, rtol=1e-4)
        best = {"batched": float("inf"), "loop": float("inf")}
        for _ in range(rounds):  # interleaved rounds, best of each: load drift hits both alike
            for name, run in (("batched", lambda: tta_predict(fn, x, VIEWS)), ("loop", lambda: per_view_loop(x))):
                t = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - t)
    ratio = best["loop"] / best["batched"]
    print(f"(ii) TTA, {len(VIEWS)} views of 2 images at 64 px, tiny U-Net on the CPU ({torch.get_num_threads()} "
          f"threads): one batched forward {best['batched'] * 1e3:.1f} ms vs a per-view loop "
          f"{best['loop'] * 1e3:.1f} ms -> speed-up {ratio:.2f}x (target >=1.5x); best of {rounds} rounds")
    return ratio


def main() -> None:
    bench_tta()
    bench_writing()


if __name__ == "__main__":
    main()
