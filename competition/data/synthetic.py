"""The embedded default competition: deterministic, X-ray-like, multilabel hand bones.

Written on first use into the competition's data root in the hand-bone polygon layout (so the
default exercises the polygon adapter end to end), with a hidden test truth CSV in the submission
format for ``competition score``. Each subject has ``images_per_subject`` images (left hand, then
mirrored right hands with a different pose and exposure); the subject folder is the group. Classes
overlap: carpal bones and radius/ulna are drawn over each other, as in real hand radiographs, and
``sesamoid`` is present in only some subjects so that rare-class handling has something to do.

Two class sets are drawn, chosen by the competition's ``classes`` (any subset, in any order):
``CLASSES``, the 12-class default (whole fingers, metacarpals as one class, a rare sesamoid), or
``HANDBONE_CLASSES``, the 29 classes of the real hand-bone competition (``finger-1`` ... ``finger-19``:
each phalanx and metacarpal its own thin capsule along the 5 fingers, tip to metacarpal, thumb first;
8 carpals as small overlapping ellipses; radius and ulna), for the full-size twin
``synthetic-hands-2048``. Both share the pose, the image model and the file layout; the 12-class
output is unchanged by the second set (the hand-bone set renders bone by bone, fast at 2048 px).

The data root is written only when it is absent, empty or carries this module's marker
(``.generated``, listing the files it wrote): a copied competition YAML that points a ``synthetic:``
section at real data is refused, and regenerating replaces only files the marker lists.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
import pandas as pd

from competition.config import CompetitionConfig
from competition.data.base import DataError
from competition.data.polygon_json import rasterize
from competition.io import ReadError, atomic_write_bytes, atomic_write_text, is_temp_name, read_text
from competition.rle import encode

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent generation is then the user's to avoid
    fcntl = None

CLASSES = ["thumb", "index", "middle", "ring", "little", "metacarpals",
           "scaphoid", "lunate", "trapezium", "radius", "ulna", "sesamoid"]
# The real hand-bone competition's 29 classes, in its order. The generator draws finger-1..3 as the
# thumb (distal phalanx, proximal phalanx, metacarpal), then 4 per finger (distal, middle, proximal
# phalanx, metacarpal) from the index to the little finger: a plausible reading of the numbers (a model
# only needs the names to be stable), not a claim about the real annotation protocol.
HANDBONE_CLASSES = ([f"finger-{i}" for i in range(1, 20)] +
                    ["Trapezium", "Trapezoid", "Capitate", "Hamate", "Scaphoid", "Lunate", "Triquetrum",
                     "Pisiform", "Radius", "Ulna"])
_DONE = ".generated"  # the marker: JSON with the spec, the files we wrote and whether all are in place
_LOCK = ".generated.lock"
_STAGING_PREFIX = ".generating."


def _capsule(a: np.ndarray, b: np.ndarray, r: float, n: int = 8) -> np.ndarray:
    """A stadium (bone shaft with rounded ends) from a to b with half-width r, as a polygon."""
    d = b - a
    ang = np.arctan2(d[1], d[0])
    t1 = np.linspace(ang + np.pi / 2, ang + 3 * np.pi / 2, n)
    t2 = np.linspace(ang - np.pi / 2, ang + np.pi / 2, n)
    r2 = r * 1.15  # bone ends (epiphyses) are wider than the shaft
    return np.concatenate([a + r2 * np.c_[np.cos(t1), np.sin(t1)], b + r2 * np.c_[np.cos(t2), np.sin(t2)]])


def _ellipse(c: np.ndarray, axes: tuple[float, float], angle: float, n: int = 20) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    p = np.c_[axes[0] * np.cos(t), axes[1] * np.sin(t)]
    ca, sa = np.cos(angle), np.sin(angle)
    return p @ np.array([[ca, sa], [-sa, ca]]) + c


# Per finger, thumb first: base (x, y), angle and segment length in unit coordinates; both hand
# drawings (12 classes and hand-bone's 29) use the same skeleton.
_FINGERS = ([(0.30, 0.62), (0.40, 0.47), (0.50, 0.45), (0.60, 0.47), (0.69, 0.52)],
            [-0.75, -0.15, 0.0, 0.13, 0.28], [0.09, 0.11, 0.12, 0.11, 0.09])


def _hand(rng: np.random.Generator, has_sesamoid: bool) -> list[tuple[str, np.ndarray]]:
    """Polygons of one left hand in unit coordinates (x right, y down), before pose and mirroring."""
    polys: list[tuple[str, np.ndarray]] = []
    width = rng.uniform(0.85, 1.15)
    length = rng.uniform(0.9, 1.1)
    bases, angles, lengths = _FINGERS
    for f, (name, (bx, by), ang, ln) in enumerate(zip(CLASSES[:5], bases, angles, lengths)):
        ang += rng.normal(0, 0.06)
        u = np.array([np.sin(ang), -np.cos(ang)])
        r = 0.016 * width * (1.2 if f == 0 else 1.0)
        # Metacarpal from the carpus up to the finger base.
        base = np.array([0.5 + (bx - 0.5) * width * 0.8, 0.70 + (by - 0.5) * 0.2])
        top = np.array([bx + (bx - 0.5) * 0.1 * width, by])
        polys.append(("metacarpals", _capsule(base, top, r * 1.1)))
        # Phalanges: several polygons share the finger's label (unioned by the adapter); the joints overlap.
        p = top + u * 0.012
        for k in range(2 if f == 0 else 3):
            seg = ln * length * (0.75 ** k) * rng.uniform(0.92, 1.08)
            q = p + u * seg
            polys.append((name, _capsule(p, q, r * (0.9 ** k))))
            p = q + u * 0.014
    polys.append(("scaphoid", _ellipse(np.array([0.42, 0.76]), (0.05 * width, 0.03), -0.5)))
    polys.append(("lunate", _ellipse(np.array([0.50, 0.78]), (0.04 * width, 0.032), 0.2)))
    polys.append(("trapezium", _ellipse(np.array([0.38, 0.72]), (0.035 * width, 0.028), -0.8)))
    polys.append(("radius", _capsule(np.array([0.45, 0.83]), np.array([0.44, 1.05]), 0.045 * width)))
    polys.append(("ulna", _capsule(np.array([0.565, 0.845]), np.array([0.58, 1.05]), 0.03 * width)))
    if has_sesamoid:
        polys.append(("sesamoid", _ellipse(np.array([0.29, 0.60]), (0.012, 0.009), 0.0)))
    return polys


# Carpals of a left hand (thumb side at small x): centre, half-axes (x scaled by the hand's width),
# angle. The distal row sits on the metacarpal bases, the proximal row on the radius and ulna; the
# pisiform lies over the triquetrum, as on a PA radiograph, so neighbours overlap.
_CARPALS = [("Trapezium", (0.385, 0.717), (0.030, 0.024), -0.8), ("Trapezoid", (0.445, 0.707), (0.024, 0.020), -0.3),
            ("Capitate", (0.505, 0.720), (0.026, 0.036), 0.0), ("Hamate", (0.573, 0.717), (0.028, 0.032), 0.3),
            ("Scaphoid", (0.432, 0.767), (0.042, 0.024), -0.5), ("Lunate", (0.500, 0.778), (0.030, 0.026), 0.2),
            ("Triquetrum", (0.563, 0.770), (0.026, 0.022), 0.4), ("Pisiform", (0.582, 0.757), (0.016, 0.014), 0.0)]


def _hand_29(rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    """Polygons of one left hand with the 29 hand-bone classes (``HANDBONE_CLASSES``), unit coordinates.

    The finger skeleton follows ``_hand`` (same bases, angles, segment lengths) with thinner bones,
    each phalanx and metacarpal labelled on its own; joints overlap a little, as annotations do.
    """
    polys: list[tuple[str, np.ndarray]] = []
    width = rng.uniform(0.85, 1.15)
    length = rng.uniform(0.9, 1.1)
    bases, angles, lengths = _FINGERS
    first = 1  # the finger-<n> number of this finger's distal phalanx
    for f, ((bx, by), ang, ln) in enumerate(zip(bases, angles, lengths)):
        ang += rng.normal(0, 0.06)
        u = np.array([np.sin(ang), -np.cos(ang)])
        r = 0.012 * width * (1.2 if f == 0 else 1.0)
        n_phalanges = 2 if f == 0 else 3
        # Tip first: finger-<first> is the distal phalanx, finger-<first + n_phalanges> the metacarpal.
        names = [f"finger-{first + j}" for j in range(n_phalanges + 1)]
        first += n_phalanges + 1
        base = np.array([0.5 + (bx - 0.5) * width * 0.8, 0.70 + (by - 0.5) * 0.2])
        top = np.array([bx + (bx - 0.5) * 0.1 * width, by])
        polys.append((names[-1], _capsule(base, top, r * 1.1)))
        p = top + u * 0.012
        for k in range(n_phalanges):  # proximal phalanx first
            seg = ln * length * (0.75 ** k) * rng.uniform(0.92, 1.08)
            q = p + u * seg
            polys.append((names[n_phalanges - 1 - k], _capsule(p, q, r * (0.9 ** k))))
            p = q + u * 0.014
    for name, (cx, cy), (ax, ay), ang in _CARPALS:
        c = np.array([0.5 + (cx - 0.5) * width, cy]) + rng.normal(0, 0.003, 2)
        polys.append((name, _ellipse(c, (1.2 * ax * width, 1.2 * ay), ang + rng.normal(0, 0.1))))
    polys.append(("Radius", _capsule(np.array([0.45, 0.83]), np.array([0.44, 1.05]), 0.045 * width)))
    polys.append(("Ulna", _capsule(np.array([0.565, 0.845]), np.array([0.58, 1.05]), 0.03 * width)))
    return polys


def _pose(polys, rng, size: int, mirror: bool):
    ang = rng.normal(0, 0.12)
    scale = rng.uniform(0.85, 1.0) * size
    shift = rng.normal(0, 0.03, 2) * size
    ca, sa = np.cos(ang), np.sin(ang)
    rot = np.array([[ca, sa], [-sa, ca]])
    out = []
    for name, p in polys:
        q = (p - 0.5) @ rot * scale + size / 2 + shift
        if mirror:
            q[:, 0] = size - q[:, 0]
        out.append((name, np.clip(q, 0, size - 1)))
    return out


def _render(polys, rng, size: int) -> np.ndarray:
    """Additive attenuation like a radiograph: soft tissue, then bones with a bright cortex."""
    s = 4  # supersampling bits for fillPoly
    img = np.zeros((size, size), np.float32)
    tissue = np.zeros_like(img)
    for _, p in polys:
        cv2.fillPoly(tissue, [np.round(p * 16).astype(np.int32)], 1.0, cv2.LINE_AA, shift=s)
    tissue = cv2.dilate(tissue, np.ones((max(3, size // 24),) * 2, np.uint8))
    img += 0.22 * cv2.GaussianBlur(tissue, (0, 0), size / 60)
    cortex_k = np.ones((max(2, size // 100),) * 2, np.uint8)
    for _, p in polys:
        b = np.zeros_like(img)
        cv2.fillPoly(b, [np.round(p * 16).astype(np.int32)], 1.0, cv2.LINE_AA, shift=s)
        rim = b - cv2.erode(b, cortex_k)
        img += rng.uniform(0.25, 0.35) * b + 0.2 * rim
    img = cv2.GaussianBlur(img, (0, 0), 0.6 + size / 512)
    return _expose(img, rng, size)


def _render_local(polys, rng, size: int) -> np.ndarray:
    """``_render``'s image model at a fraction of its cost at 2048 px (used for the hand-bone set):
    each bone is filled and eroded inside its own bounding box, and the smooth soft-tissue layer is
    built at <= 256 px and upsampled. Draws the same random numbers in the same order."""
    s = 4  # supersampling bits for fillPoly
    img = np.zeros((size, size), np.float32)
    f = max(1, size // 256)
    small = -(-size // f)
    tissue = np.zeros((small, small), np.float32)
    for _, p in polys:
        cv2.fillPoly(tissue, [np.round(p / f * 16).astype(np.int32)], 1.0, cv2.LINE_AA, shift=s)
    tissue = cv2.dilate(tissue, np.ones((max(3, small // 24),) * 2, np.uint8))
    tissue = cv2.GaussianBlur(tissue, (0, 0), small / 60)
    img += 0.22 * cv2.resize(tissue, (size, size), interpolation=cv2.INTER_LINEAR)
    k = max(2, size // 100)
    cortex_k = np.ones((k, k), np.uint8)
    for _, p in polys:
        (x0, y0), (x1, y1) = np.floor(p.min(0)).astype(int) - k - 2, np.ceil(p.max(0)).astype(int) + k + 3
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, size), min(y1, size)
        b = np.zeros((y1 - y0, x1 - x0), np.float32)
        cv2.fillPoly(b, [np.round((p - (x0, y0)) * 16).astype(np.int32)], 1.0, cv2.LINE_AA, shift=s)
        rim = b - cv2.erode(b, cortex_k)
        img[y0:y1, x0:x1] += rng.uniform(0.25, 0.35) * b + 0.2 * rim
    img = cv2.GaussianBlur(img, (0, 0), 0.6 + size / 512)
    return _expose(img, rng, size)


def _expose(img: np.ndarray, rng, size: int) -> np.ndarray:
    """The film: exposure, contrast and gamma vary per image; quantum noise and a smooth
    low-frequency field too. float32 attenuation -> uint8."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    field = 0.08 * np.sin(2 * np.pi * (rng.uniform(0.3, 1) * xx + rng.uniform(0, 1))) * yy
    img = img * rng.uniform(0.75, 1.25) + rng.uniform(0.02, 0.12) + field
    img = np.clip(img, 0, None) ** rng.uniform(0.7, 1.4)
    img += rng.normal(0, rng.uniform(0.015, 0.04), img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _layout(subjects: int, test_subjects: int, images_per_subject: int):
    """(subject index, split, subject, image index, stem) of every image, in generation order.

    Also rebuilds the file list of a folder generated before markers listed their files.
    """
    n_img = 0
    for s in range(subjects + test_subjects):
        for k in range(images_per_subject):
            yield s, "train" if s < subjects else "test", f"ID{s:03d}", k, f"image{n_img:05d}_{'LR'[k % 2]}"
            n_img += 1


def _layout_files(subjects: int, test_subjects: int, images_per_subject: int) -> list[str]:
    files = ["test_truth.csv", "sample_submission.csv"]
    for _, split, subject, _, stem in _layout(subjects, test_subjects, images_per_subject):
        files.append(f"{split}/DCM/{subject}/{stem}.png")
        if split == "train":
            files.append(f"train/outputs_json/{subject}/{stem}.json")
    return sorted(files)


def _write_image(root: Path, split: str, subject: str, stem: str, img, polys) -> list[str]:
    """Write one image (and, for training, its label file); returns their paths relative to ``root``."""
    ok, png = cv2.imencode(".png", img)
    if not ok:
        raise DataError(f"{root}: could not encode synthetic image {stem}.png")
    rel = [f"{split}/DCM/{subject}/{stem}.png"]
    atomic_write_bytes(root / rel[0], png.tobytes())
    if split == "train":
        ann = {"annotations": [{"label": n, "points": np.round(p, 2).tolist()} for n, p in polys]}
        rel.append(f"train/outputs_json/{subject}/{stem}.json")
        atomic_write_text(root / rel[1], json.dumps(ann))
    return rel


def class_set(cfg: CompetitionConfig) -> str:
    """``"default"`` (the 12 ``CLASSES``) or ``"handbone"`` (the 29 ``HANDBONE_CLASSES``): the set that
    holds every class of ``cfg``; a ValueError naming both sets otherwise."""
    if set(cfg.classes) <= set(CLASSES):
        return "default"
    if set(cfg.classes) <= set(HANDBONE_CLASSES):
        return "handbone"
    raise ValueError(f"classes: the synthetic generator draws either the default set {CLASSES} or the hand-bone "
                     f"set {HANDBONE_CLASSES} (any subset of one of them); not in the default set: "
                     f"{sorted(set(cfg.classes) - set(CLASSES))}, not in the hand-bone set: "
                     f"{sorted(set(cfg.classes) - set(HANDBONE_CLASSES))}")


def _check_classes(cfg: CompetitionConfig) -> None:
    class_set(cfg)


def generate(cfg: CompetitionConfig, root: Path) -> list[str]:
    """Write the whole dataset into ``root`` (deterministic in ``cfg.synthetic.seed``); returns the
    files written, relative to ``root``."""
    spec = cfg.synthetic
    handbone = class_set(cfg) == "handbone"
    rng = np.random.default_rng(spec.seed)
    truth_rows, sample_rows, written = [], [], []
    for s, split, subject, k, stem in _layout(spec.subjects, spec.test_subjects, spec.images_per_subject):
        if k == 0:
            anatomy_seed = rng.integers(1 << 31)
            has_sesamoid = rng.random() < 0.3
        img_rng = np.random.default_rng([spec.seed, s, k])
        anatomy = np.random.default_rng(anatomy_seed)
        polys = _hand_29(anatomy) if handbone else _hand(anatomy, has_sesamoid)
        polys = [(n, p) for n, p in _pose(polys, img_rng, spec.size, mirror=k % 2 == 1) if n in cfg.classes]
        img = (_render_local if handbone else _render)(polys, img_rng, spec.size)
        written += _write_image(root, split, subject, stem, img, polys)
        if split == "test":
            hw = (spec.size, spec.size)
            masks = rasterize([(cfg.classes.index(n), p) for n, p in polys], hw, hw, len(cfg.classes))
            for c, m in zip(cfg.classes, masks):
                truth_rows.append((f"{stem}.png", c, encode(m, cfg.submission.pixel_order), *hw))
                sample_rows.append((f"{stem}.png", c, ""))
    sub = cfg.submission
    cols = [sub.id_column, sub.class_column, sub.rle_column]
    atomic_write_text(root / "test_truth.csv",
                      pd.DataFrame(truth_rows, columns=cols + ["height", "width"]).to_csv(index=False))
    atomic_write_text(root / "sample_submission.csv", pd.DataFrame(sample_rows, columns=cols).to_csv(index=False))
    return sorted(written + ["test_truth.csv", "sample_submission.csv"])


# --------------------------------------------------------------------------------------------- #
# Writing into the data root without ever touching anyone else's files
# --------------------------------------------------------------------------------------------- #
def _stamp(cfg: CompetitionConfig) -> dict:
    return json.loads(json.dumps({"synthetic": cfg.synthetic.model_dump(), "classes": list(cfg.classes)}))


def _is_ours(name: str) -> bool:
    """Entries we leave in the data root besides the data: the marker, the lock, staging leftovers
    and the temp file of a marker write that was killed."""
    return name in (_DONE, _LOCK) or name.startswith(_STAGING_PREFIX) or _is_marker_temp(name)


def _is_marker_temp(name: str) -> bool:
    # competition.io names the temp ``.<target name>.<random>.tmp``; the marker's own name starts
    # with a dot, so its temps start with two.
    return name.startswith((f".{_DONE}.", f"{_DONE}.")) and is_temp_name(name)


def _foreign_error(cfg: CompetitionConfig, root: Path, entries: list[str]) -> DataError:
    shown = ", ".join(entries[:5]) + (f" ... ({len(entries)} in all)" if len(entries) > 5 else "")
    return DataError(
        f"{root}: refusing to generate the synthetic competition {cfg.name!r} here: the folder already holds "
        f"files it did not generate ({shown}; no {_DONE} marker). Nothing was changed. If this is real "
        f"data, remove the `synthetic:` section from the competition config; otherwise point data_root "
        f"to a new or empty folder.")


def _read_marker(path: Path) -> dict:
    """The marker as {"stamp", "complete", "files"}; older markers held only the stamp."""
    try:
        data = json.loads(read_text(path, "synthetic-data marker"))
    except (ReadError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable synthetic-data marker ({e}); if the folder holds only "
                        f"generated data, delete it and run again") from None
    if isinstance(data, dict) and set(data) == {"synthetic", "classes"}:  # before markers listed files
        spec = data["synthetic"]
        files = _layout_files(spec["subjects"], spec["test_subjects"], spec["images_per_subject"])
        return {"stamp": data, "complete": True, "files": files}
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, str) and _is_relative(f) for f in files):
        raise DataError(f"{path}: synthetic-data marker without a valid file list; if the folder holds only "
                        f"generated data, delete it and run again")
    return data


