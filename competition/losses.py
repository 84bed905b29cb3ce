"""``build_loss(cfg, mode, num_classes, class_weights)``: a weighted sum of smp loss terms, with
per-class weights and deep supervision.

Conventions (the same as ``competition.models``):
  * ``num_classes`` is the number of LOGIT CHANNELS: C for multilabel, C + 1 for multiclass
    (channel 0 = background).
  * multilabel: logits (N, C, H, W), target float (N, C, H, W) in {0, 1}; sigmoid per channel.
  * multiclass: logits (N, C+1, H, W), target long (N, H, W) of class indices, 0 = background.
  * ``class_weights``: one weight per channel; for multiclass, C weights (foreground only, as the
    training loop computes them) are accepted and background gets 1.0 (the weights' mean scale).

Terms (``loss.terms[].name``): bce (multilabel: smp SoftBCEWithLogitsLoss; multiclass: torch
CrossEntropyLoss, since smp's SoftCrossEntropyLoss takes no class weights), dice, jaccard, tversky,
focal (smp, which weights per-class losses itself), lovasz (see ``_Lovasz``: written by hand because
smp's takes no class weights). Each term's ``kwargs`` go to that class unchanged.

Ignored pixels (``ignore_index``: the competition's ``ignore``; targets hold ``IGNORE_INDEX`` there,
see ``competition.data.dataset``) contribute nothing to any term: torch's and smp's own
``ignore_index``, except where they fall short - smp's SoftBCE divides by every pixel (``_SoftBCE``
averages over the kept ones) and smp's multilabel focal loss cannot mask per channel (``_Focal``).
A batch whose pixels are all ignored has loss 0 (:meth:`SegLoss.single`).
"""
from __future__ import annotations

import inspect

import numpy as np
import torch
import torch.nn.functional as F
from segmentation_models_pytorch import losses as smp_losses
from torch import nn

from competition.config import IGNORE_INDEX, ConfigError, LossConfig
from competition.registry import Registry

__all__ = ["LOSS_TERMS", "build_loss", "downsample_target", "inverse_frequency_weights", "SegLoss"]

LOSS_TERMS = Registry("loss term")


def _bce(mode, num_classes, w, ignore_index=None, **kw):
    if mode == "multiclass":
        if ignore_index is not None:
            kw["ignore_index"] = ignore_index
        return nn.CrossEntropyLoss(weight=w, **kw)  # weighted mean over pixels by their class's weight
    if "pos_weight" in kw and not isinstance(kw["pos_weight"], torch.Tensor):
        kw["pos_weight"] = torch.as_tensor(kw["pos_weight"], dtype=torch.float32).view(-1, 1, 1)
    if w is not None:
        # Scaled so the loss is the class-weighted mean of the per-class BCEs (as smp does for dice).
        kw.setdefault("weight", (w * len(w) / w.sum()).view(1, -1, 1, 1))
    if ignore_index is not None:
        return _SoftBCE(ignore=ignore_index, **kw)
    return smp_losses.SoftBCEWithLogitsLoss(**kw)


