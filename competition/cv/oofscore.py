"""``competition oof EXP``: an experiment's OOF score — per class, per fold, mean, at each image's
original size, binarised as ``competition predict`` binarises — and a per-image table.

A fold that was trained (``best.pt`` present) but has no OOF (interrupted at the end, or OOF deleted
to save disk) gets one; ``--tta VIEW... [--scales S...]`` writes a TTA *variant* of every trained fold
(``runs/<exp>/fold<k>/oof-<variant>/``) that ``competition ensemble`` then treats as a candidate member.
Both go through :func:`competition.cv.heldout.predict_fold`, the submission's own inference path.

The experiment's ``data.exclude`` images are predicted like every other (their OOF is in the store)
but left out of the score, the table and the suspects unless ``--include-excluded``;
``--suspects --write-exclude FILE`` writes the suspects' images as a ``data.exclude`` CSV to review.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from competition import convergence, locks, metrics, paths
from competition.config import ConfigError, atomic_write_text, load_competition, load_experiment
from competition.cv import native
from competition.cv import suspects as sus
from competition.cv import views as store
from competition.cv.heldout import predict_fold
from competition.data.adapters import make_adapter
from competition.folds import Exclusion, excluded, load_folds
from competition.io import file_hash
from competition.metrics import PairMetric, pair_metric
from competition.predict.tta import check_views, variant_name
from competition.store import tiles
from competition.store.probs import blend


def ensure_oof(exp_name: str, comp, adapter, folds: pd.DataFrame, views=("identity",), scales=(1.0,),
               log=print) -> list[int]:
    """Produce the OOF (of one TTA variant) of every trained fold that lacks it; -> the folds produced.
    Untrained folds are left for :func:`competition.cv.views.open_experiment` to report."""
    variant = variant_name(views, scales)
    made = []
    for k in sorted(set(folds["fold"])):
        rp = paths.run(exp_name, k)
        d = rp.oof(variant)
        if tiles.exists(d) or not rp.best.is_file():
            continue
        ids = folds.loc[folds["fold"] == k, "id"].astype(str).tolist()
        log(f"{exp_name} fold {k}: predicting its {len(ids)} held-out images with {rp.best.name} "
            f"(TTA {'+'.join(views)} @ {', '.join(f'{s:g}' for s in scales)}) -> {d.name}/ ...")
        with locks.hold(rp.lock, True, f"run folder {rp.root}"):
            predict_fold(exp_name, int(k), comp, adapter, ids, (views, scales))
        made.append(int(k))
    return made


def pass_level(threshold: float) -> int:
    """The smallest stored value u that one member alone turns into a positive pixel at ``threshold``,
    by the submission's own arithmetic (float32 u * (1 / 255) >= float32 threshold): pixels at levels
    >= this are exactly the predicted ones."""
    u = torch.arange(256, dtype=torch.uint8).view(1, 256, 1)
    p = blend([u], torch.ones(1, 1))[0, :, 0]
    hit = torch.nonzero(p >= torch.tensor(float(threshold), dtype=torch.float32))
    return int(hit[0]) if len(hit) else 256


def per_image(images, task: str, threshold: float, metric: "PairMetric | float", workers: int | None = None,
              log=None) -> np.ndarray:
    """(N, C) scores of one experiment's OOF (``images.members[0]``) at each image's original size,
    binarised at ``threshold`` (multilabel) or by the argmax (multiclass), by the competition's per-pair
    metric; ignored pixels (``ignore.metric: exclude``) are left out."""
    w = np.ones((len(images.members[0].classes), 1), np.int64)
    (curve,), _ = native.curves(images, [w], task, metric, log or (lambda *_: None), workers)
    if task == "multiclass":
        return curve[..., 0]
    level = pass_level(threshold)
    if level > 255:
        raise ValueError(f"threshold {threshold} predicts nothing; expected a threshold in (0, 1]")
    return curve[..., level]


def report_metrics(images, task: str, threshold: float, spec) -> dict:
    """``metric.report`` at the original sizes: name -> mean (f1_at_iou: over classes of the per-class F1)."""
    wanted = [n for n in spec.report if n != spec.name]
    if not wanted:
        return {}
    view = images.members[0]
    N, C = len(view), len(view.classes)
    counts = [np.empty((N, C), np.int64) for _ in range(3)]
    hd = np.empty((N, C))
    level = pass_level(threshold)
    one = torch.ones(1, C)
    for i in range(N):
        (P,), T = images.dense(i)
        keep = images.keep(i)
        if task == "multilabel":
            pred = P >= level
        else:  # the submission's argmax (float blend against 1 - sum), not an integer one: ties differ
            pred = native.native_masks([torch.from_numpy(P)], one, torch.zeros(C), [None] * C, task).view(bool)
            T = native.exclusive(T)
        if keep is not None:
            pred = pred & keep
        for arr, v in zip(counts, metrics.pair_counts(pred[None], T[None])):
            arr[i] = v[0]
        if "hausdorff95" in wanted:
            hd[i] = [metrics.hausdorff95(pred[c], T[c]) for c in range(C)]
    out = {}
    for name in wanted:
        if name == "f1_at_iou":
            out[name] = metrics.f1_at_iou(*counts, spec.iou_threshold, spec.empty_score)["mean"]
        elif name == "hausdorff95":
            out[name] = float(hd.mean())
        else:
            out[name] = float(metrics.metric_info(name).from_counts(*counts, spec.empty_score).mean())
    return out


def report(exp_name: str, view, scores: np.ndarray, threshold: float, task: str,
           variant: str) -> tuple[str, pd.DataFrame]:
    """The printed summary and the per-image table (id, fold, mean, one column per class)."""
    classes = view.classes
    table = pd.DataFrame(scores, columns=classes)
    table.insert(0, "mean", scores.mean(1))
    table.insert(0, "fold", view.fold_of)
    table.insert(0, "id", view.ids)
    per_fold = table.groupby("fold")[["mean"]].mean()
    per_fold.insert(0, "images", table.groupby("fold").size())
    fmt = "{:.4f}".format
    rule = "argmax against the background" if task == "multiclass" else f"threshold {threshold:g}"
    name = f"{exp_name}{f' (TTA variant {variant})' if variant else ''}"
    lines = [f"{name}: OOF Dice {scores.mean():.4f} over {len(view)} images x {len(classes)} classes, each at "
             f"its original size ({rule}), scored as the leaderboard scores a submission"]
    per_class = pd.DataFrame({"dice": scores.mean(0)}, index=classes)
    lines += ["", "per fold:", per_fold.to_string(float_format=fmt), "",
              "per class:", per_class.to_string(float_format=fmt), "",
              "worst images:",
              table.nsmallest(min(5, len(table)), "mean")[["id", "fold", "mean"]].to_string(
                  index=False, float_format=fmt)]
    return "\n".join(lines), table


@dataclass(frozen=True)
class OofOptions:
    """What ``competition oof`` takes besides the experiment and its overrides.

    ``tta`` / ``scales``: the TTA variant scored, and produced where a trained fold lacks it (None: the
    plain OOF); ``suspects``: also list the ``top`` likeliest label errors; ``csv`` / ``truth_csv``: the
    OOF and the training truth in the competition's format; ``workers``: processes for the pass over
    the images (None: every core); ``include_excluded``: score the ``data.exclude`` images too;
    ``write_exclude``: write the suspects' images as a ``data.exclude`` CSV (implies ``suspects``;
    an existing file is refused unless ``force``).
    """
    tta: list[str] | None = None
    scales: list[float] | None = None
    suspects: bool = False
    top: int = 20
    csv: str | None = None
    truth_csv: str | None = None
    workers: int | None = None
    include_excluded: bool = False
    write_exclude: str | None = None
    force: bool = False


def run(exp_name_or_path: str, overrides: dict | None = None, options: OofOptions = OofOptions(),
        log=print) -> dict:
    """Score an experiment's OOF (producing missing folds' OOF first); optionally list label suspects."""
    csv, truth_csv = options.csv, options.truth_csv
    exp = load_experiment(exp_name_or_path, overrides)
    comp = load_competition(exp.competition)
    views = check_views(options.tta, comp.tta, "--tta") if options.tta else ["identity"]
    scales = [float(s) for s in (options.scales or [1.0])]
    if any(s <= 0 for s in scales):
        raise ConfigError(f"--scales must be positive numbers, got {scales}")
    suspects = options.suspects or options.write_exclude is not None
    if suspects and options.top < 1:
        raise ConfigError(f"--top must be at least 1, got {options.top}")
    if options.write_exclude is not None:
        sus.check_exclude_target(options.write_exclude, options.force)
    variant = variant_name(views, scales)
    adapter = make_adapter(comp)
    folds = load_folds(comp, adapter)
    excl = excluded(exp.data.exclude, folds)  # an unknown id fails before any prediction
    made = ensure_oof(exp.name, comp, adapter, folds, views, scales, log)
    view = store.open_experiment(exp.name, folds, comp.classes, comp.task, variant)
    truth = store.truth_store(comp, adapter, view.ids, file_hash(paths.folds_file(comp.name)), log=log)
    images = store.Images([view], truth, adapter, comp.task)
    if not options.include_excluded:
        images = images.without(excl.ids)
    view = images.members[0]
    # The same binarisation as training's OOF score in metrics.json and as `competition predict`.
    threshold = exp.train.threshold
    scores = per_image(images, comp.task, threshold, pair_metric(comp.metric), options.workers)
    if csv:
        native.write_csv(csv, images, np.ones((len(comp.classes), 1), np.int64), [threshold] * len(comp.classes),
                         {}, comp)
    if truth_csv:
        native.write_truth_csv(truth_csv, adapter, view.ids, comp)
    text, table = report(exp.name, view, scores, threshold, comp.task, variant)
    if len(excl):
        table.insert(3, "excluded", [i in excl.ids for i in view.ids])
    out = paths.oof_scores(exp.name, variant)
    atomic_write_text(out, table.to_csv(index=False, float_format="%.6f"))
    log(text)
    if len(excl):
        log(_exclusion_note(excl, options.include_excluded))
    verdicts = {int(k): v for k in sorted(set(folds["fold"]))
                if (v := convergence.of_run(paths.run(exp.name, int(k)))) is not None}
    log(f"training: {convergence.summarize(verdicts)}")
    log(f"\nper-image table: {out.relative_to(paths.project())}")
    if csv:
        log(f"wrote {csv}: the OOF as a submission at native size (score it: competition score {csv} "
            f"--truth {truth_csv or 'TRUTH.csv'})")
    if truth_csv:
        log(f"wrote {truth_csv}: the training truth in the competition's format")
    result = {"mean": float(scores.mean()), "native": float(scores.mean()),
              "table": table, "produced": made, "path": out, "variant": variant,
              "excluded": {"count": len(excl), "sha256": excl.sha256, "scored": options.include_excluded},
              "convergence": {k: v.status for k, v in verdicts.items()}}
    if suspects:
        result["suspects"] = sus.run(exp.name, images, adapter, comp.task, pass_level(threshold), options.top, log)
        if options.write_exclude is not None:
            n = sus.write_exclude(options.write_exclude, result["suspects"], options.force)
            log(f"wrote {options.write_exclude}: {n} image(s) of the top {options.top} suspects, most suspect first "
                f"(id, reason); review them, then point data.exclude at the file")
    return result


def _exclusion_note(excl: Exclusion, included: bool) -> str:
    what = ("scored too (--include-excluded)" if included
            else "left out of these scores (their OOF is kept; --include-excluded scores them)")
    return (f"data.exclude ({excl.source}): {len(excl)} image(s), sha256 {excl.sha256}, {what}")
