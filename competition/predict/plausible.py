"""Whether a submission that passed the format checks can be right, judged against training.

A recipe with a broken number (a threshold past 1, NaN weights) or a model that predicts nothing
still writes a CSV the format accepts; on the leaderboard it costs a submission and a day. What the
writer saw (per class: in how many test images the mask is non-empty, in how many it covers the
whole image) is compared with what the training truth makes likely (per class: the share of training
images holding it, which ``make ensemble`` records in the recipe as ``scores.truth_share``).

Pure: counts in, one sentence per problem out. Written by hand: no library checks a submission
against its own training data.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# A class is called missing when, at its training share s, n test images would all lack it with
# probability (1 - s) ** n below this: e.g. 10 images of a class in 50% of training images (0.001).
MISSING_P = 1e-3
# A mask covering this share of an image's pixels covers "the whole image" (a threshold at or below 0).
WHOLE = 0.999


@dataclass
class MaskCounts:
    """Per class: test images whose mask is non-empty, and whose mask covers (almost) every pixel."""

    classes: list[str]
    images: int = 0
    present: np.ndarray = field(default=None)
    whole: np.ndarray = field(default=None)

    def __post_init__(self):
        n = len(self.classes)
        self.present = np.zeros(n, np.int64) if self.present is None else self.present
        self.whole = np.zeros(n, np.int64) if self.whole is None else self.whole

    def add(self, pixels: list[int], area: int) -> None:
        """One image: the positive pixel count of each class's final mask, of ``area`` pixels."""
        p = np.asarray(pixels, np.int64)
        self.images += 1
        self.present += p > 0
        self.whole += p >= WHOLE * area


def problems(counts: MaskCounts, truth_share: dict[str, float] | None) -> list[str]:
    """Sentences saying why the submission cannot be right; empty when nothing is suspicious."""
    n, out = counts.images, []
    if n == 0:
        return out
    share = truth_share or {}
    if not counts.present.any() and (truth_share is None or any(v > 0 for v in share.values())):
        return [f"every mask of all {n} test images is empty"]
    missing = [c for c, k in zip(counts.classes, counts.present)
               if k == 0 and c in share and (1.0 - share[c]) ** n < MISSING_P]
    if missing:
        shown = ", ".join(f"{c} (in {share[c]:.0%} of training images)" for c in missing[:5])
        out.append(f"{len(missing)} class(es) empty in all {n} test images though the training truth has them: "
                   f"{shown}{' ...' if len(missing) > 5 else ''}")
    whole = [c for c, k in zip(counts.classes, counts.whole) if k == n]
    if whole:
        out.append(f"{len(whole)} class(es) cover every pixel of all {n} test images: "
                   f"{', '.join(whole[:5])}{' ...' if len(whole) > 5 else ''}")
    return out
