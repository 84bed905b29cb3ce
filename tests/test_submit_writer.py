"""The submission writer, post-processing and validation, on constructed masks (no model)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from competition import rle
from competition.config import CompetitionConfig, PostProcess
from competition.predict.submit import SubmissionWriter, encode_image, expected_rows, postprocess, validate_submission
from competition.score import ScoreError
from competition.store.probs import binarize

CLASSES = ["radius", "ulna", "thumb"]


def make_cfg(order: str = "row-major") -> CompetitionConfig:
    return CompetitionConfig(name="t", data_root="data/t", format="rle_csv", classes=CLASSES,
                             submission={"pixel_order": order, "id_column": "ImageId", "class_column": "cls",
                                         "rle_column": "EncodedPixels"})


def blobs() -> np.ndarray:
    """One class mask with components of 1, 4 and 12 pixels."""
    m = np.zeros((10, 12), np.uint8)
    m[0, 0] = 1
    m[3:5, 3:5] = 1
    m[6:9, 6:10] = 1
    return m


def test_postprocess_known_answers():
    m = blobs()
    assert postprocess(m, None) is m and postprocess(m, PostProcess()) is m
    assert postprocess(m, PostProcess(min_area=4)).sum() == 16  # the lone pixel goes
    assert postprocess(m, PostProcess(min_area=5)).sum() == 12
    largest = postprocess(m, PostProcess(keep_largest=True))
    assert largest.sum() == 12 and largest[6:9, 6:10].all()
    assert postprocess(m, PostProcess(min_area=13, keep_largest=True)).sum() == 0
    diagonal = np.eye(4, dtype=np.uint8)  # 8-connected: one component of 4 pixels
    assert postprocess(diagonal, PostProcess(min_area=4)).sum() == 4


def test_binarize_multilabel_and_multiclass():
    p = torch.tensor([[[0.6, 0.2]], [[0.5, 0.7]]])  # (C=2, 1, 2)
    assert binarize(p, "multilabel", torch.tensor([0.5, 0.6])).tolist() == [[[1, 0]], [[0, 1]]]
    # multiclass, against the background 1 - sum: pixel 0 -> class 0 (0.6 > 0.3, 0.1); pixel 1 -> class 1;
    # pixel 2 -> background (0.7 > 0.1, 0.2), in no class's mask
    q = torch.tensor([[[0.6, 0.2, 0.1]], [[0.3, 0.7, 0.2]]])
    assert binarize(q, "multiclass", torch.zeros(2)).tolist() == [[[1, 0, 0]], [[0, 1, 0]]]


@pytest.mark.parametrize("order", ["row-major", "column-major"])
def test_writer_streams_rows_in_order_and_every_rle_round_trips(tmp_path, order):
    cfg = make_cfg(order)
    rng = np.random.default_rng(0)
    images = {f"img{i}.png": (rng.random((3, 9 + i, 7)) < 0.3).astype(np.uint8) for i in range(7)}
    images["img3.png"][:] = 0  # an empty image: three empty fields
    path = tmp_path / "sub.csv"
    with SubmissionWriter(path, cfg, {"ulna": PostProcess(min_area=3)}, workers=2, max_pending=2) as w:
        for sid, masks in images.items():
            w.add(sid, masks)
    assert w.rows == 21
    lines = path.read_text().splitlines()
    assert lines[0] == "ImageId,cls,EncodedPixels"
    assert lines[10:13] == ["img3.png,radius,", "img3.png,ulna,", "img3.png,thumb,"]
    df = pd.read_csv(path, keep_default_na=False, dtype=str)
    assert df["ImageId"].tolist() == [s for s in images for _ in CLASSES]
    for (sid, cls, text) in df.itertuples(index=False):
        m = images[sid][CLASSES.index(cls)]
        want = postprocess(m, PostProcess(min_area=3)) if cls == "ulna" else m
        np.testing.assert_array_equal(rle.decode(text, m.shape, order), want)


def test_probabilities_are_thresholded_per_class_like_masks():
    probs = np.random.default_rng(1).random((3, 16, 16)).astype(np.float32)
    thr = np.array([0.2, 0.5, 0.9], np.float32)
    masks = (probs >= thr[:, None, None]).astype(np.uint8)
    rules = [None, PostProcess(keep_largest=True), None]
    assert encode_image(probs, thr, rules, "row-major") == encode_image(masks, None, rules, "row-major")


def write(path, rows, cols=("ImageId", "cls", "EncodedPixels")) -> None:
    pd.DataFrame(rows, columns=list(cols)).to_csv(path, index=False)


@pytest.fixture
def expected() -> pd.DataFrame:
    rows = [(i, c, "", 4, 5) for i in ("a.png", "b.png") for c in CLASSES]
    return pd.DataFrame(rows, columns=["ImageId", "cls", "EncodedPixels", "height", "width"])


def test_validation_accepts_exact_rows_and_names_every_problem(tmp_path, expected):
    cfg = make_cfg()
    good = [(i, c, "1 3" if c == "ulna" else "") for i in ("b.png", "a.png") for c in CLASSES]  # order is free
    write(tmp_path / "ok.csv", good)
    assert validate_submission(tmp_path / "ok.csv", cfg, expected) == 6
    cases = {
        "missing row for ImageId=a.png, cls=thumb": good[:-1],
        "duplicate of row 1": good + [good[0]],
        "extra row, not in the truth": good + [("c.png", "radius", "")],
        "beyond the 4x5 image": [(i, c, "19 3" if (i, c) == ("a.png", "radius") else t) for i, c, t in good],
        "unknown class": good + [("a.png", "femur", "")],
    }
    for message, rows in cases.items():
        write(tmp_path / "bad.csv", rows)
        with pytest.raises(ScoreError, match=message):
            validate_submission(tmp_path / "bad.csv", cfg, expected)
    write(tmp_path / "cols.csv", good, cols=("ImageId", "EncodedPixels", "cls"))
    with pytest.raises(ScoreError, match=r"columns are \['ImageId', 'EncodedPixels', 'cls'\]; the competition "
                                         r"expects exactly \['ImageId', 'cls', 'EncodedPixels'\]"):
        validate_submission(tmp_path / "cols.csv", cfg, expected)


def test_expected_rows_follow_the_sample_submission_or_the_test_listing(tiny_project):
    from competition.config import load_competition
    from competition.data.adapters import make_adapter
    from competition.data.base import DataError
    cfg = load_competition("tiny-hands")
    adapter = make_adapter(cfg)
    ids, rows = expected_rows(cfg, adapter)
    sample = adapter.sample_submission()
    assert rows[["image_name", "class"]].values.tolist() == sample[["image_name", "class"]].values.tolist()
    assert sorted(ids) == adapter.test_ids and set(rows["height"]) == {64} and set(rows["rle"]) == {""}
    # Reversed sample: images are predicted in its order.
    path = cfg.root() / cfg.submission.sample_submission
    sample.iloc[::-1].to_csv(path, index=False)
    ids_rev, _ = expected_rows(cfg, adapter)
    assert ids_rev == ids[::-1]
    sample.iloc[:3].assign(image_name="nope.png").to_csv(path, index=False)
    with pytest.raises(DataError, match=r"image\(s\) \['nope.png'\] are not in the test set"):
        expected_rows(cfg, adapter)
    # No sample submission: every test image, sorted, classes in config order.
    bare = cfg.model_copy(update={"submission": cfg.submission.model_copy(update={"sample_submission": None})})
    ids2, rows2 = expected_rows(bare, make_adapter(bare))
    assert ids2 == adapter.test_ids and len(rows2) == len(ids2) * len(cfg.classes)
