"""Where every artifact lives, derived from names alone (relative to the project folder, the cwd).

    folds/<competition>.csv              committed: the shared split
    runs/<exp>/fold<k>/                  gitignored: config.yaml, last.pt, best.pt, metrics.json,
                                         history.csv, oof/ (probs.npy, ids.json, meta.json)
    ensembles/<name>.yaml, .md           committed: ensemble recipes
    submissions/<time>-<name>.csv        gitignored; submissions/ledger.csv committed
"""
from __future__ import annotations

from pathlib import Path


def project() -> Path:
    return Path.cwd()


def folds_file(competition: str) -> Path:
    return project() / "folds" / f"{competition}.csv"


def run_dir(experiment: str, fold: int) -> Path:
    return project() / "runs" / experiment / f"fold{fold}"


def oof_dir(experiment: str, fold: int, variant: str = "") -> Path:
    """The plain OOF (``oof/``) or a TTA variant's (``oof-<variant>/``, see predict.tta.variant_name)."""
    return run_dir(experiment, fold) / (f"oof-{variant}" if variant else "oof")


def oof_variants(experiment: str, fold: int) -> list[str]:
    """The variants whose OOF store exists for one fold ("" = plain), plain first."""
    run = run_dir(experiment, fold)
    found = [p.name[4:] for p in run.glob("oof-*") if (p / "probs.npy").is_file()] if run.is_dir() else []
    return ([""] if (run / "oof" / "probs.npy").is_file() else []) + sorted(found)


def ensembles_dir() -> Path:
    return project() / "ensembles"


def submissions_dir() -> Path:
    return project() / "submissions"
