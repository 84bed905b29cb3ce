"""`competition init` on the three layouts, built on the fly (64x48 images, 8 per set), then `folds`,
one training epoch and `score --sizes-from` / `--size` on the result, without editing what init wrote."""
from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from competition.cli import main

H, W = 48, 64  # non-square: the RLE pixel order is decidable
SKY, ROAD, CAR, VOID = 1, 2, 3, 255  # the street CSV's ClassId values
NAMES = {SKY: "sky", ROAD: "road", CAR: "car", VOID: "void"}


def ref_rle(mask: np.ndarray, order: str) -> str:
    """Reference Kaggle encoder (1-based 'start length' pairs), independent of competition.rle."""
    flat = mask.flatten(order="C" if order == "row-major" else "F").astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [0]]))) + 1
    edges[1::2] -= edges[::2]
    return " ".join(map(str, edges))


def street_masks(k: int) -> dict[int, np.ndarray]:
    """Frame k of a street scene: sky above, road below, a car between them and a void strip under
    the sky; no two classes overlap (a multiclass set)."""
    rng = np.random.default_rng(k)
    y1, y2 = 12 + int(rng.integers(0, 5)), 30 + int(rng.integers(0, 5))
    x0 = int(rng.integers(4, 36))
    m = {c: np.zeros((H, W), np.uint8) for c in NAMES}
    m[SKY][:y1] = 1
    m[VOID][y1:y1 + 2] = 1
    m[ROAD][y2:] = 1
    m[CAR][y1 + 4:y2 - 2, x0:x0 + 20] = 1
    return m


def street_image(masks: dict) -> np.ndarray:
    img = np.full((H, W, 3), 90, np.uint8)
    for c, bgr in ((SKY, (230, 160, 60)), (ROAD, (80, 80, 80)), (CAR, (40, 40, 220)), (VOID, (0, 0, 0))):
        img[masks[c] > 0] = bgr
    return img


def make_street(root: Path) -> Path:
    """An RLE-CSV multiclass set: column-major RLE, numeric ClassId 1..3 plus void 255, names in
    classes.csv, video-sequence groups in groups.csv under its own column names, a sample submission."""
    (root / "train_images").mkdir(parents=True)
    (root / "test_images").mkdir()
    rows, groups = [], []
    for k in range(8):
        masks = street_masks(k)
        cv2.imwrite(str(root / "train_images" / f"f{k}.png"), street_image(masks))
        rows += [(f"f{k}.png", c, ref_rle(m, "column-major")) for c, m in masks.items() if m.any()]
        groups.append((f"f{k}.png", f"seq{k // 2}"))
    pd.DataFrame(rows, columns=["ImageId", "ClassId", "EncodedPixels"]).to_csv(root / "train.csv", index=False)
    pd.DataFrame(groups, columns=["ImageId", "SequenceId"]).to_csv(root / "groups.csv", index=False)
    pd.DataFrame(list(NAMES.items()), columns=["ClassId", "name"]).to_csv(root / "classes.csv", index=False)
    sample = []
    for k in (100, 101):
        cv2.imwrite(str(root / "test_images" / f"t{k}.png"), street_image(street_masks(k)))
        sample += [(f"t{k}.png", c, "") for c in (SKY, ROAD, CAR)]
    pd.DataFrame(sample, columns=["ImageId", "ClassId", "EncodedPixels"]).to_csv(root / "sample_submission.csv",
                                                                                 index=False)
    return root


def make_cells(root: Path) -> Path:
    """A multilabel polygon-JSON set: a membrane polygon around each nucleus (they overlap), two
    images per case folder (the group)."""
    for k in range(8):
        case, stem = f"case{k // 2}", f"img{k}"
        rng = np.random.default_rng(k)
        x, y = int(rng.integers(8, 30)), int(rng.integers(8, 20))
        img = np.full((H, W), 40, np.uint8)
        cv2.rectangle(img, (x, y), (x + 24, y + 20), 120, -1)
        cv2.rectangle(img, (x + 6, y + 5), (x + 16, y + 14), 220, -1)
        (root / "train/images" / case).mkdir(parents=True, exist_ok=True)
        (root / "train/labels" / case).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "train/images" / case / f"{stem}.png"), img)
        anns = [{"label": "membrane", "points": [[x, y], [x + 24, y], [x + 24, y + 20], [x, y + 20]]},
                {"label": "nucleus", "points": [[x + 6, y + 5], [x + 16, y + 5], [x + 16, y + 14], [x + 6, y + 14]]}]
        (root / "train/labels" / case / f"{stem}.json").write_text(json.dumps({"annotations": anns}))
    for k in range(2):
        (root / "test/images/case9").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "test/images/case9" / f"t{k}.png"), np.full((H, W), 40, np.uint8))
    return root


