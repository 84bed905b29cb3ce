"""Had a run converged? One verdict from a fold's validation curve, and one for an experiment's folds.

A run is **still improving** when its best epoch lies in the last 10 % of the schedule and the last
part of the schedule (the last 20 %, at least 3 epochs) raised the best validation score by more than
:data:`RISE` over everything before it: more epochs would very likely help, so it says by how many to
extend it (``--set train.epochs=…`` continues the same run from ``last.pt``). A run that early
stopping ended, or whose curve is flat at the end, has converged; one of fewer than
:data:`MIN_CONVERGED` epochs that is not still improving is too short to tell. Pure functions of the history:
``train`` prints the verdict at the end of a fold and writes it into ``metrics.json`` (and W&B),
``competition runs`` shows it, ``competition oof`` sums it up over the experiment's folds.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import yaml

from competition import paths
from competition.io import ReadError, read_csv, read_text

RISE = 0.005  # half a Dice point: below it, the curve's last stretch is noise, not progress
LAST_SHARE = 0.1  # the best epoch in the last 10 % of the schedule
WINDOW_SHARE = 0.2  # the stretch whose gain is measured: the last 20 %, at least 3 epochs
MIN_CONVERGED = 10  # fewer epochs show no plateau: a dip at the last one is noise (dsb2018's 4-epoch plan)


@dataclass(frozen=True)
class Verdict:
    status: str  # "still_improving", "converged", "stopped_early" or "too_short"
    message: str
    best_epoch: int
    epochs_run: int
    epochs_planned: int
    gain: float  # the last stretch's gain of the best score over the epochs before it
    suggest_epochs: int | None = None  # for "still_improving": the train.epochs to extend to

    def as_dict(self) -> dict:
        return {"status": self.status, "message": self.message, "best_epoch": self.best_epoch,
                "epochs_run": self.epochs_run, "epochs_planned": self.epochs_planned, "gain": round(self.gain, 6),
                "suggest_epochs": self.suggest_epochs}


def best_epoch(scores: list[float]) -> int:
    """The first epoch (1-based) reaching the best score; 0 for no epoch."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i)) + 1 if scores else 0


def judge(scores: list[float], epochs_planned: int, stopped_early: bool = False) -> Verdict:
    """The verdict on one run from its per-epoch validation scores (epoch 1 first)."""
    scores = [float(s) for s in scores]
    n = len(scores)
    if n == 0:
        return Verdict("too_short", "no epoch was run", 0, 0, epochs_planned, 0.0)
    best = best_epoch(scores)
    window = max(3, math.ceil(WINDOW_SHARE * max(n, epochs_planned)))
    if stopped_early:
        return Verdict("stopped_early", f"stopped early at epoch {n} of {epochs_planned} (best epoch {best}): "
                                        f"converged", best, n, epochs_planned, 0.0)
    if n <= window:
        return Verdict("too_short", f"{n} epoch(s) are too few to tell whether the run converged", best, n,
                       epochs_planned, 0.0)
    gain = max(scores[-window:]) - max(scores[:-window])
    late = best > n - max(1, math.ceil(LAST_SHARE * n))  # the best epoch in the last 10 %
    if late and gain > RISE:
        suggest = 2 * max(n, epochs_planned)
        return Verdict("still_improving",
                       f"still improving at epoch {n} of {epochs_planned} (best epoch {best}; the last {window} epochs "
                       f"added {gain:+.4f}): raise train.epochs (extend this run with --set train.epochs={suggest})",
                       best, n, epochs_planned, gain, suggest)
    if n < MIN_CONVERGED:
        return Verdict("too_short", f"{n} epochs are too few to tell whether the run converged (best epoch {best})",
                       best, n, epochs_planned, gain)
    last = max(1, math.ceil(LAST_SHARE * n))
    why = (f"none of the last {last} epochs was better" if not late
           else f"the last {window} epochs added only {gain:+.4f}")
    return Verdict("converged", f"converged: best epoch {best} of {n} ({why})", best, n, epochs_planned, gain)


def summarize(verdicts: dict[int, Verdict]) -> str:
    """One line over an experiment's folds: how many are still improving, and what to do."""
    if not verdicts:
        return "no fold history to judge convergence"
    improving = sorted(k for k, v in verdicts.items() if v.status == "still_improving")
    if not improving:
        return f"converged: no fold of {len(verdicts)} was still improving at its last epoch"
    suggest = max(verdicts[k].suggest_epochs or 0 for k in improving)
    folds = ", ".join(map(str, improving))
    return (f"still improving: fold(s) {folds} of {len(verdicts)} had their best epoch at the end of the schedule "
            f"and were still rising; raise train.epochs (extend the runs with --set train.epochs={suggest})")


def of_run(rp: paths.RunPaths, metrics: dict | None = None) -> Verdict | None:
    """The verdict on a finished or interrupted fold from its files: ``history.csv`` and the schedule in
    ``config.yaml`` (runs written before the verdict existed included); None without a history.
    ``metrics``: its ``metrics.json`` when the caller has read it already."""
    if not rp.history.is_file():
        return None
    try:
        hist = read_csv(rp.history, "history file")
        cfg = yaml.safe_load(read_text(rp.config, "run config")) if rp.config.is_file() else {}
        if metrics is None:
            metrics = json.loads(read_text(rp.metrics, "metrics file")) if rp.metrics.is_file() else {}
    except (ReadError, json.JSONDecodeError, yaml.YAMLError):
        return None
    if "val_dice" not in hist.columns:
        return None  # a run that never validated (a full-data model) has no curve to judge
    train = ((cfg or {}).get("experiment") or {}).get("train") or {}
    planned = int(train.get("epochs") or len(hist))
    patience = train.get("early_stopping")
    scores = hist["val_dice"].astype(float).tolist()
    best = best_epoch(scores)
    stopped = bool(patience) and len(scores) < planned and len(scores) - best >= int(patience) \
        and bool(metrics)  # finished (metrics.json) before the schedule's end: early stopping ended it
    return judge(scores, planned, stopped)
