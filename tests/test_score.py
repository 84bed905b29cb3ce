"""Submission scoring: exact values for known edits, every kind of bad row named, lenient scoring."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from competition.config import CompetitionConfig
from competition.metrics import dice_per_class
from competition.rle import encode
from competition.score import ScoreError, score_files, score_frames

CLASSES = ["radius", "ulna", "thumb"]
SIZES = {"a.png": (20, 30), "b.png": (16, 16), "c.png": (25, 11)}  # row-specific image sizes


def make_cfg(order: str = "row-major", **submission) -> CompetitionConfig:
    return CompetitionConfig(name="t", data_root="data/t", format="rle_csv", classes=CLASSES,
                             submission={"pixel_order": order, **submission})


def box(shape, top, left, height, width) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[top:top + height, left:left + width] = 1
    return m


def truth_masks() -> dict:
    """(image, class) -> mask; c.png/thumb is empty, as absent classes are."""
    out = {}
    for k, (image, shape) in enumerate(SIZES.items()):
        for j, cls in enumerate(CLASSES):
            out[image, cls] = box(shape, 2 + j, 1 + k, 4, 8)
    out["c.png", "thumb"][:] = 0
    return out


def frame(masks: dict, order="row-major", sizes=True) -> pd.DataFrame:
    rows = [(image, cls, encode(m, order), *m.shape) for (image, cls), m in masks.items()]
    df = pd.DataFrame(rows, columns=["image_name", "class", "rle", "height", "width"])
    return df if sizes else df.drop(columns=["height", "width"])


@pytest.fixture
def truth() -> pd.DataFrame:
    return frame(truth_masks())


@pytest.fixture
def cfg() -> CompetitionConfig:
    return make_cfg()


def edited() -> pd.DataFrame:
    """a.png/radius emptied (Dice 0); b.png/ulna shifted right 2 px: 4x6 of 4x8 overlap, 2*24/64 = 0.75."""
    masks = truth_masks()
    masks["a.png", "radius"] = np.zeros_like(masks["a.png", "radius"])
    masks["b.png", "ulna"] = np.roll(masks["b.png", "ulna"], 2, axis=1)
    return frame(masks, sizes=False)


EDITED_MEAN = (7 + 0.0 + 0.75) / 9
EDITED_PER_CLASS = {"radius": 2 / 3, "ulna": 2.75 / 3, "thumb": 1.0}


# ------------------------------------------------------------------------------------------------ #
# Exact values
# ------------------------------------------------------------------------------------------------ #
def test_truth_against_itself_is_one(truth, cfg):
    result = score_frames(truth.drop(columns=["height", "width"]), truth, cfg)
    assert result.mean == 1.0
    assert result.per_class == {c: 1.0 for c in CLASSES}
    assert result.problems == []
    assert list(result.per_row.columns) == ["id", "class", "dice"] and len(result.per_row) == 9


def test_known_edits(truth, cfg):
    result = score_frames(edited(), truth, cfg)
    assert result.mean == pytest.approx(EDITED_MEAN, abs=1e-12)
    assert result.per_class == pytest.approx(EDITED_PER_CLASS, abs=1e-12)
    dice = result.per_row.set_index(["id", "class"])["dice"]
    assert dice["a.png", "radius"] == 0.0 and dice["b.png", "ulna"] == 0.75


def test_empty_score_from_config(truth):
    """Predicting something where the truth is empty scores 0; nothing where it is empty, empty_score."""
    sub = truth.drop(columns=["height", "width"]).copy()
    result = score_frames(sub, truth, make_cfg())
    assert result.per_row.set_index(["id", "class"])["dice"]["c.png", "thumb"] == 1.0
    low = CompetitionConfig(**{**make_cfg().model_dump(), "metric": {"empty_score": 0.5}})
    assert score_frames(sub, truth, low).mean == pytest.approx((8 + 0.5) / 9)
    sub.loc[(sub["image_name"] == "c.png") & (sub["class"] == "thumb"), "rle"] = "1 3"
    assert score_frames(sub, truth, make_cfg()).mean == pytest.approx(8 / 9)


def test_column_major_competition():
    cfg = make_cfg("column-major")
    masks = truth_masks()
    masks["b.png", "ulna"] = np.roll(masks["b.png", "ulna"], 2, axis=1)
    masks["a.png", "radius"][:] = 0
    result = score_frames(frame(masks, "column-major"), frame(truth_masks(), "column-major"), cfg)
    assert result.mean == pytest.approx(EDITED_MEAN, abs=1e-12)


def test_sizes_argument_replaces_columns(cfg):
    truth = frame(truth_masks(), sizes=False)
    result = score_frames(edited(), truth, cfg, sizes=SIZES)
    assert result.mean == pytest.approx(EDITED_MEAN, abs=1e-12)
    with pytest.raises(ScoreError, match="no height and width columns"):
        score_frames(edited(), truth, cfg)
    with pytest.raises(ScoreError, match=r"row 7 \(image_name=c.png, class=radius\): image not in sizes"):
        score_frames(edited(), truth, cfg, sizes={"a.png": (20, 30), "b.png": (16, 16)})


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 70), st.integers(0, 2**32 - 1),
       st.sampled_from(["row-major", "column-major"]))
def test_run_based_dice_equals_decoded_dice(h, w, seed, order):
    rng = np.random.default_rng(seed)
    pred = rng.random((len(CLASSES), h, w)) < rng.choice([0.0, 0.1, 0.5, 0.9])
    true = rng.random((len(CLASSES), h, w)) < rng.choice([0.0, 0.1, 0.5, 0.9])
    def rows(ms):
        return pd.DataFrame([("x", c, encode(m, order), h, w) for c, m in zip(CLASSES, ms)],
                            columns=["image_name", "class", "rle", "height", "width"])
    result = score_frames(rows(pred), rows(true), make_cfg(order))
    np.testing.assert_allclose(result.per_row["dice"], dice_per_class(pred, true), rtol=0, atol=1e-15)


# ------------------------------------------------------------------------------------------------ #
# Bad submissions: strict errors name the row; lenient scores them as a leaderboard would
# ------------------------------------------------------------------------------------------------ #
def bad_submission() -> pd.DataFrame:
    """edited() without a.png/ulna (rows 1-8; rows 5 and 6 get bad RLE), then rows 9-11: a duplicate,
    an extra row and an unknown class."""
    sub = edited()
    sub = sub.drop(index=1).reset_index(drop=True)  # a.png/ulna goes missing (truth row 2)
    extra = pd.DataFrame([
        ("a.png", "radius", "1 5"),            # row 9: duplicate of row 1 (which is empty)
        ("z.png", "radius", ""),                # row 10: image not in the truth
        ("a.png", "femur", ""),                 # row 11: unknown class
    ], columns=sub.columns)
    sub = pd.concat([sub, extra], ignore_index=True)
    sub.loc[sub.index[(sub["image_name"] == "b.png") & (sub["class"] == "thumb")], "rle"] = "250 20"  # row 5
    sub.loc[sub.index[(sub["image_name"] == "c.png") & (sub["class"] == "radius")], "rle"] = "1 x"  # row 6
    return sub


EXPECTED_PROBLEMS = [
    "row 5 (image_name=b.png, class=thumb): bad RLE for a 16x16 image: run 1 (start 250, length 20): "
    "ends at pixel 269, beyond the 16x16 image (256 pixels)",
    "row 6 (image_name=c.png, class=radius): bad RLE for a 25x11 image: "
    "token 2 ('x') is not a non-negative integer",
    "row 9 (image_name=a.png, class=radius): duplicate of row 1 (the first one counts)",
    "row 10 (image_name=z.png, class=radius): extra row, not in the truth",
    "row 11 (image_name=a.png, class=femur): unknown class; classes are radius, ulna, thumb",
    "missing row for image_name=a.png, class=ulna (truth row 2); scored as an empty prediction",
]


def test_strict_names_every_bad_row(truth, cfg):
    with pytest.raises(ScoreError) as err:
        score_frames(bad_submission(), truth, cfg)
    message = str(err.value)
    assert message.startswith("submission: not a valid submission: 6 problem(s)")
    for line in EXPECTED_PROBLEMS:
        assert line in message


@pytest.mark.parametrize("edit,expected", [
    (lambda s: s.drop(index=3), "missing row for image_name=b.png, class=radius (truth row 4)"),
    (lambda s: pd.concat([s, s.iloc[[2]]]), "row 10 (image_name=a.png, class=thumb): duplicate of row 3"),
    (lambda s: pd.concat([s, pd.DataFrame([("q.png", "ulna", "")], columns=s.columns)]),
     "row 10 (image_name=q.png, class=ulna): extra row, not in the truth"),
    (lambda s: s.assign(rle=s["rle"].where(s.index != 4, "3 2 1 1")),
     r"row 5 (image_name=b.png, class=ulna): bad RLE for a 16x16 image: run 2 (start 1, length 1): "
     "start is not after the previous start 3"),
])
def test_each_problem_alone(truth, cfg, edit, expected):
    sub = edit(truth.drop(columns=["height", "width"])).reset_index(drop=True)
    with pytest.raises(ScoreError, match="1 problem") as err:
        score_frames(sub, truth, cfg)
    assert expected in str(err.value)


def test_lenient_scores_like_a_leaderboard(truth, cfg):
    result = score_frames(bad_submission(), truth, cfg, lenient=True)
    # Malformed b.png/thumb and c.png/radius and missing a.png/ulna are empty predictions (Dice 0);
    # the duplicate a.png/radius keeps the first, empty, row; extra and unknown rows are ignored.
    assert result.mean == pytest.approx((4 + 0.75) / 9, abs=1e-12)
    assert result.problems == EXPECTED_PROBLEMS
    text = result.format()
    assert f"mean Dice {(4 + 0.75) / 9:.4f} over 9 image x class pairs (3 images)" in text
    assert "6 problems forgiven" in text and EXPECTED_PROBLEMS[0] in text


def test_truth_problems_are_errors_even_when_lenient(truth, cfg):
    bad = truth.copy()
    bad.loc[4, "rle"] = "1 999"
    expected = r"(?s)truth: the truth cannot be used.*row 5 \(image_name=b.png, class=ulna\)"
    with pytest.raises(ScoreError, match=expected):
        score_frames(truth.drop(columns=["height", "width"]), bad, cfg, lenient=True)


def test_error_lists_at_most_ten(truth, cfg):
    sub = pd.concat([truth.drop(columns=["height", "width"])] * 3, ignore_index=True)  # 18 duplicates
    with pytest.raises(ScoreError) as err:
        score_frames(sub, truth, cfg)
    lines = str(err.value).splitlines()
    assert "18 problem(s)" in lines[0] and lines[-1] == "  ... and 8 more" and len(lines) == 12


def test_missing_column(truth, cfg):
    with pytest.raises(ScoreError, match="submission: missing column.s. rle; columns present: image_name, class"):
        score_frames(truth[["image_name", "class"]], truth, cfg)


def test_id_format_hint(truth, cfg):
    sub = truth.drop(columns=["height", "width"]).assign(image_name=lambda d: d["image_name"].str[:-4])
    with pytest.raises(ScoreError, match="no submission row matches a truth row"):
        score_frames(sub, truth, cfg)


# ------------------------------------------------------------------------------------------------ #
# Files
# ------------------------------------------------------------------------------------------------ #
def test_score_files_keeps_empty_rle(tmp_path, truth, cfg):
    truth.to_csv(tmp_path / "truth.csv", index=False)
    edited().to_csv(tmp_path / "sub.csv", index=False)
    assert (tmp_path / "sub.csv").read_text().count(",\n") >= 1  # empty RLE cells on disk
    result = score_files(tmp_path / "sub.csv", tmp_path / "truth.csv", cfg)
    assert result.mean == pytest.approx(EDITED_MEAN, abs=1e-12)
    text = result.format()
    assert text.splitlines()[0] == f"mean Dice {EDITED_MEAN:.4f} over 9 image x class pairs (3 images)"
    assert re.search(r"^  ulna +0\.9167$", text, re.M)


def test_score_files_errors(tmp_path, truth, cfg):
    truth.to_csv(tmp_path / "truth.csv", index=False)
    bad_submission().to_csv(tmp_path / "sub.csv", index=False)
    with pytest.raises(ScoreError, match=r"sub.csv: not a valid submission: 6 problem"):
        score_files(tmp_path / "sub.csv", tmp_path / "truth.csv", cfg)
    with pytest.raises(ScoreError, match="no such file"):
        score_files(tmp_path / "nope.csv", tmp_path / "truth.csv", cfg)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ScoreError, match="is empty"):
        score_files(tmp_path / "empty.csv", tmp_path / "truth.csv", cfg)


# ------------------------------------------------------------------------------------------------ #
# The metric registry: metric.name and metric.report
# ------------------------------------------------------------------------------------------------ #
def test_iou_as_the_competitions_metric_and_report_metrics(truth):
    """The edited submission: a.png/radius emptied, b.png/ulna shifted 2 px (4x6 of 4x8 overlap)."""
    cfg = CompetitionConfig(**{**make_cfg().model_dump(), "metric": {
        "name": "iou", "report": ["dice", "f1_at_iou", "hausdorff95"], "iou_threshold": 0.5}})
    r = score_frames(edited(), truth, cfg)
    assert r.metric == "iou" and r.mean == pytest.approx((7 + 0 + 24 / 40) / 9, abs=1e-12)
    assert r.report["dice"]["mean"] == pytest.approx(EDITED_MEAN, abs=1e-12)
    # f1 per class over images: radius 2 hits + 1 miss (2*2/(4+1)); ulna and thumb all hits
    assert r.report["f1_at_iou"]["per_class"] == pytest.approx({"radius": 0.8, "ulna": 1.0, "thumb": 1.0})
    # hausdorff95: an emptied mask costs the image diagonal, the 2 px shift 2 px, identical masks 0
    assert r.report["hausdorff95"]["mean"] == pytest.approx((np.hypot(20, 30) + 2.0) / 9)
    out = r.format()
    assert out.startswith("mean IoU ") and "also f1_at_iou: 0.9333" in out
    strict = CompetitionConfig(**{**cfg.model_dump(), "metric": {**cfg.metric.model_dump(), "iou_threshold": 0.7}})
    assert score_frames(edited(), truth, strict).report["f1_at_iou"]["per_class"]["ulna"] == pytest.approx(4 / 6)


def test_metric_name_must_be_a_pair_metric():
    from competition.config import ConfigError, validate
    with pytest.raises(ConfigError, match="list it in metric.report"):
        validate(CompetitionConfig, {**make_cfg().model_dump(), "metric": {"name": "hausdorff95"}}, "t.yaml")
    with pytest.raises(ConfigError, match="metric.report.0"):
        validate(CompetitionConfig, {**make_cfg().model_dump(), "metric": {"report": ["hd"]}}, "t.yaml")


def test_metric_known_answers():
    from competition import metrics as m
    assert m.iou_from_counts(np.array([2, 0]), np.array([3, 0]), np.array([4, 0]), 0.7).tolist() == [0.4, 0.7]
    f1 = m.f1_at_iou(np.array([[5], [0], [0]]), np.array([[6], [3], [0]]), np.array([[5], [0], [4]]))
    assert f1 == {"mean": 0.5, "per_class": [0.5]}  # 1 hit, 1 false alarm, 1 miss
    a = np.zeros((10, 10), bool)
    a[2:5, 2:5] = True
    assert m.hausdorff95(a, np.roll(a, 1, axis=1)) == 1.0 and m.hausdorff95(a, a) == 0.0
    assert m.hausdorff95(a & False, a & False, 0.0) == 0.0
    with pytest.raises(ValueError, match="valid: dice, iou, f1_at_iou, hausdorff95"):
        m.metric_info("hd")
    assert m.score_counts(2, 3, 4, m.PairMetric("iou")) == pytest.approx(0.4)
    assert m.score_counts(2, 3, 4, 1.0) == pytest.approx(4 / 7)  # a float: Dice with that empty score
