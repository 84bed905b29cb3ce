"""Sliding-window inference with Gaussian weighting (nnU-Net style), for images larger than the
model input (e.g. 2048² images seen through 1024² windows).

Windows overlap by ``overlap`` of their size; each window's prediction is weighted by a Gaussian
centred on the window (sigma = 1/8 of its size, as nnU-Net), because a fully convolutional model is
least reliable near the borders of what it saw. The weighted sum is divided by the summed weights,
so a prediction that does not depend on the window position comes out unchanged.

Written here because MONAI (whose ``sliding_window_inference`` does the same) is not a dependency,
and a few dozen lines do not justify it.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

SIGMA_SCALE = 0.125  # nnU-Net's default


def gaussian_importance(h: int, w: int, sigma_scale: float = SIGMA_SCALE, device=None) -> torch.Tensor:
    """(h, w) float32 weights, 1 at the centre, falling off as a Gaussian; never zero (nnU-Net clamps
    to the smallest positive value so border pixels of a lone window still count)."""
    def axis(n: int) -> torch.Tensor:
        d = torch.arange(n, dtype=torch.float64, device=device) - (n - 1) / 2
        return torch.exp(-d ** 2 / (2 * (n * sigma_scale) ** 2))
    g = torch.outer(axis(h), axis(w))
    g = g / g.max()
    tiny = g[g > 0].min()
    return g.clamp_min(tiny).float()


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Start offsets of windows covering [0, length): the first at 0, the last flush with the end,
    evenly spaced no further apart than ``window * (1 - overlap)``."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if length <= window:
        return [0]
    step = max(1.0, window * (1 - overlap))
    n = math.ceil((length - window) / step) + 1
    return [int(round(i * (length - window) / (n - 1))) for i in range(n)]


@torch.no_grad()
def sliding_window(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, window: int | tuple[int, int],
                   overlap: float = 0.5, batch: int = 4, sigma_scale: float = SIGMA_SCALE) -> torch.Tensor:
    """Gaussian-weighted average of ``fn`` over overlapping ``window`` crops of (N, C, H, W) ``x``.

    ``window``: an int (square) or (h, w). ``fn`` maps (B, C, h, w) windows to (B, K, h*s, w*s) (s: the
    model's output scale); ``batch`` windows (of all N images each) go through one call. An image
    smaller than the window is zero-padded (0 is the mean of a normalised input) and the padding
    cropped off the result.
    """
    win_h, win_w = (window, window) if isinstance(window, int) else (int(window[0]), int(window[1]))
    n, _, h, w = x.shape
    ph, pw = max(0, win_h - h), max(0, win_w - w)
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    hh, ww = x.shape[-2:]
    coords = [(y, x0) for y in window_starts(hh, win_h, overlap) for x0 in window_starts(ww, win_w, overlap)]
    acc = norm = g = None
    s = 1
    for i in range(0, len(coords), max(1, batch)):
        chunk = coords[i:i + max(1, batch)]
        out = fn(torch.cat([x[:, :, y:y + win_h, x0:x0 + win_w] for y, x0 in chunk]))
        if acc is None:
            s = out.shape[-1] // win_w
            if out.shape[-1] != win_w * s or out.shape[-2] != win_h * s:
                raise ValueError(f"the model maps a {win_h}x{win_w} window to {tuple(out.shape[-2:])}: not a whole "
                                 f"multiple of the window")
            acc = torch.zeros((n, out.shape[1], hh * s, ww * s), dtype=torch.float32, device=out.device)
            norm = torch.zeros((hh * s, ww * s), dtype=torch.float32, device=out.device)
            g = gaussian_importance(win_h * s, win_w * s, sigma_scale, out.device)
        for k, (y, x0) in enumerate(chunk):
            ys, xs = slice(y * s, (y + win_h) * s), slice(x0 * s, (x0 + win_w) * s)
            acc[:, :, ys, xs].add_(out[k * n:(k + 1) * n].float() * g)
            norm[ys, xs].add_(g)
    return acc.div_(norm)[:, :, :h * s, :w * s]
