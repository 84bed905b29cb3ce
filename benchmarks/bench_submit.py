"""Batched TTA and submission writing, each against its usual peers, timed in the same run.

(i) TTA on the project's real default model: ``configs/experiments/baseline.yaml`` (UNet 3+ on a
ResNet-10-T encoder at depth 4, random init) at its input size and batch size (128 px, batch 8), with the default
competition's views (identity + hflip), in eval mode under ``torch.inference_mode`` on the CPU.
Ours, ``competition.predict.tta.tta_predict``: both views of the batch through ONE forward (batch
16). Peers: a loop of one forward per view, and ttach (installed with the ``bench`` extra)
``SegmentationTTAWrapper(model + sigmoid, ttach.aliases.hflip_transform(), merge_mode="mean")``,
which also runs one forward per view. All average probabilities and must agree to 1e-5 (a batch of
16 and two of 8 may take different convolution kernels, so the last bits can differ). The same at
batch 1, where one image leaves a device the most idle.

(ii) A hand-bone-sized submission: 29 classes of 2048² masks per image, from given float32
probability maps (two distinct images' maps, reused in turn, so the maps themselves cost nothing).
Ours: ``SubmissionWriter`` (per-class threshold into a reused buffer + our RLE, rows streamed in order)
with 1 RLE thread, like the peers, and with the default thread pool (one per core; the line says so).
Peers, the snippet path of most Kaggle kernels: a per-mask numpy threshold, an RLE function (the
Kaggle snippet, or pytorch-toolbelt's), rows appended to a list of dicts, one DataFrame written with
``to_csv``. All files must be byte-identical. The cost is linear in images, so a few images stand
for the 288-image test set and the mins are extrapolated.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

from benchmarks.bench_rle import kaggle_encode, make_mask
from benchmarks.harness import Side, allclose, compare, identical
from competition.config import CompetitionConfig
from competition.predict.submit import SubmissionWriter
from competition.predict.tta import augment, deaugment, tta_predict

N_IMAGES, FULL_IMAGES, N_CLASSES, SIZE = 6, 288, 29, 2048
THRESHOLD = 0.5
NO_GAIN = 1.05  # a ratio below this is no gain (repeat runs on a shared machine differ by a few %)


# --------------------------------------------------------------------------------------------- #
# (i) TTA
# --------------------------------------------------------------------------------------------- #
def bench_tta() -> None:
    import ttach
    from torch import nn

    from competition.config import load_competition, load_experiment
    from competition.models import build_model

    exp = load_experiment("baseline")
    comp = load_competition(exp.competition)
    views = list(comp.tta)
    n_out = len(comp.classes) + (comp.task == "multiclass")
    in_ch = 1 if comp.image.channels == "grayscale" else 3
    torch.manual_seed(0)
    model = build_model(exp.model, n_out, in_ch).eval()
    size, batch = exp.data.input_size, exp.data.batch_size
    if views != ["identity", "hflip"]:
        raise RuntimeError(f"the ttach peer below is hflip_transform(); the competition's views are {views}")
    wrapped = ttach.SegmentationTTAWrapper(nn.Sequential(model, nn.Sigmoid()), ttach.aliases.hflip_transform(),
                                           merge_mode="mean")

    def fn(b: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(model(b))

    def loop(x: torch.Tensor) -> torch.Tensor:
        return sum(deaugment(fn(augment(x, v)), v) for v in views) / len(views)

    desc = (f"{exp.model.arch} / {exp.model.encoder} ({exp.name}.yaml), {n_out} classes, {size} px, views "
            f"{'+'.join(views)}, CPU")
    check = allclose(1e-5, why="one batch of 2B vs two batches of B may use different conv kernels")
    for b in (batch, 1):
        x = torch.randn(b, in_ch, size, size, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            res = compare(f"TTA, batch {b}{' (the default experiment)' if b == batch else ''}: {desc}",
                          lambda: tta_predict(fn, x, views),
                          {"per-view loop": lambda: loop(x), "ttach": lambda: wrapped(x)},
                          ours_label="ours (one batched forward)", rounds=5 if b > 1 else 9, check=check)
        ratios = ", ".join(f"{k} {res.speedup(k):.2f}x" for k in res.labels[1:])
        if min(res.speedup(k) for k in res.labels[1:]) < NO_GAIN:
            print(f"   => at batch {b} on this CPU our batched TTA does NOT beat one forward per view ({ratios}; "
                  f"below {NO_GAIN}x counts as no gain on a shared machine): a CPU forward is compute-bound, its "
                  f"cost grows with the images in it, so one forward of 2B images costs what two of B do. "
                  f"Batching pays where one forward leaves the device idle: a GPU at batch 1 (launch- and "
                  f"latency-bound), not measured here.", flush=True)
        else:
            print(f"   => at batch {b} on this CPU our batched TTA beats one forward per view ({ratios}): the "
                  f"forward of {b} image(s) per view does not keep the cores busy.", flush=True)


# --------------------------------------------------------------------------------------------- #
# (ii) Submission writing
# --------------------------------------------------------------------------------------------- #
def probability_maps(seed: int) -> np.ndarray:
    """(29, 2048, 2048) float32: bone-sized blobs with soft, blurred edges (values k/255, never 0.5)."""
    out = np.empty((N_CLASSES, SIZE, SIZE), np.float32)
    for c in range(N_CLASSES):
        soft = cv2.GaussianBlur(make_mask(seed * 1000 + c) * 255, (0, 0), 6)
        np.multiply(soft, np.float32(1 / 255), out=out[c], casting="unsafe")
    return out


def snippet_submission(path: Path, ids: list[str], maps: list[np.ndarray], classes: list[str], encode) -> bytes:
    rows = []
    for i, image in enumerate(ids):
        probs = maps[i % len(maps)]
        for c, cls in enumerate(classes):
            mask = (probs[c] > THRESHOLD).astype(np.uint8)
            rows.append({"image_name": image, "class": cls, "rle": encode(mask)})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path.read_bytes()


def our_submission(path: Path, ids: list[str], maps: list[np.ndarray], cfg: CompetitionConfig,
                   workers: int) -> bytes:
    thresholds = np.full(N_CLASSES, THRESHOLD, np.float32)
    with SubmissionWriter(path, cfg, workers=workers) as writer:
        for i, image in enumerate(ids):
            writer.add(image, maps[i % len(maps)], thresholds)
    return path.read_bytes()


def bench_writing(n_images: int = N_IMAGES) -> None:
    from pytorch_toolbelt.utils.rle import rle_encode, rle_to_string

    classes = [f"bone{c:02d}" for c in range(N_CLASSES)]
    cfg = CompetitionConfig(name="bench", data_root=".", format="polygon_json", classes=classes)
    maps = [probability_maps(0), probability_maps(1)]
    ids = [f"image{i:05d}.png" for i in range(n_images)]
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        res = compare(
            f"submission writing, {N_CLASSES} classes x {SIZE}² per image, threshold + RLE + CSV",
            lambda: our_submission(d / "ours.csv", ids, maps, cfg, 1),
            {"kaggle snippet path": lambda: snippet_submission(d / "kaggle.csv", ids, maps, classes, kaggle_encode),
             "toolbelt RLE path": lambda: snippet_submission(d / "tb.csv", ids, maps, classes,
                                                             lambda m: rle_to_string(rle_encode(m.T))),
             f"ours, {cores} RLE threads": Side(lambda: our_submission(d / "ours2.csv", ids, maps, cfg, cores),
                                                workers=cores, note="the default pool: one thread per core")},
            ours_label="ours, 1 RLE thread", rounds=5, check=identical,
            scaled=f"{n_images} of the {FULL_IMAGES} test images; every side is linear in images (same work per "
                   f"image), so the mins x {FULL_IMAGES / n_images:.0f} estimate the full submission",
            extrapolate=(FULL_IMAGES / n_images, f"for {FULL_IMAGES} images"))
        mib = len(res.outputs[res.labels[0]]) / 2**20
        print(f"   the CSV: {mib:.2f} MiB for {n_images} images, byte-identical on every side; ours with 1 thread "
              f"{n_images / res.min(res.labels[0]):.1f} img/s, with {cores} threads "
              f"{n_images / res.min(res.labels[-1]):.1f} img/s", flush=True)


def main() -> None:
    bench_tta()
    bench_writing()


if __name__ == "__main__":
    main()
