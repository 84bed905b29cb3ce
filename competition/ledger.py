"""The submissions ledger (``submissions/ledger.csv``, committed) and the CV-vs-leaderboard view.

One row per submission written by ``competition submit`` / ``predict``; the leaderboard columns are
filled in later with ``competition lb SUBMISSION --public X [--private Y]``. ``competition lb`` prints
the table and draws ``submissions/cv_vs_lb.png``, so the team sees whether CV tracks the leaderboard.
"""
from __future__ import annotations

import fcntl
import io
import math
import os
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from competition import paths
from competition.config import CompetitionConfig, ConfigError, Recipe, atomic_write_text, load_competition
from competition.io import ReadError, atomic_path, read_csv

COLUMNS = ["time", "file", "competition", "ensemble", "ensemble_sha256", "members", "cv_native_in_sample",
           "cv_native_nested", "oof_in_sample", "oof_nested", "tta", "pseudo_labels", "excluded", "images", "seconds",
           "public_lb", "private_lb"]
# Absent from ledgers written before them (read as ""). ``excluded``: the recipe's data.exclude images as
# "<count> sha256:<hash>" ("0" for none; "" for a recipe older than the key), so two submissions whose
# CV left out different images are not compared as equals.
ADDED = ["cv_native_in_sample", "cv_native_nested", "pseudo_labels", "excluded"]
PLOT = "cv_vs_lb.png"


def ledger_path() -> Path:
    return paths.ledger()


def read(path: Path | None = None) -> pd.DataFrame:
    """The ledger (empty, with its columns, when there is none yet)."""
    path = path or ledger_path()
    if not path.is_file():
        return pd.DataFrame(columns=COLUMNS)
    try:
        df = read_csv(path, "submissions ledger")
    except ReadError as e:
        raise ConfigError(str(e)) from None
    for c in ADDED:
        if c not in df.columns:
            df[c] = ""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ConfigError(f"{path}: missing column(s) {missing}; a ledger has columns {COLUMNS}")
    return df


@contextmanager
def _locked():
    """Serialise read-modify-write of the ledger between processes (two submits at once) with a lock
    on the submissions folder itself, so no lock file is left behind."""
    folder = ledger_path().parent
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write(df: pd.DataFrame) -> None:
    buf = io.StringIO()
    df[COLUMNS + [c for c in df.columns if c not in COLUMNS]].to_csv(buf, index=False, lineterminator="\n")
    atomic_write_text(ledger_path(), buf.getvalue())


def _score(scores: dict, *keys: str) -> str:
    """A number from recipe scores, which may hold ``0.97`` or ``{"mean": 0.97, ...}``."""
    for key in keys:
        v = scores.get(key)
        if isinstance(v, dict):
            v = v.get("mean", v.get("dice"))
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return f"{float(v):.6f}"
    return ""


def describe_members(recipe: Recipe) -> str:
    """``baseline(f0,1,2)x0.60 + unet3plus(f0,1,2)x0.40``; per-class weights show their mean. A full-data
    member reads ``baseline(all-data; OOF f0,1,2)x0.60``: its one model saw every training image, its
    weight was chosen on the folds' OOF."""
    c = len(recipe.classes)
    w = np.array([np.broadcast_to(np.asarray(m.weights, float), (c,)) for m in recipe.members])
    w = w / np.where(w.sum(0) > 0, w.sum(0), 1)
    parts = []
    for m, row in zip(recipe.members, w):
        weight = f"{row[0]:.2f}" if np.allclose(row, row[0]) else f"~{row.mean():.2f}"
        folds = f"f{','.join(map(str, m.folds))}"
        parts.append(f"{m.experiment}({'all-data; OOF ' + folds if m.full_data else folds})x{weight}")
    return " + ".join(parts)


def excluded_cell(recipe: Recipe) -> str:
    """The ledger's ``excluded`` cell of a recipe (see ADDED); "+scored" when they were scored too."""
    x = recipe.excluded
    if x is None:
        return ""
    if not x.count:
        return "0"
    return f"{x.count} sha256:{x.sha256}{' +scored' if x.scored else ''}"


