"""Where every artifact lives: the one owner of folder AND file names (relative to the project
folder, the cwd). No other module spells a file name of a run folder, a recipe or a submission.

    folds/<competition>.csv                      committed: the shared split
    runs/<exp>/fold<k>/                          gitignored, one :class:`RunPaths`: config.yaml, last.pt,
                                                 best.pt, metrics.json, history.csv, oof[-<variant>]/, .lock
    runs/<exp>/all-data/                         the full-data model (``--fold all-data``): the same files,
                                                 no OOF
    runs/<exp>/oof_scores[-<variant>].csv        `competition oof`; runs/<exp>/suspects/
    runs/<exp>/test[-<variant>]/                 saved test probabilities of a member (submit --save-probs)
    runs/_truth/<comp>-<key>/                    the truth store (original sizes, the store format)
    runs/studies/<study>.db, runs/studies/<study>/   Optuna storage and reports
    ensembles/<name>.yaml, .md                   committed: ensemble recipes
    submissions/<time>-<name>.csv                gitignored; submissions/ledger.csv committed

Names (experiment, recipe, study, competition) are checked here, once, with one rule, and every path
returned is proven to lie inside its root, so a name from YAML can never write elsewhere.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from competition.errors import ConfigError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+@-]*")
NAME_RULE = "letters, digits, '_', '-', '.', '+', '@' (not starting with '.' or '-'; it names a folder or file)"

# The files of one OOF store (runs/<exp>/fold<k>/oof[-<variant>]/).
OOF_PROBS, OOF_IDS, OOF_META = "probs.npy", "ids.json", "meta.json"  # meta.json marks a published store


def project() -> Path:
    return Path.cwd()


def is_safe_name(name) -> bool:
    """The one rule for names that become folder or file names: a single path component."""
    return isinstance(name, str) and bool(NAME.fullmatch(name)) and ".." not in name


def check_name(kind: str, name: str) -> str:
    """``name`` if it is a safe single path component, else a ConfigError naming ``kind``."""
    if not is_safe_name(name):
        raise ConfigError(f"{kind} name {name!r}: use {NAME_RULE}")
    return name


def inside(root: Path, path: Path) -> Path:
    """``path``, proven to lie inside ``root`` (resolving symlinks and ``..``)."""
    r, p = Path(root).resolve(), Path(path).resolve()
    if p != r and r not in p.parents:
        raise ConfigError(f"{path} lies outside {root}; refusing to write there")
    return Path(path)


def runs_root() -> Path:
    return project() / "runs"


def folds_file(competition: str) -> Path:
    return inside(project() / "folds", project() / "folds" / f"{check_name('competition', competition)}.csv")


def experiment_dir(experiment: str) -> Path:
    return inside(runs_root(), runs_root() / check_name("experiment", experiment))


# The run trained on every training image of the folds file (nnU-Net's ``fold all``): the value ``--fold``
# takes and the name of its run folder, ``runs/<exp>/all-data/``.
ALL_DATA = "all-data"


def fold_label(fold: int | str) -> str:
    """The name of a run folder: ``fold<k>`` for a CV fold, ``all-data`` for the full-data run."""
    return ALL_DATA if fold == ALL_DATA else f"fold{int(fold)}"


@dataclass(frozen=True)
class RunPaths:
    """Every file of one training run folder: ``runs/<exp>/fold<k>/`` (``fold`` an int) or
    ``runs/<exp>/all-data/`` (``fold`` is :data:`ALL_DATA`)."""

    experiment: str
    fold: int | str

    @property
    def label(self) -> str:
        """``fold<k>`` or ``all-data``: the folder's name, and how logs, W&B and recipes name the run."""
        return fold_label(self.fold)

    @property
    def is_all_data(self) -> bool:
        return self.fold == ALL_DATA

    @property
    def root(self) -> Path:
        return experiment_dir(self.experiment) / self.label

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def last(self) -> Path:
        return self.root / "last.pt"

    @property
    def best(self) -> Path:
        return self.root / "best.pt"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def history(self) -> Path:
        return self.root / "history.csv"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def top_dir(self) -> Path:
        """The k best epochs' weights kept for ``train.average_top_k``."""
        return self.root / "top"

    def top(self, epoch: int) -> Path:
        return self.top_dir / f"epoch{int(epoch):04d}.pt"

    def oof(self, variant: str = "") -> Path:
        """The plain OOF (``oof/``) or a TTA variant's (``oof-<variant>/``, see predict.tta.variant_name)."""
        if variant:
            check_name("OOF variant", variant)
        return self.root / (f"oof-{variant}" if variant else "oof")

    def oof_variants(self) -> list[str]:
        """The variants whose OOF store exists ("" = plain), plain first."""
        if not self.root.is_dir():
            return []
        found = [p.name[4:] for p in self.root.glob("oof-*") if (p / OOF_META).is_file()]
        return ([""] if (self.oof() / OOF_META).is_file() else []) + sorted(found)

    @classmethod
    def of(cls, folder: Path) -> "RunPaths | None":
        """The reverse lookup: a ``runs/<exp>/fold<k>`` or ``runs/<exp>/all-data`` folder -> its RunPaths
        (None if not one)."""
        folder = Path(folder)
        name = folder.name
        if not NAME.fullmatch(folder.parent.name):
            return None
        if name == ALL_DATA:
            return cls(folder.parent.name, ALL_DATA)
        if not (name.startswith("fold") and name[4:].isdigit()):
            return None
        return cls(folder.parent.name, int(name[4:]))


