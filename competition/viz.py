"""Pictures for people: image | truth | prediction panels with one colour per class."""
from __future__ import annotations

import colorsys

import cv2
import numpy as np


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 RGB colours, evenly spaced in hue."""
    return np.array([[int(255 * v) for v in colorsys.hsv_to_rgb(k / max(n, 1), 0.85, 1.0)] for k in range(n)],
                    np.uint8).reshape(-1, 3)


def paint(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a (C, h, w) {0,1} mask over an image resized to (h, w); overlapping classes mix."""
    h, w = mask.shape[1:]
    img = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    if img.dtype != np.uint8:
        img = (img / max(float(img.max()), 1.0) * 255).astype(np.uint8)
    rgb = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img.copy()
    m = mask.astype(np.float32)
    n = m.sum(0, keepdims=True)
    colour = np.einsum("chw,cd->hwd", m, palette(len(mask)).astype(np.float32)) / np.maximum(n, 1)[0][..., None]
    on = (n[0] > 0)[..., None]
    return np.where(on, (1 - alpha) * rgb + alpha * colour, rgb).astype(np.uint8)


def panels(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """image | truth | prediction, side by side, RGB uint8."""
    h, w = truth.shape[1:]
    plain = paint(image, np.zeros((0, h, w), np.uint8))
    return np.concatenate([plain, paint(image, truth), paint(image, pred)], axis=1)