def row_for(result, recipe: Recipe, recipe_sha: str, competition: str) -> dict:
    """A ledger row for a submission just written (``result``: a predict.run.SubmitResult)."""
    try:
        file = Path(result.path).resolve().relative_to(paths.project().resolve()).as_posix()
    except ValueError:
        file = str(result.path)
    return {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "file": file, "competition": competition,
            "ensemble": recipe.name, "ensemble_sha256": recipe_sha, "members": describe_members(recipe),
            "cv_native_in_sample": _score(recipe.scores, "in_sample"),
            "cv_native_nested": _score(recipe.scores, "nested"),
            "oof_in_sample": _score(recipe.scores.get("at_oof_size") or {}, "in_sample"),
            "oof_nested": _score(recipe.scores.get("at_oof_size") or {}, "nested"),
            "tta": " ".join(f"{m.experiment}:{'+'.join(m.tta)}@{','.join(f'{s:g}' for s in m.tta_scales)}"
                            for m in recipe.members),
            "pseudo_labels": " ".join(recipe.pseudo_labels), "excluded": excluded_cell(recipe),
            "images": str(result.images),
            "seconds": f"{result.seconds:.1f}", "public_lb": "", "private_lb": ""}


def append(row: dict) -> None:
    with _locked():
        df = read()
        _write(pd.concat([df, pd.DataFrame([{c: str(row.get(c, "")) for c in COLUMNS}])], ignore_index=True))


def find(df: pd.DataFrame, submission: str) -> int:
    """The ledger row of a submission, by its path or file name."""
    name = Path(submission).name
    hits = [i for i, f in enumerate(df["file"]) if f == submission or Path(f).name == name]
    if not hits:
        listed = ", ".join(Path(f).name for f in df["file"][-5:]) or "(the ledger is empty)"
        raise ConfigError(f"{submission}: not in {ledger_path()}; recent submissions: {listed}")
    return hits[-1]


def record(submission: str, public: float | None = None, private: float | None = None) -> dict:
    """Fill in the leaderboard score(s) of a submission; returns its row."""
    for name, v in (("--public", public), ("--private", private)):
        if v is not None and not (math.isfinite(v) and 0 <= v <= 1):
            raise ConfigError(f"{name} {v}: a leaderboard Dice lies between 0 and 1")
    with _locked():
        df = read()
        i = find(df, submission)
        if public is not None:
            df.loc[i, "public_lb"] = f"{public:.6f}"
        if private is not None:
            df.loc[i, "private_lb"] = f"{private:.6f}"
        _write(df)
        return df.loc[i].to_dict()


def cv_table(df: pd.DataFrame) -> pd.DataFrame:
    """Submissions with CV (native-resolution when known, else at the OOF size; nested when known,
    else in-sample), leaderboard scores and the gap."""
    cols = ("cv_native_in_sample", "cv_native_nested", "oof_in_sample", "oof_nested", "public_lb", "private_lb")
    num = {c: pd.to_numeric(df[c], errors="coerce") if c in df else pd.Series(np.nan, index=df.index) for c in cols}
    in_sample = num["cv_native_in_sample"].fillna(num["oof_in_sample"])
    nested = num["cv_native_nested"].fillna(num["oof_nested"])
    cv = nested.fillna(in_sample)
    return pd.DataFrame({"file": [Path(f).name for f in df["file"]], "ensemble": df["ensemble"],
                         "cv_in_sample": in_sample, "cv_nested": nested,
                         "public": num["public_lb"], "private": num["private_lb"],
                         "public_minus_cv": num["public_lb"] - cv})


