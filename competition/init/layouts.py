"""The three layouts the adapters read, recognised from a folder's files."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from competition.data.mask_folders import read_mask_png
from competition.init.common import _CLASS_HINT, _MASK_HINT, SAMPLE, InitError
from competition.init.render import Draft
from competition.init.scan import (
    Files,
    _constant_per_id,
    _ext,
    _is_sample,
    _is_test,
    _read,
    _rle_column,
    _sort_values,
    _spread,
    _strip_any_ext,
    _test_folder,
)


# --------------------------------------------------------------------------------------------- #
# Layouts
# --------------------------------------------------------------------------------------------- #
@dataclass
class Layout:
    format: str
    train: dict[str, str]  # id -> image path (relative to root)
    test_folder: str | None
    values: list[str] = field(default_factory=list)  # class values as the labels write them, sorted
    skip_csvs: set = field(default_factory=set)  # CSVs already explained (train CSV, names, groups)
    table: pd.DataFrame | None = None  # rle_csv: the train CSV, ids without extension
    raw_ids: pd.Series | None = None  # rle_csv: its ids as written
    sampled: bool = False  # the class values come from a sample of the labels (some may be missing)


def find_polygon(files: Files, d: Draft) -> Layout | None:
    labels: dict[str, set] = {}  # label file -> its label names
    for j in files.jsons:
        data = _json(files.root / j)
        anns = data.get("annotations") if isinstance(data, dict) else None
        if isinstance(anns, list):
            labels[j] = {a["label"] for a in anns if isinstance(a, dict) and isinstance(a.get("label"), str)}
        elif isinstance(data, dict) and "shapes" in data:
            raise InitError(f"{files.root / j}: a LabelMe file (\"shapes\"); the polygon_json format reads "
                            f"{{\"annotations\": [{{\"label\": ..., \"points\": [[x, y], ...]}}, ...]}}")
    if not labels:
        return None
    deep = [j for j in labels if j.count("/") >= 2]
    if not deep:
        raise InitError(f"{files.root}: polygon JSON labels found ({next(iter(labels))}, ...) but not in "
                        f"<labels>/<group>/<image>.json sub-folders, which the polygon_json format needs "
                        f"(and the images likewise in <images>/<group>/<image>)")
    labels_dir = Counter(j.rsplit("/", 2)[0] for j in deep).most_common(1)[0][0]
    label_ids = {j[len(labels_dir) + 1: -5] for j in deep if j.startswith(labels_dir + "/")}
    images_dir, n = files.best_folder(label_ids)
    if not n:
        raise InitError(f"{files.root}: labels in {labels_dir}/<group>/<image>.json, but no image folder "
                        f"holds <group>/<image> files with the same names")
    ext = _ext([p for i, p in files.by_folder[images_dir].items() if i in label_ids])
    train = {i: p for i, p in files.by_folder[images_dir].items() if i.count("/") == 1 and p.endswith(ext)}
    values = set().union(*(labels[j] for j in deep))
    test = _test_folder(files.by_folder, [images_dir, labels_dir], depth=1)
    d.set("format", "polygon_json", f"JSON labels with polygons found in {labels_dir}/")
    d.set("polygon_json.train_images", images_dir)
    d.set("polygon_json.train_labels", labels_dir)
    d.set("polygon_json.test_images", test or f"{images_dir}-test",
          "found" if test else "NOT FOUND: no test folder of <group>/<image> files; set it when you have one")
    d.set("polygon_json.image_ext", ext)
    if not test:
        d.undecided.append("no test image folder found (polygon_json.test_images)")
    unlabelled = sorted(set(train) - label_ids)
    if unlabelled:
        d.undecided.append(f"{len(unlabelled)} image(s) have no label file ({unlabelled[0]}, ...): training "
                           f"stops on them; add empty {{\"annotations\": []}} files or remove the images")
    return Layout("polygon_json", {i: train[i] for i in sorted(train)}, test, sorted(values))


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def find_rle_csv(files: Files, d: Draft) -> Layout | None:
    index = files.by_folder
    best = None
    for rel in files.csvs:
        df = None if _is_sample(rel) else _read(files, rel)
        rle_col = _rle_column(df) if df is not None and not df.empty else None
        for col in [c for c in df.columns if c != rle_col] if rle_col else []:
            folder, n = files.best_folder(_strip_any_ext(df[col]))
            if n and (best is None or n > best[0]):
                best = (n, rel, df, rle_col, col, folder)
    if best is None:
        return None
    n, csv_rel, df, rle_col, id_col, images_dir = best
    train = index[images_dir]
    ext = _ext(list(train.values()))
    train = {i: p for i, p in train.items() if p.endswith(ext)}
    df = df.assign(_id=_strip_any_ext(df[id_col]))
    rest = [c for c in df.columns if c not in (id_col, rle_col, "_id")]
    varying = [c for c in rest if not _constant_per_id(df, "_id", c)]
    hinted = [c for c in rest if _CLASS_HINT.search(c)]
    class_col = (hinted or sorted(varying, key=lambda c: df[c].nunique()) or [None])[0]
    d.set("format", "rle_csv", f"{csv_rel} has an RLE column, {rle_col!r}")
    d.set("rle_csv.images", images_dir or ".", f"{len(train)} {ext} images; {n} of them named in the CSV")
    d.set("rle_csv.csv", csv_rel)
    d.set("rle_csv.id_column", id_col)
    if class_col is not None:
        d.set("rle_csv.class_column", class_col)
    d.set("rle_csv.rle_column", rle_col)
    test = _test_folder(index, [images_dir])
    d.set("rle_csv.test_images", test, "found" if test else "none found")
    d.set("rle_csv.image_ext", ext)
    if not test:
        d.undecided.append("no test image folder found (rle_csv.test_images is null)")
    values = _sort_values(set(df[class_col].str.strip())) if class_col else []
    if class_col is None:
        d.undecided.append("the train CSV has no class column: one class, named 'object' (rename it)")
    return Layout("rle_csv", dict(sorted(train.items())), test, values, {csv_rel},
                  table=df.drop(columns=["_id"]).assign(**{id_col: df["_id"]}), raw_ids=df[id_col].str.strip())


def _looks_like_mask(path: Path) -> bool:
    """Single channel with a few distinct values (labels), not a photograph."""
    try:
        with Image.open(path) as im:
            return im.mode in ("1", "L", "P", "I;16", "I") and len(np.unique(np.asarray(im))) <= 64
    except Exception:  # PIL raises many types for unreadable files; such a file is no mask either
        return False


def find_mask_folders(files: Files, d: Draft) -> Layout | None:
    index = files.by_folder
    best = None
    for b, ids in index.items():  # b: a candidate mask folder; a: the image folder its files are named after
        if not b or len(ids) < 2:
            continue
        for mode, names in (("image", set(ids)), ("per_class", {i.rsplit("/", 1)[0] for i in ids if "/" in i})):
            nested = [f for f in index if f == b or f.startswith(b + "/") or b.startswith(f + "/")]
            a, n = files.best_folder(names, exclude=nested)
            if a is None or n < max(2, 0.5 * len(index[a])):
                continue
            named = bool(_MASK_HINT.search(b.rsplit("/", 1)[-1]))
            first = files.root / next(iter(ids.values()))
            score = (named, _looks_like_mask(first), not _is_test(a), n, mode == "image")
            if best is None or score > best[0]:
                best = (score, a, b, mode)
    if best is None:
        return None
    _, images_dir, masks_dir, mode = best
    train = {i: p for i, p in index[images_dir].items()}
    ext = _ext(list(train.values()))
    train = {i: p for i, p in sorted(train.items()) if p.endswith(ext)}
    d.set("format", "mask_folders", f"{masks_dir}/ holds one mask per image of {images_dir}/")
    d.set("mask_folders.images", images_dir)
    d.set("mask_folders.masks", masks_dir)
    test = _test_folder(index, [images_dir, masks_dir])
    sampled = False
    if mode == "per_class":
        values = sorted({i.rsplit("/", 1)[1] for i in index[masks_dir] if "/" in i})
        d.set("mask_folders.mask_mode", "per_class", f"masks/<id>/<class>.png files; classes {values}")
    else:
        seen: set = set()
        with_mask = [i for i in train if i in index[masks_dir]]
        sampled = len(with_mask) > 4 * SAMPLE
        for i in _spread(with_mask, 4 * SAMPLE):
            seen |= set(np.unique(read_mask_png(files.root / index[masks_dir][i])).tolist())
        values = [str(v) for v in sorted(seen - {0})]
        binary = seen <= {0, 255} or seen <= {0, 1}
        d.set("mask_folders.mask_mode", "binary" if binary else "index",
              f"mask values {sorted(seen)} in {min(len(train), 4 * SAMPLE)} masks read")
    d.set("mask_folders.test_images", test, "found" if test else "none found")
    d.set("mask_folders.image_ext", ext)
    if not test:
        d.undecided.append("no test image folder found (mask_folders.test_images is null)")
    return Layout("mask_folders", train, test, values, sampled=sampled)


# format -> its detector, in the order init tries them; a test holds these to the adapter registry and
# the config schema (a format is registered, has its settings key, and is found by init).
FINDERS = {"polygon_json": find_polygon, "rle_csv": find_rle_csv, "mask_folders": find_mask_folders}