def run(experiment: str, fold: int | str) -> RunPaths:
    """A CV fold's run folder (``fold`` a number) or the full-data run's (``fold`` = :data:`ALL_DATA`)."""
    check_name("experiment", experiment)
    return RunPaths(experiment, ALL_DATA if fold == ALL_DATA else int(fold))


def all_data_run(experiment: str) -> RunPaths:
    """``runs/<exp>/all-data/``: the experiment trained on every training image (no OOF)."""
    return run(experiment, ALL_DATA)


def trained_folds(experiment: str) -> dict[int, RunPaths]:
    """fold -> RunPaths for every CV fold of the experiment with a ``best.pt`` (never the all-data run)."""
    root = experiment_dir(experiment)
    out = {}
    for d in sorted(root.glob("fold*")) if root.is_dir() else []:
        rp = RunPaths.of(d)
        if rp is not None and rp.best.is_file():
            out[rp.fold] = rp
    return out


def finished_runs(pattern: str = "*") -> list[RunPaths]:
    """Every CV fold's run folder under runs/ with a ``metrics.json``, experiments matching the glob
    (the all-data runs have no validation score to list)."""
    out = []
    for d in sorted(runs_root().glob(f"{pattern}/fold*")):
        rp = RunPaths.of(d)
        if rp is not None and rp.metrics.is_file():
            out.append(rp)
    return out


# -- kept for the callers that only need a folder ------------------------------------------------
def run_dir(experiment: str, fold: int) -> Path:
    return run(experiment, fold).root


def oof_dir(experiment: str, fold: int, variant: str = "") -> Path:
    return run(experiment, fold).oof(variant)


def oof_variants(experiment: str, fold: int) -> list[str]:
    return run(experiment, fold).oof_variants()


def test_store(experiment: str, variant: str = "") -> Path:
    """``runs/<exp>/test[-<variant>]/``: a member's saved test-set probabilities (``submit --save-probs``),
    in the OOF store's format."""
    if variant:
        check_name("TTA variant", variant)
    return experiment_dir(experiment) / (f"test-{variant}" if variant else "test")


def pseudo_dir(name: str) -> Path:
    """``runs/_pseudo/<name>/``: a pseudo-label set (``competition pseudo``), one store per fold."""
    return runs_root() / "_pseudo" / check_name("pseudo-label set", name)


def export_dir(recipe: str, fmt: str) -> Path:
    """``runs/_export/<recipe>-<format>/``: ``competition export``'s default output."""
    return runs_root() / "_export" / f"{check_name('ensemble', recipe)}-{fmt}"


def pseudo_store(name: str, fold: int) -> Path:
    """``runs/_pseudo/<name>/fold<k>/``: fold k's pseudo-labels, from the recipe's fold-k models only."""
    return pseudo_dir(name) / f"fold{int(fold)}"


def oof_scores(experiment: str, variant: str = "") -> Path:
    return experiment_dir(experiment) / f"oof_scores{f'-{variant}' if variant else ''}.csv"


def suspects_dir(experiment: str) -> Path:
    return experiment_dir(experiment) / "suspects"


def truth_dir() -> Path:
    return runs_root() / "_truth"


def truth_store(competition: str, key: str) -> Path:
    """``runs/_truth/<comp>-<key>/``: the training truth at the original sizes, in the store format."""
    return truth_dir() / f"{check_name('competition', competition)}-{check_name('truth key', key)}"


def studies_dir() -> Path:
    return runs_root() / "studies"


def study_db(study: str) -> Path:
    return studies_dir() / f"{check_name('study', study)}.db"


def study_dir(study: str) -> Path:
    return studies_dir() / check_name("study", study)


def ensembles_dir() -> Path:
    return project() / "ensembles"


def recipe(name: str) -> Path:
    return inside(ensembles_dir(), ensembles_dir() / f"{check_name('ensemble', name)}.yaml")


def recipe_report(name: str) -> Path:
    return inside(ensembles_dir(), ensembles_dir() / f"{check_name('ensemble', name)}.md")


def submissions_dir() -> Path:
    return project() / "submissions"


def submission(name: str, stamp: str, n: int = 1) -> Path:
    """``submissions/<stamp>-<name>[-n].csv``."""
    check_name("ensemble", name)
    return inside(submissions_dir(), submissions_dir() / f"{stamp}-{name}{'' if n == 1 else f'-{n}'}.csv")


def ledger() -> Path:
    return submissions_dir() / "ledger.csv"