class _SoftBCE(smp_losses.SoftBCEWithLogitsLoss):
    """smp's soft BCE with ignored pixels left out of the mean too (smp zeroes their loss but still
    divides by every pixel, so the loss would shrink with the share of ignored pixels)."""

    def __init__(self, ignore: int, reduction: str = "mean", **kw):
        super().__init__(ignore_index=None, reduction="none", **kw)
        self.ignore, self.mean_or_sum = ignore, reduction

    def forward(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        keep = y_true != self.ignore
        loss = super().forward(y_pred, torch.where(keep, y_true, torch.zeros_like(y_true))) * keep
        if self.mean_or_sum == "mean":
            return loss.sum() / keep.sum().clamp_min(1)
        return loss.sum() if self.mean_or_sum == "sum" else loss


class _Focal(smp_losses.FocalLoss):
    """smp's focal loss; with ``ignore_index`` in multilabel mode each class is masked by its own
    channel (smp indexes one channel with the whole (N, C, H, W) mask and fails)."""

    def forward(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        if self.mode != "multilabel" or self.ignore_index is None:
            return super().forward(y_pred, y_true)
        losses = []
        for c in range(y_pred.size(1)):
            keep = y_true[:, c] != self.ignore_index
            losses.append(self.focal_loss_fn(y_pred[:, c][keep], y_true[:, c][keep]) if keep.any()
                          else y_pred.sum() * 0.0)
        losses = torch.stack(losses)
        if self.class_weights is None:
            return losses.mean()
        w = self.class_weights.to(losses.device)
        return (losses * w).sum() / w.sum()


def _smp_term(cls):
    def build(mode, num_classes, w, ignore_index=None, **kw):
        if w is not None:
            kw.setdefault("class_weights", w.tolist())
        if ignore_index is not None:
            kw["ignore_index"] = ignore_index
        return cls(mode=mode, **kw)
    build.cls = cls
    return build


class _Dice(smp_losses.DiceLoss):
    """smp's DiceLoss, with the sigmoid of multilabel logits taken here (``torch.sigmoid``) and smp
    given probabilities. smp's own from-logits path computes ``logsigmoid(x).exp()``, the same values,
    and torch's CPU ``log_sigmoid`` kernel made that 4x slower (15.0 vs 3.8 ms forward + backward on
    8 x 12 x 128², a quarter of the loss of a deep-supervised UNet 3+ step). Multiclass is unchanged."""

    def __init__(self, mode: str, **kw):
        self.sigmoid_here = mode != "multiclass"
        super().__init__(mode=mode, from_logits=not self.sigmoid_here, **kw)

    def forward(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.sigmoid(y_pred) if self.sigmoid_here else y_pred, y_true)


def _lovasz(mode, num_classes, w, ignore_index=None, **kw):
    return _Lovasz(mode, w, ignore_index=ignore_index, **kw)


class _Lovasz(nn.Module):
    """Lovasz per class, then the (weighted) mean over classes.

    Hand-written around smp because smp's LovaszLoss has no class weights, and in multilabel mode it
    pools every channel into one binary problem (large classes then dominate, which is what per-class
    Dice avoids). multilabel: smp's binary Lovasz hinge on each channel. multiclass: Lovasz-softmax per
    class (Berman et al. 2018), averaged over the classes present in the batch, as smp does.
    """

    def __init__(self, mode: str, class_weights: torch.Tensor | None = None, per_image: bool = False,
                 ignore_index: int | None = None):
        super().__init__()
        self.mode, self.ignore_index = mode, ignore_index
        self.binary = smp_losses.LovaszLoss("binary", per_image=per_image, ignore_index=ignore_index)
        self.per_image = per_image
        self.register_buffer("w", class_weights.float() if class_weights is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        C = logits.shape[1]
        w = self.w if self.w is not None else logits.new_ones(C)
        if self.mode == "multilabel":
            per_class = torch.stack([self.binary(logits[:, c], target[:, c]) for c in range(C)])
            return (per_class * w).sum() / w.sum()
        probs = logits.float().softmax(1)
        if self.per_image:
            return torch.stack([self._softmax(p[None], t[None], w) for p, t in zip(probs, target)]).mean()
        return self._softmax(probs, target, w)

    def _softmax(self, probs, target, w):
        probs = probs.movedim(1, -1).reshape(-1, probs.shape[1])
        target = target.reshape(-1)
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            probs, target = probs[keep], target[keep]
        losses, weights = [], []
        for c in range(probs.shape[1]):
            fg = (target == c).to(probs.dtype)
            if fg.sum() == 0:
                continue
            errors, perm = torch.sort((fg - probs[:, c]).abs(), descending=True)
            losses.append(torch.dot(errors, _lovasz_grad(fg[perm])))
            weights.append(w[c])
        if not losses:
            return probs.sum() * 0.0
        weights = torch.stack(weights)
        return (torch.stack(losses) * weights).sum() / weights.sum()


def _lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. sorted errors (Berman, Alg. 1)."""
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    jaccard[1:] = jaccard[1:] - jaccard[:-1].clone()
    return jaccard


_lovasz.cls = _Lovasz  # the class whose signature lists the valid kwargs in errors
LOSS_TERMS.register("bce", _bce, cls="SoftBCEWithLogitsLoss | torch CrossEntropyLoss (multiclass)")
_dice = _smp_term(_Dice)
_dice.cls = smp_losses.DiceLoss  # the class whose signature lists the valid kwargs in errors
LOSS_TERMS.register("dice", _dice, cls="smp DiceLoss")
LOSS_TERMS.register("jaccard", _smp_term(smp_losses.JaccardLoss), cls="smp JaccardLoss")
LOSS_TERMS.register("tversky", _smp_term(smp_losses.TverskyLoss), cls="smp TverskyLoss")
LOSS_TERMS.register("focal", _smp_term(_Focal), cls="smp FocalLoss")
LOSS_TERMS.register("lovasz", _lovasz, cls="_Lovasz (smp LovaszLoss per class)")
# We always pass logits in the competition's mode; ignored pixels come from the competition's `ignore`.
_RESERVED = {"mode", "from_logits", "ignore_index"}


class SegLoss(nn.Module):
    """sum_t weight_t * term_t(logits, target); a list of logits (deep supervision, finest first) gives
    sum_i ds_weight_i * that. Logits coarser than the target (deep supervision's auxiliary outputs) are
    scored against the target brought down to their size by nearest-neighbour sampling (nnU-Net's
    deep supervision): labels, class indices and ``IGNORE_INDEX`` stay exact. Logits of any other
    size are resized bilinearly to the target's."""

    def __init__(self, terms: list[tuple[str, float, nn.Module]], ds_weights: list[float] | None = None,
                 ignore_index: int | None = None):
        super().__init__()
        self.names = [n for n, _, _ in terms]
        self.weights = [float(w) for _, w, _ in terms]
        self.terms = nn.ModuleList(m for _, _, m in terms)
        self.ds_weights = ds_weights
        self.ignore_index = ignore_index

    def single(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        size, tsize = tuple(logits.shape[-2:]), tuple(target.shape[-2:])
        if size != tsize and size[0] <= tsize[0] and size[1] <= tsize[1]:
            target = downsample_target(target, size)
        elif size != tsize:
            logits = F.interpolate(logits, size=tsize, mode="bilinear", align_corners=False)
        if self.ignore_index is not None and not (target != self.ignore_index).any():
            return logits.sum() * 0.0  # nothing labelled: a mean over no pixel would be NaN
        return sum(w * term(logits, target) for w, term in zip(self.weights, self.terms))

    def forward(self, pred: torch.Tensor | list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        first = pred[0] if isinstance(pred, (list, tuple)) else pred
        # The loop moves the model, not the loss: class-weight buffers follow the logits here.
        if any(b.device != first.device for b in self.buffers()):
            self.to(first.device)
        if not isinstance(pred, (list, tuple)):
            return self.single(pred, target)
        ds = self.ds_weights if self.ds_weights is not None else [1.0] * len(pred)
        if len(ds) != len(pred):
            raise ConfigError(f"loss.deep_supervision_weights has {len(ds)} values but the model returns "
                              f"{len(pred)} outputs (finest first)")
        total = sum(ds)
        return sum((w / total) * self.single(p, target) for w, p in zip(ds, pred))


def downsample_target(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A multilabel (N, C, H, W) or multiclass (N, H, W) target at ``size``: the pixel nearest each
    output pixel's centre (``nearest-exact``; plain ``nearest`` takes each block's top-left pixel,
    shifting the target by half a block)."""
    t = target if target.dim() == 4 else target.unsqueeze(1)
    out = F.interpolate(t.float(), size=size, mode="nearest-exact").to(target.dtype)
    return out if target.dim() == 4 else out.squeeze(1)


def build_loss(cfg: LossConfig, mode: str, num_classes: int,
               class_weights: torch.Tensor | None = None, ignore_index: int | None = None) -> SegLoss:
    """``num_classes`` = logit channels (C, or C + 1 for multiclass); ``ignore_index``: the target value
    of ignored pixels (:func:`ignore_index_for`); see the module docstring."""
    if mode not in ("multilabel", "multiclass"):
        raise ConfigError(f"loss mode must be 'multilabel' or 'multiclass', got {mode!r}")
    if not cfg.terms:
        raise ConfigError(f"loss.terms is empty; add at least one of: {', '.join(LOSS_TERMS.names())}")
    w = _channel_weights(class_weights, mode, num_classes)
    ds = cfg.deep_supervision_weights
    if ds is not None and (any(x < 0 for x in ds) or sum(ds) <= 0):
        raise ConfigError(f"loss.deep_supervision_weights must be >= 0 with a positive sum, got {ds}")
    terms = []
    for i, t in enumerate(cfg.terms):
        try:
            build = LOSS_TERMS.get(t.name).obj
        except KeyError as e:
            raise ConfigError(f"loss.terms[{i}].name: {e.args[0]}") from None
        bad = sorted(_RESERVED & set(t.kwargs))
        if bad:
            raise ConfigError(f"loss.terms[{i}] ({t.name}).kwargs may not set {bad}: the mode comes from the "
                              f"competition's task, models always output logits and ignored pixels come "
                              f"from the competition's `ignore` key")
        kw = dict(t.kwargs, **({"ignore_index": ignore_index} if ignore_index is not None else {}))
        try:
            terms.append((t.name, t.weight, build(mode, num_classes, None if w is None else w.clone(), **kw)))
        except TypeError as e:
            target = getattr(build, "cls", None)
            valid = ([p for p in inspect.signature(target.__init__).parameters if p not in ("self", "mode")]
                     if target else [])
            raise ConfigError(f"loss.terms[{i}] ({t.name}).kwargs: {e}"
                              + (f"; valid: {valid}" if valid else "")) from None
    return SegLoss(terms, list(ds) if ds is not None else None, ignore_index)


def ignore_index_for(comp) -> int | None:
    """The loss's ``ignore_index`` for a competition: IGNORE_INDEX when it has an ``ignore`` key."""
    return IGNORE_INDEX if getattr(comp, "ignore", None) is not None else None


def _channel_weights(cw, mode: str, num_classes: int) -> torch.Tensor | None:
    if cw is None:
        return None
    cw = torch.as_tensor(cw, dtype=torch.float32).flatten()
    if mode == "multiclass" and len(cw) == num_classes - 1:
        cw = torch.cat([cw.new_ones(1), cw])  # background: neutral weight (foreground weights have mean 1)
    if len(cw) != num_classes:
        raise ConfigError(f"loss.class_weights has {len(cw)} values; expected {num_classes} (one per output channel"
                          f"{', or one per class without background' if mode == 'multiclass' else ''})")
    if (cw < 0).any() or cw.sum() <= 0:
        raise ConfigError(f"loss.class_weights must be >= 0 with a positive sum, got {cw.tolist()}")
    return cw


def inverse_frequency_weights(pixel_counts: np.ndarray, total_pixels: float) -> torch.Tensor:
    """1 - pixel frequency of each class (report 000), normalised to mean 1: (C,) float32.

    ``pixel_counts[c]`` = foreground pixels of class c over the training images; ``total_pixels`` =
    pixels per channel over the same images. Classes overlap (multilabel), so frequencies need not
    sum to 1.
    """
    counts = np.asarray(pixel_counts, dtype=np.float64)
    if counts.ndim != 1 or total_pixels <= 0 or (counts < 0).any() or (counts > total_pixels).any():
        raise ValueError(f"inverse_frequency_weights: need (C,) counts in [0, total_pixels] and total_pixels > 0; "
                         f"got shape {counts.shape}, total {total_pixels}")
    w = 1.0 - counts / float(total_pixels)
    if w.mean() <= 0:  # every class covers every pixel: no preference
        return torch.ones(len(w), dtype=torch.float32)
    return torch.as_tensor(w / w.mean(), dtype=torch.float32)
