"""The ``competition tune`` verb: run (or resume) a study and write its tuned config, or report on one."""
from __future__ import annotations

from datetime import datetime

import optuna

from competition import paths
from competition.config import ConfigError
from competition.tune import space as sp
from competition.tune.report import report
from competition.tune.study import (
    Options,
    count_finished,
    default_study_name,
    open_storage,
    prepare,
    run,
    shown,
    storage_url,
    studies_dir,
)


def tune(exp: str, space: str, opts: Options = Options(), log=print) -> dict:
    """Run (or resume) the study until it holds ``opts.trials`` finished trials; write the tuned config
    and the report. Returns the report dict plus ``tuned`` (the config path, or None). ``opts.overrides``
    (``--set``) change the base experiment of every trial and are written into the tuned config."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    job, search, _ = prepare(exp, space, opts)
    st = run(job, opts.workers, log)
    out = report(st, studies_dir() / job.study, log)
    out["tuned"] = None
    if out.get("best"):
        b = st.best_trial
        values = {**dict(job.overrides),
                  **{k: sp.config_value(search.params[k], v) for k, v in b.params.items() if k in search.params}}
        comment = (f"Written by `competition tune` ({datetime.now():%Y-%m-%d %H:%M}) from study {job.study!r}\n"
                   f"({shown(job.storage)}): best of {count_finished(st)} finished trials = trial {b.number}, "
                   f"mean best\n"
                   f"val Dice {b.value:.4f} on fold(s) {list(job.folds)} after at most {search.budget.epochs} "
                   f"epochs.\nThe epoch budget and the search's `fixed` values are not carried over. Train it:\n"
                   f"  make train-all EXP={sp.tuned_config_path(exp).stem}")
        out["tuned"] = sp.write_tuned(exp, values, comment)
        log(f"wrote {out['tuned']}: make train-all EXP={out['tuned'].stem}")
    else:
        log("no completed trial yet, so no tuned config was written")
    return out


def show_report(exp: str, space: str, storage: str | None = None, study: str | None = None, log=print) -> dict:
    """``competition tune --report``: the table, importances and plots of an existing study."""
    name = study or default_study_name(exp, space)
    if storage is None and not paths.study_db(name).is_file():
        raise ConfigError(f"no study {name!r}: {paths.study_db(name)} does not exist; "
                         f"run `make tune EXP={exp}` first (or pass --storage / --study)")
    url = storage_url(name, storage)
    try:
        st = optuna.load_study(study_name=name, storage=open_storage(url))
    except KeyError:
        raise ConfigError(f"no study {name!r} in {shown(url)}; run `make tune EXP={exp}` first") from None
    return report(st, paths.study_dir(name), log)
