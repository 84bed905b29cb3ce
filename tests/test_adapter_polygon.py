import json

import cv2
import numpy as np
import pytest

from competition.config import CompetitionConfig
from competition.data.adapters import make_adapter
from competition.data.base import DataError

CLASSES = ["a", "b", "c"]
SQUARE = [[2, 2], [9, 2], [9, 9], [2, 9]]


def cfg(root, **kw) -> CompetitionConfig:
    return CompetitionConfig(name="poly", data_root=str(root), format="polygon_json", classes=CLASSES, **kw)


def add(root, subject, stem, anns, size=(20, 30), split="train"):
    img_dir = root / split / "DCM" / subject
    img_dir.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(img_dir / f"{stem}.png"), np.full(size, 100, np.uint8))
    if split == "train":
        lab = root / "train" / "outputs_json" / subject
        lab.mkdir(parents=True, exist_ok=True)
        (lab / f"{stem}.json").write_text(json.dumps({"annotations": anns}))


@pytest.fixture
def data(tmp_path):
    add(tmp_path, "ID1", "img1", [{"label": "a", "points": SQUARE},
                                  {"label": "a", "points": [[20, 10], [25, 10], [25, 15], [20, 15]]},
                                  {"label": "b", "points": [[5, 5], [14, 5], [14, 14], [5, 14]]}])
    add(tmp_path, "ID1", "img2", [{"label": "c", "points": SQUARE}])
    add(tmp_path, "ID2", "img3", [])
    add(tmp_path, "ID9", "tst1", [], split="test")
    return tmp_path


def test_ids_groups_test_ids(data):
    ad = make_adapter(cfg(data))
    assert ad.ids == ["ID1/img1", "ID1/img2", "ID2/img3"]
    assert ad.groups() == {"ID1/img1": "ID1", "ID1/img2": "ID1", "ID2/img3": "ID2"}
    assert ad.test_ids == ["ID9/tst1"]
    assert ad.load_image("ID9/tst1", "test").shape == (20, 30)
    assert ad.submission_id("ID9/tst1") == "tst1.png"
    assert ad.presence("ID1/img1").tolist() == [True, True, False]


def test_polygons_union_and_overlap_at_native_size(data):
    m = make_adapter(cfg(data)).load_mask("ID1/img1")
    assert m.shape == (3, 20, 30) and m.dtype == np.uint8
    expect_a = np.zeros((20, 30), np.uint8)
    expect_a[2:10, 2:10] = 1
    expect_a[10:16, 20:26] = 1  # the second polygon of the same label is unioned
    np.testing.assert_array_equal(m[0], expect_a)
    assert m[1, 5:15, 5:15].all() and m[1].sum() == 100
    assert (m[0] & m[1]).sum() == 25  # classes overlap
    assert m[2].sum() == 0


def test_mask_at_requested_size_matches_resized_truth(data):
    ad = make_adapter(cfg(data))
    big = ad.load_mask("ID1/img1")
    small = ad.load_mask("ID1/img1", (10, 15))
    assert small.shape == (3, 10, 15)
    ref = np.stack([cv2.resize(c, (15, 10), interpolation=cv2.INTER_AREA) for c in big.astype(np.float32)])
    iou = ((small > 0) & (ref >= 0.5)).sum() / ((small > 0) | (ref >= 0.5)).sum()
    assert iou > 0.85


@pytest.mark.parametrize("anns, pattern", [
    ([{"label": "zz", "points": SQUARE}], r"unknown label 'zz'; valid: a, b, c"),
    ([{"label": "a", "points": [[0, 0], [50, 0], [5, 5]]}], r"outside the 30x20 image"),
    ([{"label": "a", "points": [[0, 0], ["x", 0], [5, 5]]}], r"non-numeric points"),
    ([{"label": "a", "points": [[0, 0], [1, 1]]}], r"at least 3 finite"),
])
def test_bad_polygons_name_the_file(tmp_path, anns, pattern):
    add(tmp_path, "ID1", "bad", anns)
    with pytest.raises(DataError, match=pattern) as e:
        make_adapter(cfg(tmp_path)).load_mask("ID1/bad")
    assert "bad.json" in str(e.value)


def test_not_json_and_missing_label(tmp_path):
    add(tmp_path, "ID1", "x", [])
    (tmp_path / "train/outputs_json/ID1/x.json").write_text("{oops")
    with pytest.raises(DataError, match=r"x.json: expected JSON"):
        make_adapter(cfg(tmp_path)).load_mask("ID1/x")
    (tmp_path / "train/outputs_json/ID1/x.json").unlink()
    with pytest.raises(DataError, match=r"x.json: label file not found"):
        make_adapter(cfg(tmp_path)).load_mask("ID1/x")


