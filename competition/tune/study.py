"""The Optuna study: storage, sampler and pruner from the search YAML, and the worker loop (one
process, or N local processes on one study). The trial itself is ``objective.py``.

Storage is any Optuna RDB URL; the default is a SQLite file under ``runs/studies/`` so a killed study
resumes where it stopped. ``postgresql://`` is mapped to the PostgreSQL driver that is installed (the
``postgres`` extra). Workers may start at the same moment on a fresh database: whoever loses the race to
create Optuna's tables retries and finds them. Trials heartbeat, so one killed mid-way is marked failed
and its parameters are retried. ``trials`` is the number of finished (complete or pruned) trials the
study should hold: running the same command again after it finished runs nothing; a larger number
continues the search.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import itertools
import json
import multiprocessing as mp
import os
import random
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState

from competition import paths
from competition.config import ConfigError, SearchSpace, load_experiment, load_search, to_plain
from competition.errors import UserError, describe_error
from competition.tune import space as sp
from competition.tune.objective import Objective, worker_name

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
    overrides: tuple = ()  # (dotted key, value) pairs from --set, applied to the base experiment


@dataclass(frozen=True)
class Options:
    """How ``competition tune`` runs a study (its command-line options); None takes the search space's
    value (``trials``, ``budget.folds``) or the default (the SQLite file, ``<exp>-<space>``)."""

    trials: int | None = None  # finished trials the study should hold
    folds: list[int] | None = None
    workers: int = 1  # local worker processes
    storage: str | None = None  # an Optuna RDB URL
    study: str | None = None
    overrides: dict | None = None  # --set: the base experiment of every trial


def studies_dir() -> Path:
    return paths.studies_dir()


def default_study_name(exp: str, space: str) -> str:
    return f"{Path(exp).stem}-{Path(space).stem}"


def storage_url(study: str, storage: str | None) -> str:
    if storage:
        return driver_url(storage)
    studies_dir().mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{paths.study_db(study).resolve()}"


# (module, SQLAlchemy driver name), preferred first: psycopg 3 is the maintained one.
POSTGRES_DRIVERS = (("psycopg", "psycopg"), ("psycopg2", "psycopg2"))
POSTGRES_EXTRA = "pip install -e '.[postgres]'"


def driver_url(url: str) -> str:
    """``postgresql://`` (and Heroku-style ``postgres://``) as users write them, with the installed
    driver named: SQLAlchemy maps the bare scheme to one fixed driver (psycopg2 in 2.0, psycopg 3 from
    2.1) whether or not that one is installed. URLs that name a driver, and other databases, pass unchanged."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        return url
    for module, driver in POSTGRES_DRIVERS:
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{driver}://{rest}"
    raise ConfigError(f"storage {shown(url)!r} needs a PostgreSQL driver, and none is installed: {POSTGRES_EXTRA}")


def shown(url: str) -> str:
    """The URL without its password: it is printed, and written into the tuned config's comment."""
    try:
        from sqlalchemy.engine import make_url  # noqa: PLC0415 (sqlalchemy: the postgres extra)
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: mask what looks like user:password@
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


CREATE_ATTEMPTS = 8


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's storage at ``url``, creating its tables on first use, race-free: see ``_lost_creation_race``."""
    # SQLite serialises writers: wait for the lock rather than fail when two workers write at once.
    kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    # Renamed in Optuna 4.9; both are marked experimental, which is not news to our users.
    retry = (getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
             or optuna.storages.RetryFailedTrialCallback)
    for attempt in itertools.count(1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=30, grace_period=120,
                                                  heartbeat_stale_trial_callback=retry(max_retry=1))
        except ImportError as e:  # Optuna's "Failed to import DB access module": say which, and the fix
            hint = POSTGRES_EXTRA if url.startswith("postgres") else "install the driver the URL names"
            raise ConfigError(f"cannot open Optuna storage {shown(url)!r}: its database driver is not installed "
                              f"({e.__cause__ or e}): {hint}") from None
        except Exception as e:  # a bad URL or an unreachable database: say which
            if attempt < CREATE_ATTEMPTS and _lost_creation_race(e):
                time.sleep(random.uniform(0.05, 0.2) * attempt)  # jitter: the losers do not collide again
                continue
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ConfigError(f"cannot open Optuna storage {shown(url)!r}: {type(e).__name__}: {first}") from None


