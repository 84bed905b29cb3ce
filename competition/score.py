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

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from competition import metrics, rle
from competition.config import CompetitionConfig
from competition.data.base import DataError, header_size, walk_files
from competition.data.folder import IMAGE_EXTS
from competition.errors import UserError
from competition.io import ReadError, read_csv
from competition.metrics import pair_metric, score_counts

MAX_LISTED = 10
ROWS_NOTE = "rows are numbered from 1 after the header, so row N is line N+1 of the file"


class ScoreError(UserError, ValueError):
    """The submission or the truth cannot be scored; the message names the rows and what is wrong."""


class CsvRows(NamedTuple):
    """One CSV's id, class and RLE cells as string arrays; index i is the file's row i + 1."""
    ids: np.ndarray
    classes: np.ndarray
    rles: np.ndarray


class PairCounts(NamedTuple):
    """Per truth row (one image x class pair), in pixels: |pred n truth|, |pred| and |truth|."""
    inter: np.ndarray
    pred_sum: np.ndarray
    truth_sum: np.ndarray


@dataclass
class ScoreResult:
    mean: float
    per_class: dict[str, float]
    per_row: pd.DataFrame  # columns id, class, dice (the competition's metric); one row per truth row
    problems: list[str] = field(default_factory=list)
    metric: str = "dice"
    report: dict[str, dict] = field(default_factory=dict)  # metric.report: name -> {mean, per_class}

    def format(self) -> str:
        n_images = self.per_row["id"].nunique()
        shown = {"dice": "Dice", "iou": "IoU"}.get(self.metric, self.metric)
        lines = [f"mean {shown} {self.mean:.4f} over {len(self.per_row)} image x class pairs ({n_images} images)"]
        lines += [f"  also {name}: {r['mean']:.4f}" for name, r in self.report.items()]
        width = max([len("class"), *map(len, self.per_class)])
        lines.append(f"  {'class':<{width}}  {self.metric:>6}" + "".join(f"  {n:>11}" for n in self.report))
        lines += [f"  {name:<{width}}  {score:6.4f}"
                  + "".join(f"  {r['per_class'][name]:11.4f}" for r in self.report.values())
                  for name, score in self.per_class.items()]
        if self.problems:
            lines.append(f"{len(self.problems)} problems forgiven by lenient scoring ({ROWS_NOTE}):")
            lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


def score_files(submission_path, truth_path, cfg: CompetitionConfig, sizes: dict | tuple | None = None,
                lenient: bool = False, sizes_from: Path | str | None = None) -> ScoreResult:
    """:func:`score_frames` on two CSV files; empty RLE cells stay ``""``.

    ``sizes_from``: a folder of images; each truth image's (H, W) is read from its file there
    (``--sizes-from``), for truth CSVs without ``height``/``width`` columns.
    """
    sub, truth = _read_csv(submission_path), _read_csv(truth_path)
    if sizes_from is not None and not {"height", "width"} <= set(truth.columns):
        id_col = cfg.submission.id_column
        _require_columns(truth, [id_col], str(truth_path))
        sizes = sizes_from_images(sizes_from, dict.fromkeys(_strings(truth[id_col])))
    return _score(sub, truth, cfg, sizes, lenient, str(submission_path), str(truth_path))


def score_frames(sub: pd.DataFrame, truth: pd.DataFrame, cfg: CompetitionConfig, sizes: dict | tuple | None = None,
                 lenient: bool = False) -> ScoreResult:
    """Score ``sub`` against ``truth`` (same columns, plus ``height`` and ``width`` unless ``sizes``
    maps each image id to its (H, W), or is one (H, W) for every image). Class cells hold the
    competition's class values (:attr:`CompetitionConfig.class_values`); results are keyed by class
    name. Rows are named by position: the first data row is row 1."""
    return _score(sub, truth, cfg, sizes, lenient, "submission", "truth")


def parse_size(text: str) -> tuple[int, int]:
    """``--size HxW`` (height first, e.g. ``360x480``) -> (360, 480)."""
    h, sep, w = str(text).lower().replace(" ", "").partition("x")
    if not (sep and h.isdigit() and w.isdigit() and int(h) > 0 and int(w) > 0):
        raise ScoreError(f"--size {text!r}: expected HEIGHTxWIDTH in pixels, e.g. --size 360x480")
    return int(h), int(w)


