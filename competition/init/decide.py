"""Classes, void, groups, images, pixel order, submission and task, decided from a layout; the
starter experiment."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from competition import rle
from competition.config import CompetitionConfig, DataConfig, size_hw
from competition.data.adapters import make_adapter
from competition.data.alignment import SAMPLE as ALIGN_SAMPLE
from competition.data.alignment import OrderEvidence, transpose_fit
from competition.data.base import header_size, read_image
from competition.init.common import _RLE_HINT, SAMPLE, VOID_NAMES, InitError
from competition.init.layouts import Layout
from competition.init.render import Draft, _checked
from competition.init.scan import (
    _BACKGROUND,
    Files,
    _find_groups_csv,
    _group_column,
    _id_column,
    _is_sample,
    _names_csv,
    _read,
    _spread,
    names_txt,
    without_background,
)


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
    txt = names_txt(files)
    if txt and found:
        d.undecided.append(f"class names from {found[1]}; {txt[1]} names them too and was not read (keep one)")
        txt = None
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
    if txt:
        _classes_from_txt(files, lay, d, values, *txt)
        return
    if lay.format == "rle_csv" and not d.get("rle_csv.class_column"):
        d.set("classes", ["object"], "one class: the train CSV has no class column")
        return
    if lay.format == "mask_folders" and d.get("mask_folders.mask_mode") in ("binary", "index") and values:
        if d.get("mask_folders.mask_mode") == "binary":
            d.set("classes", [names.get("255", names.get("1", "object"))], "binary masks hold one class")
            if not names:
                d.undecided.append("binary masks: the class is named 'object' (rename it; a classes.txt with "
                                   "its name is read when present)")
            return
        top = max(int(v) for v in values)
        listed = [names.get(str(k), f"class_{k}") for k in range(1, top + 1)]
        d.set("classes", listed, f"index masks: class k is pixel value k, 1..{top}"
              + (f"; names from {found[1]}" if found else ""))
        if not found:
            d.undecided.append(f"class names: none found, so class_1..class_{top} (rename them; a CSV mapping "
                               f"pixel values to names, e.g. classes.csv with value,name, or a classes.txt with "
                               f"one name per line, is read when present)")
        return
    numeric = all(re.fullmatch(r"-?\d+", v) for v in values)
    if numeric or (names and any(names.get(v, v) != v for v in values)):
        mapping = {int(v) if numeric else v: names.get(v, f"class_{v}") for v in values}
        d.set("classes", mapping, f"names from {found[1]}" if found else "NOT DECIDED: no CSV names the values")
        if not found:
            d.undecided.append(f"class names: the labels hold numbers {values} and no CSV or classes.txt names "
                               f"them, so they are called class_<value> (rename them in `classes`)")
    else:
        d.set("classes", values, f"the {len(values)} labels found" + (f"; names from {found[1]}" if found else ""))


def _classes_from_txt(files: Files, lay: Layout, d: Draft, values: list[str], listed: list[str], rel: str) -> None:
    """``classes`` named by a classes.txt: one name per class the labels hold, in the order of the
    class values (numbers) or in the file's order (names); a count or set that differs is an InitError."""
    path, mode = files.root / rel, d.get("mask_folders.mask_mode")
    one = (("the train CSV has no class column" if lay.format == "rle_csv" and not d.get("rle_csv.class_column")
            else "the masks are binary" if lay.format == "mask_folders" and mode == "binary" else None))
    if one:
        names = without_background(listed, 1)
        if len(names) != 1:
            raise InitError(f"{path}: {len(names)} class names ({', '.join(names)}), but {one}, so the data holds "
                            f"one class; give its one name (or remove the file: it is then called 'object')")
        d.set("classes", names, f"one class: {one}; its name from {rel}")
    elif lay.format == "mask_folders" and mode == "index":
        top = max((int(v) for v in values), default=0)
        names = without_background(listed, top)
        if len(names) < top or (len(names) > top and not lay.sampled):
            raise InitError(f"{path}: {len(names)} class names, but the index masks hold pixel values 1..{top} "
                            f"({top} classes: value k is class k, 0 is background); list {top} names, one per "
                            f"line, in value order")
        unseen = f"; values {top + 1}..{len(names)} not seen in the masks read" if len(names) > top else ""
        d.set("classes", names, f"index masks: class k is pixel value k, 1..{len(names)}; names from {rel}{unseen}")
    elif values and all(re.fullmatch(r"-?\d+", v) for v in values):
        names = without_background(listed, len(values))
        if len(names) != len(values):
            raise InitError(f"{path}: {len(names)} class names, but the labels hold {len(values)} class values "
                            f"({', '.join(values)}); list {len(values)} names, one per line, in the order of the "
                            f"values")
        d.set("classes", {int(v): n for v, n in zip(values, names)}, f"names from {rel}, in the order of the values")
    else:
        void = str(d.get("ignore.value", ""))
        names = [n for n in listed if n in values or (n.lower() not in _BACKGROUND and n != void)]
        missing, extra = [v for v in values if v not in names], [n for n in names if n not in values]
        if missing or extra:
            raise InitError(f"{path}: does not list the labels' class names: "
                            + "; ".join(x for x in (f"missing {missing}" if missing else "",
                                                    f"not in any label {extra}" if extra else "") if x)
                            + f"; list {', '.join(values)}, one per line, in the order the classes should take")
        d.set("classes", names, f"the {len(names)} labels found, in the order of {rel}")
    d.decided.append(f"class names from {rel}: {', '.join(names)}")


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
    into stripes, unless the image is square (where the two orders differ by a transpose only). With
    square images only, the order whose mask boundaries lie on the image's edges (see
    :mod:`competition.data.alignment`), when a clear majority of the images sampled say so."""
    table, spec = lay.table, d.data["rle_csv"]
    rows = table[~table[spec["rle_column"]].str.strip().isin(("", "-1"))]
    rows = rows[rows[spec["id_column"]].isin(set(lay.train))]
    scores, checked, square = {"row-major": 0, "column-major": 0}, 0, []
    for _, r in rows.iloc[_spread(list(range(len(rows))), 4 * SAMPLE)].iterrows():
        h, w = header_size(files.root / lay.train[r[spec["id_column"]]])
        if h == w:
            square.append(r[spec["id_column"]])
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
    ev = _square_evidence(files, lay, d, list(dict.fromkeys(square))) if not checked and square else None
    if ev is not None and (ev.other_fits_better or ev.configured_fits_better):
        best = ev.other if ev.other_fits_better else ev.configured
        ids = ev.prefer()[0 if best == ev.other else 1]
        ratio = ev.ratio(ids) if best == ev.other else 1 / ev.ratio(ids)
        why = (f"square images, where both orders decode to valid masks: the mask boundaries lie on image edges "
               f"{ratio:.1f}x more strongly with {best} on {len(ids)} of {len(ev.informative)} images scored")
        d.set("rle_csv.pixel_order", best, f"decided: {why}")
        d.decided.append(f"RLE pixel order {best} ({why})")
        return best
    d.set("rle_csv.pixel_order", "row-major", "NOT DECIDED: " + (
        "the images are square, where both orders decode to valid masks, and their edges favour neither"
        if not checked else "both orders give equally compact masks") + "; check the competition's data description")
    d.undecided.append("RLE pixel order: not decidable from the data; row-major written (rle_csv.pixel_order, "
                       "submission.pixel_order)" + (f" [{ev.describe()}]" if ev is not None and ev.fits else ""))
    return "row-major"


def _square_evidence(files: Files, lay: Layout, d: Draft, ids: list[str]) -> OrderEvidence | None:
    """Row-major against column-major on up to ``alignment.SAMPLE`` square images (their rows decoded
    row-major; column-major is then the transpose); None when an RLE does not fit its image."""
    table, spec = lay.table, d.data["rle_csv"]
    channels = "rgb" if d.get("image.channels") == "rgb" else "grayscale"
    ev = OrderEvidence("row-major", "column-major")
    for i in _spread(ids, ALIGN_SAMPLE):
        path = files.root / lay.train[i]
        h, w = header_size(path)
        cells = table.loc[table[spec["id_column"]] == i, spec["rle_column"]].str.strip()
        try:
            masks = np.stack([rle.decode(c, (h, w), "row-major") for c in cells if c not in ("", "-1")])
        except ValueError:  # reported by the checks through the adapter, naming the CSV line
            return None
        ev.fits[i] = transpose_fit(read_image(path, channels), masks)
    return ev


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
        truth_df = _read(files, truth[0]) if truth else None
        if truth_df is not None and set(df.columns) <= set(truth_df.columns):
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


def input_size_at(h: int, w: int, side: int) -> int | list[int]:
    """``data.input_size`` for (h, w) images at ``side`` px on the long side, never above the images' own:
    the aspect ratio kept, multiples of 32; an int when square."""
    scale = min(1.0, side / max(h, w))
    hw = [_mult32(h * scale), _mult32(w * scale)]
    return hw[0] if hw[0] == hw[1] else hw


def starter_experiment(name: str, sizes: list[tuple[int, int]]) -> tuple[dict, dict]:
    h, w = Counter(sizes).most_common(1)[0][0]
    size = input_size_at(h, w, 256)
    why = {}
    data = {"input_size": size}
    try:
        DataConfig.model_validate({**data, "resize": "letterbox"} if "resize" in DataConfig.model_fields else data)
    except Exception:  # this version takes a square input only
        data = {"input_size": max(size_hw(size))}
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
