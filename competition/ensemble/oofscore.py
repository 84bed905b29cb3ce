"""``competition oof EXP``: an experiment's OOF score — per class, per fold, mean, at the OOF size and at
each image's native size — and a per-image table.

A fold that was trained (``best.pt`` present) but has no OOF (interrupted at the end, or OOF deleted
to save disk) gets one; ``--tta VIEW... [--scales S...]`` writes a TTA *variant* of every trained fold
(``runs/<exp>/fold<k>/oof-<variant>/``) that ``competition ensemble`` then treats as a candidate member.
Both go through :func:`competition.predict.heldout.predict_fold`, the submission's own inference path.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from competition.metrics import pair_metric
from competition import locks, paths
from competition.config import ConfigError, atomic_write_text
from competition.ensemble.blend import blend_labels, threshold_level, threshold_value, truth_labels
from competition.ensemble.compact import chunk_images
from competition.metrics import PairMetric, scores_per_class


def ensure_oof(exp_name: str, comp, adapter, folds: pd.DataFrame, views=("identity",), scales=(1.0,),
               log=print) -> list[int]:
    """Produce the OOF (of one TTA variant) of every trained fold that lacks it; -> the folds produced.
    Untrained folds are left for :func:`competition.ensemble.store.open_experiment` to report."""
    from competition.predict.heldout import predict_fold
    from competition.predict.tta import variant_name
    variant = variant_name(views, scales)
    made = []
    for k in sorted(set(folds["fold"])):
        rp = paths.run(exp_name, k)
        d = rp.oof(variant)
        if (d / paths.OOF_PROBS).is_file() or not rp.best.is_file():
            continue
        ids = folds.loc[folds["fold"] == k, "id"].astype(str).tolist()
        log(f"{exp_name} fold {k}: predicting its {len(ids)} held-out images with {rp.best.name} "
            f"(TTA {'+'.join(views)} @ {', '.join(f'{s:g}' for s in scales)}) -> {d.name}/ ...")
        with locks.hold(rp.lock, True, f"run folder {rp.root}"):
            predict_fold(exp_name, int(k), comp, adapter, ids, views, scales, log=log)
        made.append(int(k))
    return made


def per_image(view, truth, task: str, level: int, metric: "PairMetric | float", budget_bytes: int = 128 << 20,
              ignore=None) -> np.ndarray:
    """(N, C) scores of one experiment's OOF at ``probs >= level`` (multilabel) or argmax (multiclass),
    by the competition's per-pair metric. ``ignore``: :func:`competition.oof.ignore_view` - pixels no
    prediction counts at (the truth has none there), i.e. left out of the score."""
    out = np.empty((len(view), len(view.classes)))
    for s, e, pred, T in _masks(view, truth, task, level, budget_bytes, ignore):
        out[s:e] = scores_per_class(pred, T, metric)
    return out


def report_metrics(view, truth, task: str, level: int, spec, budget_bytes: int = 128 << 20, ignore=None) -> dict:
    """``metric.report`` at the OOF size: name -> mean (f1_at_iou: over classes of the per-class F1)."""
    from competition import metrics
    wanted = [n for n in spec.report if n != spec.name]
    if not wanted:
        return {}
    N, C = len(view), len(view.classes)
    counts = [np.empty((N, C), np.int64) for _ in range(3)]
    hd = np.empty((N, C))
    for s, e, pred, T in _masks(view, truth, task, level, budget_bytes, ignore):
        for arr, v in zip(counts, metrics.pair_counts(pred, T)):
            arr[s:e] = v
        if "hausdorff95" in wanted:
            hd[s:e] = [[metrics.hausdorff95(pred[i, c], T[i, c]) for c in range(C)] for i in range(e - s)]
    out = {}
    for name in wanted:
        if name == "f1_at_iou":
            out[name] = metrics.f1_at_iou(*counts, spec.iou_threshold, spec.empty_score)["mean"]
        elif name == "hausdorff95":
            out[name] = float(hd.mean())
        else:
            out[name] = float(metrics.metric_info(name).from_counts(*counts, spec.empty_score).mean())
    return out


def _masks(view, truth, task: str, level: int, budget_bytes: int, ignore):
    """(start, end, predicted masks, truth masks) per chunk of images, both (n, C, h, w) bool-like."""
    N, C = len(view), len(view.classes)
    B = chunk_images(C, int(np.prod(view.size)), 4, budget_bytes)
    for s in range(0, N, B):
        e = min(N, s + B)
        P, T = view.read(s, e), truth.read(s, e)
        keep = None if ignore is None else ~ignore.read(s, e)[:, None]
        if task == "multilabel":
            yield s, e, (P >= level if keep is None else (P >= level) & keep), T
        else:
            k = np.arange(1, C + 1, dtype=np.uint8).reshape(1, C, 1, 1)
            lab = blend_labels([P], np.ones((C, 1), np.int64))[:, None]
            yield s, e, (lab == k if keep is None else (lab == k) & keep), truth_labels(T)[:, None] == k


def report(exp_name: str, view, scores: np.ndarray, level: int, task: str, native: np.ndarray | None,
           variant: str) -> tuple[str, pd.DataFrame]:
    """The printed summary and the per-image table (id, fold, mean, one column per class)."""
    classes = view.classes
    table = pd.DataFrame(scores, columns=classes)
    table.insert(0, "mean", scores.mean(1))
    table.insert(0, "fold", view.fold_of)
    table.insert(0, "id", view.ids)
    if native is not None:
        table.insert(3, "native_mean", native.mean(1))
    per_fold = table.groupby("fold")[["mean"] + (["native_mean"] if native is not None else [])].mean()
    per_fold.insert(0, "images", table.groupby("fold").size())
    fmt = "{:.4f}".format
    rule = "argmax against the background" if task == "multiclass" else f"threshold {threshold_value(level):.3f}"
    name = f"{exp_name}{f' (TTA variant {variant})' if variant else ''}"
    lines = [f"{name}: OOF Dice {scores.mean():.4f} over {len(view)} images x {len(classes)} classes "
             f"at {view.size[0]}x{view.size[1]} ({rule})"]
    if native is not None:
        lines.append(f"{name}: native-resolution OOF Dice {native.mean():.4f} (each image at its original "
                     f"size, scored as the leaderboard scores a submission)")
    per_class = pd.DataFrame({"dice": scores.mean(0)}, index=classes)
    if native is not None:
        per_class["native"] = native.mean(0)
    lines += ["", "per fold:", per_fold.to_string(float_format=fmt), "",
              "per class:", per_class.to_string(float_format=fmt), "",
              "worst images:",
              table.nsmallest(min(5, len(table)), "mean")[["id", "fold", "mean"]].to_string(
                  index=False, float_format=fmt)]
    return "\n".join(lines), table


def native_scores(exp, comp, adapter, view, csv: str | None = None) -> np.ndarray:
    """(N, C) native-resolution Dice of one experiment's OOF, binarised as ``competition predict``
    binarises (``train.threshold``, or the argmax), no post-processing; optionally as a CSV too."""
    from competition.ensemble import native
    images = native.Images([view], adapter, view.ids)
    w = np.ones((len(comp.classes), 1), np.int64)
    thresholds = [exp.train.threshold] * len(comp.classes)
    if csv:
        native.write_csv(csv, images, w, thresholds, {}, comp)
    return native.score_plan(images, w, thresholds, {}, comp.task, pair_metric(comp.metric))


def run(exp_name_or_path: str, overrides: dict | None = None, suspects: bool = False, top: int = 20,
        tta: list[str] | None = None,
        scales: list[float] | None = None, native_cv: bool = True, csv: str | None = None,
        truth_csv: str | None = None, log=print) -> dict:
    """Score an experiment's OOF (producing missing folds' OOF first); optionally list label suspects."""
    from competition.config import load_competition, load_experiment
    from competition.data.adapters import make_adapter
    from competition.ensemble import store
    from competition.folds import load_folds
    from competition.predict.tta import check_views, variant_name
    from competition.train.checkpoint import file_hash

    exp = load_experiment(exp_name_or_path, overrides)
    comp = load_competition(exp.competition)
    views = check_views(tta, comp.tta, "--tta") if tta else ["identity"]
    scales = [float(s) for s in (scales or [1.0])]
    if any(s <= 0 for s in scales):
        raise ConfigError(f"--scales must be positive numbers, got {scales}")
    variant = variant_name(views, scales)
    adapter = make_adapter(comp)
    folds = load_folds(comp, adapter)
    made = ensure_oof(exp.name, comp, adapter, folds, views, scales, log)
    view = store.open_experiment(exp.name, folds, comp.classes, comp.task, variant)
    truth = store.truth_cache(comp, adapter, view.ids, view.size, file_hash(paths.folds_file(comp.name)), log=log)
    # The same binarisation as training's OOF score in metrics.json (one threshold -> level rule).
    level = threshold_level(exp.train.threshold)
    from competition.oof import ignore_view
    scores = per_image(view, truth, comp.task, level, pair_metric(comp.metric),
                       ignore=ignore_view(comp, adapter, view.ids, view.size))
    nat = native_scores(exp, comp, adapter, view, csv) if (native_cv or csv) else None
    if truth_csv:
        from competition.ensemble.native import write_truth_csv
        write_truth_csv(truth_csv, adapter, view.ids, comp)
    text, table = report(exp.name, view, scores, level, comp.task, nat, variant)
    out = paths.oof_scores(exp.name, variant)
    atomic_write_text(out, table.to_csv(index=False, float_format="%.6f"))
    log(text)
    log(f"\nper-image table: {out.relative_to(paths.project())}")
    if csv:
        log(f"wrote {csv}: the OOF as a submission at native size (score it: competition score {csv} "
            f"--truth {truth_csv or 'TRUTH.csv'})")
    if truth_csv:
        log(f"wrote {truth_csv}: the training truth in the competition's format")
    result = {"mean": float(scores.mean()), "native": None if nat is None else float(nat.mean()),
              "table": table, "produced": made, "path": out, "variant": variant}
    if suspects:
        from competition.ensemble import suspects as sus
        if top < 1:
            raise ConfigError(f"--top must be at least 1, got {top}")
        result["suspects"] = sus.run(exp.name, view, truth, adapter, comp.task, level, top, log)
    return result
