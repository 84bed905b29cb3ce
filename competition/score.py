"""Score a submission CSV against a truth CSV with the competition's own metric.

Dice per image x class pair, averaged over every pair of the truth. Dice is computed straight from
the run lists, never decoding a mask: the truth pixels before position x are a prefix sum over the
truth runs, found for every predicted run end with one ``np.searchsorted`` over all rows at once.

Strict mode (the default, for checking a file before upload) rejects any missing, duplicate, extra,
unknown-class or malformed row, naming each by its CSV row number. Lenient mode scores the way a
leaderboard does: a missing or malformed row is an empty prediction, the first of duplicates counts,
extra rows are ignored, and what was forgiven is listed in ``ScoreResult.problems``.
"""
from __future__ import annotations

from competition.errors import UserError

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from competition import rle
from competition.config import CompetitionConfig
from competition.metrics import dice_from_counts

MAX_LISTED = 10
ROWS_NOTE = "rows are numbered from 1 after the header, so row N is line N+1 of the file"


class ScoreError(UserError, ValueError):
    """The submission or the truth cannot be scored; the message names the rows and what is wrong."""


@dataclass
class ScoreResult:
    mean: float
    per_class: dict[str, float]
    per_row: pd.DataFrame  # columns id, class, dice; one row per truth row, in truth order
    problems: list[str] = field(default_factory=list)

    def format(self) -> str:
        n_images = self.per_row["id"].nunique()
        lines = [f"mean Dice {self.mean:.4f} over {len(self.per_row)} image x class pairs ({n_images} images)"]
        width = max([len("class"), *map(len, self.per_class)])
        lines.append(f"  {'class':<{width}}  dice")
        lines += [f"  {name:<{width}}  {score:.4f}" for name, score in self.per_class.items()]
        if self.problems:
            lines.append(f"{len(self.problems)} problems forgiven by lenient scoring ({ROWS_NOTE}):")
            lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


def score_files(submission_path, truth_path, cfg: CompetitionConfig, sizes: dict | None = None,
                lenient: bool = False) -> ScoreResult:
    """:func:`score_frames` on two CSV files; empty RLE cells stay ``""``."""
    sub, truth = _read_csv(submission_path), _read_csv(truth_path)
    return _score(sub, truth, cfg, sizes, lenient, str(submission_path), str(truth_path))


def score_frames(sub: pd.DataFrame, truth: pd.DataFrame, cfg: CompetitionConfig, sizes: dict | None = None,
                 lenient: bool = False) -> ScoreResult:
    """Score ``sub`` against ``truth`` (same columns, plus ``height`` and ``width`` unless ``sizes``
    maps each image id to its (H, W)). Rows are named by position: the first data row is row 1."""
    return _score(sub, truth, cfg, sizes, lenient, "submission", "truth")