def format_table(df: pd.DataFrame) -> str:
    t = cv_table(df)
    if t.empty:
        return "no submissions in the ledger yet"
    text = t.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4f}")
    both = t.dropna(subset=["public"])
    cv = both["cv_nested"].fillna(both["cv_in_sample"]).dropna()
    if len(cv) >= 3:
        # scipy: the plots extra (installs.EXTRAS maps it there); only `lb`'s rank correlation needs it
        from scipy.stats import spearmanr  # noqa: PLC0415 (scipy: the plots extra)
        rho = spearmanr(cv, both.loc[cv.index, "public"]).statistic
        text += f"\nrank correlation CV vs public LB (Spearman, {len(cv)} submissions): {rho:.2f}"
    return text


def scatter(df: pd.DataFrame, path: Path | None = None) -> Path | None:
    """CV (x) against leaderboard (y), one labelled point per scored submission; None if none is scored."""
    t = cv_table(df)
    t["cv"] = t["cv_nested"].fillna(t["cv_in_sample"])
    t = t.dropna(subset=["cv"])
    if t["public"].isna().all() and t["private"].isna().all():
        return None
    import matplotlib  # noqa: PLC0415 (matplotlib: the plots extra; lb's plot only)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (matplotlib: the plots extra)
    fig, ax = plt.subplots(figsize=(6, 5))
    for col, marker in (("public", "o"), ("private", "s")):
        pts = t.dropna(subset=[col])
        if len(pts):
            ax.scatter(pts["cv"], pts[col], marker=marker, label=f"{col} LB")
            for _, r in pts.iterrows():
                ax.annotate(r["ensemble"], (r["cv"], r[col]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    scored = t.dropna(subset=["public", "private"], how="all")
    vals = pd.concat([scored["cv"], scored["public"], scored["private"]]).dropna()
    lo, hi = float(vals.min()), float(vals.max())
    pad = max(1e-3, (hi - lo) * 0.1)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8, label="LB = CV")
    ax.set_xlabel("CV Dice at native resolution (nested when known, else in-sample)")
    ax.set_ylabel("leaderboard Dice")
    ax.set_title("Does CV track the leaderboard?")
    ax.legend(fontsize=8)
    path = path or paths.submissions_dir() / PLOT
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------- #
# Kaggle upload
# --------------------------------------------------------------------------------------------- #
def kaggle_configured() -> bool:
    """The Kaggle CLI finds credentials in KAGGLE_USERNAME/KAGGLE_KEY or a kaggle.json (its own rules)."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    dirs = [os.environ.get("KAGGLE_CONFIG_DIR"), Path.home() / ".kaggle", Path.home() / ".config" / "kaggle"]
    return any(d and (Path(d) / "kaggle.json").is_file() for d in dirs)


def upload_recorded(submission: str, message: str | None = None) -> str:
    """Upload a submission listed in the ledger (its competition's slug comes from the row)."""
    df = read()
    row = df.loc[find(df, submission)]
    path = paths.project() / row["file"]
    if not path.is_file():
        raise ConfigError(f"{path}: the submission file is gone; nothing to upload")
    return upload(path, load_competition(row["competition"]), message or path.name)


def upload(submission: Path, comp: CompetitionConfig, message: str) -> str:
    """Submit the file with the Kaggle CLI; raises ValueError saying clearly why not when it cannot."""
    slug = comp.submission.kaggle
    if not slug:
        raise ConfigError(f"not uploaded: competition {comp.name!r} has no submission.kaggle (the Kaggle "
                         f"competition slug) in its config")
    exe = shutil.which("kaggle")
    if exe is None:
        raise ConfigError("not uploaded: the Kaggle CLI is not installed (pip install kaggle); upload "
                         f"{submission} by hand")
    if not kaggle_configured():
        raise ConfigError("not uploaded: the Kaggle CLI is installed but not configured (no KAGGLE_USERNAME/"
                         "KAGGLE_KEY and no kaggle.json in ~/.kaggle or KAGGLE_CONFIG_DIR); see "
                         "https://github.com/Kaggle/kaggle-api#api-credentials")
    r = subprocess.run([exe, "competitions", "submit", "-c", slug, "-f", str(submission), "-m", message],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise ConfigError(f"not uploaded: kaggle exited with {r.returncode}: {(r.stderr or r.stdout).strip()}")
    return r.stdout.strip()