def make_organs(root: Path) -> Path:
    """A mask-folder set: index masks (1 = liver, 2 = kidney), patients in patients.csv with the
    columns image,patient."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "test").mkdir()
    rows = []
    for k in range(8):
        m = np.zeros((H, W), np.uint8)
        m[5 + k:25 + k, 5:30] = 1
        m[30:44, 36 + k:56] = 2
        cv2.imwrite(str(root / "images" / f"m{k}.png"), (m * 90 + 20).astype(np.uint8))
        cv2.imwrite(str(root / "masks" / f"m{k}.png"), m)
        rows.append((f"m{k}.png", f"p{k % 4}"))
    pd.DataFrame(rows, columns=["image", "patient"]).to_csv(root / "patients.csv", index=False)
    for k in range(2):
        cv2.imwrite(str(root / "test" / f"x{k}.png"), np.full((H, W), 20, np.uint8))
    return root


@pytest.fixture
def proj(tmp_path, monkeypatch, one_thread) -> Path:
    (tmp_path / "configs/competitions").mkdir(parents=True)
    (tmp_path / "configs/experiments").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


TRAIN = [a for kv in ("train.epochs=1", "scheduler.warmup_epochs=0", "model.encoder=tu-test_resnet",
                      "tracking.wandb=false", "train.progress=false") for a in ("--set", kv)]


def init_folds_train(proj: Path, name: str, capsys) -> tuple[dict, pd.DataFrame, dict, str]:
    """`competition init`, `folds` and one epoch of fold 0, as a new user runs them."""
    assert main(["init", f"data/{name}"]) == 0
    out = capsys.readouterr().out
    comp = yaml.safe_load((proj / f"configs/competitions/{name}.yaml").read_text())
    assert main(["folds", "--comp", name]) == 0
    folds = pd.read_csv(proj / f"folds/{name}.csv")
    assert main(["train", "--exp", f"{name}-baseline", "--fold", "0", *TRAIN]) == 0
    metrics = json.loads((proj / f"runs/{name}-baseline/fold0/metrics.json").read_text())
    return comp, folds, metrics, out


def commented(path: Path) -> None:
    """Every key line of a file init wrote follows a comment line (the entries of a {value: name}
    classes mapping are explained by the comment above `classes`)."""
    lines = path.read_text().splitlines()
    for k, line in enumerate(lines):
        s = line.strip()
        if not s or s.startswith(("#", "- ")):
            continue
        indent = len(line) - len(line.lstrip())
        parent = next((q.strip() for q in reversed(lines[:k])
                       if q.strip() and not q.strip().startswith("#") and len(q) - len(q.lstrip()) < indent), "")
        assert parent == "classes:" or lines[k - 1].lstrip().startswith("#"), f"{path}:{k + 1} {line!r}: no comment"


@pytest.mark.slow
def test_rle_csv_multiclass_street_scenes(proj, capsys):
    make_street(proj / "data/street")
    comp, folds, metrics, out = init_folds_train(proj, "street", capsys)
    assert comp["data_root"] == "data/street"  # relative: the data lies inside the project
    assert comp["format"] == "rle_csv" and comp["task"] == "multiclass"
    assert comp["classes"] == {1: "sky", 2: "road", 3: "car"}  # names from classes.csv, values from the CSV
    spec = comp["rle_csv"]
    assert (spec["images"], spec["csv"], spec["id_column"], spec["class_column"], spec["rle_column"]) == \
        ("train_images", "train.csv", "ImageId", "ClassId", "EncodedPixels")
    assert spec["pixel_order"] == "column-major" and spec["test_images"] == "test_images"
    assert comp["groups"] == {"source": "column", "csv": "groups.csv", "id_column": "ImageId",
                              "column": "SequenceId"}
    assert comp["image"]["channels"] == "rgb"
    sub = comp["submission"]
    assert (sub["id_column"], sub["class_column"], sub["rle_column"], sub["pixel_order"], sub["id_format"],
            sub["sample_submission"]) == ("ImageId", "ClassId", "EncodedPixels", "column-major", "filename",
                                          "sample_submission.csv")
    from competition.config import CompetitionConfig, load_competition
    from competition.data.adapters import make_adapter
    adapter = make_adapter(load_competition("street"))
    truth = street_masks(3)
    np.testing.assert_array_equal(adapter.load_mask("f3"), np.stack([truth[c] for c in (SKY, ROAD, CAR)]))
    if "ignore" in CompetitionConfig.model_fields:
        assert comp["ignore"] == {"value": 255, "metric": "exclude"}
        np.testing.assert_array_equal(adapter.void_region("f3"), truth[VOID] > 0)
    else:
        assert "ignore" not in comp and "255" in out
    # Groups respected: the two frames of a sequence share a fold.
    seq = folds["id"].str[1:].astype(int) // 2
    assert (folds.groupby(seq)["fold"].nunique() == 1).all() and folds["fold"].nunique() == 4
    assert set(metrics["val_dice_per_class"]) == {"sky", "road", "car"}
    commented(proj / "configs/competitions/street.yaml")
    commented(proj / "configs/experiments/street-baseline.yaml")


@pytest.mark.slow
def test_polygon_json_multilabel(proj, capsys):
    make_cells(proj / "data/cells")
    comp, folds, metrics, out = init_folds_train(proj, "cells", capsys)
    assert comp["format"] == "polygon_json" and comp["task"] == "multilabel"  # membrane and nucleus overlap
    assert comp["classes"] == ["membrane", "nucleus"]
    assert comp["polygon_json"] == {"train_images": "train/images", "train_labels": "train/labels",
                                    "test_images": "test/images", "image_ext": ".png"}
    assert comp["groups"] == {"source": "folder"} and comp["image"]["channels"] == "grayscale"
    assert (folds.groupby(folds["id"].str.split("/").str[0])["fold"].nunique() == 1).all()
    assert set(metrics["val_dice_per_class"]) == {"membrane", "nucleus"}
    assert "no sample submission found" in out
    commented(proj / "configs/competitions/cells.yaml")


@pytest.mark.slow
def test_mask_folders_index(proj, capsys):
    make_organs(proj / "data/organs")
    comp, folds, metrics, out = init_folds_train(proj, "organs", capsys)
    assert comp["format"] == "mask_folders" and comp["task"] == "multiclass"
    assert comp["mask_folders"]["mask_mode"] == "index" and comp["mask_folders"]["test_images"] == "test"
    assert comp["classes"] == ["class_1", "class_2"] and "rename them" in out  # no names anywhere
    assert comp["groups"] == {"source": "column", "csv": "patients.csv", "id_column": "image",
                              "column": "patient"}
    patient = folds["id"].str[1:].astype(int) % 4
    assert (folds.groupby(patient)["fold"].nunique() == 1).all()
    assert set(metrics["val_dice_per_class"]) == {"class_1", "class_2"}


def test_refuses_to_overwrite_without_force(proj, capsys):
    make_organs(proj / "data/organs")
    assert main(["init", "data/organs", "--name", "o"]) == 0
    path = proj / "configs/competitions/o.yaml"
    path.write_text(path.read_text() + "# my edit\n")
    assert main(["init", "data/organs", "--name", "o"]) == 2
    assert "--force" in capsys.readouterr().err and path.read_text().endswith("# my edit\n")
    assert main(["init", "data/organs", "--name", "o", "--force"]) == 0
    assert not path.read_text().endswith("# my edit\n")


def square_set(root: Path, shown: bool) -> None:
    """Four 32x32 images with column-major RLE masks; ``shown``: each image shows its mask, else blank."""
    (root / "imgs").mkdir(parents=True)
    rows = []
    for k in range(4):
        m = np.zeros((32, 32), np.uint8)
        m[4 + k:20, 6:18 + k] = 1
        cv2.imwrite(str(root / "imgs" / f"a{k}.png"), m * 200 if shown else np.zeros_like(m))
        rows.append((f"a{k}", ref_rle(m, "column-major"), f"site{k // 2}"))
    pd.DataFrame(rows, columns=["id", "rle", "site"]).to_csv(root / "train.csv", index=False)


def test_square_images_leave_the_pixel_order_undecided(proj, capsys):
    """On square images both orders decode to valid, equally compact masks; on blank images no edge
    says which: init says so, and `folds` does not refuse."""
    square_set(proj / "data/sq", shown=False)
    assert main(["init", "data/sq"]) == 0
    out = capsys.readouterr().out
    comp = yaml.safe_load((proj / "configs/competitions/sq.yaml").read_text())
    assert comp["rle_csv"]["pixel_order"] == "row-major" and "pixel order" in out
    assert "NOT DECIDED" in (proj / "configs/competitions/sq.yaml").read_text()
    assert "0 of 4 sampled square images scored" in out and "blank image" in out
    assert main(["folds", "--comp", "sq"]) == 0
    assert comp["classes"] == ["object"] and "class_column" not in comp["rle_csv"]
    assert comp["groups"] == {"source": "column", "column": "site"}  # from the train CSV itself
    assert comp["rle_csv"]["test_images"] is None and "no test image folder" in out


def test_square_images_take_the_pixel_order_their_edges_show(proj, capsys):
    """Square images that show what the masks outline: the order whose boundaries lie on the edges."""
    square_set(proj / "data/sq", shown=True)
    assert main(["init", "data/sq"]) == 0
    out = capsys.readouterr().out
    comp = yaml.safe_load((proj / "configs/competitions/sq.yaml").read_text())
    assert comp["rle_csv"]["pixel_order"] == comp["submission"]["pixel_order"] == "column-major"
    # a2 is a square on the diagonal: its own transpose, so no evidence
    assert "RLE pixel order column-major (square images" in out and "on 3 of 3 images scored" in out
    assert "PROBLEMS" not in out and main(["folds", "--comp", "sq"]) == 0
    # Set back to row-major by hand: `folds` refuses with the evidence, init reports it as a problem.
    path = proj / "configs/competitions/sq.yaml"
    path.write_text(path.read_text().replace("pixel_order: column-major", "pixel_order: row-major"))
    assert main(["folds", "--comp", "sq", "--force"]) == 2
    err = capsys.readouterr().err
    assert "masks fit their images better transposed" in err and "on 3 of 3 sampled square images" in err
    assert "set `rle_csv.pixel_order: column-major` in configs/competitions/sq.yaml" in err


def test_data_that_does_not_load_is_written_and_reported(proj, capsys):
    """RLE runs beyond their images: the config is written, the problem printed, the exit code 1."""
    root = proj / "data/bad"
    (root / "train_images").mkdir(parents=True)
    for k in range(3):
        cv2.imwrite(str(root / "train_images" / f"b{k}.png"), np.zeros((H, W), np.uint8))
    pd.DataFrame([(f"b{k}", "x", f"1 {H * W + 10}") for k in range(3)],
                 columns=["ImageId", "label", "EncodedPixels"]).to_csv(root / "train.csv", index=False)
    assert main(["init", "data/bad"]) == 1
    out = capsys.readouterr().out
    assert "PROBLEMS" in out and "train.csv line 2" in out
    assert (proj / "configs/competitions/bad.yaml").is_file()


def test_unknown_layouts_are_refused(proj, capsys):
    (proj / "data/only/imgs").mkdir(parents=True)
    cv2.imwrite(str(proj / "data/only/imgs/a.png"), np.zeros((8, 8), np.uint8))
    assert main(["init", "data/only"]) == 2
    assert "not a layout competition init recognises" in capsys.readouterr().err
    (proj / "data/only/a.json").write_text(json.dumps({"shapes": [{"label": "x", "points": []}]}))
    assert main(["init", "data/only"]) == 2
    assert "LabelMe" in capsys.readouterr().err
    assert not list((proj / "configs/competitions").iterdir())


def test_starter_input_size_keeps_the_aspect_ratio():
    from competition.config import DataConfig
    from competition.init import starter_experiment
    exp, _ = starter_experiment("s", [(360, 480)] * 3 + [(100, 100)])
    if "resize" in DataConfig.model_fields:  # non-square inputs
        assert exp["data"]["input_size"] == [192, 256] and exp["data"]["resize"] == "letterbox"
    else:
        assert exp["data"]["input_size"] == 256
    assert starter_experiment("s", [(64, 64)])[0]["data"]["input_size"] == 64


# --------------------------------------------------------------------------------------------- #
# Class maps: names in reports, the competition's values in CSVs
# --------------------------------------------------------------------------------------------- #
def test_class_map_forms_and_errors():
    from competition.config import CompetitionConfig, ConfigError, to_plain, validate
    base = {"name": "c", "data_root": "d", "format": "rle_csv"}
    mapping = validate(CompetitionConfig, {**base, "classes": {1: "sky", 2: "road"}}, "t")
    listed = validate(CompetitionConfig, {**base, "classes": ["sky", "road"],
                                          "rle_csv": {"class_values": [1, "2"]}}, "t")
    assert mapping == listed and mapping.classes == ["sky", "road"] and mapping.class_values == ["1", "2"]
    assert validate(CompetitionConfig, to_plain(mapping), "t") == mapping  # the resolved form reads back
    assert validate(CompetitionConfig, {**base, "classes": ["a"]}, "t").class_values == ["a"]
    for bad, message in [({"classes": ["a", "b"], "rle_csv": {"class_values": [1]}}, "one value per class"),
                         ({"classes": ["a", "b"], "rle_csv": {"class_values": [1, "1"]}}, "repeated: \\['1'\\]"),
                         ({"classes": {1: "a"}, "rle_csv": {"class_values": [1]}}, "give the class values once"),
                         ({"classes": ["a"], "rle_csv": {"class_values": [1.5]}}, "integer or a non-empty string")]:
        with pytest.raises(ConfigError, match=message):
            validate(CompetitionConfig, {**base, **bad}, "t")


def test_submission_writes_class_values_and_validates(proj, capsys):
    from competition.config import load_competition
    from competition.data.adapters import make_adapter
    from competition.predict.submit import SubmissionWriter, expected_rows, validate_submission
    from competition.score import score_files
    make_street(proj / "data/street")
    assert main(["init", "data/street"]) == 0
    cfg = load_competition("street")
    ids, expected = expected_rows(cfg, make_adapter(cfg))
    assert ids == ["t100", "t101"] and expected["ClassId"].tolist() == ["1", "2", "3"] * 2
    truth = street_masks(100)
    with SubmissionWriter(proj / "sub.csv", cfg) as w:
        for i in ids:
            w.add(f"{i}.png", np.stack([truth[c] for c in (SKY, ROAD, CAR)]))
    sub = pd.read_csv(proj / "sub.csv", dtype=str, keep_default_na=False)
    assert sub["ClassId"].tolist() == ["1", "2", "3"] * 2
    assert sub["EncodedPixels"][0] == ref_rle(truth[SKY], "column-major")
    assert validate_submission(proj / "sub.csv", cfg, expected) == 6
    exact = expected.assign(EncodedPixels=sub["EncodedPixels"])
    exact.to_csv(proj / "truth.csv", index=False)
    result = score_files(proj / "sub.csv", proj / "truth.csv", cfg)
    assert result.mean == 1.0 and list(result.per_class) == ["sky", "road", "car"]
    assert result.per_row["class"].tolist() == ["sky", "road", "car"] * 2


# --------------------------------------------------------------------------------------------- #
# competition score --sizes-from / --size
# --------------------------------------------------------------------------------------------- #
def test_score_truth_without_sizes(proj, capsys):
    root = make_street(proj / "data/street")
    assert main(["init", "data/street"]) == 0
    capsys.readouterr()
    truth = [(f"t{k}.png", c, ref_rle(street_masks(k)[c], "column-major")) for k in (100, 101) for c in (1, 2, 3)]
    cols = ["ImageId", "ClassId", "EncodedPixels"]
    pd.DataFrame(truth, columns=cols).to_csv(proj / "truth.csv", index=False)
    sub = [list(r) for r in truth]
    sub[2][2] = ""  # t100's car predicted empty: Dice 0 for that pair
    pd.DataFrame(sub, columns=cols).to_csv(proj / "sub.csv", index=False)
    base = ["score", "sub.csv", "--comp", "street", "--truth", "truth.csv"]

    assert main(base) == 2
    err = capsys.readouterr().err
    assert "--sizes-from DIR" in err and "--size HxW" in err

    assert main(base + ["--sizes-from", str(root / "test_images")]) == 0
    out = capsys.readouterr().out
    assert f"mean Dice {5 / 6:.4f} over 6" in out and "car" in out and "sky" in out  # names, not ClassIds

    assert main(base + ["--size", f"{H}x{W}"]) == 0
    assert f"mean Dice {5 / 6:.4f}" in capsys.readouterr().out
    assert main(base + ["--size", "40x40"]) == 2  # too small: the truth's runs leave the image
    assert "bad RLE for a 40x40 image" in capsys.readouterr().err
    assert main(base + ["--size", "48by64"]) == 2
    assert "HEIGHTxWIDTH" in capsys.readouterr().err


def test_sizes_from_names_missing_images(tmp_path):
    from competition.score import ScoreError, sizes_from_images
    (tmp_path / "s").mkdir()
    cv2.imwrite(str(tmp_path / "s" / "a.jpg"), np.zeros((5, 7), np.uint8))
    cv2.imwrite(str(tmp_path / "b.png"), np.zeros((3, 4), np.uint8))
    assert sizes_from_images(tmp_path, ["a", "a.jpg", "s/a", "b.png"]) == \
        {"a": (5, 7), "a.jpg": (5, 7), "s/a": (5, 7), "b.png": (3, 4)}
    with pytest.raises(ScoreError, match=r"no image file for id\(s\) c.png"):
        sizes_from_images(tmp_path, ["a", "c.png"])


def test_hand_bone_layout_and_its_test_truth(proj, tiny_data_cache, capsys):
    """The embedded generator's hand-bone layout (train/DCM, train/outputs_json, a sample submission
    and a test truth): init finds them all, and `competition score` then needs no --truth."""
    import shutil
    shutil.copytree(tiny_data_cache, proj / "data/hands")
    assert main(["init", "data/hands"]) == 0
    comp = yaml.safe_load((proj / "configs/competitions/hands.yaml").read_text())
    assert comp["polygon_json"] == {"train_images": "train/DCM", "train_labels": "train/outputs_json",
                                    "test_images": "test/DCM", "image_ext": ".png"}
    assert comp["submission"]["sample_submission"] == "sample_submission.csv"
    assert comp["submission"]["test_truth"] == "test_truth.csv" and len(comp["classes"]) == 12
    truth = pd.read_csv(proj / "data/hands/test_truth.csv", dtype=str, keep_default_na=False)
    truth.drop(columns=["height", "width"]).to_csv(proj / "perfect.csv", index=False)
    capsys.readouterr()
    assert main(["score", "perfect.csv", "--comp", "hands"]) == 0
    assert "mean Dice 1.0000" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------- #
# Files init cannot use: named, with the line and what was expected
# --------------------------------------------------------------------------------------------- #
def one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback
    return err


def test_a_train_csv_that_is_not_utf8_is_named(proj, capsys):
    root = make_street(proj / "data/street")
    text = (root / "train.csv").read_text().splitlines()
    text[3] += ",caf\xe9"  # a Latin-1 byte on line 4
    (root / "train.csv").write_bytes("\n".join(text).encode("latin-1"))
    assert main(["init", "data/street"]) == 2
    err = one_error(capsys)
    assert "train.csv: CSV is not UTF-8 text (undecodable byte 0xe9 on line 4); save it as UTF-8" in err
    assert not list((proj / "configs/competitions").iterdir())


def test_an_unreadable_side_csv_is_reported(proj, capsys):
    root = make_street(proj / "data/street")
    (root / "groups.csv").write_bytes((root / "groups.csv").read_bytes() + b"f9.png,s\xe9q\n")
    assert main(["init", "data/street"]) == 0
    out = capsys.readouterr().out
    assert "groups.csv: CSV is not UTF-8 text (undecodable byte 0xe9 on line 10)" in out
    assert "init did not use it" in out


@pytest.mark.parametrize("rows, message", [
    ([(1, "sky"), (2, "road"), (3, "car"), (255, "void"), (2, "lane")],
     r"classes\.csv line 6: class value '2' \(column 'ClassId'\) is listed twice, also at line 3"),
    ([(1, "sky"), (2, "road"), (3, "road"), (255, "void")],
     r"classes\.csv line 4: class name 'road' \(column 'name'\) is listed twice, also at line 3"),
])
def test_a_class_table_with_a_repeat_is_refused(proj, capsys, rows, message):
    root = make_street(proj / "data/street")
    pd.DataFrame(rows, columns=["ClassId", "name"]).to_csv(root / "classes.csv", index=False)
    assert main(["init", "data/street"]) == 2
    assert re.search(message, one_error(capsys))


def test_classes_txt_names_index_masks(proj, capsys):
    root = make_organs(proj / "data/organs")
    (root / "classes.txt").write_text("liver\n\n  kidney  \n")
    assert main(["init", "data/organs"]) == 0
    out = capsys.readouterr().out
    comp = yaml.safe_load((proj / "configs/competitions/organs.yaml").read_text())
    assert comp["classes"] == ["liver", "kidney"] and "class names from classes.txt: liver, kidney" in out
    assert "rename them" not in out
    (root / "classes.txt").write_text("background\nliver\nkidney\n")  # a leading background entry is no class
    assert main(["init", "data/organs", "--force"]) == 0
    assert yaml.safe_load((proj / "configs/competitions/organs.yaml").read_text())["classes"] == ["liver", "kidney"]


@pytest.mark.parametrize("text, message", [
    ("liver\nkidney\n\nliver\n", r"classes\.txt line 4: class name 'liver' is listed twice \(also on line 1\)"),
    ("liver\nkidney\nspleen\n", r"classes\.txt: 3 class names, but the index masks hold pixel values 1\.\.2 \(2 "
                                r"classes"),
    ("liver\n", r"classes\.txt: 1 class names, but the index masks hold pixel values 1\.\.2"),
    ("\n\n", r"classes\.txt: no class names in it"),
])
def test_classes_txt_errors(proj, capsys, text, message):
    root = make_organs(proj / "data/organs")
    (root / "classes.txt").write_text(text)
    assert main(["init", "data/organs"]) == 2
    assert re.search(message, one_error(capsys))
    (root / "classes.txt").write_bytes(b"liver\nk\xf6rper\n")
    assert main(["init", "data/organs"]) == 2
    assert "classes.txt: class names file is not UTF-8 text (undecodable byte 0xf6 on line 2)" in one_error(capsys)


def test_classes_txt_orders_label_names_and_numeric_values(proj, capsys):
    root = make_cells(proj / "data/cells")
    (root / "classes.txt").write_text("nucleus\nmembrane\n")
    assert main(["init", "data/cells"]) == 0
    assert yaml.safe_load((proj / "configs/competitions/cells.yaml").read_text())["classes"] == ["nucleus", "membrane"]
    (root / "classes.txt").write_text("nucleus\ncytoplasm\n")
    assert main(["init", "data/cells", "--force"]) == 2
    err = one_error(capsys)
    assert "classes.txt: does not list the labels' class names: missing ['membrane']; not in any label " \
           "['cytoplasm']" in err
    street = make_street(proj / "data/street")
    (street / "classes.csv").unlink()
    (street / "classes.txt").write_text("sky\nroad\ncar\n")  # 255 is void, not a class
    assert main(["init", "data/street"]) == 0
    comp = yaml.safe_load((proj / "configs/competitions/street.yaml").read_text())
    assert comp["classes"] == {1: "sky", 2: "road", 3: "car"}


def test_every_data_format_is_registered_configured_detected_and_documented():
    """A format is its reader module plus one entry in config.FORMATS: the `format` literal, the settings
    sections, the reader modules' adapters, init's detectors and the docs must name the same formats."""
    import typing
    from pathlib import Path

    from competition.config import FORMATS, CompetitionConfig
    from competition.data.adapters import load_readers
    from competition.data.base import ADAPTERS
    from competition.init.layouts import FINDERS
    load_readers()
    formats = set(FORMATS)
    assert set(typing.get_args(CompetitionConfig.model_fields["format"].annotation)) == formats
    assert set(ADAPTERS.names()) == formats == set(FINDERS)
    assert all(CompetitionConfig.model_fields[f].annotation is FORMATS[f] for f in formats)
    docs = (Path(__file__).resolve().parent.parent / "docs/competitions.md").read_text()
    assert all(f"`{f}`" in docs for f in formats)
