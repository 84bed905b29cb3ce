"""``competition oof EXP``: an experiment's OOF score — per class, per fold, mean — and a per-image table.

A fold that was trained (``best.pt`` present) but has no ``oof/`` (interrupted at the end, or OOF
deleted to save disk) gets one: its held-out images are predicted with ``best.pt`` and the run's own
resolved config (``runs/<exp>/fold<k>/config.yaml``), exactly as training's last step does.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from competition import oof, paths
from competition.config import ConfigError, ExperimentConfig, atomic_write_text, read_yaml, validate
from competition.ensemble.blend import blend_labels, truth_labels
from competition.ensemble.compact import chunk_images
from competition.metrics import dice_per_class


def predict_fold(exp_name: str, fold: int, comp, adapter, val_ids: list[str], log=print):
    """Write ``runs/<exp>/fold<k>/oof/`` from ``best.pt`` and the run's own resolved config."""
    from competition.models import build_model
    from competition.train import checkpoint as ckpt
    from competition.train import distributed as dd
    from competition.train.engine import Engine
    from competition.train.loop import write_oof

    run = paths.run_dir(exp_name, fold)
    cfg_path = run / "config.yaml"
    exp = validate(ExperimentConfig, read_yaml(cfg_path).get("experiment", {}), cfg_path)
    out_ch = comp.num_classes + (1 if comp.task == "multiclass" else 0)
    model = build_model(exp.model, out_ch, 1 if comp.image.channels == "grayscale" else 3)
    d = dd.setup()
    engine = Engine(model, None, exp, comp, dd.device_for(d), d)
    engine.model_for_eval().load_state_dict(ckpt.load(run / "best.pt")["model"])
    log(f"{exp_name} fold {fold}: no OOF; predicting its {len(val_ids)} held-out images with best.pt ...")
    return write_oof(engine, exp, comp, adapter, fold, val_ids)


def ensure_oof(exp_name: str, comp, adapter, folds: pd.DataFrame, log=print) -> list[int]:
    """Produce the OOF of every trained fold that lacks it; -> the folds produced. Untrained folds are
    left for :func:`competition.ensemble.store.open_experiment` to report."""
    made = []
    for k in sorted(set(folds["fold"])):
        d = paths.oof_dir(exp_name, k)
        if (d / "probs.npy").is_file() or not (paths.run_dir(exp_name, k) / "best.pt").is_file():
            continue
        predict_fold(exp_name, int(k), comp, adapter, folds.loc[folds["fold"] == k, "id"].astype(str).tolist(), log)
        made.append(int(k))
    return made


def per_image(view, truth, task: str, level: int, empty: float, budget_bytes: int = 128 << 20) -> np.ndarray:
    """(N, C) Dice of one experiment's OOF at ``probs >= level`` (multilabel) or argmax (multiclass)."""
    N, C = len(view), len(view.classes)
    B = chunk_images(C, int(np.prod(view.size)), 4, budget_bytes)
    out = np.empty((N, C))
    for s in range(0, N, B):
        e = min(N, s + B)
        P, T = view.read(s, e), truth.read(s, e)
        if task == "multilabel":
            out[s:e] = dice_per_class(P >= level, T, empty)
        else:
            k = np.arange(1, C + 1, dtype=np.uint8).reshape(1, C, 1, 1)
            lab = blend_labels([P], np.ones((C, 1), np.int64))[:, None]
            out[s:e] = dice_per_class(lab == k, truth_labels(T)[:, None] == k, empty)
    return out


def report(exp_name: str, view, scores: np.ndarray, level: int) -> tuple[str, pd.DataFrame]:
    """The printed summary and the per-image table (id, fold, mean, one column per class)."""
    classes = view.classes
    table = pd.DataFrame(scores, columns=classes)
    table.insert(0, "mean", scores.mean(1))
    table.insert(0, "fold", view.fold_of)
    table.insert(0, "id", view.ids)
    per_fold = table.groupby("fold")["mean"].agg(["size", "mean"]).rename(columns={"size": "images"})
    fmt = "{:.4f}".format
    lines = [f"{exp_name}: OOF Dice {scores.mean():.4f} over {len(view)} images x {len(classes)} classes "
             f"at {view.size[0]}x{view.size[1]} (threshold {(level - 0.5) / 255:.3f} of the uint8 OOF)", "",
             "per fold:", per_fold.to_string(float_format=fmt), "",
             "per class:", pd.Series(scores.mean(0), index=classes, name="dice").to_string(float_format=fmt), "",
             "worst images:",
             table.nsmallest(min(5, len(table)), "mean")[["id", "fold", "mean"]].to_string(
                 index=False, float_format=fmt)]
    return "\n".join(lines), table


def run(exp_name_or_path: str, suspects: bool = False, top: int = 20, log=print) -> dict:
    """Score an experiment's OOF (producing missing folds' OOF first); optionally list label suspects."""
    from competition.config import load_competition, load_experiment
    from competition.data.adapters import make_adapter
    from competition.ensemble import store
    from competition.folds import load_folds
    from competition.train.checkpoint import file_hash

    exp = load_experiment(exp_name_or_path)
    comp = load_competition(exp.competition)
    adapter = make_adapter(comp)
    folds = load_folds(comp, adapter)
    made = ensure_oof(exp.name, comp, adapter, folds, log)
    view = store.open_experiment(exp.name, folds, comp.classes, comp.task)
    truth = store.truth_cache(comp, adapter, view.ids, view.size, file_hash(paths.folds_file(comp.name)), log=log)
    # The same binarisation as training's OOF score in metrics.json: probs >= round(threshold * 255).
    level = int(round(exp.train.threshold * oof.QUANT))
    scores = per_image(view, truth, comp.task, level, comp.metric.empty_score)
    text, table = report(exp.name, view, scores, level)
    out = paths.project() / "runs" / exp.name / "oof_scores.csv"
    atomic_write_text(out, table.to_csv(index=False, float_format="%.6f"))
    log(text)
    log(f"\nper-image table: {out.relative_to(paths.project())}")
    result = {"mean": float(scores.mean()), "table": table, "produced": made, "path": out}
    if suspects:
        from competition.ensemble import suspects as sus
        if top < 1:
            raise ConfigError(f"--top must be at least 1, got {top}")
        result["suspects"] = sus.run(exp.name, view, truth, adapter, comp.task, level, top, log)
    return result