def _lost_creation_race(e: BaseException) -> bool:
    """Optuna creates its tables, version row and alembic stamp without a lock, so two workers on a
    fresh database collide (PostgreSQL: a unique violation on ``pg_type`` or ``alembic_version``;
    SQLite: ``UNIQUE constraint failed`` or ``table ... already exists``). The loser's transaction is
    rolled back and what it collided with is what it was creating: trying again finds it."""
    from sqlalchemy import exc  # noqa: PLC0415 (sqlalchemy: the postgres extra)
    while e is not None:
        if isinstance(e, exc.IntegrityError) or (isinstance(e, exc.DatabaseError) and "already exists" in str(e)):
            return True
        e = e.__cause__
    return False


def sampler_seed(space: SearchSpace, index: int, n_before: int) -> int:
    """A pinned ``sampler.seed`` reproduces a single worker's study (offset by the local worker index and
    by the trials already run, so a resumed study does not replay draws). Unpinned, each worker process
    draws its own seed from its host, PID and start time: workers on many machines, each with index 0 and
    the same trials before them, would otherwise ask for the same trials."""
    if space.sampler.seed is not None:
        return space.sampler.seed + 1000 * index + n_before
    key = f"{worker_name()}:{time.time_ns()}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little")  # numpy seeds are 32-bit


def make_sampler(space: SearchSpace, seed: int) -> optuna.samplers.BaseSampler:
    if space.sampler.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # Constant liar: a running trial counts as a bad result, so parallel workers spread out.
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=space.sampler.startup_trials,
                                          constant_liar=True)


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


