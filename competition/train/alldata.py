"""``competition train --fold all-data`` (nnU-Net's ``fold all``; most winners' final submissions): one
model trained on every training image of the folds file, with the experiment's schedule, no
validation and no OOF, in ``runs/<exp>/all-data/``.

The epoch count: the rounded (half up) mean of the CV folds' ``best_epoch`` (their metrics.json), not
scaled for the extra data; ``train.epochs`` when no fold of the experiment has finished. The run
records the rule, and resuming keeps the count it started with. ``best.pt`` is the final weights (the
EMA's with ``train.ema``, the SWA average with ``train.swa``): there is no validation to choose by.
What needs validation is refused: the ``plateau`` scheduler, ``train.average_top_k``; so is
``data.pseudo``, whose sets are made per CV fold.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from competition import checkpoint as ckpt
from competition import paths, tracking
from competition.config import ConfigError, ExperimentConfig, atomic_write_text, load_competition, read_yaml
from competition.folds import load_folds
from competition.io import ReadError, read_json
from competition.train import initfrom


@dataclass(frozen=True)
class EpochPlan:
    """How many epochs the all-data run trains, and why (printed, and kept in config.yaml and metrics.json)."""

    epochs: int
    rule: str
    from_folds: dict[str, int]  # fold -> its best_epoch (str keys: as YAML and JSON both keep them)

    def as_dict(self) -> dict:
        return {"epochs": self.epochs, "rule": self.rule, "from_folds": dict(self.from_folds)}

    @classmethod
    def from_dict(cls, d: dict) -> EpochPlan:
        return cls(int(d["epochs"]), str(d["rule"]), {str(k): int(v) for k, v in (d.get("from_folds") or {}).items()})

    @property
    def line(self) -> str:
        return f"all-data: {self.epochs} epochs = {self.rule}"


def _span(folds: list[int]) -> str:
    """``0-4`` for a run of consecutive folds, else ``0, 2, 3``."""
    if len(folds) > 2 and folds == list(range(folds[0], folds[-1] + 1)):
        return f"{folds[0]}-{folds[-1]}"
    return ", ".join(map(str, folds))


def best_epochs(experiment: str, cv_folds: list[int]) -> dict[int, int]:
    """fold -> best_epoch of every CV fold of ``experiment`` whose metrics.json records one."""
    out = {}
    for k in cv_folds:
        f = paths.run(experiment, k).metrics
        if not f.is_file():
            continue
        try:
            be = read_json(f, "metrics file").get("best_epoch")
        except (ReadError, AttributeError):
            continue
        if isinstance(be, int) and not isinstance(be, bool) and be >= 1:
            out[k] = be
    return out


def plan_epochs(exp: ExperimentConfig, cv_folds: list[int]) -> EpochPlan:
    """The rule of the module docstring, applied to the folds' metrics.json as they are now."""
    found = best_epochs(exp.name, cv_folds)
    if not found:
        return EpochPlan(exp.train.epochs, f"train.epochs (no CV fold of {exp.name} has a metrics.json yet)", {})
    mean = sum(found.values()) / len(found)
    n = max(1, math.floor(mean + 0.5))
    rule = f"mean best epoch of folds {_span(sorted(found))} ({', '.join(str(found[k]) for k in sorted(found))})"
    missing = [k for k in cv_folds if k not in found]
    if missing:
        rule += f"; fold(s) {_span(missing)} not finished"
    return EpochPlan(n, rule, {str(k): v for k, v in sorted(found.items())})


def prepare(exp: ExperimentConfig, restart: bool) -> tuple[ExperimentConfig, EpochPlan]:
    """(the experiment as the all-data run trains it: ``train.epochs`` = the plan's, no early stopping;
    the plan). A run being resumed keeps the plan its config.yaml recorded."""
    rp = paths.all_data_run(exp.name)
    plan = None
    if not restart and rp.last.is_file() and rp.config.is_file():
        saved = read_yaml(rp.config).get("all_data")
        if isinstance(saved, dict) and isinstance(saved.get("epochs"), int):
            plan = EpochPlan.from_dict(saved)
    if plan is None:
        comp = load_competition(exp.competition)
        plan = plan_epochs(exp, sorted(int(k) for k in set(load_folds(comp)["fold"])))
    train = exp.train.model_copy(update={"epochs": plan.epochs, "early_stopping": None})
    return exp.model_copy(update={"train": train}), plan


def check(exp: ExperimentConfig) -> None:
    """Refuse what an all-data run cannot do: it has no validation and no fold."""
    if exp.scheduler.name == "plateau":
        raise ConfigError("scheduler.name: plateau steps on the validation score, and --fold all-data has no "
                          "validation; use cosine, onecycle or none for the all-data run (e.g. a variant "
                          f"experiment with `extends: {exp.name}`)")
    if exp.train.average_top_k:
        raise ConfigError("train.average_top_k picks epochs by their validation score, and --fold all-data has no "
                          "validation; set it to null for the all-data run (--set train.average_top_k=null)")
    if exp.data.pseudo is not None:
        raise ConfigError(f"data.pseudo: pseudo-label sets are made per CV fold (fold k's from fold k's models); "
                          f"--fold all-data has no fold to take {exp.data.pseudo.name!r} from; train the all-data "
                          f"model without data.pseudo (--set data.pseudo=null)")


def finish(run, train_seconds: float, plan: EpochPlan) -> dict:
    """best.pt = the final weights (or the SWA average), then metrics.json; ``run``: the FoldRun."""
    exp, state, rp, engine = run.exp, run.state, run.rp, run.engine
    model, best_is = engine.model_for_eval(), "final epoch" + (" (EMA weights)" if engine.ema is not None else "")
    if run.swa is not None and (avg := run.swa.finalize(run.train_loader, engine.device)) is not None:
        model, best_is = avg, "swa"
    ckpt.save({"model": model.state_dict(), "epoch": state.epoch, "config": run.run_cfg,
               **({"averaged": "swa"} if best_is == "swa" else {})}, rp.best)
    last = state.history[-1] if state.history else {}
    metrics = {"experiment": exp.name, "fold": paths.ALL_DATA, "competition": run.comp.name,
               "epochs": plan.epochs, "epochs_rule": plan.rule, "epochs_from_folds": plan.from_folds,
               "epochs_run": state.epoch, "best_is": best_is, "final_train_loss": last.get("train_loss"),
               "train_seconds": round(train_seconds, 2), "n_train": len(run.train_ds), "n_val": 0,
               **initfrom.recorded_in(run.run_cfg)}
    atomic_write_text(rp.metrics, pd.Series(metrics).to_json(indent=1))
    run.tracker.summary({k: v for k, v in metrics.items() if not isinstance(v, (dict, list))})
    tracking.log_fold(run.tracker, exp, paths.ALL_DATA, metrics)
    run.log(f"all-data: {state.epoch} epochs on {len(run.train_ds)} images; best.pt = the {best_is} -> {rp.root}")
    return metrics
