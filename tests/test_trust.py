"""Nothing the runner wrote itself is trusted unchecked: a hand-edited recipe, a damaged CSV or JSON,
a submission that passes the format but cannot be right, a full disk — each ends in one line naming
the file and what was expected, or is handled, never a wrong result marked "validated"."""
from __future__ import annotations

import errno
import math
import re

import numpy as np
import pytest
import yaml

from competition.config import ConfigError, load_recipe
from competition.io import ReadError, read_csv, read_json
from competition.predict import plausible

GOOD = {"name": "r", "competition": "c", "task": "multilabel", "classes": ["a", "b"], "folds_sha256": "f",
        "members": [{"experiment": "e", "folds": [0, 1], "weights": [1.0],
                     "checkpoints": [{"path": "runs/e/fold0/best.pt", "sha256": "0" * 16},
                                     {"path": "runs/e/fold1/best.pt", "sha256": "1" * 16}]}],
        "thresholds": [0.5, 0.4]}


def recipe_file(tmp_path, **change):
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    for key, value in change.items():
        node, *path = key.split(".")
        target = data
        for k in [node, *path][:-1]:
            target = target[int(k)] if isinstance(target, list) else target[k]
        last = [node, *path][-1]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_a_valid_recipe_loads(tmp_path):
    assert load_recipe(recipe_file(tmp_path)).thresholds == [0.5, 0.4]


