"""One trial = a real training run (``train.fit``) on each budget fold, named ``<study>-t<k>`` so its
run folder and W&B run (grouped by study) are its own. Validation Dice is reported every epoch; the
pruner may stop the trial there. A diverged or out-of-memory trial counts as pruned (bad
hyperparameters), not as a crash. Each trial records who ran it (``worker``: host:PID, and its
``sampler_seed``) and which completed trials the pruner last judged it against (``compared_with``):
with many workers on one study, that is how to see that they share one search."""
from __future__ import annotations

import os
import shutil
import socket

import numpy as np
import optuna
import torch
from optuna.trial import TrialState

from competition import paths
from competition.config import SearchSpace, load_experiment, to_plain
from competition.train.engine import TrainingDiverged
from competition.train.loop import fit
from competition.tune import space as sp


def trial_experiment_name(study: str, number: int) -> str:
    return f"{study}-t{number}"


def worker_name() -> str:
    """``host:PID``: who ran a trial (a trial attribute; :mod:`~competition.tune.study` also seeds samplers
    with it). Here, not in study.py, which imports this module: the one-way import keeps both at the top."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Objective:
    def __init__(self, job, space: SearchSpace, worker: int = 0, seed: int | None = None):
        self.job, self.space, self.worker, self.seed = job, space, worker, seed
        self.base = to_plain(load_experiment(job.exp, dict(job.overrides)))

    def __call__(self, trial: optuna.Trial) -> float:
        job, epochs = self.job, self.space.budget.epochs
        values = sp.suggest(trial, self.space.params)
        name = trial_experiment_name(job.study, trial.number)
        # Progress bars from parallel workers would interleave; the per-epoch log lines remain.
        overrides = {"train.epochs": epochs, "train.progress": False, **self.space.fixed, **values,
                     "name": name, "tracking.group": job.study, "tracking.job_type": "tune"}
        exp = sp.build(self.base, overrides, f"trial {trial.number} of study {job.study!r}")
        trial.set_user_attr("experiment", name)
        trial.set_user_attr("worker", worker_name())
        if self.seed is not None:
            trial.set_user_attr("sampler_seed", self.seed)
        tag = f"[trial {trial.number}{f' w{self.worker}' if self.worker else ''}]"
        log = lambda msg: print(f"{tag} {msg}", flush=True)  # noqa: E731
        log("params: " + ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items()))
        scores, finished = [], False
        try:
            for i, fold in enumerate(job.folds):
                m = fit(exp, fold, restart=True, log=log, on_epoch=self._reporter(trial, i, fold, epochs, log))
                scores.append(m["val_dice"])
            finished = True
        except (TrainingDiverged, torch.OutOfMemoryError) as e:
            trial.set_user_attr("stopped", f"{type(e).__name__}: {e}")
            log(f"pruned: {type(e).__name__}: {e}")
            raise optuna.TrialPruned(str(e)) from None
        finally:
            _tidy(name, job.folds[:len(scores) + 1], keep_best=finished)
        value = float(np.mean(scores))
        trial.set_user_attr("fold_scores", scores)
        log(f"finished: mean best val Dice {value:.4f} over fold(s) {list(job.folds)}")
        return value

    @staticmethod
    def _reporter(trial: optuna.Trial, i: int, fold: int, epochs: int, log):
        def on_epoch(epoch: int, val_dice: float) -> None:
            # One step per epoch across folds, so trials are compared at the same amount of training.
            trial.report(val_dice, i * epochs + epoch)
            # What the pruner compares against (completed trials, whichever worker ran them).
            done = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            trial.set_user_attr("compared_with", [t.number for t in done])
            if trial.should_prune():
                trial.set_user_attr("stopped", f"pruned at fold {fold}, epoch {epoch}")
                log(f"pruned at fold {fold}, epoch {epoch}: val Dice {val_dice:.4f} is below the pruner's bar")
                raise optuna.TrialPruned(f"fold {fold}, epoch {epoch}")
        return on_epoch


def _tidy(name: str, folds, keep_best: bool) -> None:
    """Trials never resume (a new trial is a new run), so last.pt is dead weight (~3x the model);
    a pruned trial's best.pt too. Histories, metrics and OOF stay for `competition runs`."""
    for fold in folds:
        rp = paths.run(name, fold)
        rp.last.unlink(missing_ok=True)
        shutil.rmtree(rp.top_dir, ignore_errors=True)
        if not keep_best:
            rp.best.unlink(missing_ok=True)


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
