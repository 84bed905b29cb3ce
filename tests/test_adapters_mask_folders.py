"""The image + mask-PNG folders adapter on tiny fixtures written on the fly (32x40 images)."""
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import competition.data.mask_folders  # noqa: F401  registers "mask_folders"
from competition.config import CompetitionConfig, ConfigError
from competition.data.adapters import make_adapter
from competition.data.base import DataError

H, W = 32, 40


def box(y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def write(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), arr)
    return path


def image(root: Path, image_id: str, folder="images", shape=(H, W, 3)) -> None:
    rng = np.random.default_rng(len(image_id))
    write(root / folder / f"{image_id}.png", rng.integers(0, 255, shape, dtype=np.uint8))


def cfg(root: Path, classes=("nucleus",), mode="binary", **kw) -> CompetitionConfig:
    kw.setdefault("groups", {"source": "none"})
    mf = {"mask_mode": mode, **kw.pop("mask_folders", {})}
    return CompetitionConfig(name="mf", data_root=str(root), format="mask_folders", classes=list(classes),
                             mask_folders=mf, **kw)


BIN = {"a": box(2, 10, 3, 12) | box(20, 30, 25, 38), "b": box(0, 32, 0, 1), "c": np.zeros((H, W), np.uint8)}


@pytest.fixture
def binary(tmp_path) -> Path:
    for i, m in BIN.items():
        image(tmp_path, i)
        write(tmp_path / "masks" / f"{i}.png", m * 255)
    image(tmp_path, "t1", "test")
    pd.DataFrame({"id": ["a", "b", "c"], "height": [H] * 3, "group": ["g1", "g1", "g2"]}) \
        .to_csv(tmp_path / "meta.csv", index=False)
    return tmp_path


# Index mode: classes [p, q, r]; per-class mode: the same truth as one PNG per class.
IDX = np.zeros((H, W), np.uint8)
IDX[2:10, 3:12], IDX[20:30, 25:38], IDX[0:5, 30:40] = 1, 3, 3
IDX_TRUTH = np.stack([IDX == k for k in (1, 2, 3)]).astype(np.uint8)  # class q (2) is empty


def test_binary_ids_groups_test_ids_and_masks(binary):
    ad = make_adapter(cfg(binary, groups={"source": "column", "column": "group"},
                          mask_folders={"test_images": "test"}, image={"channels": "rgb"}))
    assert ad.ids == ["a", "b", "c"] and ad.test_ids == ["t1"]
    assert ad.groups() == {"a": "g1", "b": "g1", "c": "g2"}
    assert list(ad.metadata().columns) == ["id", "height", "group"]
    assert ad.load_image("t1", "test").shape == (H, W, 3)
    for i, m in BIN.items():
        got = ad.load_mask(i)
        assert got.shape == (1, H, W) and got.dtype == np.uint8
        np.testing.assert_array_equal(got[0], m)
    assert [ad.presence(i).tolist() for i in "abc"] == [[True], [True], [False]]


@pytest.mark.parametrize("size", [(16, 20), (50, 45)])
def test_requested_size_is_nearest_resize(binary, size):
    ad = make_adapter(cfg(binary))
    h, w = size
    np.testing.assert_array_equal(ad.load_mask("a", size)[0],
                                  cv2.resize(BIN["a"], (w, h), interpolation=cv2.INTER_NEAREST))


def test_groups_none_folder_and_default_meta(binary, tmp_path):
    assert make_adapter(cfg(binary)).groups() == {"a": "a", "b": "b", "c": "c"}
    assert make_adapter(cfg(binary)).test_ids == []  # test_images not set
    root = tmp_path / "nested"
    for i in ("s1/a", "s1/b", "s2/c"):
        image(root, i)
        write(root / "masks" / f"{i}.png", BIN[i[-1]] * 255)
    ad = make_adapter(cfg(root, groups={"source": "folder"}))
    assert ad.groups() == {"s1/a": "s1", "s1/b": "s1", "s2/c": "s2"}
    np.testing.assert_array_equal(ad.load_mask("s1/a")[0], BIN["a"])
    assert ad.metadata() is None  # no meta.csv


def test_index_mode_including_palette_png(tmp_path):
    image(tmp_path, "a")
    write(tmp_path / "masks" / "a.png", IDX)
    image(tmp_path, "b")
    pal = Image.fromarray(IDX, mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)  # colours must not be read as values
    pal.save(tmp_path / "masks" / "b.png")
    ad = make_adapter(cfg(tmp_path, classes=["p", "q", "r"], mode="index"))
    for i in ("a", "b"):
        np.testing.assert_array_equal(ad.load_mask(i), IDX_TRUTH)
    np.testing.assert_array_equal(ad.load_mask("a", (16, 20)), np.stack(
        [cv2.resize(c, (20, 16), interpolation=cv2.INTER_NEAREST) for c in IDX_TRUTH]))


def test_index_value_above_class_count(tmp_path):
    image(tmp_path, "a")
    bad = IDX.copy()
    bad[0, 0] = 7
    write(tmp_path / "masks" / "a.png", bad)
    with pytest.raises(DataError, match=r"masks/a\.png: index mask has value\(s\) 7 but the competition has 3 class"):
        make_adapter(cfg(tmp_path, classes=["p", "q", "r"], mode="index")).load_mask("a")