def sizes_from_images(folder: Path | str, ids) -> dict[str, tuple[int, int]]:
    """(H, W) of each image id, read from its file's header in ``folder`` (searched recursively).

    An id may name the file with its extension (``a.png``), without it (``a``), or as a path
    relative to ``folder`` (``s1/a``), as ``submission.id_format`` writes it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ScoreError(f"--sizes-from {folder}: no such folder (expected the folder holding the truth's images)")
    files: dict[str, list[Path]] = {}
    for p in walk_files(folder, folder, lambda name: Path(name.lower()).suffix in IMAGE_EXTS):
        rel = p.relative_to(folder)
        for key in dict.fromkeys([rel.as_posix(), rel.with_suffix("").as_posix(), p.name, p.stem]):
            files.setdefault(key, []).append(p)
    out, missing, ambiguous = {}, [], []
    for i in ids:
        found = files.get(i, [])
        if len(found) != 1:
            (ambiguous.append(f"{i} ({', '.join(f.name for f in found)})") if found else missing.append(i))
            continue
        try:
            out[i] = header_size(found[0])
        except DataError as e:
            raise ScoreError(str(e)) from None
    if missing or ambiguous:
        what = [f"no image file for id(s) {_few(missing)}"] if missing else []
        what += [f"more than one file for id(s) {_few(ambiguous)}"] if ambiguous else []
        raise ScoreError(f"--sizes-from {folder}: {'; '.join(what)} (an id names a file as <id>, <id>.<ext> "
                         f"or a path relative to the folder)")
    return out


def _few(items) -> str:
    items = list(items)
    return ", ".join(map(str, items[:MAX_LISTED])) + (f" ... ({len(items)} in all)" if len(items) > MAX_LISTED else "")


def _read_csv(path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise ScoreError(f"{path}: no such file")
    try:
        return read_csv(path, "CSV file")
    except ReadError as e:
        raise ScoreError(str(e)) from None


def _score(sub, truth, cfg, sizes, lenient, sub_name, truth_name) -> ScoreResult:
    spec = cfg.submission
    truth, void = split_void(truth, cfg)
    cols = [spec.id_column, spec.class_column, spec.rle_column]
    has_size_cols = {"height", "width"} <= set(truth.columns)
    _require_columns(sub, cols, sub_name)
    _require_columns(truth, cols, truth_name)
    if not has_size_cols and sizes is None:
        raise ScoreError(f"{truth_name}: no height and width columns (the image sizes); pass --sizes-from DIR "
                         f"(each image's size read from its file in DIR) or --size HxW (one size for every image) "
                         f"to `competition score`, or sizes={{image id: (height, width)}} from Python")
    sub_rows = CsvRows(*(_strings(sub[c]) for c in cols))
    truth_rows = CsvRows(*(_strings(truth[c]) for c in cols))
    t_id, t_cls = truth_rows.ids, truth_rows.classes
    label = _labeller(spec.id_column, spec.class_column)
    shapes = _truth_shapes(truth, t_id, t_cls, sizes if not has_size_cols else None, truth_name, label)
    truth_runs = _check_truth(truth_rows, shapes, cfg.class_values, truth_name, label)
    target, pred_runs, problems = _check_submission(sub_rows, truth_rows, shapes, cfg, label)
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
    if void is None:
        counts = _overlap_counts(aligned, truth_runs, n_pixels)
    else:
        counts = _counts_without_void(aligned, truth_runs, n_pixels, _void_runs(void, t_id, shapes, cfg, truth_name))
    dice = score_counts(counts.inter, counts.pred_sum, counts.truth_sum, pair_metric(cfg.metric))
    names = dict(zip(cfg.class_values, cfg.classes))  # the CSVs' class values -> the names reports show
    per_row = pd.DataFrame({"id": t_id, "class": [names[v] for v in t_cls], "dice": dice})
    by_class = per_row.groupby("class", sort=False)["dice"].mean()
    per_class = {c: float(by_class[c]) for c in cfg.classes if c in by_class.index}
    report = {name: _report_metric(name, cfg, per_row, counts, aligned, truth_runs, shapes)
              for name in cfg.metric.report if name != cfg.metric.name}
    return ScoreResult(mean=float(dice.mean()), per_class=per_class, per_row=per_row,
                       problems=[msg for _, msg in problems], metric=cfg.metric.name, report=report)


def _report_metric(name: str, cfg, per_row, counts: PairCounts, pred_runs, truth_runs, shapes) -> dict:
    """One ``metric.report`` entry from the rows' counts (dice, iou, f1_at_iou) or masks (hausdorff95).
    Ignored pixels are left out of the count metrics only (hausdorff95 measures the masks as written)."""
    inter, pred_sum, truth_sum = counts
    classes = [c for c in cfg.classes if c in set(per_row["class"])]
    by = per_row.groupby("class", sort=False).indices  # class -> its rows
    if name in ("dice", "iou"):
        v = metrics.metric_info(name).from_counts(inter, pred_sum, truth_sum, cfg.metric.empty_score)
        per_class = {c: float(v[by[c]].mean()) for c in classes}
        return {"mean": float(v.mean()), "per_class": per_class}
    if name == "f1_at_iou":
        per_class = {c: metrics.f1_at_iou(inter[by[c], None], pred_sum[by[c], None], truth_sum[by[c], None],
                                          cfg.metric.iou_threshold, cfg.metric.empty_score)["mean"] for c in classes}
        return {"mean": float(np.mean(list(per_class.values()))), "per_class": per_class}
    order = cfg.submission.pixel_order
    hd = np.array([metrics.hausdorff95(rle.from_runs(*p, s, order), rle.from_runs(*t, s, order))
                   for p, t, s in zip(pred_runs, truth_runs, shapes)])
    return {"mean": float(hd.mean()), "per_class": {c: float(hd[by[c]].mean()) for c in classes}}


def _check_truth(truth: CsvRows, shapes, classes, name, label) -> list:
    """The truth's runs per row; any problem in the truth is an error, whatever the mode."""
    t_id, t_cls, t_rle = truth
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


