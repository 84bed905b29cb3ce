"""The embedded default competition: deterministic, X-ray-like, multilabel hand bones.

Written on first use into the competition's data root in the hand-bone polygon layout (so the
default exercises the polygon adapter end to end), with a hidden test truth CSV in the submission
format for ``competition score``. Each subject has ``images_per_subject`` images (left hand, then
mirrored right hands with a different pose and exposure); the subject folder is the group. Classes
overlap: carpal bones and radius/ulna are drawn over each other, as in real hand radiographs, and
``sesamoid`` is present in only some subjects so that rare-class handling has something to do.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from competition.config import CompetitionConfig, atomic_write_text
from competition.data.polygon import rasterize
from competition.rle import encode

CLASSES = ["thumb", "index", "middle", "ring", "little", "metacarpals",
           "scaphoid", "lunate", "trapezium", "radius", "ulna", "sesamoid"]
_DONE = ".generated"


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


def _hand(rng: np.random.Generator, has_sesamoid: bool) -> list[tuple[str, np.ndarray]]:
    """Polygons of one left hand in unit coordinates (x right, y down), before pose and mirroring."""
    polys: list[tuple[str, np.ndarray]] = []
    width = rng.uniform(0.85, 1.15)
    length = rng.uniform(0.9, 1.1)
    bases = [(0.30, 0.62), (0.40, 0.47), (0.50, 0.45), (0.60, 0.47), (0.69, 0.52)]
    angles = [-0.75, -0.15, 0.0, 0.13, 0.28]
    lengths = [0.09, 0.11, 0.12, 0.11, 0.09]
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
    # Exposure, contrast and gamma vary per image; quantum noise and a smooth low-frequency field too.
    yy, xx = np.mgrid[0:size, 0:size] / size
    field = 0.08 * np.sin(2 * np.pi * (rng.uniform(0.3, 1) * xx + rng.uniform(0, 1))) * yy
    img = img * rng.uniform(0.75, 1.25) + rng.uniform(0.02, 0.12) + field
    img = np.clip(img, 0, None) ** rng.uniform(0.7, 1.4)
    img += rng.normal(0, rng.uniform(0.015, 0.04), img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _write_image(root: Path, split: str, subject: str, stem: str, img, polys) -> None:
    folder = root / split / "DCM" / subject
    folder.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / f"{stem}.png"), img)
    if split == "train":
        ann = {"annotations": [{"label": n, "points": np.round(p, 2).tolist()} for n, p in polys]}
        (root / "train" / "outputs_json" / subject).mkdir(parents=True, exist_ok=True)
        (root / "train" / "outputs_json" / subject / f"{stem}.json").write_text(json.dumps(ann))


def generate(cfg: CompetitionConfig, root: Path) -> None:
    """Write the whole dataset into ``root`` (deterministic in ``cfg.synthetic.seed``)."""
    spec = cfg.synthetic
    unknown = sorted(set(cfg.classes) - set(CLASSES))
    if unknown:
        raise ValueError(f"classes: the synthetic generator draws only {CLASSES}; unknown {unknown}")
    rng = np.random.default_rng(spec.seed)
    truth_rows, sample_rows = [], []
    n_img = 0
    for s in range(spec.subjects + spec.test_subjects):
        split = "train" if s < spec.subjects else "test"
        subject = f"ID{s:03d}"
        anatomy_seed = rng.integers(1 << 31)
        has_sesamoid = rng.random() < 0.3
        for k in range(spec.images_per_subject):
            img_rng = np.random.default_rng([spec.seed, s, k])
            polys = _hand(np.random.default_rng(anatomy_seed), has_sesamoid)
            polys = [(n, p) for n, p in _pose(polys, img_rng, spec.size, mirror=k % 2 == 1) if n in cfg.classes]
            img = _render(polys, img_rng, spec.size)
            stem = f"image{n_img:05d}_{'LR'[k % 2]}"
            n_img += 1
            _write_image(root, split, subject, stem, img, polys)
            if split == "test":
                hw = (spec.size, spec.size)
                masks = rasterize([(cfg.classes.index(n), p) for n, p in polys], hw, hw, len(cfg.classes))
                for c, m in zip(cfg.classes, masks):
                    truth_rows.append((f"{stem}.png", c, encode(m, cfg.submission.pixel_order), *hw))
                    sample_rows.append((f"{stem}.png", c, ""))
    sub = cfg.submission
    cols = [sub.id_column, sub.class_column, sub.rle_column]
    pd.DataFrame(truth_rows, columns=cols + ["height", "width"]).to_csv(root / "test_truth.csv", index=False)
    pd.DataFrame(sample_rows, columns=cols).to_csv(root / "sample_submission.csv", index=False)


def ensure_generated(cfg: CompetitionConfig) -> Path:
    """Generate the data on first use; later calls only check the marker file."""
    root = cfg.root()
    marker = root / _DONE
    stamp = json.dumps({"synthetic": cfg.synthetic.model_dump(), "classes": cfg.classes}, sort_keys=True)
    if marker.is_file() and marker.read_text() == stamp:
        return root
    # Generate beside the target and rename, so an interrupted first run never leaves half a dataset.
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    print(f"generating the synthetic competition {cfg.name!r} into {root} ...", flush=True)
    generate(cfg, tmp)
    atomic_write_text(tmp / _DONE, stamp)
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)
    return root
