"""The Kaggle RLE CSV adapter on tiny fixtures written on the fly (32x40 images)."""
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import competition.data.rle_csv  # noqa: F401  registers "rle_csv"
from competition.config import CompetitionConfig
from competition.data.adapters import make_adapter
from competition.data.base import DataError

H, W = 32, 40
CLASSES = ["x", "y"]


def rle(mask: np.ndarray, order: str = "row-major") -> str:
    """Reference Kaggle encoder (1-based 'start length' pairs), independent of competition.rle."""
    flat = mask.flatten(order="C" if order == "row-major" else "F").astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [0]]))) + 1
    edges[1::2] -= edges[::2]
    return " ".join(map(str, edges))


def box(y0, y1, x0, x1, shape=(H, W)) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


# Truth: a/x is two rectangles written as two rows (unioned), a/y overlaps it; b has y only; c has no rows.
A_X1, A_X2, A_Y, B_Y = box(2, 10, 3, 12), box(20, 30, 25, 38), box(5, 15, 8, 20), box(0, 32, 0, 1)
TRUTH = {"a": np.stack([A_X1 | A_X2, A_Y]), "b": np.stack([np.zeros((H, W), np.uint8), B_Y]),
         "c": np.zeros((2, H, W), np.uint8)}


def write_image(path: Path, shape=(H, W), value=90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full(shape, value, np.uint8))


def make_data(root: Path, order: str = "row-major", rows=None, images=("a", "b", "c"), tests=("t1", "t2")) -> Path:
    for i in images:
        write_image(root / "train_images" / f"{i}.png")
    for i in tests:
        write_image(root / "test_images" / f"{i}.png")
    if rows is None:
        rows = [("a", "x", rle(A_X1, order), "s1"), ("b", "y", rle(B_Y, order), "s2"),
                ("a", "y", rle(A_Y, order), "s1"), ("a", "x", rle(A_X2, order), "s1")]
    columns = {2: ["id", "rle"], 3: ["id", "class", "rle"], 4: ["id", "class", "rle", "site"]}[len(rows[0])]
    pd.DataFrame(rows, columns=columns).to_csv(root / "train.csv", index=False)
    return root


def cfg(root: Path, **kw) -> CompetitionConfig:
    kw.setdefault("classes", CLASSES)
    kw.setdefault("groups", {"source": "none"})
    return CompetitionConfig(name="rle", data_root=str(root), format="rle_csv", **kw)


@pytest.mark.parametrize("order", ["row-major", "column-major"])
def test_ids_masks_union_and_empty_classes(tmp_path, order):
    ad = make_adapter(cfg(make_data(tmp_path, order), rle_csv={"pixel_order": order}))
    assert ad.ids == ["a", "b", "c"]  # c has no rows: a training image with empty masks
    assert ad.test_ids == ["t1", "t2"]
    assert ad.groups() == {"a": "a", "b": "b", "c": "c"}
    for i, truth in TRUTH.items():
        m = ad.load_mask(i)
        assert m.shape == (2, H, W) and m.dtype == np.uint8
        np.testing.assert_array_equal(m, truth)
    assert [ad.presence(i).tolist() for i in "abc"] == [[True, True], [False, True], [False, False]]
    assert ad.image_size("t1", "test") == (H, W) and ad.load_image("t2", "test").shape == (H, W)


def test_wrong_pixel_order_gives_a_different_mask(tmp_path):
    ad = make_adapter(cfg(make_data(tmp_path, "column-major")))  # decoded as row-major
    assert not np.array_equal(ad.load_mask("a"), TRUTH["a"])


@pytest.mark.parametrize("size", [(16, 20), (50, 45), (32, 40)])
def test_mask_at_requested_size_is_nearest_resize_of_truth(tmp_path, size):
    ad = make_adapter(cfg(make_data(tmp_path)))
    h, w = size
    want = np.stack([cv2.resize(c, (w, h), interpolation=cv2.INTER_NEAREST) for c in TRUTH["a"]])
    np.testing.assert_array_equal(ad.load_mask("a", size), want)


def test_ids_with_extension_empty_cells_and_single_class_without_class_column(tmp_path):
    rows = [("a.png", rle(A_X1)), ("a", rle(A_X2)), ("b.png", ""), ("c", "-1")]
    ad = make_adapter(cfg(make_data(tmp_path, rows=rows), classes=["x"]))
    np.testing.assert_array_equal(ad.load_mask("a")[0], A_X1 | A_X2)
    assert ad.load_mask("b").sum() == 0 and ad.load_mask("c").sum() == 0
    assert ad.submission_id("t1") == "t1.png"


def test_groups_from_train_csv_column_and_metadata(tmp_path):
    ad = make_adapter(cfg(make_data(tmp_path, images=("a", "b")), groups={"source": "column", "column": "site"}))
    assert ad.groups() == {"a": "s1", "b": "s2"}
    meta = ad.metadata()
    assert list(meta["id"]) == ["a", "b"] and list(meta["site"]) == ["s1", "s2"]
    assert "class" not in meta.columns and "rle" not in meta.columns


