"""``competition oof EXP --suspects``: where the OOF most confidently disagrees with the truth.

Report 000 found swapped normal/disease labels only by reading failures. Here every image x class
gets a *suspicion* = (1 - Dice) x the mean confidence |2p - 1| of the model on the pixels where its
prediction and the truth disagree: a confident model that disagrees over a large area points at the
label rather than at the model. For each suspect we also name the class whose truth the prediction
matches best (Dice of this class's prediction against every class's truth), which is how swapped
labels show up (only when that match is at least 0.5 and beats the class's own Dice). Ties (e.g.
classes missed outright with full confidence) go to the larger disagreeing area. The top N are
written as image | truth | prediction panels.

``--write-exclude FILE`` writes the top N's images (each once, most suspect first) as a ``data.exclude``
CSV (``id,reason``), for a person to review before pointing ``data.exclude`` at it.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from competition import paths, viz
from competition.config import ConfigError, atomic_write_text
from competition.cv.blend import blend_labels, truth_labels


def _masks(P: np.ndarray, T: np.ndarray, task: str, level: int) -> tuple[np.ndarray, np.ndarray]:
    if task == "multilabel":
        return P >= level, T
    C = P.shape[1]
    k = np.arange(1, C + 1, dtype=np.uint8).reshape(1, C, 1)
    lab = blend_labels([P], np.ones((C, 1), np.int64))
    return lab[:, None] == k, truth_labels(T)[:, None] == k


def _image(images, i: int):
    """(P, T): one image's OOF and truth as (1, C, H * W) (the original size)."""
    rows, truth = images.dense(i)
    C = truth.shape[0]
    return rows[0].reshape(1, C, -1), truth.reshape(1, C, -1)


def scores(images, task: str, level: int) -> pd.DataFrame:
    """One row per image x class: dice, confidence, suspicion, best-matching truth class and its Dice."""
    view = images.members[0]
    N, C = len(view), len(view.classes)
    rows = []
    for s in range(N):
        e = s + 1
        P, T = _image(images, s)
        pred, T = _masks(P, T, task, level)
        conf = np.abs(P.astype(np.float32) * (2 / 255) - 1)  # |2p - 1|
        wrong = pred ^ T
        n_wrong = np.count_nonzero(wrong, axis=-1)
        mean_conf = np.where(n_wrong > 0, (conf * wrong).sum(-1) / np.maximum(n_wrong, 1), 0.0)
        ps, ts = np.count_nonzero(pred, -1), np.count_nonzero(T, -1)
        cross = np.matmul(pred.astype(np.float32), T.astype(np.float32).transpose(0, 2, 1))  # (b, C pred, C truth)
        denom = ps[:, :, None] + ts[:, None, :]
        cross_dice = np.where(denom > 0, 2 * cross / np.maximum(denom, 1), 0.0)  # empty vs empty: no match
        own = np.where(ps + ts > 0, np.diagonal(cross_dice, axis1=1, axis2=2), 1.0)
        match = cross_dice.argmax(-1)
        for i in range(e - s):
            for c in range(C):
                best = cross_dice[i, c, match[i, c]]
                other = match[i, c] != c and best >= 0.5 and best > own[i, c]
                rows.append((view.ids[s + i], int(view.fold_of[s + i]), view.classes[c], own[i, c],
                             mean_conf[i, c], (1 - own[i, c]) * mean_conf[i, c],
                             view.classes[match[i, c]] if other else "", best if other else np.nan,
                             int(n_wrong[i, c]), int(ps[i, c]), int(ts[i, c])))
    df = pd.DataFrame(rows, columns=["id", "fold", "class", "dice", "confidence", "suspicion", "matches_truth_of",
                                     "matches_dice", "wrong_pixels", "pred_pixels", "truth_pixels"])
    return df.sort_values(["suspicion", "wrong_pixels"], ascending=False, kind="stable").reset_index(drop=True)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")[:80] or "x"