def _read_csv(path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise ScoreError(f"{path}: no such file")
    try:
        return pd.read_csv(path, keep_default_na=False, dtype=str)
    except pd.errors.EmptyDataError:
        raise ScoreError(f"{path}: the file is empty (expected a header row)") from None
    except pd.errors.ParserError as e:
        raise ScoreError(f"{path}: not a valid CSV: {e}") from None


def _score(sub, truth, cfg, sizes, lenient, sub_name, truth_name) -> ScoreResult:
    spec = cfg.submission
    cols = [spec.id_column, spec.class_column, spec.rle_column]
    has_size_cols = {"height", "width"} <= set(truth.columns)
    _require_columns(sub, cols, sub_name)
    _require_columns(truth, cols, truth_name)
    if not has_size_cols and sizes is None:
        raise ScoreError(f"{truth_name}: no height and width columns (the image sizes); "
                         f"pass sizes={{image id: (height, width)}} instead")
    s_id, s_cls, s_rle = (_strings(sub[c]) for c in cols)
    t_id, t_cls, t_rle = (_strings(truth[c]) for c in cols)
    label = _labeller(spec.id_column, spec.class_column)
    shapes = _truth_shapes(truth, t_id, t_cls, sizes if not has_size_cols else None, truth_name, label)
    truth_runs = _check_truth(t_id, t_cls, t_rle, shapes, cfg.classes, truth_name, label)
    target, pred_runs, problems = _check_submission(s_id, s_cls, s_rle, t_id, t_cls, shapes, cfg, label)
    if problems and not lenient:
        hint = ""
        if len(target) == 0 and len(sub):
            hint = (f"; no submission row matches a truth row: check the {spec.id_column} values "
                    f"(submission.id_format)")
        raise ScoreError(_report(sub_name, "not a valid submission" + hint, problems))

    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    aligned = [empty] * len(truth)
    for j, r in zip(target, pred_runs):
        aligned[j] = r
    n_pixels = np.array([h * w for h, w in shapes], np.int64)
    inter, pred_sum, truth_sum = _overlap_counts(aligned, truth_runs, n_pixels)
    dice = dice_from_counts(inter, pred_sum, truth_sum, cfg.metric.empty_score)
    per_row = pd.DataFrame({"id": t_id, "class": t_cls, "dice": dice})
    by_class = per_row.groupby("class", sort=False)["dice"].mean()
    per_class = {c: float(by_class[c]) for c in cfg.classes if c in by_class.index}
    return ScoreResult(mean=float(dice.mean()), per_class=per_class,
                       per_row=per_row, problems=[msg for _, msg in problems])


def _check_truth(t_id, t_cls, t_rle, shapes, classes, name, label) -> list:
    """The truth's runs per row; any problem in the truth is an error, whatever the mode."""
    if len(t_id) == 0:
        raise ScoreError(f"{name}: no rows to score against")
    truth_runs, problems = _parse_rows(t_rle, shapes, np.arange(len(t_id)), t_id, t_cls, label)
    problems += [(i, f"{label(i, t_id, t_cls)}: unknown class; classes are {', '.join(classes)}")
                 for i in np.flatnonzero(~pd.Series(t_cls).isin(classes).to_numpy())]
    first = _first_row(t_id, t_cls)
    problems += [(i, f"{label(i, t_id, t_cls)}: duplicate of row {first[i] + 1}")
                 for i in np.flatnonzero(first != np.arange(len(t_id)))]
    if problems:
        problems.sort(key=lambda p: p[0])
        raise ScoreError(_report(name, "the truth cannot be used", problems))
    return truth_runs


def _check_submission(s_id, s_cls, s_rle, t_id, t_cls, shapes, cfg, label):
    """Which truth row each usable submission row scores, its runs, and (sort key, message) problems.

    Each submission row gets at most one problem, in this priority: unknown class, duplicate, extra,
    malformed RLE. Missing truth rows sort after every submission row.
    """
    spec = cfg.submission
    s_keys, t_keys = pd.MultiIndex.from_arrays([s_id, s_cls]), pd.MultiIndex.from_arrays([t_id, t_cls])
    unknown = ~pd.Series(s_cls).isin(cfg.classes).to_numpy()
    first = _first_row(s_id, s_cls)
    dup = (first != np.arange(len(s_id))) & ~unknown
    extra = ~s_keys.isin(t_keys) & ~unknown & ~dup
    kept = np.flatnonzero(~(unknown | dup | extra))
    target = t_keys.get_indexer(s_keys[kept])  # truth row of each kept submission row
    problems = [(i, f"{label(i, s_id, s_cls)}: unknown class; classes are {', '.join(cfg.classes)}")
                for i in np.flatnonzero(unknown)]
    problems += [(i, f"{label(i, s_id, s_cls)}: duplicate of row {first[i] + 1} (the first one counts)")
                 for i in np.flatnonzero(dup)]
    problems += [(i, f"{label(i, s_id, s_cls)}: extra row, not in the truth") for i in np.flatnonzero(extra)]
    pred_runs, bad_rle = _parse_rows(s_rle[kept], [shapes[j] for j in target], kept, s_id, s_cls, label)
    problems += bad_rle
    covered = np.zeros(len(t_id), bool)
    covered[target] = True
    problems += [(len(s_id) + j, f"missing row for {spec.id_column}={t_id[j]}, {spec.class_column}={t_cls[j]} "
                                 f"(truth row {j + 1}); scored as an empty prediction")
                 for j in np.flatnonzero(~covered)]
    problems.sort(key=lambda p: p[0])
    return target, pred_runs, problems


def _overlap_counts(pred: list, truth: list, n_pixels: np.ndarray):
    """Per row: |pred n truth|, |pred|, |truth| from (starts, ends) run lists, all rows at once.

    Rows are laid end to end (row j starts at the sum of the earlier rows' pixel counts), so the runs
    of all rows form one sorted, non-overlapping list and one searchsorted serves every row.
    """
    n_rows = len(n_pixels)
    offset = np.concatenate([[0], np.cumsum(n_pixels)[:-1]])

    def flatten(run_lists):
        counts = np.array([r[0].size for r in run_lists], np.int64)
        row = np.repeat(np.arange(n_rows), counts)
        if not counts.sum():
            return np.zeros(0, np.int64), np.zeros(0, np.int64), row
        starts = np.concatenate([r[0] for r in run_lists]) + offset[row]
        ends = np.concatenate([r[1] for r in run_lists]) + offset[row]
        return starts, ends, row

    p_s, p_e, p_row = flatten(pred)
    t_s, t_e, t_row = flatten(truth)
    pred_sum = np.bincount(p_row, weights=p_e - p_s, minlength=n_rows)
    truth_sum = np.bincount(t_row, weights=t_e - t_s, minlength=n_rows)
    if t_s.size == 0 or p_s.size == 0:
        return np.zeros(n_rows), pred_sum, truth_sum
    t_len = t_e - t_s
    before = np.concatenate([[0], np.cumsum(t_len)[:-1]])  # truth pixels in the runs before run k

    def truth_pixels_below(x):
        k = np.searchsorted(t_s, x, side="right") - 1  # the last truth run starting at or before x
        kk = np.maximum(k, 0)
        below = before[kk] + np.clip(x - t_s[kk], 0, t_len[kk])
        return np.where(k >= 0, below, 0)

    inter = np.bincount(p_row, weights=truth_pixels_below(p_e) - truth_pixels_below(p_s), minlength=n_rows)
    # bincount sums in float64, exact for counts below 2**53.
    return inter, pred_sum, truth_sum


def _parse_rows(texts, shapes, rows, ids, classes, label):
    """Validated runs per row, and (row, message) for each malformed one (whose runs become empty)."""
    parsed, problems = [], []
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    for text, shape, i in zip(texts, shapes, rows):
        try:
            parsed.append(rle.runs(text, shape))
        except rle.RLEError as e:
            parsed.append(empty)
            problems.append((i, f"{label(i, ids, classes)}: bad RLE for a {shape[0]}x{shape[1]} image: {e}"))
    return parsed, problems


def _truth_shapes(truth, t_id, t_cls, sizes, name, label) -> list[tuple[int, int]]:
    """(H, W) of every truth row, from its height/width columns or else from ``sizes``."""
    if sizes is None:
        hw = truth[["height", "width"]].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
        bad = np.flatnonzero(~(np.isfinite(hw).all(1) & (hw >= 1).all(1) & (hw == np.round(hw)).all(1)))
        if bad.size:
            raise ScoreError(_report(name, "bad image sizes", [
                (i, f"{label(i, t_id, t_cls)}: height/width must be positive integers, got "
                    f"{truth['height'].iloc[i]!r} x {truth['width'].iloc[i]!r}") for i in bad]))
        return [(int(h), int(w)) for h, w in hw]
    missing = [i for i, image in enumerate(t_id) if image not in sizes]
    if missing:
        raise ScoreError(_report(name, "no size for these images in `sizes`",
                                 [(i, f"{label(i, t_id, t_cls)}: image not in sizes") for i in missing]))
    return [tuple(int(v) for v in sizes[image]) for image in t_id]


def _require_columns(df: pd.DataFrame, cols: list[str], name: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ScoreError(f"{name}: missing column(s) {', '.join(missing)}; "
                         f"columns present: {', '.join(map(str, df.columns)) or '(none)'}")


def _first_row(ids: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """For every row, the position of the first row with the same (id, class)."""
    positions = pd.Series(np.arange(len(ids)))
    return positions.groupby([ids, classes], sort=False).transform("first").to_numpy()


def _strings(col: pd.Series) -> np.ndarray:
    # Frames not read with keep_default_na=False hold NaN for empty cells: an empty RLE is "".
    return col.fillna("").astype(str).to_numpy(dtype=object)


def _labeller(id_column: str, class_column: str):
    def label(i, ids, classes) -> str:
        return f"row {i + 1} ({id_column}={ids[i]}, {class_column}={classes[i]})"
    return label


def _report(name: str, what: str, problems: list) -> str:
    listed = [f"  {msg}" for _, msg in problems[:MAX_LISTED]]
    more = len(problems) - MAX_LISTED
    tail = [f"  ... and {more} more"] if more > 0 else []
    return "\n".join([f"{name}: {what}: {len(problems)} problem(s) ({ROWS_NOTE}):", *listed, *tail])