def test_image_without_rows_has_no_group_in_the_train_csv(tmp_path):
    ad = make_adapter(cfg(make_data(tmp_path), groups={"source": "column", "column": "site"}))
    with pytest.raises(DataError, match=r"train\.csv: no 'site' \(group\) for training image\(s\) c;.*groups\.csv"):
        ad.groups()


def test_groups_from_separate_csv(tmp_path):
    make_data(tmp_path)
    pd.DataFrame({"id": ["a", "b", "c", "t1"], "patient": ["p1", "p1", "p2", "p9"], "age": ["3", "4", "5", "6"]}) \
        .to_csv(tmp_path / "groups.csv", index=False)
    ad = make_adapter(cfg(tmp_path, groups={"source": "column", "column": "patient", "csv": "groups.csv"}))
    assert ad.groups() == {"a": "p1", "b": "p1", "c": "p2"}
    meta = ad.metadata()
    assert list(meta["id"]) == ["a", "b", "c"] and list(meta["age"]) == ["3", "4", "5"]
    assert list(meta["site"]) == ["s1", "s2", ""]  # per-id column of the train CSV; c has no rows


def test_conflicting_group_assignments(tmp_path):
    make_data(tmp_path)
    (tmp_path / "groups.csv").write_text("id,patient\na,p1\nb,p2\nc,p3\na,p1\nb,p7\n")
    ad = make_adapter(cfg(tmp_path, groups={"source": "column", "column": "patient", "csv": "groups.csv"}))
    with pytest.raises(DataError, match=r"groups\.csv: conflicting 'patient' values .*'b': 'p2' \(line 3\), "
                                        r"'p7' \(line 6\)"):
        ad.groups()


def test_folder_groups_with_nested_ids(tmp_path):
    for i in ("p1/a", "p1/b", "p2/c"):
        write_image(tmp_path / "train_images" / f"{i}.png")
    pd.DataFrame([("p1/a", "x", rle(A_X1)), ("p2/c.png", "y", rle(A_Y))], columns=["id", "class", "rle"]) \
        .to_csv(tmp_path / "train.csv", index=False)
    ad = make_adapter(cfg(tmp_path, groups={"source": "folder"}))
    assert ad.ids == ["p1/a", "p1/b", "p2/c"] and ad.test_ids == []
    assert ad.groups() == {"p1/a": "p1", "p1/b": "p1", "p2/c": "p2"}
    np.testing.assert_array_equal(ad.load_mask("p2/c")[1], A_Y)
    flat = make_adapter(cfg(make_data(tmp_path / "flat"), groups={"source": "folder"}))
    with pytest.raises(DataError, match="needs the images in <group>/ sub-folders"):
        flat.groups()


def test_custom_column_names_and_folders(tmp_path):
    write_image(tmp_path / "imgs" / "a.jpg")
    pd.DataFrame({"ImageId": ["a.jpg"], "ClassId": ["2"], "EncodedPixels": [rle(A_Y, "column-major")]}) \
        .to_csv(tmp_path / "labels.csv", index=False)
    ad = make_adapter(cfg(tmp_path, classes=["1", "2"], rle_csv={
        "images": "imgs", "csv": "labels.csv", "id_column": "ImageId", "class_column": "ClassId",
        "rle_column": "EncodedPixels", "pixel_order": "column-major", "test_images": None, "image_ext": ".jpg"}))
    assert ad.ids == ["a"] and ad.test_ids == []
    np.testing.assert_array_equal(ad.load_mask("a"), np.stack([np.zeros_like(A_Y), A_Y]))


# --------------------------------------------------------------------------------------------- #
# Bad inputs: DataError naming the file (and CSV line) and what was expected
# --------------------------------------------------------------------------------------------- #
def test_unknown_class_lists_valid_ones(tmp_path):
    make_data(tmp_path, rows=[("a", "x", "1 3"), ("b", "zz", "1 3")])
    with pytest.raises(DataError, match=r"train\.csv: unknown class name\(s\) .*'zz' \(line 3\); valid: x, y"):
        make_adapter(cfg(tmp_path)).ids


def test_csv_image_missing_on_disk(tmp_path):
    make_data(tmp_path, rows=[("a", "x", "1 3"), ("ghost", "x", "1 3")])
    with pytest.raises(DataError, match=r"train\.csv: image\(s\) listed in the CSV but not found on disk: "
                                        r"train_images/ghost\.png \(line 3\)"):
        make_adapter(cfg(tmp_path)).ids


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd"])
def test_id_escaping_the_data_root_is_refused(tmp_path, bad):
    make_data(tmp_path, rows=[("a", "x", "1 3"), (bad, "x", "1 3")])
    with pytest.raises(DataError, match=r"train\.csv line 3: image id .* escapes the data root"):
        make_adapter(cfg(tmp_path)).ids