def test_per_class_mode_missing_file_is_empty(tmp_path):
    image(tmp_path, "a")
    write(tmp_path / "masks" / "a" / "p.png", IDX_TRUTH[0] * 255)
    write(tmp_path / "masks" / "a" / "r.png", IDX_TRUTH[2] * 255)  # q.png absent
    image(tmp_path, "b")  # no masks/b/ at all
    ad = make_adapter(cfg(tmp_path, classes=["p", "q", "r"], mode="per_class"))
    np.testing.assert_array_equal(ad.load_mask("a"), IDX_TRUTH)
    assert ad.load_mask("b").shape == (3, H, W) and ad.load_mask("b").sum() == 0
    assert ad.load_mask("a", (8, 10)).shape == (3, 8, 10)


def test_per_class_unknown_class_file(tmp_path):
    image(tmp_path, "a")
    write(tmp_path / "masks" / "a" / "P.png", IDX_TRUTH[0] * 255)
    with pytest.raises(DataError, match=r"masks/a: mask file\(s\) \['P\.png'\] name no class; valid: p, q, r"):
        make_adapter(cfg(tmp_path, classes=["p", "q", "r"], mode="per_class")).load_mask("a")


def test_binary_mode_needs_exactly_one_class(binary):
    with pytest.raises(ConfigError, match="mask_mode 'binary' holds exactly one class.*use mask_mode index"):
        make_adapter(cfg(binary, classes=["a", "b"]))


# --------------------------------------------------------------------------------------------- #
# Bad inputs
# --------------------------------------------------------------------------------------------- #
def test_mask_size_differs_from_image(binary):
    write(binary / "masks" / "b.png", np.zeros((H, W + 1), np.uint8))
    with pytest.raises(DataError, match=r"masks/b\.png: mask is 41x32 \(WxH\) but its image b\.png is 40x32"):
        make_adapter(cfg(binary)).load_mask("b")


def test_undecodable_image_and_mask(binary):
    (binary / "images" / "b.png").write_bytes(b"garbage")
    (binary / "masks" / "a.png").write_bytes(b"garbage")
    ad = make_adapter(cfg(binary))
    with pytest.raises(DataError, match=r"images/b\.png: cannot be decoded as an image"):
        ad.load_mask("b")
    with pytest.raises(DataError, match=r"images/b\.png: cannot be decoded as an image"):
        ad.load_image("b")
    with pytest.raises(DataError, match=r"masks/a\.png: cannot be decoded as a mask image"):
        ad.load_mask("a")


def test_missing_and_non_binary_masks(binary):
    (binary / "masks" / "c.png").unlink()
    write(binary / "masks" / "b.png", (BIN["b"] * 128).astype(np.uint8))
    ad = make_adapter(cfg(binary))
    with pytest.raises(DataError, match=r"masks/c\.png: mask file not found for image 'c'"):
        ad.load_mask("c")
    with pytest.raises(DataError, match=r"masks/b\.png: binary mask has value\(s\) 0, 128; expected only 0 and 255"):
        ad.load_mask("b")


def test_duplicate_stem(binary):
    write(binary / "images" / "a.jpg", np.zeros((H, W), np.uint8))
    with pytest.raises(DataError, match=r"images: the same image id is stored more than once: 'a' \(a\.jpg, a\.png\)"):
        make_adapter(cfg(binary)).ids


def test_meta_csv_group_conflicts_and_gaps(binary):
    (binary / "meta.csv").write_text("id,group\na,g1\nb,g1\nc,g2\nc,g3\n")
    ad = make_adapter(cfg(binary, groups={"source": "column", "column": "group"}))
    with pytest.raises(DataError,
                       match=r"meta\.csv: conflicting 'group' values .*'c': 'g2' \(line 4\), 'g3' \(line 5\)"):
        ad.groups()
    (binary / "meta.csv").write_text("id,group\na,g1\nb,g1\n")
    with pytest.raises(DataError, match=r"meta\.csv: no 'group' \(group\) for training image\(s\) c"):
        make_adapter(cfg(binary, groups={"source": "column", "column": "group"})).groups()
    with pytest.raises(DataError, match=r"meta\.csv: metadata CSV \(groups.column\) has no column\(s\) \['site'\]"):
        make_adapter(cfg(binary, groups={"source": "column", "column": "site"})).groups()
    (binary / "meta.csv").unlink()
    with pytest.raises(DataError, match="groups.source 'column' needs groups.csv"):
        make_adapter(cfg(binary, groups={"source": "column", "column": "group"})).groups()


def test_paths_escaping_the_data_root(binary, tmp_path):
    with pytest.raises(DataError, match="mask_folders.masks '../masks' escapes the data root"):
        make_adapter(cfg(binary / "images", mask_folders={"images": ".", "masks": "../masks"})).load_mask("a")
    with pytest.raises(DataError, match="mask_folders.images '/etc' escapes the data root"):
        make_adapter(cfg(binary, mask_folders={"images": "/etc"})).ids
    with pytest.raises(DataError, match="groups.csv '../x.csv' escapes"):
        make_adapter(cfg(binary, groups={"source": "column", "column": "g", "csv": "../x.csv"})).groups()
    with pytest.raises(DataError, match="unknown train image id '../../etc/passwd'"):
        make_adapter(cfg(binary)).load_mask("../../etc/passwd")


def test_per_class_class_name_escaping(tmp_path):
    image(tmp_path, "a")
    (tmp_path / "masks" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="escapes the data root"):
        make_adapter(cfg(tmp_path, classes=["p", "../../../../x"], mode="per_class")).load_mask("a")


def test_non_utf8_meta_csv_names_the_file(binary):
    (binary / "meta.csv").write_bytes("id,group\na,Zürich\nb,g1\nc,g2\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"meta\.csv: metadata CSV is not UTF-8 text \(undecodable byte 0xfc on "
                                        r"line 2\)"):
        make_adapter(cfg(binary, groups={"source": "column", "column": "group"})).groups()