def test_undecodable_image(tmp_path):
    add(tmp_path, "ID1", "x", [])
    (tmp_path / "train/DCM/ID1/x.png").write_bytes(b"not a png")
    ad = make_adapter(cfg(tmp_path))
    with pytest.raises(DataError, match=r"x.png: cannot be decoded"):
        ad.load_image("ID1/x")
    with pytest.raises(DataError, match=r"x.png: cannot be decoded"):
        ad.load_mask("ID1/x")


def test_duplicate_image_name_across_subjects(tmp_path):
    add(tmp_path, "ID1", "same", [])
    add(tmp_path, "ID2", "same", [])
    with pytest.raises(DataError, match=r"duplicate image id.*same.png"):
        make_adapter(cfg(tmp_path)).ids


def test_path_escaping_the_data_root(tmp_path):
    root = tmp_path / "root"
    add(tmp_path, "ID1", "x", [])
    bad = cfg(root, polygon_json={"train_images": "../train/DCM"})
    with pytest.raises(DataError, match=r"escapes the data root"):
        make_adapter(bad).ids


# --------------------------------------------------------------------------------------------- #
# Malformed label files: refused with the file, the annotation and what was expected
# --------------------------------------------------------------------------------------------- #
def write_label(root, stem, content: bytes | str):
    path = root / "train/outputs_json/ID1" / f"{stem}.json"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


@pytest.mark.parametrize("content, pattern", [
    ("[]", r"x\.json: expected JSON \{\"annotations\".*but the top level is a JSON list, not an object"),
    ('[{"label": "a", "points": [[2, 2], [9, 2], [9, 9]]}]', r"x\.json: .*top level is a JSON list"),
    ('"annotations"', r"x\.json: .*top level is a JSON string"),
    ("{}", r'x\.json: expected JSON .*but "annotations" is missing'),
    ('{"annotations": {"label": "a"}}', r'x\.json: .*but "annotations" is a JSON object'),
    ('{"annotations": [{"label": ["a"], "points": [[2, 2], [9, 2], [9, 9]]}]}',
     r"x\.json: annotation 0 has unknown label \['a'\]"),
])
def test_label_file_of_the_wrong_shape(tmp_path, content, pattern):
    add(tmp_path, "ID1", "x", [])
    write_label(tmp_path, "x", content)
    with pytest.raises(DataError, match=pattern):
        make_adapter(cfg(tmp_path)).load_mask("ID1/x")


@pytest.mark.parametrize("points, bad", [
    ([[2, 2], ["12.5", 2], [9, 9]], r"point 1 is \['12\.5', 2\]"),
    ([[2, 2], [9, 2], [9, True]], r"point 2 is \[9, True\]"),
    ([[False, 2], [9, 2], [9, 9]], r"point 0 is \[False, 2\]"),
    ([[2, 2], [9, None], [9, 9]], r"point 1 is \[9, None\]"),
])
def test_string_and_boolean_coordinates_are_refused_not_converted(tmp_path, points, bad):
    add(tmp_path, "ID1", "x", [{"label": "a", "points": SQUARE}, {"label": "b", "points": points}])
    with pytest.raises(DataError, match=r"x\.json: annotation 1 \(b\) has non-numeric points: " + bad +
                                        r"; coordinates must be JSON numbers"):
        make_adapter(cfg(tmp_path)).load_mask("ID1/x")


def test_int_and_float_coordinates_are_fine(tmp_path):
    add(tmp_path, "ID1", "x", [{"label": "a", "points": [[2, 2.0], [9.5, 2], [9, 9]]}])
    assert make_adapter(cfg(tmp_path)).load_mask("ID1/x")[0].sum() > 0


@pytest.mark.parametrize("points", [[[0, 0], 5, [5, 5]], [[0, 0], [1, 2, 3], [5, 5]], [[0, 0], [1e400, 0], [5, 5]]])
def test_points_that_are_not_pairs_or_not_finite(tmp_path, points):
    add(tmp_path, "ID1", "x", [])
    text = json.dumps({"annotations": [{"label": "a", "points": points}]})
    write_label(tmp_path, "x", text.replace("Infinity", "1e400"))  # JSON has no Infinity; 1e400 overflows to it
    with pytest.raises(DataError, match=r"x\.json: annotation 0 \(a\) (has non-numeric points or points that are "
                                        r"not \[x, y\] pairs|needs at least 3 finite)"):
        make_adapter(cfg(tmp_path)).load_mask("ID1/x")


def test_non_utf8_label_file_names_the_file(tmp_path):
    add(tmp_path, "ID1", "x", [])
    write_label(tmp_path, "x", '{"annotations": [{"label": "a", "note": "Müller", "points": []}]}'.encode("latin-1"))
    with pytest.raises(DataError, match=r"ID1/x\.json: label file is not UTF-8 text \(undecodable byte 0xfc"):
        make_adapter(cfg(tmp_path)).load_mask("ID1/x")
    write_label(tmp_path, "x", b"\xef\xbb\xbf" + json.dumps({"annotations": []}).encode())  # a BOM is fine
    assert make_adapter(cfg(tmp_path)).load_mask("ID1/x").sum() == 0
