"""``competition init DATA_DIR``: look at a data folder, write a commented competition config and a
starter experiment.

It recognises the three layouts the adapters read (``polygon_json``, ``rle_csv``, ``mask_folders``),
reads the classes from the train CSV, the JSON labels or the masks (names from a small CSV mapping
values to names, such as ``classes.csv`` with ``ClassId,name``), finds the image and test folders, a
groups CSV or column (or group sub-folders), the sample submission, image sizes and channels, and the
RLE pixel order where non-square images let the two orders be told apart. It then loads the data
through the real adapter with the draft config (labels, groups, the sample submission), so what it
writes is what ``make folds`` will read; what it could not decide is printed, and every key it
writes carries a comment saying what it means and how it was chosen.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from competition import rle
from competition.config import (CompetitionConfig, ConfigError, DataConfig, ExperimentConfig, config_dirs,
                                validate)
from competition.data.base import DataError, header_size, read_csv_table, read_image, walk_files
from competition.data.folder import IMAGE_EXTS
from competition.errors import UserError
from competition.io import atomic_write_text
from competition.paths import NAME_RULE, is_safe_name

SAMPLE = 24  # images / rows read to decide sizes, channels, pixel order and overlaps
VOID_NAMES = {"void", "ignore", "ignored", "unlabelled", "unlabeled", "dontcare", "dont_care", "don't care"}
_GROUP_HINT = re.compile(r"group|patient|subject|sequence|seq|video|clip|case|site|study|scene|series|"
                         r"session|slide|well|plate|volume|scan|camera|source", re.I)
_CLASS_HINT = re.compile(r"class|label|categor|type|attribute", re.I)
_NAME_HINT = re.compile(r"name|label|class|categor", re.I)
_RLE_HINT = re.compile(r"rle|encoded|pixels|mask|segment", re.I)
_MASK_HINT = re.compile(r"mask|label|gt|annot|seg|truth", re.I)
_RLE_CELL = re.compile(r"^\d+(\s+\d+)+$")


class InitError(UserError, ValueError):
    """The folder is not a layout ``competition init`` recognises; the message says what it looked for."""


# --------------------------------------------------------------------------------------------- #
# What every key means (the comment written above it); a draft adds how it was chosen
# --------------------------------------------------------------------------------------------- #
DOC = {
    "name": "the competition's name: this file is configs/competitions/<name>.yaml, the split folds/<name>.csv",
    "data_root": "the data folder, relative to the project folder (where you run make) when it lies inside it",
    "format": "how the labels are stored: polygon_json, rle_csv or mask_folders",
    "task": "multiclass: one class per pixel (softmax; background is implicit, every unlabelled pixel); "
            "multilabel: classes may overlap (one sigmoid per class)",
    "classes": "the class names, in output-channel order: what tables, W&B and plots show",
    "ignore": "unlabelled (void) pixels: always left out of the loss",
    "ignore.value": "what marks them: the mask pixel value (mask_folders), the class column's value (rle_csv) "
                    "or the label name (polygon_json)",
    "ignore.metric": "exclude: the competition's metric skips void pixels (validation, OOF and `competition "
                     "score` leave them out); background: it scores them as background",
    "image": "how images are read",
    "image.channels": "grayscale or rgb: the network's input channels",
    "image.bit_depth": "8 or 16 bits per channel",
    "groups": "images of one group never share a fold (no leak between near-duplicate images)",
    "groups.source": "column: a column of groups.csv (or of the train CSV); folder: the image's sub-folder; "
                     "none: every image is its own group",
    "groups.csv": "the per-image CSV holding the group column, relative to data_root",
    "groups.id_column": "that CSV's image-id column (with or without the file extension)",
    "groups.column": "that CSV's group column",
    "stratify": "how folds are balanced",
    "stratify.by": "class_presence: on which classes each image holds (the rarest one when there are too "
                   "many combinations); rare_class, column or none (plain GroupKFold) are the others",
    "metric": "the competition's metric",
    "metric.name": "dice: Dice per image x class, averaged over every pair",
    "metric.empty_score": "the Dice of a pair whose truth and prediction are both empty",
    "submission": "the submission CSV: one row per test image x class",
    "submission.id_column": "its image-id column",
    "submission.class_column": "its class column (it holds the class values when classes is a mapping)",
    "submission.rle_column": "its RLE column: 1-based 'start length' pairs, an empty cell for an empty mask",
    "submission.pixel_order": "row-major (left to right, then down) or column-major (top to bottom, then right)",
    "submission.id_format": "how an image is named in it: filename (with extension), stem (without) or id "
                            "(the path under the image folder without extension)",
    "submission.sample_submission": "the competition's sample submission, relative to data_root: the "
                                    "submission lists its images in its order",
    "submission.test_truth": "the test set's truth (when you have it), relative to data_root: what "
                             "`competition score SUB` scores against",
    "polygon_json": "the polygon JSON layout: <folder>/<group>/<image> images, <group>/<image>.json labels",
    "polygon_json.train_images": "the training images folder, relative to data_root",
    "polygon_json.train_labels": "the label folder: {\"annotations\": [{\"label\": ..., \"points\": [[x, y], "
                                 "...]}, ...]} per image",
    "polygon_json.test_images": "the test images folder (<group>/<image>), relative to data_root",
    "polygon_json.image_ext": "the images' file extension",
    "rle_csv": "the Kaggle RLE CSV layout: an image folder and a CSV of run-length encoded masks",
    "rle_csv.images": "the training images folder, relative to data_root; every image in it is a training "
                      "image (one without CSV rows has empty masks)",
    "rle_csv.csv": "the train CSV, relative to data_root",
    "rle_csv.id_column": "its image-id column (with or without the file extension)",
    "rle_csv.class_column": "its class column",
    "rle_csv.rle_column": "its RLE column",
    "rle_csv.pixel_order": "the order its runs number pixels in: row-major or column-major",
    "rle_csv.test_images": "the test images folder, relative to data_root (null: none)",
    "rle_csv.image_ext": "the images' file extension",
    "mask_folders": "the mask folder layout: one mask PNG per image (or one per image and class)",
    "mask_folders.images": "the training images folder, relative to data_root",
    "mask_folders.masks": "the masks folder, relative to data_root",
    "mask_folders.mask_mode": "binary: one 0/255 mask per image (one class); index: pixel value = class "
                              "index + 1, 0 = background; per_class: masks/<id>/<class>.png",
    "mask_folders.test_images": "the test images folder, relative to data_root (null: none)",
    "mask_folders.image_ext": "the images' file extension",
    "tta": "test-time augmentations allowed (identity, hflip, vflip, rot90, rot180, rot270): drop the ones "
           "that make no sense for this data",
    "folds": "K of the K-fold split (at most the number of groups)",
    "fold_seed": "the split's seed: change it to draw another split",
}

EXP_DOC = {
    "competition": "the competition this experiment trains on (configs/competitions/<name>.yaml)",
    "model": "the network",
    "model.arch": "any segmentation_models_pytorch architecture (Unet, FPN, DeepLabV3Plus, Segformer, ...) "
                  "or unet3plus",
    "model.encoder": "an smp encoder (resnet18, efficientnet-b3, ...) or a timm one as tu-<name>",
    "model.encoder_weights": "null: random init; imagenet (needs internet or a warm cache) or a local file",
    "loss": "the training loss",
    "loss.terms": "a weighted sum: bce is binary cross-entropy per class (multilabel) or cross-entropy over "
                  "the classes (multiclass); dice is the soft Dice loss",
    "optimizer": "any timm optimizer",
    "optimizer.name": "adamw, sgd, lamb, lion, ...",
    "optimizer.lr": "the peak learning rate",
    "optimizer.weight_decay": "decoupled weight decay",
    "scheduler": "the learning-rate schedule",
    "scheduler.name": "cosine, onecycle, plateau or none",
    "scheduler.warmup_epochs": "epochs of linear warm-up",
    "augment": "albumentations transforms, {name: Transform, p: ..., its arguments}",
    "augment.preprocess": "applied to training, validation and test images alike",
    "augment.train": "applied to training images only",
    "data": "how images become network inputs",
    "data.input_size": "the network input in pixels: an int (square) or [height, width]; multiples of 32",
    "data.resize": "stretch: resized to input_size; letterbox: the aspect ratio kept (resized to fit, padded)",
    "data.batch_size": "images per step",
    "data.workers": "DataLoader processes: 0 is fastest on a 2-core CPU; use 8 or more on a GPU machine",
    "train": "the training loop",
    "train.epochs": "epochs per fold",
    "train.seed": "the run's seed (sampling and augmentation)",
}


@dataclass
class Draft:
    """A config being written: plain data in key order, a comment per key, and what was decided."""

    data: dict = field(default_factory=dict)
    why: dict = field(default_factory=dict)  # dotted key -> how it was chosen (appended to DOC)
    decided: list = field(default_factory=list)
    undecided: list = field(default_factory=list)
    problems: list = field(default_factory=list)

    def set(self, key: str, value, why: str = "") -> None:
        *parents, last = key.split(".")
        d = self.data
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = value
        if why:
            self.why[key] = why

    def get(self, key: str, default=None):
        d = self.data
        for p in key.split("."):
            if not isinstance(d, dict) or p not in d:
                return default
            d = d[p]
        return d

    def drop(self, key: str) -> None:
        *parents, last = key.split(".")
        d = self.data
        for p in parents:
            d = d.get(p, {})
        d.pop(last, None)


# --------------------------------------------------------------------------------------------- #
# Rendering: YAML with a comment above every key, checked to read back as the same data
# --------------------------------------------------------------------------------------------- #
def _flow(v) -> str:
    text = yaml.safe_dump(v, default_flow_style=True, width=10**6, sort_keys=False).strip()
    return text[:-4].strip() if text.endswith("\n...") else text


def _comment(text: str, indent: str, width: int = 110) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(indent) + 2 + len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}" if cur else w
    return [f"{indent}# {line}" for line in lines + ([cur] if cur else [])]


def render(data: dict, doc: dict, why: dict, header: list[str], prefix: str = "", depth: int = 0) -> str:
    """``data`` as block YAML, each key preceded by its ``doc`` (+ ``why``) comment."""
    out = [f"# {h}" if h else "#" for h in header] + ([""] if header else [])
    indent = "  " * depth
    for k, v in data.items():
        key = f"{prefix}{k}"
        if prefix != "classes.":  # the entries of a {value: name} mapping are explained by `classes`
            if key not in doc:
                raise KeyError(f"no comment for key {key!r}")  # a bug here, never the user's
            note = why.get(key)
            out += _comment(doc[key] + (f" ({note})" if note else ""), indent)
        if isinstance(v, dict) and v:
            out.append(f"{indent}{_flow(k)}:")
            out.append(render(v, doc, why, [], f"{key}.", depth + 1))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            out.append(f"{indent}{_flow(k)}:")
            out += [f"{indent}  - {_flow(x)}" for x in v]
        else:
            out.append(f"{indent}{_flow(k)}: {_flow(v)}")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------- #
# The folder's files
# --------------------------------------------------------------------------------------------- #
@dataclass
class Files:
    root: Path
    images: list[str]  # paths relative to root, posix
    jsons: list[str]
    csvs: list[str]

    @cached_property
    def by_folder(self) -> dict[str, dict[str, str]]:
        """folder (relative, "" = root) -> {id: image path} for every image below it (id: the path
        under the folder without its extension, as the adapters name images)."""
        out: dict[str, dict[str, str]] = {}
        for rel in self.images:
            parts = rel[: len(rel) - len(Path(rel).suffix)].split("/")
            for k in range(len(parts)):
                out.setdefault("/".join(parts[:k]), {})["/".join(parts[k:])] = rel
        return out

    @cached_property
    def _folders_of(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for folder, ids in self.by_folder.items():
            for i in ids:
                out.setdefault(i, []).append(folder)
        return out

    def best_folder(self, ids, exclude=()) -> tuple[str | None, int]:
        """The folder holding images named by the most of ``ids`` (ties: not a test folder, shallower)."""
        count = Counter(f for i in set(ids) for f in self._folders_of.get(i, ()) if f not in exclude)
        if not count:
            return None, 0
        folder = max(count, key=lambda f: (count[f], not _is_test(f), -f.count("/")))
        return folder, count[folder]


def scan(root: Path) -> Files:
    images, jsons, csvs = [], [], []
    for p in walk_files(root, root):
        rel = p.relative_to(root).as_posix()
        suffix = p.suffix.lower()
        (images if suffix in IMAGE_EXTS else jsons if suffix == ".json" else csvs if suffix == ".csv"
         else []).append(rel)
    return Files(root, images, jsons, csvs)


def _spread(items: list, n: int = SAMPLE) -> list:
    """Up to ``n`` items spread evenly over the list (deterministic)."""
    if len(items) <= n:
        return list(items)
    return [items[round(k * (len(items) - 1) / (n - 1))] for k in range(n)]


def _ext(paths: list[str]) -> str:
    return Counter(Path(p).suffix for p in paths).most_common(1)[0][0]


def _strip_any_ext(values: pd.Series) -> pd.Series:
    v = values.astype(str).str.strip()
    low = v.str.lower()
    for ext in IMAGE_EXTS:
        has = low.str.endswith(ext)
        v, low = v.where(~has, v.str.slice(0, -len(ext))), low.where(~has, low.str.slice(0, -len(ext)))
    return v


def _is_test(folder: str) -> bool:
    return bool(re.search(r"test", folder, re.I))


def _test_folder(index: dict, exclude: list[str], depth: int | None = None) -> str | None:
    """The folder with "test" in its name holding the most images outside the training folders."""
    best = None
    for folder, ids in index.items():
        if not folder or not _is_test(folder) or any(folder == e or folder.startswith(e + "/") or
                                                     e.startswith(folder + "/") or e == "" for e in exclude):
            continue
        n = sum(1 for i in ids if depth is None or i.count("/") == depth)
        if n and (best is None or n > best[0] or (n == best[0] and folder.count("/") > best[1].count("/"))):
            best = (n, folder)
    return best[1] if best else None


# --------------------------------------------------------------------------------------------- #
# CSV helpers
# --------------------------------------------------------------------------------------------- #
def _read(files: Files, rel: str) -> pd.DataFrame | None:
    try:
        return read_csv_table(files.root / rel, "CSV")
    except DataError:
        return None


def _is_sample(rel: str) -> bool:
    name = Path(rel).name.lower()
    return "sample" in name or "submission" in name


def _rle_column(df: pd.DataFrame) -> str | None:
    best = None
    for col in df.columns:
        cells = [c for c in df[col].head(2000) if c.strip() not in ("", "-1")]
        if not cells:
            continue
        ok = [bool(_RLE_CELL.match(c.strip())) and len(c.split()) % 2 == 0 for c in cells]
        score = sum(ok) / len(ok) + (0.5 if _RLE_HINT.search(col) else 0)
        if sum(ok) / len(ok) >= 0.9 and (best is None or score > best[0]):
            best = (score, col)
    return best[1] if best else None


def _id_column(df: pd.DataFrame, ids: set, skip=()) -> tuple[str | None, int]:
    """The column whose values (extensions stripped) name the most of ``ids``."""
    best = (None, 0)
    for col in df.columns:
        if col in skip:
            continue
        n = len(set(_strip_any_ext(df[col])) & ids)
        if n > best[1]:
            best = (col, n)
    return best


def _constant_per_id(df: pd.DataFrame, id_col: str, col: str) -> bool:
    return bool((df.groupby(id_col, sort=False)[col].nunique() <= 1).all())


def _group_column(df: pd.DataFrame, id_col: str, skip=()) -> tuple[str | None, bool]:
    """(a column constant per id with 2..n-1 values, whether its name says it is a group)."""
    n_ids = df[id_col].nunique()
    found = []
    for col in df.columns:
        if col == id_col or col in skip or not _constant_per_id(df, id_col, col):
            continue
        k = df.drop_duplicates(id_col)[col].nunique()
        if 2 <= k < n_ids:
            found.append((bool(_GROUP_HINT.search(col)), -k, col))
    if not found:
        return None, False
    hint, _, col = max(found)
    return col, hint


def _sort_values(values) -> list[str]:
    values = list(values)
    if all(re.fullmatch(r"-?\d+", v) for v in values):
        return sorted(values, key=int)
    return sorted(values)


def _names_csv(files: Files, values: list[str], skip: set) -> tuple[dict, str] | None:
    """{value: name} from a small CSV with a column holding ``values`` and a column of unique names."""
    for rel in files.csvs:
        if rel in skip or _is_sample(rel):
            continue
        df = _read(files, rel)
        if df is None or len(df) > 10000:
            continue
        for vcol in df.columns:
            vals = df[vcol].str.strip()
            if not set(values) <= set(vals):
                continue
            for ncol in sorted(df.columns, key=lambda c: not _NAME_HINT.search(c)):
                names = df[ncol].str.strip()
                if ncol != vcol and names.is_unique and vals.is_unique and not names.str.fullmatch(r"-?\d+").all():
                    return dict(zip(vals, names)), rel
    return None


def _find_groups_csv(files: Files, ids: set, skip: set) -> tuple[str, str, str, bool] | None:
    """(csv, id column, group column, named like a group) from a CSV naming the training images."""
    best = None
    for rel in files.csvs:
        if rel in skip or _is_sample(rel):
            continue
        df = _read(files, rel)
        if df is None or df.empty:
            continue
        id_col, n = _id_column(df, ids)
        if id_col is None or n < max(2, 0.9 * len(ids)):
            continue
        d = df.assign(**{id_col: _strip_any_ext(df[id_col])})
        col, hint = _group_column(d, id_col)
        if col and (best is None or hint > best[3]):
            best = (rel, id_col, col, hint)
    return best


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
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.mode in ("1", "L", "P", "I;16", "I") and len(np.unique(np.asarray(im))) <= 64
    except Exception:  # PIL raises many types for unreadable files; such a file is no mask either
        return False


def find_mask_folders(files: Files, d: Draft) -> Layout | None:
    from competition.data.mask_folders import read_mask_png
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
    if mode == "per_class":
        values = sorted({i.rsplit("/", 1)[1] for i in index[masks_dir] if "/" in i})
        d.set("mask_folders.mask_mode", "per_class", f"masks/<id>/<class>.png files; classes {values}")
    else:
        seen: set = set()
        for i in _spread([i for i in train if i in index[masks_dir]], 4 * SAMPLE):
            seen |= set(np.unique(read_mask_png(files.root / index[masks_dir][i])).tolist())
        values = [str(v) for v in sorted(seen - {0})]
        binary = seen <= {0, 255} or seen <= {0, 1}
        d.set("mask_folders.mask_mode", "binary" if binary else "index",
              f"mask values {sorted(seen)} in {min(len(train), 4 * SAMPLE)} masks read")
    d.set("mask_folders.test_images", test, "found" if test else "none found")
    d.set("mask_folders.image_ext", ext)
    if not test:
        d.undecided.append("no test image folder found (mask_folders.test_images is null)")
    return Layout("mask_folders", train, test, values)


# --------------------------------------------------------------------------------------------- #
# Classes, void, groups, images, pixel order, submission
# --------------------------------------------------------------------------------------------- #
def _ignore_supported() -> bool:
    return "ignore" in CompetitionConfig.model_fields


def decide_classes(files: Files, lay: Layout, d: Draft) -> None:
    values = lay.values
    found = _names_csv(files, values, lay.skip_csvs) if values else None
    names = found[0] if found else {}
    if found:
        lay.skip_csvs.add(found[1])
    void = [v for v in values if names.get(v, v).strip().lower() in VOID_NAMES]
    if not void and lay.format != "polygon_json" and "255" in values and len(values) > 1:
        void = ["255"]
    if void and _ignore_supported():
        v = void[0]
        d.set("ignore.value", int(v) if re.fullmatch(r"-?\d+", v) else v,
              f"{v!r} is named {names.get(v, v)!r}" if v in names else f"{v} looks like a void value")
        d.set("ignore.metric", "exclude", "a guess: check whether the competition scores void pixels")
        d.undecided.append(f"{v!r} taken as the void (ignore) value; check ignore.metric against the "
                           f"competition's rules (exclude: the metric skips void pixels)")
        values = [x for x in values if x != v]
    elif void and lay.format == "mask_folders":  # a mask value is no class: the masks cannot be read
        values = [x for x in values if x != void[0]]
        d.problems.append(f"the masks hold {void[0]} (void?), which this version cannot ignore (no `ignore` key)")
    elif void:
        d.undecided.append(f"{void[0]!r} looks like a void value, but this version has no `ignore` key: it is "
                           f"trained as a class")
    if lay.format == "rle_csv" and not d.get("rle_csv.class_column"):
        d.set("classes", ["object"], "one class: the train CSV has no class column")
        return
    if lay.format == "mask_folders" and d.get("mask_folders.mask_mode") in ("binary", "index") and values:
        if d.get("mask_folders.mask_mode") == "binary":
            d.set("classes", [names.get("255", names.get("1", "object"))], "binary masks hold one class")
            if not names:
                d.undecided.append("binary masks: the class is named 'object' (rename it)")
            return
        top = max(int(v) for v in values)
        listed = [names.get(str(k), f"class_{k}") for k in range(1, top + 1)]
        d.set("classes", listed, f"index masks: class k is pixel value k, 1..{top}"
              + (f"; names from {found[1]}" if found else ""))
        if not found:
            d.undecided.append(f"class names: none found, so class_1..class_{top} (rename them; a CSV mapping "
                               f"pixel values to names, e.g. classes.csv with value,name, is read when present)")
        return
    numeric = all(re.fullmatch(r"-?\d+", v) for v in values)
    if numeric or (names and any(names.get(v, v) != v for v in values)):
        mapping = {int(v) if numeric else v: names.get(v, f"class_{v}") for v in values}
        d.set("classes", mapping, f"names from {found[1]}" if found else "NOT DECIDED: no CSV names the values")
        if not found:
            d.undecided.append(f"class names: the labels hold numbers {values} and no CSV names them, so they "
                               f"are called class_<value> (rename them in `classes`)")
    else:
        d.set("classes", values, f"the {len(values)} labels found" + (f"; names from {found[1]}" if found else ""))


def decide_groups(files: Files, lay: Layout, d: Draft) -> None:
    ids = set(lay.train)
    table = lay.table
    found = _find_groups_csv(files, ids, lay.skip_csvs)
    if found:
        rel, id_col, col, hint = found
        d.set("groups.source", "column", f"{rel} names every training image")
        d.set("groups.csv", rel)
        d.set("groups.id_column", id_col)
        d.set("groups.column", col, "its name says group" if hint else "a guess: the column with a few values "
                                                                       "per image; check it")
        if not hint:
            d.undecided.append(f"groups: {rel} column {col!r} taken as the group (check it)")
        else:
            d.decided.append(f"groups: column {col!r} of {rel} (image ids in {id_col!r})")
        lay.skip_csvs.add(rel)
        return
    if table is not None:
        spec_id = d.get("rle_csv.id_column")
        col, hint = _group_column(table, spec_id, skip=(d.get("rle_csv.class_column"), d.get("rle_csv.rle_column")))
        listed = set(table[spec_id])
        if col and hint and ids <= listed:
            d.set("groups.source", "column", f"a column of the train CSV, {d.get('rle_csv.csv')}")
            d.set("groups.column", col)
            d.decided.append(f"groups: column {col!r} of the train CSV")
            return
        if col and hint:
            d.undecided.append(f"the train CSV has a group column {col!r}, but {len(ids - listed)} image(s) "
                               f"have no rows there and so no group: give a groups CSV (groups.csv)")
    subs = {i.rsplit("/", 1)[0] for i in ids if "/" in i}
    if len(subs) >= 2 and all("/" in i for i in ids) and len(subs) < len(ids):
        d.set("groups.source", "folder", f"the images lie in {len(subs)} sub-folders")
        d.decided.append(f"groups: the images' {len(subs)} sub-folders")
        return
    d.set("groups.source", "none", "no groups CSV, group column or group sub-folders found")
    d.undecided.append("no groups found: every image is its own group. If images are related (frames of one "
                       "video, slices of one patient), give groups (groups.csv, groups.column) or CV leaks")


def decide_images(files: Files, lay: Layout, d: Draft) -> list[tuple[int, int]]:
    paths = [files.root / p for p in _spread(list(lay.train.values()), 4 * SAMPLE)]
    sizes = [header_size(p) for p in paths]
    colour = 0
    for p in paths[:8]:
        img = read_image(p, "rgb", 8)
        colour += int(img.ndim == 3 and not (np.array_equal(img[..., 0], img[..., 1])
                                             and np.array_equal(img[..., 1], img[..., 2])))
    from PIL import Image
    with Image.open(paths[0]) as im:
        deep = im.mode in ("I;16", "I;16B", "I;16L", "I")
    d.set("image.channels", "rgb" if colour else "grayscale",
          f"{colour} of {min(8, len(paths))} images read have colour" if colour else "no colour in the images read")
    d.set("image.bit_depth", 16 if deep else 8)
    shown = Counter(f"{w}x{h}" for h, w in sizes).most_common(3)
    d.decided.append(f"image sizes (WxH) of {len(sizes)} images read: " + ", ".join(f"{s} ({n})" for s, n in shown))
    return sizes


def _perimeter(m: np.ndarray) -> int:
    return int((m[:, 1:] != m[:, :-1]).sum() + (m[1:, :] != m[:-1, :]).sum())


def decide_pixel_order(files: Files, lay: Layout, d: Draft) -> str:
    """The order whose decoded masks have the shorter boundaries: the other one scatters every run
    into stripes, unless the image is square (where the two orders differ by a transpose only)."""
    table, spec = lay.table, d.data["rle_csv"]
    rows = table[~table[spec["rle_column"]].str.strip().isin(("", "-1"))]
    rows = rows[rows[spec["id_column"]].isin(set(lay.train))]
    scores, checked = {"row-major": 0, "column-major": 0}, 0
    for _, r in rows.iloc[_spread(list(range(len(rows))), 4 * SAMPLE)].iterrows():
        h, w = header_size(files.root / lay.train[r[spec["id_column"]]])
        if h == w:
            continue
        try:
            for order in scores:
                scores[order] += _perimeter(rle.decode(r[spec["rle_column"]], (h, w), order))
        except ValueError as e:
            d.undecided.append(f"an RLE of {r[spec['id_column']]} does not fit its {w}x{h} image ({e}); check "
                               f"rle_csv.images and the image sizes")
            break
        checked += 1
    best, other = sorted(scores, key=scores.get)
    if checked and scores[other] >= 1.25 * max(scores[best], 1):
        why = (f"{checked} masks of non-square images decoded both ways: {best} gives boundaries "
               f"{scores[other] / max(scores[best], 1):.1f}x shorter")
        d.set("rle_csv.pixel_order", best, f"decided: {why}")
        d.decided.append(f"RLE pixel order {best} ({why})")
        return best
    d.set("rle_csv.pixel_order", "row-major", "NOT DECIDED: " + (
        "the images are square, where both orders decode to valid masks" if not checked
        else "both orders give equally compact masks") + "; check the competition's data description")
    d.undecided.append("RLE pixel order: not decidable from the data; row-major written (rle_csv.pixel_order, "
                       "submission.pixel_order)")
    return "row-major"


def decide_submission(files: Files, lay: Layout, d: Draft, classes_written: list[str]) -> None:
    samples = [c for c in files.csvs if _is_sample(c)]
    index = files.by_folder
    test_ids = set(index.get(lay.test_folder or "\0", {}))
    test_names = {Path(p).name for p in index.get(lay.test_folder or "\0", {}).values()}
    order = d.get("rle_csv.pixel_order", "row-major")
    df = _read(files, samples[0]) if samples else None
    if df is not None and not df.empty:
        rel = samples[0]
        rle_col = next((c for c in df.columns if _RLE_HINT.search(c)), df.columns[-1])
        id_col, _ = _id_column(df, test_ids | {Path(i).name for i in test_ids}, skip=(rle_col,))
        id_col = id_col or df.columns[0]
        rest = [c for c in df.columns if c not in (id_col, rle_col)]
        class_col = next((c for c in rest if set(df[c].str.strip()) <= set(classes_written)), rest[0] if rest else None)
        ids = df[id_col].str.strip()
        fmt = "filename" if ids.isin(test_names).any() or ids.str.contains(r"\.\w{2,4}$").all() else \
            "id" if ids.str.contains("/").any() else "stem"
        d.set("submission.id_column", id_col, f"from {rel}")
        if class_col:
            d.set("submission.class_column", class_col)
        else:
            d.undecided.append(f"{rel} has no class column; the submission writes one ('class')")
        d.set("submission.rle_column", rle_col)
        d.set("submission.pixel_order", order, "as the train CSV" if lay.format == "rle_csv" else
              "NOT DECIDED: no RLE to learn it from; check the competition's rules")
        d.set("submission.id_format", fmt, f"as {rel} writes ids")
        d.set("submission.sample_submission", rel)
        truth = [c for c in files.csvs if re.search(r"truth|solution", Path(c).name, re.I) and c not in lay.skip_csvs]
        if truth and set(df.columns) <= set(_read(files, truth[0]).columns):
            d.set("submission.test_truth", truth[0], "its columns are the submission's")
            d.decided.append(f"test truth {truth[0]}: `competition score SUB` scores against it")
        d.decided.append(f"submission columns {id_col}, {class_col or 'class'}, {rle_col} and id format {fmt} "
                         f"from {rel}")
        if lay.format != "rle_csv":
            d.undecided.append("submission.pixel_order: row-major written; check the competition's rules")
        return
    if lay.format == "rle_csv":
        spec = d.data["rle_csv"]
        fmt = "filename" if lay.raw_ids.str.contains(r"\.\w{2,4}$").all() else "stem"
        d.set("submission.id_column", spec["id_column"], "no sample submission: as the train CSV")
        d.set("submission.class_column", spec.get("class_column", "class"))
        d.set("submission.rle_column", spec["rle_column"])
        d.set("submission.pixel_order", order, "as the train CSV")
        d.set("submission.id_format", fmt, "as the train CSV writes ids")
    else:
        guess = "no sample submission: the default; check the competition's rules"
        d.set("submission.id_column", "image_name", guess)
        d.set("submission.class_column", "class", guess)
        d.set("submission.rle_column", "rle", guess)
        d.set("submission.pixel_order", "row-major", guess)
        d.set("submission.id_format", "filename", guess)
    d.undecided.append("no sample submission found: the submission's columns and id format are "
                       + ("the train CSV's" if lay.format == "rle_csv" else "the defaults") + "; check them")


def decide_task(lay: Layout, d: Draft) -> None:
    """multilabel when two classes overlap in the masks read (through the adapter), else multiclass."""
    from competition.data.adapters import make_adapter
    if len(d.get("classes")) == 1:
        d.set("task", "multilabel", "one class")
        return
    if d.get("mask_folders.mask_mode") == "index":
        d.set("task", "multiclass", "index masks hold one class per pixel")
        return
    adapter = make_adapter(_checked(d))
    overlap, read = 0, 0
    for i in _spread(adapter.ids, SAMPLE):
        m = adapter.load_mask(i)
        overlap += int((m.sum(0) > 1).any())
        read += 1
    if overlap:
        d.set("task", "multilabel", f"classes overlap in {overlap} of {read} images read")
    else:
        d.set("task", "multiclass", f"no two classes overlap in the {read} images read")
        d.undecided.append("task: multiclass, since no classes overlap in the masks read; if the competition "
                           "scores each class on its own and classes may overlap, use multilabel")


# --------------------------------------------------------------------------------------------- #
# The experiment
# --------------------------------------------------------------------------------------------- #
def _mult32(x: float) -> int:
    return max(32, int(round(x / 32)) * 32)


def starter_experiment(name: str, sizes: list[tuple[int, int]]) -> tuple[dict, dict]:
    h, w = Counter(sizes).most_common(1)[0][0]
    scale = min(1.0, 256 / max(h, w))
    hw = [_mult32(h * scale), _mult32(w * scale)]
    why = {}
    data = {"input_size": hw if hw[0] != hw[1] else hw[0]}
    try:
        DataConfig.model_validate({**data, "resize": "letterbox"} if "resize" in DataConfig.model_fields else data)
    except Exception:  # this version takes a square input only
        data = {"input_size": max(hw)}
    why["data.input_size"] = f"the images are {w}x{h} (WxH), at most 256 px on the long side"
    if "resize" in DataConfig.model_fields and h != w:
        data["resize"] = "letterbox"
        why["data.resize"] = "non-square images: kept undistorted"
    exp = {
        "competition": name,
        "model": {"arch": "Unet", "encoder": "resnet18", "encoder_weights": None},
        "loss": {"terms": [{"name": "bce", "weight": 1.0}, {"name": "dice", "weight": 1.0}]},
        "optimizer": {"name": "adamw", "lr": 0.003, "weight_decay": 0.0001},
        "scheduler": {"name": "cosine", "warmup_epochs": 1},
        "augment": {"preprocess": [], "train": [{"name": "HorizontalFlip", "p": 0.5},
                                                {"name": "RandomBrightnessContrast", "p": 0.5}]},
        "data": {**data, "batch_size": 8, "workers": 0},
        "train": {"epochs": 25, "seed": 0},
    }
    return exp, why


# --------------------------------------------------------------------------------------------- #
# The command
# --------------------------------------------------------------------------------------------- #
@dataclass
class InitResult:
    competition: Path
    experiment: Path
    config: CompetitionConfig
    decided: list[str]
    undecided: list[str]
    problems: list[str]  # the data did not load with the config: it needs an edit before `make folds`

    def format(self) -> str:
        lines = [f"wrote {self.competition}", f"wrote {self.experiment}", "decided:"]
        lines += [f"  {x}" for x in self.decided]
        if self.undecided:
            lines.append("could not decide (check these in the config):")
            lines += [f"  {x}" for x in self.undecided]
        if self.problems:
            lines.append("PROBLEMS (edit the config before `make folds`):")
            lines += [f"  {x}" for x in self.problems]
        lines.append(f"next: competition folds --comp {self.config.name} && competition train --exp "
                     f"{self.config.name}-baseline --fold 0   (make folds COMP={self.config.name} && make train "
                     f"EXP={self.config.name}-baseline FOLD=0)")
        return "\n".join(lines)


def _default_name(root: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.+@-]+", "-", root.name).strip(".-")
    if not is_safe_name(name):
        raise ConfigError(f"cannot make a competition name from the folder name {root.name!r}; pass --name "
                          f"({NAME_RULE})")
    return name


def _data_root(root: Path) -> str:
    cwd = Path.cwd().resolve()
    return root.relative_to(cwd).as_posix() if root == cwd or cwd in root.parents else str(root)


def draft(root: Path, name: str) -> tuple[Draft, list[tuple[int, int]]]:
    """The competition config for the data in ``root``, checked through its adapter."""
    files = scan(root)
    if not files.images:
        raise InitError(f"{root}: no image files found (looked for {', '.join(sorted(IMAGE_EXTS))})")
    d = Draft()
    d.set("name", name)
    d.set("data_root", _data_root(root))
    lay = find_polygon(files, d) or find_rle_csv(files, d) or find_mask_folders(files, d)
    if lay is None:
        raise InitError(f"{root}: not a layout competition init recognises: no JSON polygon labels "
                        f"(<labels>/<group>/<image>.json), no CSV with an RLE column naming the images of a folder, "
                        f"and no folder of masks named like the images of another folder")
    decide_classes(files, lay, d)
    values = d.get("classes")
    names = list(values.values()) if isinstance(values, dict) else list(values)
    written = [str(k) for k in values] if isinstance(values, dict) else names
    if isinstance(values, dict) and d.get("ignore.value") is not None:
        written.append(str(d.get("ignore.value")))
    sizes = decide_images(files, lay, d)
    decide_groups(files, lay, d)
    if lay.format == "rle_csv":
        decide_pixel_order(files, lay, d)
    decide_submission(files, lay, d, written)
    d.set("stratify.by", "class_presence")
    d.set("metric.name", "dice")
    d.set("metric.empty_score", 1.0, "check the competition's rules for empty truth and prediction")
    d.set("tta", ["identity", "hflip"], "no vertical flips or rotations until you know the data allows them")
    d.set("folds", 5)
    d.set("fold_seed", 42)
    try:
        decide_task(lay, d)
        check(_checked(d), d)
    except UserError as e:
        d.problems.append(f"the data does not load with this config yet: {e}")
    return d, sizes


def _ordered(data: dict) -> dict:
    keys = ["name", "data_root", "format", "task", "classes", "ignore", "image", "groups", "stratify", "metric",
            "submission", "polygon_json", "rle_csv", "mask_folders", "tta", "folds", "fold_seed"]
    return {k: data[k] for k in keys if k in data}


def _checked(d: Draft) -> CompetitionConfig:
    """The draft validated; a void value this version's ``ignore`` refuses is dropped, and said so."""
    try:
        return validate(CompetitionConfig, _ordered(d.data), "the draft config")
    except ConfigError:
        if "ignore" not in d.data:
            raise
        d.undecided.append("the void value did not validate as `ignore`; it was left out")
        d.drop("ignore")
        return validate(CompetitionConfig, _ordered(d.data), "the draft config")