def _is_relative(rel: str) -> bool:
    p = PurePosixPath(rel)
    return bool(rel) and not p.is_absolute() and ".." not in p.parts


def _write_marker(root: Path, stamp: dict, files: list[str], complete: bool) -> None:
    body = {"generator": __name__, "complete": complete, "stamp": stamp, "files": sorted(files)}
    atomic_write_text(root / _DONE, json.dumps(body, indent=1, sort_keys=True))


def _existing_files(cfg: CompetitionConfig, root: Path) -> tuple[list[str], dict | None]:
    """(files we generated earlier, their marker) for a folder we may write into; refuses any other.

    A folder we may write into is absent, empty (but for our own lock and staging leftovers), or
    carries our marker. Checked under the lock, so no other generator changes it meanwhile.
    """
    if (root / _DONE).is_file() and not (root / _DONE).is_symlink():
        marker = _read_marker(root / _DONE)
        return marker["files"], marker
    with os.scandir(root) as it:
        foreign = sorted(e.name for e in it if not _is_ours(e.name))
    if foreign:
        raise _foreign_error(cfg, root, foreign)
    return [], None


@contextmanager
def _locked(root: Path):
    """An exclusive lock on ``root`` so two processes (DDP ranks, two runs) never generate at once."""
    with open(root / _LOCK, "a+b") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _prepare_root(cfg: CompetitionConfig, root: Path) -> None:
    """Create ``root`` when absent; refuse a data_root that is a file (or a dangling link) before anything."""
    if root.is_symlink() and not root.exists():
        raise DataError(f"{root}: data_root is a broken symlink; fix it or remove the link")
    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: data_root is a file, not a folder; point data_root to a folder")
    if not root.exists():
        root.mkdir(parents=True, exist_ok=True)  # another process may be creating it too
        return
    with os.scandir(root) as it:
        foreign = sorted(e.name for e in it if not _is_ours(e.name))
    if foreign and not (root / _DONE).is_file():
        raise _foreign_error(cfg, root, foreign)  # before the lock file is written into someone's data


