"""``competition tune``: an Optuna study over a YAML search space (``configs/search/<name>.yaml``).

    runs/studies/<study>.db                   the default storage (SQLite): re-run to resume
    runs/studies/<study>/trials.csv, *.png     the trials table and Optuna's plots
    runs/<study>-t<k>/fold<f>/                 each trial's training run (history, metrics, OOF)
    configs/experiments/<exp>-tuned.yaml       the best trial as a ready experiment

``command.py`` is the verb (run a study and write the tuned config, or report on one), ``space.py``
applies a search space to an experiment, ``objective.py`` is one trial, ``study.py`` the storage,
sampler, pruner and worker processes, ``report.py`` what the study found.
"""
from competition.tune.command import show_report, tune
from competition.tune.study import Job, Options

__all__ = ["tune", "show_report", "Job", "Options"]
