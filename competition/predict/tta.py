"""Test-time augmentation: paired augment / de-augment functions and the batched TTA forward.

Every view is an exact symmetry of the pixel grid (a flip or a quarter turn), so
``deaugment(augment(x, v), v) == x`` bit for bit, and a model that commutes with the view gives the
same output under every view. The views of one scale that share a shape go through the model as
ONE batch (``V x N`` images): one forward instead of V, which is what keeps an accelerator busy.

Written here rather than taken from ttach: ttach runs one forward per view (the loop this replaces)
and its multi-scale transform cannot round sizes to the encoder's stride.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from competition.config import TTA_VIEWS as VIEWS
from competition.config import ConfigError

_TURNS = {"rot90": 1, "rot180": 2, "rot270": 3}  # counter-clockwise quarter turns (torch.rot90)


def variant_name(views: Sequence[str], scales: Sequence[float] = (1.0,)) -> str:
    """The OOF variant a TTA setting is stored as: "" for the plain prediction (identity at scale 1),
    else e.g. ``identity+hflip`` or ``identity+hflip@1+1.25`` (``runs/<exp>/fold<k>/oof-<variant>/``)."""
    views, scales = list(views), [float(s) for s in scales]
    if views == ["identity"] and scales == [1.0]:
        return ""
    name = "+".join(views)
    return name if scales == [1.0] else f"{name}@{'+'.join(f'{s:g}' for s in scales)}"


def check_views(views: Sequence[str], allowed: Sequence[str], where: str) -> list[str]:
    """The views, in the order given, each one of the competition's ``tta`` list (else an error naming it)."""
    if not views:
        raise ConfigError(f"{where}: name at least one TTA view")
    bad = [v for v in views if v not in allowed]
    if bad:
        raise ConfigError(f"{where}: TTA view(s) {bad} are not in the competition's `tta` list {list(allowed)}; "
                          f"allowed views are an exact symmetry of this competition's images")
    if len(set(views)) != len(views):
        raise ConfigError(f"{where}: TTA view listed twice in {list(views)}")
    return list(views)


def augment(x: torch.Tensor, view: str) -> torch.Tensor:
    """The view of a (..., H, W) tensor: ``hflip`` mirrors left-right, ``rot90`` turns a quarter
    counter-clockwise (as ``np.rot90``)."""
    if view == "identity":
        return x
    if view == "hflip":
        return x.flip(-1)
    if view == "vflip":
        return x.flip(-2)
    if view in _TURNS:
        return torch.rot90(x, _TURNS[view], dims=(-2, -1))
    raise ValueError(f"unknown TTA view {view!r}; valid: {', '.join(VIEWS)}")


def deaugment(y: torch.Tensor, view: str) -> torch.Tensor:
    """Undo :func:`augment` on a prediction, so it lines up with the original image again."""
    if view in _TURNS:
        return torch.rot90(y, -_TURNS[view], dims=(-2, -1))
    return augment(y, view)  # identity and flips are their own inverses


def scaled_size(h: int, w: int, scale: float, multiple: int = 32) -> tuple[int, int]:
    """(h, w) times ``scale``, rounded to a multiple of the encoder stride (at least one stride)."""
    return (max(multiple, int(round(h * scale / multiple)) * multiple),
            max(multiple, int(round(w * scale / multiple)) * multiple))


def shape_groups(views: Sequence[str], h: int, w: int) -> list[list[str]]:
    """Views grouped by the shape they produce: quarter turns of a non-square image swap H and W, so
    they cannot share a batch with the other views; on a square image all views form one group."""
    groups: dict[tuple[int, int], list[str]] = {}
    for v in views:
        key = (w, h) if v in ("rot90", "rot270") else (h, w)
        groups.setdefault(key, []).append(v)
    return list(groups.values())


def tta_predict(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                views: Sequence[str] = ("identity",), scales: Sequence[float] = (1.0,),
                multiple: int = 32) -> torch.Tensor:
    """Mean over ``views`` x ``scales`` of ``deaugment(fn(augment(x)))``, as float32.

    ``fn`` maps a (B, C, H, W) batch to (B, K, H*s, W*s) probabilities (s: the model's output scale).
    Each scale's same-shape views are concatenated into one batch and ``fn`` is called once for them;
    scaled outputs are resized back to the unscaled output size before averaging.
    """
    if not views or not scales:
        raise ValueError("TTA needs at least one view and one scale")
    for v in views:
        if v not in VIEWS:
            raise ValueError(f"unknown TTA view {v!r}; valid: {', '.join(VIEWS)}")
    n, _, h, w = x.shape
    total, out_size = None, None
    for s in scales:
        if s <= 0:
            raise ValueError(f"TTA scales must be positive, got {s}")
        xs = x if s == 1 else F.interpolate(x, size=scaled_size(h, w, s, multiple), mode="bilinear",
                                            align_corners=False)
        for group in shape_groups(views, xs.shape[-2], xs.shape[-1]):
            out = fn(torch.cat([augment(xs, v) for v in group]) if len(group) > 1 else augment(xs, group[0]))
            for k, v in enumerate(group):
                y = deaugment(out[k * n:(k + 1) * n], v).float()
                if out_size is None:  # the model's output scale, read off its first output
                    ratio = y.shape[-2] / xs.shape[-2]
                    out_size = (int(round(h * ratio)), int(round(w * ratio)))
                if tuple(y.shape[-2:]) != out_size:
                    y = F.interpolate(y, size=out_size, mode="bilinear", align_corners=False)
                total = y.clone() if total is None else total.add_(y)
    return total.div_(len(views) * len(scales))
