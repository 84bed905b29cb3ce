"""The submission CSV: the expected rows, a streaming writer with an RLE worker pool, and validation.

The writer never holds more than ``max_pending`` images: each image's masks go to a thread pool
(post-processing + RLE, numpy releases the GIL for the heavy parts) and rows are written to the CSV
in submission order as soon as the image at the head of the queue is done, so the accelerator never
waits on encoding and the test set's masks are never all in memory at once.

Validation is strict scoring (:func:`competition.score.score_frames`) against the expected rows with
empty masks: the scorer's checks are exactly "every id x class once, nothing extra, every RLE valid
and inside its image", each problem named by its CSV row.
"""
from __future__ import annotations

import csv
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from competition import rle
from competition.config import CompetitionConfig, PostProcess
from competition.data.base import Adapter, DataError
from competition.io import ReadError, read_csv
from competition.predict.plausible import MaskCounts
from competition.score import ScoreError, score_frames


# --------------------------------------------------------------------------------------------- #
# Post-processing (pure)
# --------------------------------------------------------------------------------------------- #
def postprocess(mask: np.ndarray, rule: PostProcess | None) -> np.ndarray:
    """Drop 8-connected components smaller than ``min_area`` pixels, then (``keep_largest``) all but
    the largest one. Returns ``mask`` itself when the rule changes nothing."""
    if rule is None or (not rule.min_area and not rule.keep_largest) or not mask.any():
        return mask
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.ones(n - 1, bool)
    if rule.min_area:
        keep &= areas >= rule.min_area
    if rule.keep_largest and keep.any():
        largest = np.argmax(np.where(keep, areas, -1))
        keep[:] = False
        keep[largest] = True
    if keep.all():
        return mask
    lut = np.zeros(n, np.uint8)
    lut[1:] = keep
    return lut[labels]


def encode_image(masks: np.ndarray, thresholds: np.ndarray | None, rules: list, order: str) -> list[str]:
    """RLE of each class of one image. ``masks`` is (C, H, W) uint8 {0, 1}, or float probabilities
    thresholded here (``>=`` the class's threshold) one class at a time into one reused buffer."""
    return encode_counted(masks, thresholds, rules, order)[0]


def encode_counted(masks: np.ndarray, thresholds: np.ndarray | None, rules: list,
                   order: str) -> tuple[list[str], list[int]]:
    """:func:`encode_image`, and each class's positive pixel count in the final mask."""
    buf = np.empty(masks.shape[1:], bool) if thresholds is not None else None
    out, counts = [], []
    for c in range(len(masks)):
        m = masks[c] if thresholds is None else np.greater_equal(masks[c], thresholds[c], out=buf)
        m = postprocess(m, rules[c])
        out.append(rle.encode(m, order))
        counts.append(int(np.count_nonzero(m)))
    return out, counts


# --------------------------------------------------------------------------------------------- #
# Streaming writer
# --------------------------------------------------------------------------------------------- #
class SubmissionWriter:
    """Rows ``id, class, rle`` (the competition's column names), one per image x class, in the order
    images are added; an empty mask is an empty field."""

    def __init__(self, path: Path, cfg: CompetitionConfig, postprocess_rules: dict[str, PostProcess] | None = None,
                 workers: int | None = None, max_pending: int | None = None):
        self.cfg, self.path = cfg, Path(path)
        self.rules = [(postprocess_rules or {}).get(c) for c in cfg.classes]
        workers = workers or max(1, min(8, os.cpu_count() or 1))
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="rle")
        self.max_pending = max_pending or 2 * workers
        self.pending: deque[tuple[str, int, Future]] = deque()
        self.rows = 0
        self.counts = MaskCounts(list(cfg.classes))  # what the plausibility check judges
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", newline="")
        self._csv = csv.writer(self._file, lineterminator="\n")
        spec = cfg.submission
        self._csv.writerow([spec.id_column, spec.class_column, spec.rle_column])

    def add(self, submission_id: str, masks: np.ndarray, thresholds: np.ndarray | None = None) -> None:
        """Queue one image's (C, H, W) masks (or probabilities with per-class ``thresholds``)."""
        if len(masks) != len(self.cfg.classes):
            raise ValueError(f"{submission_id}: {len(masks)} mask channels for {len(self.cfg.classes)} classes")
        while len(self.pending) >= self.max_pending:  # back-pressure: bounded memory
            self._write_head()
        fut = self.pool.submit(encode_counted, masks, thresholds, self.rules, self.cfg.submission.pixel_order)
        self.pending.append((submission_id, masks.shape[1] * masks.shape[2], fut))
        while self.pending and self.pending[0][2].done():  # write whatever is ready, in order
            self._write_head()

    def _write_head(self) -> None:
        sid, area, fut = self.pending.popleft()
        texts, pixels = fut.result()
        self.counts.add(pixels, area)
        self._csv.writerows([sid, c, t] for c, t in zip(self.cfg.class_values, texts))  # the competition's values
        self.rows += len(texts)

    def close(self) -> int:
        try:
            while self.pending:
                self._write_head()
        finally:
            for *_, fut in self.pending:
                fut.cancel()
            self.pool.shutdown(wait=True)
            self._file.close()
        return self.rows

    def __enter__(self) -> "SubmissionWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:  # an error upstream: stop the workers and leave the temp file for the caller to remove
            self.pending.clear()
            self.pool.shutdown(wait=True, cancel_futures=True)
            self._file.close()