def prepare(exp: str, space_name: str, opts: Options = Options()) -> tuple[Job, SearchSpace, optuna.Study]:
    """Validate everything and create (or reopen) the study before any worker starts. ``opts.overrides``
    (``--set``) change the base experiment every trial starts from; they are part of the study's identity."""
    space = load_search(space_name)
    base = to_plain(load_experiment(exp, opts.overrides))
    sp.check(space, base, f"search space {space_name!r}")
    name = opts.study or default_study_name(exp, space_name)
    paths.check_name("study", name)
    url = storage_url(name, opts.storage)
    cores = os.cpu_count() or 1
    job = Job(exp=exp, space=space_name, study=name, storage=url, trials=opts.trials or space.trials,
              folds=tuple(opts.folds if opts.folds is not None else space.budget.folds),
              threads=max(1, cores // opts.workers) if opts.workers > 1 else 0,
              overrides=tuple(sorted((opts.overrides or {}).items())))
    # Two workers creating the same study: Optuna's load_if_exists turns the loser's duplicate into a load.
    study = optuna.create_study(study_name=name, storage=open_storage(url), direction="maximize",
                                load_if_exists=True, pruner=make_pruner(space, len(job.folds)))
    ident = {"experiment": exp, "space_hash": space_hash(space), "folds": list(job.folds)}
    if opts.overrides:  # absent for a study without --set, so studies created before this key still resume
        ident["overrides"] = {k: v for k, v in job.overrides}
    # Keys another worker has already written must match; the missing ones are written, then read back,
    # so of two workers that start together with different spaces at least one is refused.
    _check_identity(study, ident, name, url, only_set=True)
    for k, v in ident.items():
        if study.user_attrs.get(k) is None:
            study.set_user_attr(k, v)
    _check_identity(study, ident, name, url, only_set=False)  # user_attrs reads the storage again
    return job, space, study


def _check_identity(study: optuna.Study, ident: dict, name: str, url: str, only_set: bool) -> None:
    old = {k: study.user_attrs.get(k) for k in ident}
    changed = [k for k in ident if old[k] != ident[k] and not (only_set and old[k] is None)]
    if changed:
        raise ConfigError(f"study {name!r} in {shown(url)} was started with a different {', '.join(changed)} "
                          f"({old} vs now {ident}); its trials would not be comparable: pass a new --study "
                          f"name (STUDY=...) or restore the search space")


def work(job: Job, index: int, n_trials: int) -> None:
    """One worker: up to ``n_trials`` trials, stopping early once the study holds ``job.trials``."""
    if job.threads:
        torch.set_num_threads(job.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_search(job.space)
    storage = open_storage(job.storage)
    with storage_errors(job.storage):
        n_before = len(optuna.load_study(study_name=job.study, storage=storage).trials)
        seed = sampler_seed(space, index, n_before)
        study = optuna.load_study(study_name=job.study, storage=storage, pruner=make_pruner(space, len(job.folds)),
                                  sampler=make_sampler(space, seed))
        stop = optuna.study.MaxTrialsCallback(job.trials, states=FINISHED)
        study.optimize(Objective(job, space, worker=index, seed=seed), n_trials=n_trials, callbacks=[stop], catch=())


@contextlib.contextmanager
def storage_errors(url: str):
    """The database's own errors mid-study as one line naming the storage: a full disk as ENOSPC (SQLite
    says "database or disk is full"), a damaged file or a lost server as a ConfigError."""
    from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415 (sqlalchemy: the postgres extra)
    try:
        yield
    except SQLAlchemyError as e:
        first = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        if "disk is full" in first or "No space left" in first:
            path = url.split("///", 1)[-1] if url.startswith("sqlite") else shown(url)
            raise OSError(errno.ENOSPC, f"No space left on device (Optuna storage: {first})", path) from None
        raise ConfigError(f"Optuna storage {shown(url)!r} failed: {type(e).__name__}: {first}; if it is a "
                          f"damaged SQLite file, move it aside and run again (the study starts over)") from None


def run(job: Job, workers: int, log=print) -> optuna.Study:
    """Run the remaining trials (split over ``workers`` local processes) and return the study."""
    study = optuna.load_study(study_name=job.study, storage=open_storage(job.storage))
    done = count_finished(study)
    remaining = max(0, job.trials - done)
    log(f"study {job.study!r} ({shown(job.storage)}): {done} finished trial(s) of {job.trials}; "
        f"running {remaining} more" + (f" on {workers} worker processes" if remaining and workers > 1 else ""))
    if remaining == 0:
        log(f"nothing to run: pass TRIALS={job.trials + max(1, job.trials // 2)} (--trials) to continue the search")
        return study
    if workers <= 1:
        work(job, 0, remaining)
        return study
    shares = [remaining // workers + (i < remaining % workers) for i in range(workers)]
    ctx = mp.get_context("spawn")  # torch and fork do not mix; spawn starts clean interpreters
    procs = [ctx.Process(target=_worker, args=(job, i, n), name=f"tune-worker-{i}") for i, n in enumerate(shares) if n]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    bad = [f"{p.name} (exit code {p.exitcode})" for p in procs if p.exitcode != 0]
    if bad:
        raise UserError(f"tuning worker(s) failed: {', '.join(bad)} (each said why above); their trials are marked "
                        f"failed in {shown(job.storage)}; re-run the same command to continue")
    return study


def _worker(job: Job, index: int, n_trials: int) -> None:
    """A worker process: an expected failure is its one line and exit code 2, as the CLI's; a bug keeps
    its traceback."""
    try:
        work(job, index, n_trials)
    except (UserError, OSError) as e:
        print(f"error: tune-worker-{index}: {describe_error(e)}", file=sys.stderr, flush=True)
        sys.exit(2)
