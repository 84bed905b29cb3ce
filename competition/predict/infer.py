"""Ensemble inference for one batch of test images: every member x fold model with TTA (and sliding
windows for images larger than the model input), probabilities averaged with the recipe's weights,
resized to each image's original size and binarised, all on the device.

Members that see the same input (same geometry and preprocessing) share one decoded, preprocessed
batch; members whose outputs have the same size are summed before the single resize to the original
size (bilinear resizing is linear, so this equals resizing each and summing).
"""
from __future__ import annotations

import contextlib
import json

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from competition.data.base import Adapter
from competition.data.dataset import Geometry, SegDataset
from competition.oof import probabilities
from competition.predict.members import LoadedModel
from competition.predict.sliding import sliding_window
from competition.predict.tta import tta_predict

OVERLAP = 0.5  # sliding-window overlap (nnU-Net's default)


def input_key(model: LoadedModel) -> str:
    """Members with equal keys take the same network input."""
    exp = model.experiment
    return json.dumps([list(vars(Geometry.from_config(exp)).values()),
                       [t.model_dump() for t in exp.augment.preprocess]], sort_keys=True)


class TestInputs(Dataset):
    """Test image ``i`` -> {input name: network input} for every distinct member input, plus its
    original (H, W). ``inputs`` maps an input name to an experiment defining that input."""

    def __init__(self, adapter: Adapter, ids: list[str], inputs: dict, task: str):
        self.adapter, self.ids = adapter, list(ids)
        self.sets = {name: SegDataset(adapter, ids, exp, task, "test", split="test") for name, exp in inputs.items()}

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        h, w = self.adapter.image_size(self.ids[i], "test")
        return {"inputs": {name: ds[i]["image"] for name, ds in self.sets.items()},
                "index": i, "size": torch.tensor([h, w])}


class EnsemblePredictor:
    """Binary masks at the original size for a batch, from loaded models and the recipe's rules."""

    def __init__(self, models: list[LoadedModel], task: str, thresholds: list[float], views, scales,
                 device: torch.device):
        self.models, self.task, self.device = models, task, device
        self.views, self.scales = list(views), list(scales)
        names: dict[str, str] = {}  # input key -> input name
        self.inputs = {}  # input name -> an experiment defining that input
        for m in models:
            key = input_key(m)
            if key not in names:
                names[key] = f"in{len(names)}"
                self.inputs[names[key]] = m.experiment
        self.model_input = [names[input_key(m)] for m in models]
        c = len(models[0].weight)
        self.thresholds = torch.as_tensor(thresholds if task == "multilabel" else [0.5] * c,
                                          dtype=torch.float32, device=device).view(c, 1, 1)
        self.memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format

    @torch.no_grad()
    def probabilities(self, inputs: dict, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Per image: the (C, H, W) float32 ensemble probabilities at its original size, on the device."""
        sums: dict[tuple, torch.Tensor] = {}
        for m, name in zip(self.models, self.model_input):
            x = inputs[name].to(self.device, non_blocking=True)
            p = self._model_probs(m, x)
            key = (name, tuple(p.shape[-2:]))
            p.mul_(m.weight.view(1, -1, 1, 1))
            sums[key] = p if key not in sums else sums[key].add_(p)
        out = []
        for i, size in enumerate(sizes):
            total = None
            for s in sums.values():
                r = s[i:i + 1]
                if tuple(r.shape[-2:]) != tuple(size):
                    r = F.interpolate(r, size=tuple(size), mode="bilinear", align_corners=False)
                total = r[0].clone() if total is None else total.add_(r[0])
            out.append(total)
        return out

    def binarize(self, probs: torch.Tensor) -> torch.Tensor:
        return binarize(probs, self.task, self.thresholds)

    def _model_probs(self, m: LoadedModel, x: torch.Tensor) -> torch.Tensor:
        amp = torch.autocast(self.device.type, dtype=m.amp) if m.amp is not None else contextlib.nullcontext()

        def forward(batch: torch.Tensor) -> torch.Tensor:
            with amp:
                logits = m.model(batch.contiguous(memory_format=self.memory_format))
            return probabilities(logits, self.task)

        def with_tta(batch: torch.Tensor) -> torch.Tensor:
            return tta_predict(forward, batch, self.views, self.scales)

        window = m.experiment.data.input_size
        if x.shape[-2] > window or x.shape[-1] > window:
            return sliding_window(with_tta, x, window, OVERLAP, batch=max(1, m.experiment.data.batch_size))
        return with_tta(x)


def binarize(probs: torch.Tensor, task: str, thresholds: torch.Tensor) -> torch.Tensor:
    """(C, H, W) probabilities -> (C, H, W) uint8 {0, 1}: ``>=`` per-class thresholds (multilabel), or
    the argmax against the implicit background ``1 - sum`` (multiclass; thresholds unused)."""
    if task == "multilabel":
        return (probs >= thresholds.view(-1, 1, 1)).to(torch.uint8)
    background = (1 - probs.sum(0, keepdim=True)).clamp_min_(0)
    winner = torch.cat([background, probs]).argmax(0)
    k = torch.arange(1, len(probs) + 1, device=probs.device).view(-1, 1, 1)
    return (winner.unsqueeze(0) == k).to(torch.uint8)


def masks_for_writer(predictor: EnsemblePredictor, probs: torch.Tensor):
    """What the writer's workers receive for one image.

    On an accelerator the masks are binarised there and only uint8 crosses the bus. On the CPU the
    float probabilities go to the workers, which threshold one class at a time into a reused buffer:
    that avoids allocating a fresh full-size mask per image (page faults cost more than the compare)
    and spreads the compare across the worker threads.
    """
    if probs.device.type != "cpu" or predictor.task != "multilabel":
        return predictor.binarize(probs).cpu().numpy(), None
    return probs.numpy(), predictor.thresholds.view(-1).cpu().numpy()