def _check_submission(sub: CsvRows, truth: CsvRows, shapes, cfg, label):
    """Which truth row each usable submission row scores, its runs, and (sort key, message) problems.

    Each submission row gets at most one problem, in this priority: unknown class, duplicate, extra,
    malformed RLE. Missing truth rows sort after every submission row.
    """
    s_id, s_cls, s_rle = sub
    t_id, t_cls, _ = truth
    spec = cfg.submission
    s_keys, t_keys = pd.MultiIndex.from_arrays([s_id, s_cls]), pd.MultiIndex.from_arrays([t_id, t_cls])
    unknown = ~pd.Series(s_cls).isin(cfg.class_values).to_numpy()
    first = _first_row(s_id, s_cls)
    dup = (first != np.arange(len(s_id))) & ~unknown
    extra = ~s_keys.isin(t_keys) & ~unknown & ~dup
    kept = np.flatnonzero(~(unknown | dup | extra))
    target = t_keys.get_indexer(s_keys[kept])  # truth row of each kept submission row
    problems = [(i, f"{label(i, s_id, s_cls)}: unknown class; classes are {', '.join(cfg.class_values)}")
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


# -- ignored pixels (the competition's `ignore`) ------------------------------------------------------
def split_void(truth: pd.DataFrame, cfg: CompetitionConfig) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(the truth's class rows, its void rows or None).

    A void row is a truth row whose class cell is ``ignore.value``: its RLE is that image's void
    region (several rows of one image are unioned). With ``ignore.metric: exclude`` those pixels are
    left out of every Dice count; with ``background`` they count as background, so the rows are only
    dropped. Without an ``ignore`` key nothing is split. Truth rows are then numbered without them.
    """
    ig, col = cfg.ignore, cfg.submission.class_column
    if ig is None or col not in truth.columns:
        return truth, None
    is_void = pd.Series(_strings(truth[col])).str.strip().to_numpy() == str(ig.value)
    rest = truth[~is_void].reset_index(drop=True)
    return rest, (truth[is_void].reset_index(drop=True) if ig.metric == "exclude" else None)


def _void_runs(void: pd.DataFrame, t_id: np.ndarray, shapes: list, cfg, name: str) -> list:
    """Per truth row: the void runs of its image (sorted, non-overlapping; empty when it has none)."""
    spec = cfg.submission
    shape_of = dict(zip(t_id, shapes))
    v_id, v_rle = _strings(void[spec.id_column]), _strings(void[spec.rle_column])
    found: dict[str, list] = {}
    problems = []
    for r, (image, text) in enumerate(zip(v_id, v_rle)):
        if image not in shape_of:
            continue  # an image without class rows is not scored
        h, w = shape_of[image]
        try:
            found.setdefault(image, []).append(rle.runs(text, (h, w)))
        except rle.RLEError as e:
            problems.append((r, f"void row {r + 1} ({spec.id_column}={image}, {spec.class_column}="
                                f"{cfg.ignore.value}): bad RLE for a {h}x{w} image: {e}"))
    if problems:
        raise ScoreError(_report(name, "the truth's void rows (ignore.value) cannot be used", problems))
    union = {i: _union_runs(r) for i, r in found.items()}
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    return [union.get(i, empty) for i in t_id]


def _union_runs(run_lists: list) -> tuple[np.ndarray, np.ndarray]:
    starts = np.concatenate([r[0] for r in run_lists])
    ends = np.concatenate([r[1] for r in run_lists])
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    if not starts.size:
        return starts, ends
    reach = np.maximum.accumulate(ends)
    new = np.r_[True, starts[1:] > reach[:-1]]  # a run starting past every earlier end opens a new one
    return starts[new], reach[np.r_[new[1:], True]]


def _subtract_runs(a: tuple, b: tuple) -> tuple[np.ndarray, np.ndarray]:
    """The runs of ``a`` minus those of ``b`` (each sorted and non-overlapping), as runs."""
    (s, e), (bs, be) = a, b
    if not s.size or not bs.size:
        return s, e
    cuts = np.unique(np.concatenate([s, e, bs, be]))
    lo, hi = cuts[:-1], cuts[1:]

    def inside(starts, ends, x):
        k = np.searchsorted(starts, x, side="right") - 1
        return (k >= 0) & (x < ends[np.maximum(k, 0)])
    keep = inside(s, e, lo) & ~inside(bs, be, lo)
    lo, hi = lo[keep], hi[keep]
    if not lo.size:
        return lo, hi
    new = np.r_[True, lo[1:] != hi[:-1]]  # touching pieces form one run
    return lo[new], hi[np.r_[new[1:], True]]


def _counts_without_void(pred: list, truth: list, n_pixels: np.ndarray, void: list) -> PairCounts:
    """:func:`_overlap_counts` over the pixels outside each row's void region only."""
    truth = [_subtract_runs(t, v) for t, v in zip(truth, void)]
    inter, pred_sum, truth_sum = _overlap_counts(pred, truth, n_pixels)
    in_void, _, _ = _overlap_counts(pred, void, n_pixels)
    return PairCounts(inter, pred_sum - in_void, truth_sum)


def _overlap_counts(pred: list, truth: list, n_pixels: np.ndarray) -> PairCounts:
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
        return PairCounts(np.zeros(n_rows), pred_sum, truth_sum)
    t_len = t_e - t_s
    before = np.concatenate([[0], np.cumsum(t_len)[:-1]])  # truth pixels in the runs before run k

    def truth_pixels_below(x):
        k = np.searchsorted(t_s, x, side="right") - 1  # the last truth run starting at or before x
        kk = np.maximum(k, 0)
        below = before[kk] + np.clip(x - t_s[kk], 0, t_len[kk])
        return np.where(k >= 0, below, 0)

    inter = np.bincount(p_row, weights=truth_pixels_below(p_e) - truth_pixels_below(p_s), minlength=n_rows)
    # bincount sums in float64, exact for counts below 2**53.
    return PairCounts(inter, pred_sum, truth_sum)


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
    if isinstance(sizes, tuple):  # one size for every image (--size HxW)
        return [tuple(int(v) for v in sizes)] * len(t_id)
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