def _install(root: Path, staging: Path, old: list[str], new: list[str], stamp: dict) -> None:
    """Move the staged files into ``root``, replacing only files listed as ours; the marker goes last."""
    olds, news = set(old), set(new)
    _check_targets(root, olds, news)
    # From here on a kill must leave a folder that says "ours, incomplete" and lists every file
    # either generation may have left, so the next run regenerates and can clean up after it.
    _write_marker(root, stamp, sorted(olds | news), complete=False)
    for rel in sorted(olds - news):
        _remove_ours(root, rel)
    for rel in new:
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, dst)
    _write_marker(root, stamp, new, complete=True)


def _check_targets(root: Path, olds: set[str], news: set[str]) -> None:
    """Refuse, before changing anything, to overwrite a file we did not write or to reach through a
    symlinked folder out of the data root (a ``train/DCM`` linked to real data, say)."""
    clash = sorted(f for f in news - olds if os.path.lexists(root / f))
    if clash:
        raise DataError(f"{root}: regenerating the synthetic data would overwrite file(s) it did not "
                        f"generate: {', '.join(clash[:5])}; move them away or point data_root to an empty "
                        f"folder. Nothing was changed.")
    real_root = root.resolve()
    for rel in sorted({str(PurePosixPath(f).parent) for f in olds | news}):
        real = (root / rel).resolve()
        if real != real_root and real_root not in real.parents:
            raise DataError(f"{root / rel}: links out of the data root (to {real}); the synthetic generator "
                            f"writes and deletes only inside {root}. Nothing was changed.")


