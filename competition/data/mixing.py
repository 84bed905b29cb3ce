"""Batch-level mixing (``augment.batch``): MixUp, CutMix and copy-paste of rare-class instances.

albumentations transforms one sample at a time; these need two images of a batch, so they run in
``Engine.train_epoch`` on each training batch once it is on the device, before the forward pass.

Conventions (as ``competition.losses``): images ``x`` float (B, C_in, H, W); targets uint8
(B, C, h, w) for multilabel or int64 (B, h, w) class indices (0 = background) for multiclass, with
``IGNORE_INDEX`` (255) at ignored pixels (``competition.data.dataset``): mixed targets carry it
along (a pasted region brings its own labels, ignored pixels included), and only a pixel labelled 1
(multilabel) or with the class's index counts as a class pixel. The target may be at a larger
resolution than the image (``model.output_scale``); boxes and regions are scaled between the two.

A mixed batch carries a list of weighted targets ``[(weight, y), ...]``: the loss is
``sum_k weight_k * loss(out, y_k)`` (:func:`mixed_loss`). Without mixup it is ``[(1.0, y)]``, and
the loss is computed exactly as without mixing.

* ``mixup`` (Zhang et al. 2018): lam ~ Beta(alpha, alpha); x <- lam x + (1 - lam) x[perm]; the
  targets become ``[(lam, y), (1 - lam, y[perm])]``.
* ``cutmix`` (Yun et al. 2019): a box of area fraction about 1 - lam (lam ~ Beta(alpha, alpha); the
  box is clipped at the border) is pasted from x[perm] into x, and the same box of the mask from
  y[perm] into y: hard masks, a single target.
* ``copy_paste`` (after Ghiasi et al. 2021, simple version: no scale jitter, same position): every
  image receives, from a donor image of the batch that holds one of the chosen classes, that
  class's pixels - image pixels, and the class's mask (multilabel: that class's channel set to 1,
  the other channels untouched; multiclass: the index set). Donor regions come from the batch as it
  was before the op, so the result does not depend on the order images are processed in.
  ``classes``: names, or ``rare`` - the rule of ``competition.data.dataset.rare_class_weights``
  (classes present in at most the ``data.rare_class_quantile`` quantile of per-class image
  counts), counted once on the training fold's images when the engine's loader exposes its dataset,
  else on the batch itself (e.g. ``train --dry-run``'s single batch).

Each op applies with probability ``p`` per batch, in the listed order. After a mixup the regions of
a later ``copy_paste`` come from the first (lam-weighted) target; list ``copy_paste`` first.

Randomness: every op of every batch draws from its own ``torch.Generator`` seeded from
(train.seed, epoch, step, op index, DDP rank) - never the global RNG - so a resumed run mixes
exactly as the uninterrupted one, and each DDP rank mixes its own shard differently. Draws are made
on the CPU and then applied on the batch's device, so a batch mixes the same way on any device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from competition.config import BatchMix, CompetitionConfig, ConfigError, ExperimentConfig

__all__ = ["BatchMixer", "check", "copy_paste", "cutmix", "cutmix_box", "generator", "mixed_loss", "mixup",
           "rare_classes", "sample_lam"]

Targets = list  # [(weight: float, target: torch.Tensor), ...]


# -- randomness ----------------------------------------------------------------------------------
def generator(seed: int, epoch: int, step: int, op_index: int, rank: int = 0) -> torch.Generator:
    """A CPU generator for one op of one batch, a pure function of its arguments."""
    words = [int(v) & 0xFFFF_FFFF_FFFF_FFFF for v in (seed, epoch, step, op_index, rank)]
    lo, hi = np.random.SeedSequence(words).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(lo) | (int(hi) << 32))


def sample_lam(alpha: float, g: torch.Generator) -> float:
    """lam ~ Beta(alpha, alpha), as G1 / (G1 + G2) with G ~ Gamma(alpha, 1), from ``g``."""
    a = torch.full((2,), float(alpha), dtype=torch.float64)
    g1, g2 = torch._standard_gamma(a, generator=g).tolist()
    return g1 / (g1 + g2) if g1 + g2 > 0 else 0.5


def _perm(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=g)


def _as_list(y):
    return (list(y), True) if isinstance(y, (list, tuple)) else ([y], False)


# -- the ops: tensors in, tensors out ------------------------------------------------------------
def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0, g: torch.Generator | None = None, *,
          lam: float | None = None, perm: torch.Tensor | None = None):
    """-> (lam x + (1 - lam) x[perm], y, y[perm], lam). ``lam`` and ``perm`` are drawn from ``g``
    unless given (lam first, then perm)."""
    if lam is None:
        lam = sample_lam(alpha, g)
    if perm is None:
        perm = _perm(len(x), g)
    perm = perm.to(x.device)
    return lam * x + (1.0 - lam) * x[perm], y, y[perm.to(y.device)], float(lam)


def cutmix_box(h: int, w: int, lam: float, g: torch.Generator) -> tuple[int, int, int, int]:
    """Yun et al.'s box, (y0, y1, x0, x1): sides sqrt(1 - lam) of the image's, centre uniform,
    clipped at the border."""
    r = math.sqrt(max(0.0, 1.0 - lam))
    ch, cw = int(h * r), int(w * r)
    cy, cx = int(torch.randint(h, (1,), generator=g)), int(torch.randint(w, (1,), generator=g))
    return (max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w))


def _scale_box(box, src: tuple[int, int], dst: tuple[int, int]) -> tuple[int, int, int, int]:
    if tuple(src) == tuple(dst):
        return box
    y0, y1, x0, x1 = box
    sy, sx = dst[0] / src[0], dst[1] / src[1]
    return round(y0 * sy), round(y1 * sy), round(x0 * sx), round(x1 * sx)


def cutmix(x: torch.Tensor, y, alpha: float = 1.0, g: torch.Generator | None = None, *,
           lam: float | None = None, perm: torch.Tensor | None = None,
           box: tuple[int, int, int, int] | None = None):
    """-> (x, y) with the box (y0, y1, x0, x1 in image pixels) of x[perm] pasted into x and the same
    box (scaled to the mask's resolution) of y[perm] pasted into y. ``y``: a target or a list of
    targets (each gets the same box). Drawn from ``g`` unless given: lam, perm, then the box."""
    ys, is_list = _as_list(y)
    if box is None:
        if lam is None:
            lam = sample_lam(alpha, g)
        if perm is None:
            perm = _perm(len(x), g)
        box = cutmix_box(x.shape[-2], x.shape[-1], lam, g)
    elif perm is None:
        perm = _perm(len(x), g)
    y0, y1, x0, x1 = box
    out = x.clone()
    out[..., y0:y1, x0:x1] = x[..., y0:y1, x0:x1][perm.to(x.device)]
    mixed = []
    for t in ys:
        b0, b1, a0, a1 = _scale_box(box, x.shape[-2:], t.shape[-2:])
        m = t.clone()
        m[..., b0:b1, a0:a1] = t[..., b0:b1, a0:a1][perm.to(t.device)]
        mixed.append(m)
    return out, (mixed if is_list else mixed[0])


def _region(y0: torch.Tensor, task: str, classes: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) bool (multilabel: the chosen channels) or (B, h, w) bool (multiclass: any chosen index)."""
    if task == "multilabel":
        return y0[:, classes.to(y0.device)] == 1  # not IGNORE_INDEX
    return torch.isin(y0, (classes + 1).to(y0.device))


def copy_paste(x: torch.Tensor, y, task: str, classes, g: torch.Generator | None = None, *,
               donors: torch.Tensor | None = None):
    """-> (x, y) where image i receives, from image ``donors[i]``, the pixels of ``classes`` (indices
    into the competition's classes, no background): image pixels copied, and the class's mask set
    (multilabel: channel c = 1; multiclass: index c + 1). ``donors[i] == i`` leaves image i as it is.
    ``donors`` default: for each image, a random other image holding any of the classes (itself
    when there is none). ``y``: a target or a list of targets (regions come from the first)."""
    ys, is_list = _as_list(y)
    classes = torch.as_tensor(classes, dtype=torch.long).flatten()
    if len(classes) == 0:
        return x, y
    sel = _region(ys[0], task, classes)
    if donors is None:
        holds = sel.flatten(1).any(1).cpu()
        u = torch.rand(len(x), generator=g)  # always B draws, whatever the batch holds
        donors = torch.arange(len(x))
        for i in range(len(x)):
            cand = [j for j in range(len(x)) if j != i and holds[j]]
            if cand:
                donors[i] = cand[min(int(u[i] * len(cand)), len(cand) - 1)]
    donors = donors.to(x.device)
    sel = sel[donors.to(sel.device)]  # the donor's region, per recipient
    where = sel.any(1) if task == "multilabel" else sel  # (B, h, w)
    if where.shape[-2:] != x.shape[-2:]:
        where_x = F.interpolate(where[:, None].float(), size=x.shape[-2:], mode="nearest")[:, 0] > 0
    else:
        where_x = where
    out = torch.where(where_x[:, None].to(x.device), x[donors], x)
    mixed = []
    for t in ys:
        if task == "multilabel":
            m = t.clone()
            cl = classes.to(t.device)
            m[:, cl] = torch.where(sel.to(t.device), torch.ones_like(m[:, cl]), m[:, cl])
        else:
            m = torch.where(sel.to(t.device), ys[0][donors.to(t.device)], t)
        mixed.append(m)
    return out, (mixed if is_list else mixed[0])


def rare_classes(presence: np.ndarray, quantile: float) -> np.ndarray:
    """(C,) bool: ``rare_class_weights``' rule - present in at most the ``quantile`` quantile of the
    per-class image counts (classes never present are not rare: there is nothing to copy)."""
    counts = np.asarray(presence).sum(0)
    seen = counts > 0
    if not seen.any():
        return np.zeros(len(counts), bool)
    return seen & (counts <= np.quantile(counts[seen], quantile))


def mixed_loss(loss_fn, out, targets: Targets) -> torch.Tensor:
    """sum_k w_k loss_fn(out, y_k); a single target of weight 1 is ``loss_fn(out, y)`` unchanged."""
    if len(targets) == 1 and targets[0][0] == 1.0:
        return loss_fn(out, targets[0][1])
    return sum(w * loss_fn(out, t) for w, t in targets)


# -- configuration -------------------------------------------------------------------------------
def check(exp: ExperimentConfig, comp: CompetitionConfig) -> None:
    """Raise a ConfigError naming ``augment.batch[i].classes`` for class names the competition does not
    have (listing the valid ones), an empty list, or a class list on an op that takes none."""
    valid = list(comp.classes)
    for i, op in enumerate(exp.augment.batch):
        if op.classes == "rare":
            continue
        key = f"augment.batch[{i}].classes"
        if op.name != "copy_paste":
            raise ConfigError(f"{key}: {op.name} mixes whole images and takes no classes (only copy_paste "
                              f"does); remove the key")
        if not op.classes:
            raise ConfigError(f"{key} is empty; name classes to copy, or use \"rare\"; valid: {', '.join(valid)}")
        bad = [c for c in op.classes if c not in valid]
        if bad:
            raise ConfigError(f"{key}: unknown class{'es' if len(bad) > 1 else ''} {', '.join(map(repr, bad))}; "
                              f"valid: {', '.join(valid)} (or \"rare\" for the rare-class rule)")


def _training_presence(dataset) -> np.ndarray | None:
    """(N, C) presence of the training images, when the dataset says which they are."""
    adapter, ids = getattr(dataset, "adapter", None), getattr(dataset, "ids", None)
    if adapter is None or ids is None or getattr(dataset, "split", "train") != "train":
        return None
    return np.stack([np.asarray(adapter.presence(i), bool) for i in ids])


@dataclass
class BatchMixer:
    """The experiment's ``augment.batch`` ops, applied to one batch at a time (see the module docstring)."""

    ops: list[BatchMix]
    task: str
    classes: list[str]
    seed: int
    rank: int = 0
    rare: np.ndarray | None = None  # (C,) bool from the training fold; None: decided per batch
    rare_quantile: float = 0.25

    @classmethod
    def for_training(cls, exp: ExperimentConfig, comp: CompetitionConfig, dataset=None,
                     rank: int = 0) -> "BatchMixer":
        check(exp, comp)
        rare = None
        if any(op.name == "copy_paste" and op.classes == "rare" for op in exp.augment.batch):
            pres = _training_presence(dataset) if dataset is not None else None
            rare = rare_classes(pres, exp.data.rare_class_quantile) if pres is not None else None
        return cls(list(exp.augment.batch), comp.task, list(comp.classes), exp.train.seed, rank, rare,
                   exp.data.rare_class_quantile)

    def _class_indices(self, op: BatchMix, y: torch.Tensor) -> list[int]:
        if op.classes != "rare":
            return [self.classes.index(c) for c in op.classes]
        rare = self.rare
        if rare is None:  # no training set to count on: the batch's own presence
            C = len(self.classes)
            if self.task == "multilabel":
                pres = (y.flatten(2) == 1).any(-1)
            else:
                pres = torch.stack([(y == k + 1).flatten(1).any(1) for k in range(C)], 1)
            rare = rare_classes(pres.cpu().numpy(), self.rare_quantile)
        return np.flatnonzero(rare).tolist()

    def __call__(self, x: torch.Tensor, y: torch.Tensor, epoch: int, step: int) -> tuple[torch.Tensor, Targets]:
        targets: Targets = [(1.0, y)]
        for i, op in enumerate(self.ops):
            g = generator(self.seed, epoch, step, i, self.rank)
            if op.p <= 0 or float(torch.rand(1, generator=g)) >= op.p:
                continue
            if op.name == "mixup":
                lam = sample_lam(op.alpha, g)
                perm = _perm(len(x), g)
                x, *_ = mixup(x, y, lam=lam, perm=perm)
                targets = [pair for w, t in targets
                           for pair in ((w * lam, t), (w * (1.0 - lam), t[perm.to(t.device)]))]
            elif op.name == "cutmix":
                x, ys = cutmix(x, [t for _, t in targets], op.alpha, g)
                targets = [(w, t) for (w, _), t in zip(targets, ys)]
            else:
                x, ys = copy_paste(x, [t for _, t in targets], self.task, self._class_indices(op, targets[0][1]), g)
                targets = [(w, t) for (w, _), t in zip(targets, ys)]
        return x, targets