def run(exp_name: str, images, adapter, task: str, level: int, top: int, log=print) -> pd.DataFrame:
    view = images.members[0]
    df = scores(images, task, level)
    # What "low" means for this class in this fold: its mean Dice over the fold's scored images.
    fold_mean = df.groupby(["fold", "class"])["dice"].transform("mean")
    df.insert(df.columns.get_loc("dice") + 1, "fold_class_dice", fold_mean)
    top_df = df[df["suspicion"] > 0].head(top)
    folder = paths.suspects_dir(exp_name)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    row_of = {i: r for r, i in enumerate(view.ids)}
    pngs = []
    for rank, r in enumerate(top_df.to_dict("records"), 1):
        row = row_of[r["id"]]
        P, T = _image(images, row)
        pred, tr = _masks(P, T, task, level)
        shown = [view.classes.index(r["class"])] + \
            ([view.classes.index(r["matches_truth_of"])] if r["matches_truth_of"] else [])
        h, w = view.original_sizes[r["id"]]
        panel = viz.panels(adapter.load_image(r["id"]), tr[0, shown].reshape(-1, h, w).astype(np.uint8),
                           pred[0, shown].reshape(-1, h, w).astype(np.uint8))
        png = folder / f"{rank:03d}-{_safe(r['id'])}-{_safe(r['class'])}.png"
        cv2.imwrite(str(png), cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))
        pngs.append(png.name)
    top_df = top_df.assign(png=pngs)
    atomic_write_text(folder / "suspects.csv", top_df.to_csv(index=False, float_format="%.4f"))
    if len(top_df):
        cols = ["id", "class", "dice", "confidence", "suspicion", "matches_truth_of"]
        log(f"\nlabel suspects (most confident disagreement first; image | truth | prediction panels in "
            f"{folder.relative_to(paths.project())}/):")
        log(top_df[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    else:
        log("\nno suspects: the OOF agrees with the truth everywhere")
    return top_df


def check_exclude_target(path: str | Path, force: bool) -> None:
    """Refuse, before any work, a ``--write-exclude`` file that exists (unless ``force``) or has no folder:
    a reviewed exclusion list must never be overwritten by a fresh, unreviewed one."""
    p = Path(path)
    if p.exists() and not force:
        raise ConfigError(f"--write-exclude {path}: the file exists (perhaps a reviewed list data.exclude points "
                          f"at); pass --force to overwrite it, or name a new file")
    if p.is_dir():
        raise ConfigError(f"--write-exclude {path}: is a folder; expected a CSV file path")
    if not p.resolve().parent.is_dir():
        raise ConfigError(f"--write-exclude {path}: the folder {p.resolve().parent} does not exist")


def _reason(rank: int, r: dict) -> str:
    swap = (f", matches the truth of {r['matches_truth_of']} (dice {r['matches_dice']:.2f})"
            if r["matches_truth_of"] else "")
    return (f"suspect rank {rank}: class {r['class']} dice {r['dice']:.2f} vs fold mean {r['fold_class_dice']:.2f}, "
            f"confidence {r['confidence']:.2f}, suspicion {r['suspicion']:.3f}{swap}")


def exclude_rows(top_df: pd.DataFrame) -> pd.DataFrame:
    """The suspects table as ``data.exclude`` rows: each image once, at its best rank, with the reasons
    of all its suspect classes ("; "-separated)."""
    reasons: dict[str, list[str]] = {}
    for rank, r in enumerate(top_df.to_dict("records"), 1):
        reasons.setdefault(str(r["id"]), []).append(_reason(rank, r))
    return pd.DataFrame({"id": list(reasons), "reason": ["; ".join(v) for v in reasons.values()]})


def write_exclude(path: str | Path, top_df: pd.DataFrame, force: bool) -> int:
    """Write the suspects' images as an ``id,reason`` CSV (atomically); -> the number of images."""
    check_exclude_target(path, force)
    rows = exclude_rows(top_df)
    atomic_write_text(path, rows.to_csv(index=False, lineterminator="\n"))
    return len(rows)