def _remove_ours(root: Path, rel: str) -> None:
    """Delete one file we generated, then any folders it leaves empty (never a non-empty one)."""
    path = root / rel
    if path.is_symlink() or path.is_file():
        path.unlink()
    parent = path.parent
    while parent != root:
        try:
            parent.rmdir()  # fails, and stops here, when anything else is still inside
        except OSError:
            return
        parent = parent.parent


def _clean_staging(root: Path) -> None:
    # Staging folders and marker temps are only ever created by this module, and we hold the lock:
    # any found now were left by a killed run.
    with os.scandir(root) as it:
        entries = [(e.path, e.name, e.is_dir(follow_symlinks=False)) for e in it]
    for path, name, is_dir in entries:
        if is_dir and name.startswith(_STAGING_PREFIX):
            shutil.rmtree(path, ignore_errors=True)
        elif not is_dir and _is_marker_temp(name):
            os.unlink(path)


def ensure_generated(cfg: CompetitionConfig) -> Path:
    """Generate the data on first use; later calls only check the marker file.

    Generated data is only written into a folder that is absent, empty, or carries our marker; a
    folder with anyone else's files is refused with a DataError and left untouched. Regenerating
    replaces only the files our marker lists. The data is generated into a hidden staging folder and
    moved into place file by file, the marker last, so a run killed at any point never leaves a
    folder that looks complete.
    """
    root = cfg.root()
    stamp = _stamp(cfg)
    if _complete(root, stamp):
        return root
    _check_classes(cfg)
    _prepare_root(cfg, root)
    with _locked(root):
        old, marker = _existing_files(cfg, root)
        if marker is not None and marker.get("complete") and marker.get("stamp") == stamp:
            return root  # another process generated it while we waited for the lock
        _clean_staging(root)
        staging = Path(tempfile.mkdtemp(dir=root, prefix=_STAGING_PREFIX))
        try:
            print(f"generating the synthetic competition {cfg.name!r} into {root} ...", flush=True)
            new = generate(cfg, staging)
            _install(root, staging, old, new, stamp)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return root


def _complete(root: Path, stamp: dict) -> bool:
    """Whether ``root`` already holds a complete generation of exactly this spec (the fast path)."""
    marker = root / _DONE
    if not marker.is_file() or marker.is_symlink():
        return False
    try:
        data = _read_marker(marker)
    except DataError:
        return False  # reported, with its advice, by the full check under the lock
    return bool(data.get("complete")) and data.get("stamp") == stamp