# --------------------------------------------------------------------------------------------- #
# What is expected, and validation
# --------------------------------------------------------------------------------------------- #
def expected_rows(cfg: CompetitionConfig, adapter: Adapter) -> tuple[list[str], pd.DataFrame]:
    """(adapter test ids in submission order, the expected rows with height/width and empty RLE).

    With a sample submission, its images in their order of first appearance (every image it names
    must be in the test set); otherwise every test image, sorted. Classes in config order.
    """
    spec = cfg.submission
    test_ids = adapter.test_ids
    if not test_ids:
        raise DataError(f"{cfg.name}: no test images found under {adapter.root}")
    by_sub_id = {adapter.submission_id(i, "test"): i for i in test_ids}
    sample = adapter.sample_submission()
    if sample is None:
        ids = list(test_ids)
        rows = pd.DataFrame([(adapter.submission_id(i, "test"), c) for i in ids for c in cfg.class_values],
                            columns=[spec.id_column, spec.class_column])
    else:
        where = f"sample submission {spec.sample_submission}"
        missing = [c for c in (spec.id_column, spec.class_column) if c not in sample.columns]
        if missing:
            raise DataError(f"{where}: missing column(s) {missing}; columns: {list(sample.columns)}")
        unknown = sorted(set(sample[spec.id_column]) - set(by_sub_id))
        if unknown:
            raise DataError(f"{where}: image(s) {unknown[:5]} are not in the test set "
                            f"({len(unknown)} in all; submission.id_format is {spec.id_format!r})")
        bad = sorted(set(sample[spec.class_column]) - set(cfg.class_values))
        if bad:
            raise DataError(f"{where}: unknown class(es) {bad[:5]}; classes are {cfg.class_values}")
        rows = sample[[spec.id_column, spec.class_column]].copy()
        ids = [by_sub_id[s] for s in dict.fromkeys(rows[spec.id_column])]
    sizes = {adapter.submission_id(i, "test"): adapter.image_size(i, "test") for i in ids}
    rows[spec.rle_column] = ""
    rows["height"] = [sizes[s][0] for s in rows[spec.id_column]]
    rows["width"] = [sizes[s][1] for s in rows[spec.id_column]]
    return ids, rows.reset_index(drop=True)


def validate_submission(path: Path, cfg: CompetitionConfig, expected: pd.DataFrame) -> int:
    """Raise :class:`ScoreError` naming each bad row unless the CSV at ``path`` has exactly the
    competition's columns and exactly the expected rows with valid, in-bounds RLE; returns the row count."""
    spec = cfg.submission
    try:
        sub = read_csv(path, "submission CSV")
    except ReadError as e:
        raise ScoreError(str(e)) from None
    cols = [spec.id_column, spec.class_column, spec.rle_column]
    if list(sub.columns) != cols:
        raise ScoreError(f"{path}: columns are {list(sub.columns)}; the competition expects exactly {cols}")
    score_frames(sub, expected, cfg)  # strict: raises on any missing, duplicate, extra or malformed row
    return len(sub)