def check(cfg: CompetitionConfig, d: Draft) -> None:
    """Groups, every label and the sample submission read through the adapter, as `make folds` and
    `submit` will read them; ``folds`` is fitted to the number of groups."""
    from competition.data.adapters import make_adapter
    from competition.predict.submit import expected_rows
    adapter = make_adapter(cfg)
    n_groups = len(set(adapter.groups().values()))
    d.set("folds", max(2, min(5, n_groups)), f"{n_groups} groups")
    d.decided.insert(0, f"{cfg.format}: {len(adapter.ids)} training images, {len(adapter.test_ids)} test images, "
                        f"{n_groups} groups ({cfg.groups.source}), {cfg.num_classes} classes "
                        f"({', '.join(cfg.classes)}), {cfg.task}")
    adapter.validate_labels()
    for i in _spread(adapter.ids, SAMPLE):
        adapter.presence(i)
    if adapter.test_ids:
        expected_rows(cfg, adapter)


def init(data_dir: str | Path, name: str | None = None, force: bool = False) -> InitResult:
    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        raise InitError(f"{data_dir}: no such folder")
    name = name or _default_name(root)
    if not is_safe_name(name):
        raise ConfigError(f"--name {name!r}: use {NAME_RULE}")
    comp_path = config_dirs("competitions")[0] / f"{name}.yaml"
    exp_path = config_dirs("experiments")[0] / f"{name}-baseline.yaml"
    existing = [p for p in (comp_path, exp_path) if p.exists()]
    if existing and not force:
        raise ConfigError(f"{', '.join(map(str, existing))} exist(s); pass --force to overwrite")
    d, sizes = draft(root, name)
    data = _ordered(d.data)
    cfg = validate(CompetitionConfig, data, comp_path)
    exp, exp_why = starter_experiment(name, sizes)
    validate(ExperimentConfig, {"name": f"{name}-baseline", **exp}, exp_path)
    doc = dict(DOC)
    if isinstance(data["classes"], dict):
        doc["classes"] = ("{value: name}: the value is how the labels, the sample submission and the submission "
                          "write the class; tables, W&B and plots show the name")
    header = [f"Competition {name}, written by `competition init {data_dir}`. Check the keys marked NOT",
              "DECIDED or guess. Every key is documented in the README (Competition definitions)."]
    comp_text = render(data, doc, d.why, header) + "\n"
    exp_header = [f"Starter experiment for {name}, written by `competition init`: a small U-Net, random init,",
                  "CPU-friendly. Variants: a new file with `extends: " + f"{name}-baseline` and the keys that change."]
    exp_text = render(exp, EXP_DOC, exp_why, exp_header) + "\n"
    assert yaml.safe_load(comp_text) == data and yaml.safe_load(exp_text) == exp  # the comments hide nothing
    atomic_write_text(comp_path, comp_text)
    atomic_write_text(exp_path, exp_text)
    return InitResult(comp_path, exp_path, cfg, d.decided, d.undecided, d.problems)
