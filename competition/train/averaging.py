"""Weight averaging at the end of training: the mean of the k best epochs' weights (timm's
``avg_checkpoints``, ``train.average_top_k``) and stochastic weight averaging (``torch.optim.swa_utils``,
``train.swa``: a constant learning rate from ``start_epoch``, weights averaged every epoch, BatchNorm
statistics recomputed on the training data). Each average is validated like an epoch and replaces
``best.pt`` only if it scores better on the fold.
"""
from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, update_bn

from competition import checkpoint as ckpt
from competition.data.transfer import images


def mean_state(states: list[dict]) -> dict:
    """The element-wise mean of state dicts; integer buffers (BatchNorm's counters) from the first."""
    out = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            out[k] = sum(s[k].double() for s in states).div(len(states)).to(v.dtype)
        else:
            out[k] = v.clone()
    return out


class TopK:
    """The k best epochs' evaluation weights, on disk in ``runs/<exp>/fold<k>/top/`` (so a resumed run
    keeps them); the list of (score, epoch) travels in the training state."""

    def __init__(self, k: int, rp, kept: list | None = None):
        self.k, self.rp = k, rp
        self.kept = [tuple(x) for x in (kept or [])]  # [(score, epoch)], best first

    def offer(self, epoch: int, score: float, state_dict: dict, saver) -> None:
        if len(self.kept) >= self.k and score <= self.kept[-1][0]:
            return
        if saver is not None:
            saver.save({"model": state_dict, "epoch": epoch, "score": score}, self.rp.top(epoch))
        self.kept = sorted(self.kept + [(score, epoch)], key=lambda x: (-x[0], x[1]))
        for _, old in self.kept[self.k:]:
            if saver is not None:
                saver.delete(self.rp.top(old))
        self.kept = self.kept[:self.k]

    def average(self) -> dict | None:
        if len(self.kept) < 2:
            return None
        return mean_state([ckpt.load(self.rp.top(e))["model"] for _, e in self.kept])


class Swa:
    """torch's AveragedModel of the raw weights, updated once per epoch from ``start_epoch``."""

    def __init__(self, cfg, model: torch.nn.Module, device):
        self.cfg = cfg
        self.avg = AveragedModel(model, device=device)

    def active(self, epoch: int) -> bool:
        return epoch >= self.cfg.start_epoch

    def update(self, model: torch.nn.Module) -> None:
        self.avg.update_parameters(model)

    def state_dict(self) -> dict:
        return self.avg.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.avg.load_state_dict(state)

    def finalize(self, train_loader, device) -> torch.nn.Module | None:
        """The averaged model with BatchNorm statistics recomputed, or None before any update."""
        if int(self.avg.n_averaged) == 0:
            return None
        update_bn((images(b, device) for b in train_loader), self.avg, device=device)
        return self.avg.module
