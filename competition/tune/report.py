"""What a study found: the trials table, parameter importances (Optuna's fANOVA), and Optuna's plots
(optimisation history, importances, intermediate values — the pruning picture) under
``runs/studies/<study>/``: PNG always (matplotlib), HTML as well when plotly is installed."""
from __future__ import annotations

import warnings
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from competition import paths
from competition.config import atomic_write_text
from competition.io import atomic_path


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    rows = []
    for t in study.get_trials(deepcopy=False):
        steps = max(t.intermediate_values) if t.intermediate_values else 0
        secs = ((t.datetime_complete - t.datetime_start).total_seconds()
                if t.datetime_complete and t.datetime_start else None)
        rows.append({"trial": t.number, "state": t.state.name.lower(), "value": t.value, "epochs": steps,
                     "seconds": round(secs, 1) if secs is not None else None, **t.params})
    return pd.DataFrame(rows)


def importances(study: optuna.Study) -> tuple[dict[str, float], str | None]:
    """Parameter importances, or ({}, why not) when the completed trials cannot support them."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(done) < 3:  # fANOVA on fewer points ranks noise
        return {}, f"importances need at least 3 completed trials ({len(done)} so far)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.importance.get_param_importances(study), None
    except Exception as e:  # e.g. every completed trial drew the same values
        return {}, f"importances unavailable: {e}"


def save_plots(study: optuna.Study, out: Path, have_importances: bool) -> list[Path]:
    import matplotlib  # noqa: PLC0415 (matplotlib: the plots extra; tune --report's plots only)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (matplotlib: the plots extra)
    from optuna.visualization import matplotlib as vm  # noqa: PLC0415 (imports matplotlib: the plots extra)

    plots = {"history": vm.plot_optimization_history, "intermediate": vm.plot_intermediate_values}
    if have_importances:
        plots["importances"] = vm.plot_param_importances
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        for name, fn in plots.items():
            ax = fn(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(9, 5)
            fig.tight_layout()
            with atomic_path(out / f"{name}.png") as tmp:
                fig.savefig(tmp, dpi=100, format="png")
            plt.close(fig)
            written.append(out / f"{name}.png")
        try:
            import plotly  # noqa: F401, PLC0415  optional, in no extra: interactive versions of the same plots
        except ImportError:
            return written
        # loading optuna.visualization loads its matplotlib module too (the plots extra), and it is wanted
        # only when the plotly probe above found plotly
        from optuna import visualization as vp  # noqa: PLC0415 (loads matplotlib: the plots extra)
        for name in plots:
            fig = getattr(vp, {"history": "plot_optimization_history", "intermediate": "plot_intermediate_values",
                               "importances": "plot_param_importances"}[name])(study)
            fig.write_html(out / f"{name}.html")
            written.append(out / f"{name}.html")
    return written


def report(study: optuna.Study, out: Path, log=print) -> dict:
    """Print the trials table, best trial and importances; write trials.csv and the plots."""
    df = trials_frame(study)
    if df.empty:
        log(f"study {study.study_name!r} has no trials yet")
        return {"trials": 0}
    counts = df["state"].value_counts().to_dict()
    log(f"study {study.study_name!r}: {len(df)} trials ({', '.join(f'{n} {s}' for s, n in counts.items())})")
    with pd.option_context("display.max_columns", None, "display.width", 200, "display.float_format", "{:.4g}".format):
        log(df.sort_values("value", ascending=False, na_position="last").to_string(index=False))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "trials.csv", df.to_csv(index=False))
    imp, why = importances(study)
    if imp:
        log("parameter importances (fANOVA): " + ", ".join(f"{k} {v:.2f}" for k, v in imp.items()))
    else:
        log(why)
    best = None
    if counts.get("complete"):
        b = study.best_trial
        best = {"number": b.number, "value": b.value, "params": b.params}
        log(f"best: trial {b.number}, mean val Dice {b.value:.4f}: "
            + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in b.params.items()))
    plots = save_plots(study, out, bool(imp)) if counts.get("complete") else []
    if plots:
        here = paths.project()
        log(f"plots: {', '.join(str(p.relative_to(here) if p.is_relative_to(here) else p) for p in plots)}")
    return {"trials": len(df), "states": counts, "importances": imp, "best": best, "plots": plots}
