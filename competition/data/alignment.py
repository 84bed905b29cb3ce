"""Do the labels lie on their images? Mask boundaries scored against image edges.

A segmentation label is drawn along the edges of what it outlines, so the image's gradient is strong
on the mask's boundary. A label read in the wrong pixel order breaks that: on a square image an RLE
decoded row-major instead of column-major (or the other way round) is exactly the transposed mask,
which passes every format check (the runs fit the image) yet outlines nothing. The score here is
the mean gradient magnitude on the mask's boundary pixels, compared with the same boundary
transposed; a clear majority of sampled images preferring the transpose is the evidence
:func:`check_pixel_order` refuses with.

Written by hand because no library offers this test: scikit-image, OpenCV, albumentations and the
segmentation libraries decode and draw masks but never ask whether a mask fits its image. The
pieces are OpenCV calls (Gaussian blur, Sobel, erosion) on numpy arrays, at most 512 px per side
(larger images are downscaled first) and on a small deterministic sample, so the check costs well
under a second (8 DSB 2018 images up to 1024 px: about 0.1 s).

When it says nothing: a blank image (no edges to fit), an empty mask, a mask whose boundary is
(nearly) its own transpose (a disc or square centred on the diagonal), a textureless image (noise
only: both boundaries score alike, under the ``CLEAR`` ratio), non-square images (a transposed RLE
does not decode to a transposed mask there; the format checks and ``competition init``'s
boundary-length test cover them), and formats with no pixel-order setting.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from competition.data.base import DataError

MAX_SIDE = 512  # images are downscaled to at most this many pixels per side before scoring
SAMPLE = 8  # images scored per check
CANDIDATES = 32  # labelled images looked at (header only) to find the square ones to sample
CLEAR = 1.25  # an image prefers an order when its edge strength is at least this many times the other's
SYMMETRIC = 0.1  # boundaries whose transpose differs in fewer than this share of pixels prove nothing
MIN_VOTES = 3  # never refuse on fewer images than this
MAJORITY = 2 / 3  # share of the informative sampled images that must prefer the other order
_EPS = 1e-6
ORDER_KEYS = {"rle_csv": "rle_csv.pixel_order"}  # formats whose labels have a pixel-order setting


class LabelFitError(DataError):
    """The labels fit their images clearly better in another pixel order; the message gives the evidence."""


# --------------------------------------------------------------------------------------------- #
# The pure scoring
# --------------------------------------------------------------------------------------------- #
def _downscale(image: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    f = MAX_SIDE / max(h, w)
    if f >= 1:
        return image, masks
    size = (max(1, round(w * f)), max(1, round(h * f)))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return small, np.stack([cv2.resize(m, size, interpolation=cv2.INTER_NEAREST) for m in masks])


def edge_map(image: np.ndarray) -> np.ndarray | None:
    """(H, W) float32 gradient magnitude: Sobel on a lightly blurred image (the strongest channel of a
    colour image), scaled to the image's own range; None for a blank image (no contrast at all)."""
    img = np.asarray(image, np.float32)
    lo, hi = float(img.min()), float(img.max())
    if hi - lo <= _EPS:
        return None
    img = (img - lo) / (hi - lo)
    chans = [img] if img.ndim == 2 else [img[..., c] for c in range(img.shape[2])]
    mag = None
    for ch in chans:
        ch = cv2.GaussianBlur(ch, (0, 0), 0.5)
        g = cv2.magnitude(cv2.Sobel(ch, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(ch, cv2.CV_32F, 0, 1, ksize=3))
        mag = g if mag is None else np.maximum(mag, g)
    return mag


def boundary(masks: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels on the inner boundary of any of the (C, H, W) or (H, W) masks (a mask
    reaching the image's border has no boundary there)."""
    masks = np.asarray(masks)
    masks = masks[None] if masks.ndim == 2 else masks
    out = np.zeros(masks.shape[1:], bool)
    kernel = np.ones((3, 3), np.uint8)
    for m in masks:
        m = (m != 0).astype(np.uint8)
        if m.any():
            out |= (m - cv2.erode(m, kernel, borderType=cv2.BORDER_REPLICATE)) > 0
    return out


@dataclass(frozen=True)
class Fit:
    """How strongly one image's edges follow its mask's boundary, as given and transposed."""

    given: float  # mean gradient magnitude on the boundary pixels, the mask as read
    transposed: float  # the same for the transposed boundary
    reason: str | None = None  # why the image is no evidence (blank, empty mask, symmetric); None: it is

    @property
    def ratio(self) -> float:
        """How many times stronger the edges are under the transposed boundary (>1: the transpose fits better)."""
        return (self.transposed + _EPS) / (self.given + _EPS)


def transpose_fit(image: np.ndarray, masks: np.ndarray) -> Fit:
    """Edge strength on the boundary of ``masks`` ((C, H, W) or (H, W), nonzero = inside) against its
    transpose, on the square ``image`` ((H, W) or (H, W, channels), any dtype)."""
    image, masks = np.asarray(image, np.float32), np.asarray(masks)
    masks = masks[None] if masks.ndim == 2 else masks
    h, w = image.shape[:2]
    if h != w or masks.shape[1:] != (h, w):
        raise ValueError(f"transpose_fit needs a square image and masks of its size, got image {image.shape} "
                         f"and masks {masks.shape}")
    image, masks = _downscale(image, (masks != 0).astype(np.uint8))
    b = boundary(masks)
    n = int(b.sum())
    if n == 0:
        return Fit(0.0, 0.0, "empty mask")
    edges = edge_map(image)
    if edges is None:
        return Fit(0.0, 0.0, "blank image")
    given, transposed = float(edges[b].mean()), float(edges[b.T].mean())
    if np.count_nonzero(b != b.T) < SYMMETRIC * n:
        return Fit(given, transposed, "mask symmetric about the diagonal")
    if max(given, transposed) <= 0.1 * float(edges.mean()) + _EPS:  # boundaries on no edge either way
        return Fit(given, transposed, "no edges on either boundary")
    return Fit(given, transposed)


# --------------------------------------------------------------------------------------------- #
# The verdict over a sample
# --------------------------------------------------------------------------------------------- #
@dataclass
class OrderEvidence:
    """Per sampled image, how the configured order fits compared with the other one."""

    configured: str
    other: str
    fits: dict[str, Fit] = field(default_factory=dict)  # image id -> its fit

    @property
    def informative(self) -> dict[str, Fit]:
        return {i: f for i, f in self.fits.items() if f.reason is None}

    def prefer(self, clear: float = CLEAR) -> tuple[list[str], list[str]]:
        """(ids whose edges clearly prefer the other order, ids that clearly prefer the configured one)."""
        inf = self.informative
        return ([i for i, f in inf.items() if f.ratio >= clear], [i for i, f in inf.items() if f.ratio <= 1 / clear])

    @property
    def other_fits_better(self) -> bool:
        """True only on a clear majority: most informative sampled images clearly prefer the other order."""
        other, _ = self.prefer()
        return len(other) >= MIN_VOTES and len(other) >= MAJORITY * len(self.informative)

    @property
    def configured_fits_better(self) -> bool:
        _, mine = self.prefer()
        return len(mine) >= MIN_VOTES and len(mine) >= MAJORITY * len(self.informative)

    def ratio(self, ids: list[str]) -> float:
        """The median edge-strength ratio (other / configured) over ``ids``."""
        return float(np.median([self.fits[i].ratio for i in ids])) if ids else 1.0

    def describe(self) -> str:
        """One line: how many images were scored and what they say."""
        other, mine = self.prefer()
        inf = self.informative
        skipped = {f.reason for f in self.fits.values() if f.reason}
        skip = f"; {len(self.fits) - len(inf)} gave no evidence ({', '.join(sorted(skipped))})" if skipped else ""
        return (f"{len(inf)} of {len(self.fits)} sampled square images scored: {len(mine)} fit {self.configured} "
                f"clearly better, {len(other)} fit {self.other} clearly better; median edge strength "
                f"{self.other}/{self.configured} {self.ratio(list(inf)):.2f}x{skip}")


def _few(ids: list[str], n: int = 8) -> str:
    return ", ".join(ids[:n]) + (f" ... ({len(ids)} in all)" if len(ids) > n else "")


def _spread(items: list, n: int) -> list:
    if len(items) <= n:
        return list(items)
    return [items[round(k * (len(items) - 1) / (n - 1))] for k in range(n)]


def other_order(order: str) -> str:
    return "column-major" if order == "row-major" else "row-major"


def order_evidence(cfg, adapter, n: int = SAMPLE) -> OrderEvidence | None:
    """The configured pixel order against the other one on up to ``n`` labelled square training images
    (spread evenly over the ids, deterministic); None when the format has no pixel-order setting or no
    labelled image is square."""
    key = ORDER_KEYS.get(cfg.format)
    if key is None:
        return None
    order = getattr(getattr(cfg, cfg.format), "pixel_order")
    labelled = [i for i in adapter.ids if adapter.presence(i).any()]
    square = [i for i in _spread(labelled, CANDIDATES) if len(set(adapter.image_size(i))) == 1]
    if not square:
        return None
    ev = OrderEvidence(order, other_order(order))
    for i in _spread(square, n):
        ev.fits[i] = transpose_fit(adapter.load_image(i), adapter.load_mask(i))
    return ev


def check_pixel_order(cfg, adapter, n: int = SAMPLE) -> OrderEvidence | None:
    """Refuse (:class:`LabelFitError`) when the labels clearly fit their images better in the other pixel
    order; returns the evidence (None where the check does not apply) otherwise."""
    ev = order_evidence(cfg, adapter, n)
    if ev is None or not ev.other_fits_better:
        return ev
    other, _ = ev.prefer()
    key = ORDER_KEYS[cfg.format]
    label_file = getattr(getattr(cfg, cfg.format), "csv", None)
    where = f"{cfg.root() / label_file}" if label_file else cfg.name
    raise LabelFitError(
        f"{where}: the masks fit their images better transposed: boundary edge strength {ev.ratio(other):.1f}x "
        f"higher with {ev.other} than the configured {ev.configured} on {len(other)} of {len(ev.informative)} "
        f"sampled square images (ids {_few(other, 4)}); set `{key}: {ev.other}` in configs/competitions/"
        f"{cfg.name}.yaml (and check submission.pixel_order), or pass --no-label-check to `competition folds` "
        f"if the images really do not show what the labels outline")