@pytest.mark.parametrize("change, message", [
    ({"thresholds.0": 1.5}, r"thresholds: 1.5 for class 'a'; expected a probability strictly between 0 and 1"),
    ({"thresholds.1": -0.2}, r"thresholds: -0.2 for class 'b'"),
    ({"thresholds.0": float("nan")}, r"thresholds.0: Input should be a finite number"),
    ({"thresholds.0": 0.0}, r"strictly between 0 and 1"),
    ({"thresholds": [0.5]}, r"thresholds: 1 values for 2 classes"),
    ({"members.0.weights": [float("nan")]}, r"members.0.weights.0.*finite number"),
    ({"members.0.weights": [float("inf")]}, r"members.0.weights.0.*finite number"),
    ({"members.0.weights": [-1.0]}, r"members.0.weights.0.*greater than or equal to 0"),
    ({"members.0.weights": [0.0]}, r"weights sum to 0 for class\(es\) \['a', 'b'\]"),
    ({"members.0.weights": [1.0, 0.0, 2.0]}, r"3 values; expected 1 \(global\) or 2"),
    ({"members.0.folds": [0]}, r"2 checkpoints for 1 folds"),
    ({"members.0.folds": [0, 0]}, r"list a fold twice"),
    ({"members.0.checkpoints.0.sha256": "not-a-hash"}, r"sha256"),
    ({"members.0.tta_scales": [0.0]}, r"tta_scales.0.*greater than 0"),
    ({"members.0.experiment": "../up"}, r"members.0.experiment"),
    ({"classes": ["a", "a"]}, r"distinct class names"),
    ({"postprocess": {"z": {"min_area": 3}}}, r"postprocess: unknown class\(es\) \['z'\]"),
    ({"postprocess": {"a": {"min_area": -3}}}, r"min_area.*greater than or equal to 0"),
])
def test_a_hand_edited_recipe_is_refused_naming_the_file_and_key(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_recipe(recipe_file(tmp_path, **change))
    assert str(tmp_path / "r.yaml") in str(e.value)


def test_nan_written_by_hand_as_yaml_text_is_refused(tmp_path):
    p = recipe_file(tmp_path)
    p.write_text(p.read_text().replace("- 0.4", "- .nan"))
    with pytest.raises(ConfigError, match="thresholds.1: Input should be a finite number"):
        load_recipe(p)


# --------------------------------------------------------------------------------------------- #
# Readers of our own text files
# --------------------------------------------------------------------------------------------- #
def test_csv_and_json_readers_name_the_file_and_the_problem(tmp_path):
    p = tmp_path / "x.csv"
    p.write_bytes(b"id,class,rle\nimg\xff,a,1 2\n")
    with pytest.raises(ReadError, match=r"x.csv: submission is not UTF-8 text \(undecodable byte 0xff on line 2\)"):
        read_csv(p, "submission")
    p.write_bytes(b"")
    with pytest.raises(ReadError, match=r"x.csv: submission is empty"):
        read_csv(p, "submission")
    p.write_text('id,class\n"a,b\n')
    with pytest.raises(ReadError, match=r"x.csv: submission is not a valid CSV"):
        read_csv(p, "submission")
    p.write_text("id,class,rle\nimg,a,1 2,extra\n")  # pandas alone would shift the row into an index
    with pytest.raises(ReadError,
                       match=r"x.csv: submission is not a valid CSV \(line 2 has 4 cells but the header has 3\)"):
        read_csv(p, "submission")
    j = tmp_path / "m.json"
    j.write_text('{"a": 1,')
    with pytest.raises(ReadError, match=r"m.json: metrics file is not valid JSON \(line 1"):
        read_json(j, "metrics file")
    j.write_text('{"a": [1, 2]}')
    assert read_json(j) == {"a": [1, 2]}


def test_score_of_a_non_utf8_submission_is_one_line_naming_it(tmp_path, capsys):
    from competition.cli import main
    sub, truth = tmp_path / "sub.csv", tmp_path / "truth.csv"
    truth.write_text("image_name,class,rle,height,width\nimg,thumb,1 2,4,4\n")
    sub.write_bytes(b"image_name,class,rle\nimg,thumb,1 2\xe9\n")
    assert main(["score", str(sub), "--truth", str(truth)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(sub) in err and "not UTF-8" in err, err


# --------------------------------------------------------------------------------------------- #
# A submission that cannot be right
# --------------------------------------------------------------------------------------------- #
def counts(present, whole, images, classes=("a", "b", "c")):
    return plausible.MaskCounts(list(classes), images, np.array(present), np.array(whole))


def test_plausibility_known_answers():
    share = {"a": 1.0, "b": 0.5, "c": 0.0}
    assert plausible.problems(counts([10, 3, 0], [0, 0, 0], 10), share) == []
    assert plausible.problems(counts([0, 0, 0], [0, 0, 0], 10), share) == ["every mask of all 10 test images is empty"]
    # b is in half the training images: 10 test images all without it happen with p = 0.5 ** 10 < 1e-3
    found = plausible.problems(counts([10, 0, 0], [0, 0, 0], 10), share)
    assert len(found) == 1 and "1 class(es) empty in all 10 test images" in found[0] and "b (in 50%" in found[0]
    # ... but 3 test images without it are likely (0.125): not suspicious; c is never in training
    assert plausible.problems(counts([3, 0, 0], [0, 0, 0], 3), share) == []
    found = plausible.problems(counts([10, 3, 1], [10, 0, 0], 10), share)
    assert found == ["1 class(es) cover every pixel of all 10 test images: a"]
    # no training truth on record (a `predict` of one experiment): only what is wrong whatever the truth
    assert plausible.problems(counts([10, 0, 0], [0, 0, 0], 10), None) == []
    assert plausible.problems(counts([0, 0, 0], [0, 0, 0], 10), None) == ["every mask of all 10 test images is empty"]
    assert plausible.problems(counts([0, 0, 0], [0, 0, 0], 0), share) == []


def test_mask_counts_from_pixels():
    c = plausible.MaskCounts(["a", "b"])
    c.add([0, 100], area=100)
    c.add([5, 99], area=100)
    assert c.images == 2 and c.present.tolist() == [1, 2] and c.whole.tolist() == [0, 1]
    assert math.isclose(plausible.WHOLE, 0.999)


# --------------------------------------------------------------------------------------------- #
# A full disk
# --------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize("free, code", [(0, errno.ENOSPC), (1 << 40, errno.EIO)])
def test_a_failed_checkpoint_write_is_called_a_full_disk_only_when_it_is(tmp_path, monkeypatch, free, code):
    import shutil
    from collections import namedtuple

    import torch

    from competition import checkpoint as ckpt

    def failing(obj, f, *a, **kw):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 3456 vs 3392")
    monkeypatch.setattr(torch, "save", failing)
    real = shutil.disk_usage
    monkeypatch.setattr(ckpt.shutil, "disk_usage",
                        lambda p: (namedtuple("u", "total used free")(1, 1, free) if str(p) == str(tmp_path)
                                   else real(p)))
    with pytest.raises(OSError) as e:
        ckpt.save({"w": torch.zeros(1000)}, tmp_path / "last.pt")
    assert e.value.errno == code and e.value.filename == str(tmp_path / "last.pt")
    assert not list(tmp_path.iterdir())  # the temp file is gone


def test_a_full_or_damaged_optuna_database_is_one_line_naming_it():
    from sqlalchemy.exc import OperationalError

    from competition.errors import describe_error
    from competition.tune.study import storage_errors
    url = "sqlite:////tmp/proj/runs/_tune/e.db"
    with pytest.raises(OSError) as e:
        with storage_errors(url):
            raise OperationalError("INSERT ...", {}, Exception("database or disk is full"))
    assert e.value.errno == errno.ENOSPC and e.value.filename == "/tmp/proj/runs/_tune/e.db"
    assert "the disk is full" in describe_error(e.value)
    with pytest.raises(ConfigError, match=r"storage .*e.db.* failed: OperationalError: database disk image is "
                                          r"malformed; if it is a damaged SQLite file"):
        with storage_errors(url):
            raise OperationalError("SELECT ...", {}, Exception("database disk image is malformed"))


@pytest.mark.parametrize("override", ["optimizer.lr=nan", "train.threshold=.inf", "data.pseudo.weight=.inf"])
def test_nan_and_infinity_are_refused_in_every_config(override):
    from competition.config import load_experiment, parse_overrides
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}: Input should be a finite number"):
        load_experiment("baseline", parse_overrides([override]))
