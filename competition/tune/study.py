"""The Optuna study: storage, sampler and pruner from the search YAML, and the worker loop (one
process, or N local processes on one study). The trial itself is ``objective.py``.

Storage is any Optuna RDB URL; the default is a SQLite file under ``runs/studies/`` so a killed study
resumes where it stopped. Trials heartbeat, so one killed mid-way is marked failed and its parameters
are retried. ``trials`` is the number of finished (complete or pruned) trials the study should hold:
running the same command again after it finished runs nothing; a larger number continues the search.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from competition import paths
from competition.config import ConfigError, SearchSpace, load_experiment, load_search, to_plain
from competition.tune import space as sp

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass(frozen=True)
class Job:
    """Everything a worker process needs (plain data: it crosses a process boundary)."""

    exp: str
    space: str
    study: str
    storage: str
    trials: int
    folds: tuple[int, ...]
    threads: int = 0  # torch threads per worker; 0 = torch's default


def studies_dir() -> Path:
    return paths.studies_dir()


def default_study_name(exp: str, space: str) -> str:
    return f"{Path(exp).stem}-{Path(space).stem}"


def storage_url(study: str, storage: str | None) -> str:
    if storage:
        return storage
    studies_dir().mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{paths.study_db(study).resolve()}"


def open_storage(url: str) -> optuna.storages.RDBStorage:
    # SQLite serialises writers: wait for the lock rather than fail when two workers write at once.
    kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    # Renamed in Optuna 4.9; both are marked experimental, which is not news to our users.
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=30, grace_period=120,
                                              heartbeat_stale_trial_callback=retry(max_retry=1))
    except Exception as e:  # a bad URL or an unreachable database: say which
        raise ConfigError(f"cannot open Optuna storage {url!r}: {type(e).__name__}: {e}") from None


def make_sampler(space: SearchSpace, offset: int) -> optuna.samplers.BaseSampler:
    # Seeded, offset by worker and by trials already run, so a resumed study or a second worker
    # does not replay the same random draws.
    seed = space.sampler.seed + offset
    if space.sampler.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=space.sampler.startup_trials)


def make_pruner(space: SearchSpace, n_folds: int) -> optuna.pruners.BasePruner:
    p = space.pruner
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_epochs)
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource, reduction_factor=p.reduction_factor,
                                              max_resource=space.budget.epochs * n_folds)
    return optuna.pruners.NopPruner()


def space_hash(space: SearchSpace) -> str:
    """What a study's trials are comparable under: params, fixed values and budget (not ``trials``)."""
    plain = to_plain(space)
    plain = {k: plain[k] for k in ("params", "fixed", "budget")}
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:16]


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def prepare(exp: str, space_name: str, trials: int | None, folds: list[int] | None, storage: str | None,
            study_name: str | None, workers: int = 1) -> tuple[Job, SearchSpace, optuna.Study]:
    """Validate everything and create (or reopen) the study before any worker starts."""
    space = load_search(space_name)
    base = to_plain(load_experiment(exp))
    sp.check(space, base, f"search space {space_name!r}")
    name = study_name or default_study_name(exp, space_name)
    paths.check_name("study", name)
    url = storage_url(name, storage)
    cores = os.cpu_count() or 1
    job = Job(exp=exp, space=space_name, study=name, storage=url, trials=trials or space.trials,
              folds=tuple(folds if folds is not None else space.budget.folds),
              threads=max(1, cores // workers) if workers > 1 else 0)
    study = optuna.create_study(study_name=name, storage=open_storage(url), direction="maximize",
                                load_if_exists=True, sampler=make_sampler(space, 0),
                                pruner=make_pruner(space, len(job.folds)))
    ident = {"experiment": exp, "space_hash": space_hash(space), "folds": list(job.folds)}
    old = {k: study.user_attrs.get(k) for k in ident}
    if all(v is None for v in old.values()):
        for k, v in ident.items():
            study.set_user_attr(k, v)
    elif old != ident:
        changed = [k for k in ident if old[k] != ident[k]]
        raise ConfigError(f"study {name!r} in {url} was started with a different {', '.join(changed)} "
                          f"({old} vs now {ident}); its trials would not be comparable: pass a new --study "
                          f"name (STUDY=...) or restore the search space")
    return job, space, study


def work(job: Job, index: int, n_trials: int) -> None:
    """One worker: up to ``n_trials`` trials, stopping early once the study holds ``job.trials``."""
    import torch
    if job.threads:
        torch.set_num_threads(job.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from competition.tune.objective import Objective
    space = load_search(job.space)
    storage = open_storage(job.storage)
    n_before = len(optuna.load_study(study_name=job.study, storage=storage).trials)
    study = optuna.load_study(study_name=job.study, storage=storage, pruner=make_pruner(space, len(job.folds)),
                              sampler=make_sampler(space, 1000 * index + n_before))
    stop = optuna.study.MaxTrialsCallback(job.trials, states=FINISHED)
    study.optimize(Objective(job, space, worker=index), n_trials=n_trials, callbacks=[stop], catch=())


def run(job: Job, workers: int, log=print) -> optuna.Study:
    """Run the remaining trials (split over ``workers`` local processes) and return the study."""
    study = optuna.load_study(study_name=job.study, storage=open_storage(job.storage))
    done = count_finished(study)
    remaining = max(0, job.trials - done)
    log(f"study {job.study!r} ({job.storage}): {done} finished trial(s) of {job.trials}; "
        f"running {remaining} more" + (f" on {workers} worker processes" if remaining and workers > 1 else ""))
    if remaining == 0:
        log(f"nothing to run: pass TRIALS={job.trials + max(1, job.trials // 2)} (--trials) to continue the search")
        return study
    if workers <= 1:
        work(job, 0, remaining)
        return study
    shares = [remaining // workers + (i < remaining % workers) for i in range(workers)]
    ctx = mp.get_context("spawn")  # torch and fork do not mix; spawn starts clean interpreters
    procs = [ctx.Process(target=work, args=(job, i, n), name=f"tune-worker-{i}") for i, n in enumerate(shares) if n]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    bad = [f"{p.name} (exit code {p.exitcode})" for p in procs if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"tuning worker(s) failed: {', '.join(bad)}; their trials are marked failed in "
                           f"{job.storage}; re-run the same command to continue")
    return study