def test_config_paths_escaping_the_data_root_are_refused(tmp_path):
    make_data(tmp_path / "d")
    (tmp_path / "outside.csv").write_text("id,class,rle\n")
    with pytest.raises(DataError, match="rle_csv.csv '../outside.csv' escapes the data root"):
        make_adapter(cfg(tmp_path / "d", rle_csv={"csv": "../outside.csv"})).ids
    with pytest.raises(DataError, match="groups.csv '../outside.csv' escapes"):
        make_adapter(cfg(tmp_path / "d", groups={"source": "column", "column": "g", "csv": "../outside.csv"})).groups()


@pytest.mark.parametrize("bad", ["1 x", "5 3 2", "1281 2", "0 3", "3 -1"])
def test_malformed_rle_names_the_csv_line(tmp_path, bad):
    make_data(tmp_path, rows=[("a", "x", "1 3"), ("b", "y", bad)])
    ad = make_adapter(cfg(tmp_path))
    ad.load_mask("a")
    with pytest.raises(DataError, match=r"train\.csv line 3 \(id 'b', class 'y'\): malformed RLE for the 40x32 image"):
        ad.load_mask("b")


def test_missing_columns(tmp_path):
    make_data(tmp_path, rows=[("a", "x", "1 3")])
    with pytest.raises(DataError, match=r"train\.csv: train CSV has no column\(s\) \['EncodedPixels'\]; columns "
                                        r"found: \['id', 'class', 'rle'\]"):
        make_adapter(cfg(tmp_path, rle_csv={"rle_column": "EncodedPixels"})).ids


def test_same_id_stored_twice(tmp_path):
    make_data(tmp_path)
    write_image(tmp_path / "train_images" / "b.jpg")
    with pytest.raises(DataError, match=r"train_images: the same image id is stored more than once: 'b' "
                                        r"\(b\.jpg, b\.png\)"):
        make_adapter(cfg(tmp_path)).ids


def test_undecodable_image(tmp_path):
    make_data(tmp_path)
    (tmp_path / "train_images" / "b.png").write_bytes(b"not a png at all")
    ad = make_adapter(cfg(tmp_path))
    with pytest.raises(DataError, match=r"b\.png: cannot be decoded as an image"):
        ad.load_mask("b")
    with pytest.raises(DataError, match=r"b\.png: cannot be decoded as an image"):
        ad.load_image("b")


def test_no_images_and_unknown_id(tmp_path):
    (tmp_path / "train_images").mkdir()
    (tmp_path / "train_images" / "a.tif").write_bytes(b"")
    (tmp_path / "train.csv").write_text("id,class,rle\n")
    with pytest.raises(DataError, match=r"no training images found \(expected <id>\.png files; found \.tif files"):
        make_adapter(cfg(tmp_path)).ids
    ad = make_adapter(cfg(make_data(tmp_path / "ok")))
    with pytest.raises(DataError, match="unknown train image id '../a'"):
        ad.load_mask("../a")


def test_non_utf8_train_csv_names_the_file(tmp_path):
    make_data(tmp_path, rows=[("a", "x", "1 3")])
    (tmp_path / "train.csv").write_bytes("id,class,rle\na,x,1 3\nb,y,\nc,x,\n# Société\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"train\.csv: train CSV \(rle_csv\.csv\) is not UTF-8 text \(undecodable "
                                        r"byte 0xe9 on line 5\); save it as UTF-8"):
        make_adapter(cfg(tmp_path)).ids


def test_groups_csv_with_a_byte_order_mark_keeps_its_id_column(tmp_path):
    make_data(tmp_path)
    (tmp_path / "groups.csv").write_bytes(b"\xef\xbb\xbfid,patient\na,p1\nb,p1\nc,p2\n")  # as Excel saves it
    ad = make_adapter(cfg(tmp_path, groups={"source": "column", "column": "patient", "csv": "groups.csv"}))
    assert ad.groups() == {"a": "p1", "b": "p1", "c": "p2"}


@pytest.mark.parametrize("bad", ["1 x", "5 3 2", "1281 2", "0 3", "3 -1"])
def test_validate_labels_checks_every_rle_against_the_image_size(tmp_path, bad):
    make_data(tmp_path, rows=[("a", "x", "1 3"), ("b", "y", bad)])
    ad = make_adapter(cfg(tmp_path))
    assert ad.presence("b").tolist() == [False, True]  # the index alone cannot tell it is malformed
    with pytest.raises(DataError, match=r"train\.csv line 3 \(id 'b', class 'y'\): malformed RLE for the 40x32 image "
                                        r"b\.png"):
        ad.validate_labels()


def test_validate_labels_accepts_good_rle(tmp_path):
    make_adapter(cfg(make_data(tmp_path))).validate_labels()


def test_row_with_more_cells_than_the_header_is_refused_not_shifted(tmp_path):
    make_data(tmp_path)
    (tmp_path / "train.csv").write_text("id,class,rle\na,x,1 3,extra\nb,y,\n")  # pandas would make a,x an index
    with pytest.raises(DataError, match=r"train\.csv: train CSV \(rle_csv\.csv\) is not a readable CSV \(line 2 has 4 "
                                        r"cells but the header has 3\)"):
        make_adapter(cfg(tmp_path)).ids
