"""How long a bundle's run.py will take: measured on THIS machine, through the real inference path.

A few test images (training images where the data has no test images) go through exactly what
``run.py`` runs -- the bundle's recipe, its runtime, every member's TTA views and scales, resizing,
blending, thresholds, post-processing and RLE -- after one untimed warm-up image. Their images per
second times the test set's size is the estimate; loading the models is measured and added once.

It is an estimate for this machine: a Kaggle GPU (or a slower Kaggle CPU) will differ, and images of
other sizes than the ones measured take other times. Set ``submission.time_limit_h`` in the competition
config to be warned when the estimate comes near the limit.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from competition.config import CompetitionConfig, Recipe, load_recipe, read_yaml, validate
from competition.data.adapters import make_adapter
from competition.predict.infer import masks_for_writer
from competition.predict.options import Inference
from competition.predict.run import build_predictor, inputs_loader, pick_device
from competition.predict.submit import SubmissionWriter

IMAGES = 4  # timed images (after one warm-up image)
WARN_SHARE = 0.8  # warn from 80% of submission.time_limit_h on


@dataclass
class Estimate:
    images_per_s: float
    measured: int  # images timed
    split: str  # where they came from: test, or train when the data has no test images
    load_s: float  # building the predictor (reading and loading every model)
    total_images: int  # the test set's size the estimate is for (0: unknown)
    device: str  # "CPU, 2 threads", "cuda (NVIDIA H100)"
    runtime: str

    @property
    def seconds(self) -> float:
        return self.load_s + self.total_images / self.images_per_s


def duration(seconds: float) -> str:
    """``1 h 12 min``, ``7 min 30 s``, ``42 s``."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60} min"
    if s >= 60:
        return f"{s // 60} min {s % 60} s"
    return f"{s} s"


def describe_device(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return f"{dev.type.upper()}, {torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''}"


def measure(recipe: Recipe, comp: CompetitionConfig, root: Path, inference: Inference,
            total_images: int | None = None) -> Estimate:
    """Time the recipe (checkpoints relative to ``root``) on up to :data:`IMAGES` images after one warm-up.
    ``total_images``: the test set's size (default: the local test set's)."""
    inference.check()
    dev = pick_device(inference.device)
    adapter = make_adapter(comp)
    split, ids = ("test", adapter.test_ids) if adapter.test_ids else ("train", adapter.ids)
    t0 = time.perf_counter()
    predictor = build_predictor(recipe, comp, root, str(root / "recipe.yaml"), dev, inference, log=lambda *_: None)
    load_s = time.perf_counter() - t0
    warm, timed = ids[:1], ids[1:1 + IMAGES] or ids[:1]

    def run(some: list[str]) -> float:
        with tempfile.TemporaryDirectory(prefix="competition-estimate-") as t:
            start = time.perf_counter()
            with SubmissionWriter(Path(t) / "estimate.csv", comp, recipe.postprocess, inference.rle_workers) as w:
                for batch in inputs_loader(adapter, some, predictor, inference, split):
                    us = predictor.member_probs(batch["inputs"], batch["size"])
                    for i, p in zip(batch["index"].tolist(), predictor.probabilities(us)):
                        w.add(some[i], *masks_for_writer(predictor, p))
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            return time.perf_counter() - start

    run(warm)
    seconds = run(timed)
    total = total_images if total_images is not None else len(adapter.test_ids)
    return Estimate(len(timed) / max(seconds, 1e-9), len(timed), split, load_s, total, describe_device(dev),
                    inference.runtime)


def _n(k: int, what: str) -> str:
    return f"{k} {what}{'s' if k != 1 else ''}"


def forward_passes(recipe: Recipe) -> str:
    """Per member: views x scales x models (its folds, or one all-data model) = network passes per image
    (what there is to cut)."""
    return "; ".join(f"{m.experiment} ({'+'.join(m.tta)} @ {'+'.join(f'{s:g}' for s in m.tta_scales)}): "
                     f"{_n(len(m.tta), 'view')} x {_n(len(m.tta_scales), 'scale')} x "
                     f"{_n(len(m.checkpoints), 'model')} = {len(m.tta) * len(m.tta_scales) * len(m.checkpoints)}"
                     for m in recipe.members)


def report(est: Estimate, recipe: Recipe, time_limit_h: float | None) -> list[str]:
    """The lines ``competition bundle`` prints: the estimate, and a loud warning near the time limit."""
    where = f"on this machine ({est.device}, runtime {est.runtime})"
    rate = f"{est.images_per_s:.3g} img/s"
    measured = f"measured on {est.measured} {est.split} image{'s' if est.measured > 1 else ''} after one warm-up"
    if est.total_images == 0:
        return [f"run-time estimate: {rate} {where} ({measured}); the data has no test images: give "
                f"--test-images N for the time of N"]
    lines = [f"estimated {duration(est.seconds)} for {est.total_images} test images {where} at {rate} ({measured}, "
             f"+ {duration(est.load_s)} to load the models); an estimate for THIS machine: a Kaggle GPU will differ"]
    if time_limit_h is not None and est.seconds > WARN_SHARE * time_limit_h * 3600:
        over = "EXCEEDS" if est.seconds > time_limit_h * 3600 else f"is over {WARN_SHARE:.0%} of"
        lines.append(f"WARNING: the estimate ({duration(est.seconds)} at {rate}) {over} submission.time_limit_h "
                     f"({time_limit_h:g} h). Network passes per image: {forward_passes(recipe)}. Cut TTA views "
                     f"or scales, members or folds (make ensemble), or measure on the target hardware.")
    return lines


def estimate_bundle(folder: Path, inference: Inference, total_images: int | None = None) -> list[str]:
    """:func:`measure` a bundle as its run.py would run it (its recipe, checkpoints or onnx/, competition
    config) on this machine's data; the :func:`report` lines."""
    folder = Path(folder)
    comp = validate(CompetitionConfig, read_yaml(folder / "competition.yaml"), folder / "competition.yaml")
    recipe = load_recipe(folder / "recipe.yaml")
    est = measure(recipe, comp, folder, inference, total_images)
    return report(est, recipe, comp.submission.time_limit_h)
