"""``competition runs``: every finished run in one table, from the files training leaves behind
(``runs/<exp>/fold<k>/metrics.json`` and ``config.yaml``), for teammates without W&B and for CI.

Columns: experiment, fold, the configuration keys whose values differ between the listed runs, best
validation Dice, the worst classes, epochs (best / run), whether the run had converged
(:mod:`competition.convergence`: ``NO`` = still improving at its last epoch) and training wall time.
``--plot`` draws the per-class validation Dice of each experiment (mean over its folds) as grouped bars in a PNG.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from competition import convergence, paths
from competition.config import ConfigError, read_yaml
from competition.io import ReadError, atomic_path, read_text

# Keys (and key prefixes) that differ between runs without changing what was learned.
IGNORED = ("name", "train.progress", "data.workers")
IGNORED_PREFIXES = ("tracking.",)


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists of mappings by index (``loss.terms.1.weight``, as search
    spaces name them); other lists become compact JSON so they compare and print as one value."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))  # an empty mapping adds no key
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            out[f"{key}.n"] = len(v)
            for i, x in enumerate(v):
                out.update(flatten(x, f"{key}.{i}."))
        elif isinstance(v, list):
            out[key] = json.dumps([float(f"{x:.4g}") if isinstance(x, float) else x for x in v],
                                  separators=(",", ":"))
        else:
            out[key] = v
    return out


def collect(pattern: str = "*") -> tuple[pd.DataFrame, dict[str, dict]]:
    """One row per finished fold (metrics.json present); also each run's per-class validation Dice."""
    rows, per_class = [], {}
    for rp in paths.finished_runs(pattern):
        mfile, exp, fold = rp.metrics, rp.experiment, rp.root.name
        try:
            m = json.loads(read_text(mfile, "metrics file"))
        except (ReadError, json.JSONDecodeError) as e:
            raise ConfigError(f"{mfile}: unreadable metrics file ({e}); "
                              f"delete the fold folder or re-train it") from None
        cfg = read_yaml(rp.config) if rp.config.is_file() else {}
        params = flatten((cfg or {}).get("experiment", {}))
        pc = m.get("val_dice_per_class") or {}
        worst = sorted(pc.items(), key=lambda kv: kv[1])[:3]
        rows.append({"experiment": exp, "fold": int(m.get("fold", fold.removeprefix("fold"))), **params,
                     "val_dice": m.get("val_dice"),
                     "worst_classes": ", ".join(f"{c} {v:.2f}" for c, v in worst),
                     "epochs": f"{m.get('best_epoch')}/{m.get('epochs_run')}",
                     "train_s": m.get("train_seconds"),
                     "converged": _status(rp, m),
                     **{f"oof_{k}": v for k, v in (m.get("oof_report") or {}).items()}})  # metric.report
        per_class[f"{exp}/{fold}"] = pc
    return pd.DataFrame(rows), per_class


def differing(df: pd.DataFrame, fixed_cols: list[str]) -> list[str]:
    """Configuration columns whose values are not the same in every listed run."""
    return [c for c in df.columns
            if c not in fixed_cols and c not in IGNORED and not c.startswith(IGNORED_PREFIXES)
            and df[c].astype(str).nunique(dropna=False) > 1]


SUMMARY = ["val_dice", "worst_classes", "epochs", "converged", "train_s"]


def _status(rp: paths.RunPaths, m: dict) -> str:
    """yes / NO (still improving: more epochs would help) / early (stopped early) / ? (too few epochs)."""
    v = (m.get("convergence") or {}).get("status") or getattr(convergence.of_run(rp, m), "status", None)
    return {"converged": "yes", "still_improving": "NO", "stopped_early": "early", "too_short": "?"}.get(v, "-")


def table(df: pd.DataFrame, sort: str = "val_dice", ascending: bool = False) -> pd.DataFrame:
    if df.empty:
        return df
    reported = [c for c in df.columns if c.startswith("oof_")]  # metric.report, beside the summary
    cols = ["experiment", "fold", *differing(df, ["experiment", "fold", *SUMMARY, *reported]), *SUMMARY, *reported]
    if sort not in df.columns:
        raise ConfigError(f"--sort {sort!r}: not a column; choose from {', '.join(cols)}")
    out = df.sort_values([sort, "experiment", "fold"], ascending=[ascending, True, True],
                         na_position="last")[cols].reset_index(drop=True)
    params = cols[2:len(cols) - len(SUMMARY) - len(reported)]
    out[params] = out[params].astype(object).where(out[params].notna(), "-")  # unset / null in that run
    return out


def plot(df: pd.DataFrame, per_class: dict[str, dict], path: Path) -> Path:
    """Grouped bars: one group per class, one bar per experiment (mean over its folds)."""
    import matplotlib  # noqa: PLC0415 (matplotlib: the plots extra; runs --plot only)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (matplotlib: the plots extra)

    exps = list(dict.fromkeys(df["experiment"]))
    frames = {e: pd.DataFrame([per_class[f"{e}/fold{f}"] for f in df.loc[df["experiment"] == e, "fold"]]).mean()
              for e in exps}
    classes = list(dict.fromkeys(c for s in frames.values() for c in s.index))
    n = len(exps)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(8.0, len(classes) * (0.35 + 0.18 * n)), 4.8))
    x = np.arange(len(classes))
    for i, e in enumerate(exps):
        s = frames[e].reindex(classes)
        folds = int((df["experiment"] == e).sum())
        ax.bar(x - 0.4 + width * (i + 0.5), s.values, width,
               label=f"{e} ({s.mean():.3f}, {folds} fold{'s' * (folds > 1)})")
    ax.set_xticks(x, classes, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("best validation Dice")
    ax.set_title("Best validation Dice per class, mean over folds (legend: mean over classes)", fontsize=10)
    ax.legend(fontsize=8, ncol=max(1, n // 12 + 1), loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)
    return path
