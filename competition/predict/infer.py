"""The one inference path, shared by ``competition submit``, the OOF of every trained fold and the
native-resolution CV, so that CV measures exactly what the leaderboard scores:

    member probabilities   each member (one experiment's fold models x one TTA variant): TTA views and
                           scales (sliding windows for images larger than the model input), averaged
                           over its fold models, unpadded (``data.resize: letterbox``), resized
                           (bilinear) to the image's original (H, W) and quantised to uint8
                           -- exactly what an OOF store holds for a held-out image;
    blend                  members' uint8 probabilities weighted per class (float32);
    binarise               ``p >= threshold`` per class, or the argmax against the background.

OOF runs the first step on held-out images (one fold model per member); the ensemble's CV runs the
last two on the stored OOF; a submission runs all three on the test images.
"""
from __future__ import annotations

import contextlib
import json

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from competition.data.base import Adapter
from competition.data.dataset import Geometry, SegDataset, unletterbox
from competition.predict.members import LoadedModel
from competition.predict.sliding import sliding_window
from competition.predict.tta import tta_predict
from competition.store.probs import binarize, blend, probabilities, quantize_tensor, to_size

OVERLAP = 0.5  # sliding-window overlap (nnU-Net's default)


def input_key(exp) -> str:
    """Experiments with equal keys take the same network input (geometry and preprocessing)."""
    return json.dumps([list(vars(Geometry.from_config(exp)).values()),
                       [t.model_dump() for t in exp.augment.preprocess]], sort_keys=True)


def batch_size_for(experiments: list) -> int:
    """Images per batch: the smallest experiment batch, 1 for whole images at their native sizes
    (``data.policy: crop`` without ``crop_from``: sizes differ, so images cannot share a batch)."""
    if any(Geometry.from_config(e).policy == "crop" and not e.data.crop_from for e in experiments):
        return 1
    return max(1, min(e.data.batch_size for e in experiments))


class TestInputs(Dataset):
    """Image ``i`` of ``split`` -> {input name: network input} for every distinct member input, plus
    its original (H, W). ``inputs`` maps an input name to an experiment defining that input."""

    def __init__(self, adapter: Adapter, ids: list[str], inputs: dict, task: str, split: str = "test"):
        self.adapter, self.ids, self.split = adapter, list(ids), split
        self.sets = {name: SegDataset(adapter, ids, exp, task, "test", split=split) for name, exp in inputs.items()}

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        h, w = self.adapter.image_size(self.ids[i], self.split)
        return {"inputs": {name: ds[i]["image"] for name, ds in self.sets.items()},
                "index": i, "size": torch.tensor([h, w])}


class MemberPredictor:
    """One member: the fold models of one experiment seen through one TTA variant.

    ``__call__`` maps a network-input batch and the images' original (H, W) to one uint8 (C, H, W)
    tensor per image: the mean over the models of their TTA (and sliding-window) probabilities,
    unpadded (``data.resize: letterbox``), resized to the original size and quantised. For a held-out
    image (one fold model) this IS the OOF row.
    """

    def __init__(self, models: list[LoadedModel], task: str, views, scales, device: torch.device):
        self.models, self.task, self.device = models, task, device
        self.views, self.scales = list(views), list(scales)
        self.experiment = models[0].experiment
        self.geometry = Geometry.from_config(self.experiment)
        self.memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sizes) -> list[torch.Tensor]:
        """``sizes``: each image's original (H, W) ((B, 2) tensor or list of pairs)."""
        x = x.to(self.device, non_blocking=True)
        total = None
        for m in self.models:
            p = self._model_probs(m, x)
            total = p if total is None else total.add_(p)
        total = total.div_(len(self.models))
        sizes = [tuple(int(v) for v in hw) for hw in (sizes.tolist() if torch.is_tensor(sizes) else sizes)]
        canvas = tuple(total.shape[-2:])
        if self.geometry.resize == "letterbox":
            return [quantize_tensor(unletterbox(total[i:i + 1], self.geometry.content(hw, canvas), hw))[0]
                    for i, hw in enumerate(sizes)]
        if len(set(sizes)) == 1:  # one resize for the batch
            out = total if canvas == sizes[0] else F.interpolate(total, size=sizes[0], mode="bilinear",
                                                                align_corners=False)
            return list(quantize_tensor(out))
        return [quantize_tensor(to_size(total[i], hw)) for i, hw in enumerate(sizes)]

    def _model_probs(self, m: LoadedModel, x: torch.Tensor) -> torch.Tensor:
        amp = torch.autocast(self.device.type, dtype=m.amp) if m.amp is not None else contextlib.nullcontext()

        def forward(batch: torch.Tensor) -> torch.Tensor:
            with amp:
                logits = m.model(batch.contiguous(memory_format=self.memory_format))
            return probabilities(logits, self.task)

        def with_tta(batch: torch.Tensor) -> torch.Tensor:
            return tta_predict(forward, batch, self.views, self.scales)

        wh, ww = m.experiment.data.input_hw
        window = wh if wh == ww else (wh, ww)
        if x.shape[-2] > wh or x.shape[-1] > ww:
            return sliding_window(with_tta, x, window, OVERLAP, batch=max(1, m.experiment.data.batch_size))
        return with_tta(x)


class EnsemblePredictor:
    """Per-image probabilities at the original size from members and the recipe's weights."""

    def __init__(self, members: list[MemberPredictor], weights, task: str, thresholds: list[float],
                 device: torch.device):
        self.members, self.task, self.device = members, task, device
        self.weights = torch.as_tensor(weights, dtype=torch.float32, device=device)  # (M, C)
        names: dict[str, str] = {}  # input key -> input name
        self.inputs = {}  # input name -> an experiment defining that input
        for m in members:
            key = input_key(m.experiment)
            if key not in names:
                names[key] = f"in{len(names)}"
                self.inputs[names[key]] = m.experiment
        self.member_input = [names[input_key(m.experiment)] for m in members]
        c = self.weights.shape[1]
        self.thresholds = torch.as_tensor(thresholds if task == "multilabel" else [0.5] * c,
                                          dtype=torch.float32, device=device).view(c, 1, 1)

    @torch.no_grad()
    def member_probs(self, inputs: dict, sizes) -> list[list[torch.Tensor]]:
        """Per member, per image: uint8 (C, H, W) probabilities at the image's original size."""
        return [m(inputs[name], sizes) for m, name in zip(self.members, self.member_input)]

    @torch.no_grad()
    def probabilities(self, member_probs: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """Per image: the (C, H, W) float32 ensemble probabilities at its original size, on the device,
        from the members' uint8 probabilities (``member_probs``, or saved ones)."""
        n = len(member_probs[0]) if member_probs else 0
        return [blend([mp[i].to(self.device) for mp in member_probs], self.weights) for i in range(n)]

    def binarize(self, probs: torch.Tensor) -> torch.Tensor:
        return binarize(probs, self.task, self.thresholds)


def masks_for_writer(predictor: EnsemblePredictor, probs: torch.Tensor):
    """What the writer's workers receive for one image.

    On an accelerator the masks are binarised there and only uint8 crosses the bus. On the CPU the
    float probabilities go to the workers, which threshold one class at a time into a reused buffer:
    that avoids allocating a fresh full-size mask per image (page faults cost more than the compare)
    and spreads the compare across the worker threads. Both compare the same float32 values.
    """
    if probs.device.type != "cpu" or predictor.task != "multilabel":
        return predictor.binarize(probs).cpu().numpy(), None
    return probs.numpy(), predictor.thresholds.view(-1).cpu().numpy()
