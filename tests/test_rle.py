"""RLE codec: known answers, round trips on random masks, and one validator error per rule."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from competition.rle import RLEError, decode, encode, runs, validate

GRID = np.array([[1, 0, 0, 1, 1],
                 [0, 1, 0, 1, 0],
                 [1, 1, 0, 1, 0]], np.uint8)
GRID_ROW_MAJOR = "1 1 4 2 7 1 9 1 11 2 14 1"
GRID_COLUMN_MAJOR = "1 1 3 1 5 2 10 4"
ORDERS = ["row-major", "column-major"]


def kaggle_encode(mask: np.ndarray, order: str) -> str:
    """The reference every Kaggle kernel copies, as an independent oracle."""
    p = (mask.flatten(order="C" if order == "row-major" else "F") != 0).astype(np.int64)
    p = np.concatenate([[0], p, [0]])
    r = np.where(p[1:] != p[:-1])[0] + 1
    r[1::2] -= r[::2]
    return " ".join(str(x) for x in r)


@st.composite
def masks(draw):
    """Odd and awkward sizes (1 pixel, 1 row, widths around multiples of 8 and 64), any density."""
    h = draw(st.integers(1, 70))
    w = draw(st.sampled_from([1, 2, 7, 8, 9, 63, 64, 65, 127, 130]) | st.integers(1, 150))
    density = draw(st.sampled_from([0.0, 0.02, 0.5, 0.98, 1.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    mask = rng.random((h, w)) < density
    if draw(st.booleans()):  # long runs: constant rows, like real masks
        mask[:] = mask[:, :1]
    dtype = draw(st.sampled_from([bool, np.uint8, np.int32]))
    return mask.astype(dtype) * (255 if dtype is np.uint8 and draw(st.booleans()) else 1)


# ------------------------------------------------------------------------------------------------ #
# Known answers
# ------------------------------------------------------------------------------------------------ #
def test_grid_row_major():
    assert encode(GRID) == GRID_ROW_MAJOR
    assert encode(GRID, "row-major") == GRID_ROW_MAJOR


def test_grid_column_major():
    assert encode(GRID, "column-major") == GRID_COLUMN_MAJOR


@pytest.mark.parametrize("order,text", [("row-major", GRID_ROW_MAJOR), ("column-major", GRID_COLUMN_MAJOR)])
def test_grid_decodes(order, text):
    out = decode(text, GRID.shape, order)
    assert out.dtype == np.uint8 and out.shape == (3, 5)
    np.testing.assert_array_equal(out, GRID)
    assert out.flags.c_contiguous


@pytest.mark.parametrize("order", ORDERS)
def test_empty_and_full(order):
    assert encode(np.zeros((7, 9), np.uint8), order) == ""
    assert encode(np.ones((7, 9), bool), order) == "1 63"
    np.testing.assert_array_equal(decode("1 63", (7, 9), order), np.ones((7, 9)))


@pytest.mark.parametrize("blank", ["", "   ", None, float("nan")])
def test_blank_decodes_to_empty(blank):
    out = decode(blank, (4, 6))
    assert out.shape == (4, 6) and out.dtype == np.uint8 and not out.any()
    assert validate(blank, (4, 6)).shape == (0, 2)


def test_nonzero_is_foreground():
    assert encode(GRID * 255) == GRID_ROW_MAJOR
    assert encode(GRID.astype(np.int32) * 7, "column-major") == GRID_COLUMN_MAJOR


def test_single_pixel_ends():
    m = np.zeros((1, 130), np.uint8)
    m[0, 0] = m[0, 63] = m[0, 64] = m[0, 129] = 1
    assert encode(m) == "1 1 64 2 130 1"


def test_touching_runs_are_accepted():
    np.testing.assert_array_equal(validate("1 2 3 4", (3, 5)), [[1, 2], [3, 4]])
    np.testing.assert_array_equal(decode("1 2 3 4", (3, 5)).ravel(), [1] * 6 + [0] * 9)


def test_whitespace_between_tokens_is_tolerated():
    np.testing.assert_array_equal(decode(" 1 1\t4  2\n", (3, 5)).ravel()[:6], [1, 0, 0, 1, 1, 0])


def test_runs_are_zero_indexed_half_open():
    starts, ends = runs(GRID_ROW_MAJOR, GRID.shape)
    np.testing.assert_array_equal(starts, [0, 3, 6, 8, 10, 13])
    np.testing.assert_array_equal(ends, [1, 5, 7, 9, 12, 14])


# ------------------------------------------------------------------------------------------------ #
# Round trips
# ------------------------------------------------------------------------------------------------ #
@settings(max_examples=150, deadline=None)
@given(masks(), st.sampled_from(ORDERS))
def test_round_trip(mask, order):
    text = encode(mask, order)
    assert text == kaggle_encode(mask, order)
    np.testing.assert_array_equal(decode(text, mask.shape, order), mask != 0)


@settings(max_examples=100, deadline=None)
@given(masks())
def test_column_major_is_row_major_of_transpose(mask):
    assert encode(mask, "column-major") == encode(np.ascontiguousarray(mask.T), "row-major")


def test_non_contiguous_input():
    big = np.random.default_rng(0).random((40, 90)) < 0.3
    view = big[::3, 5::2]
    for order in ORDERS:
        assert encode(view, order) == kaggle_encode(view, order)


def test_large_mask_round_trip():
    rng = np.random.default_rng(1)
    m = np.zeros((2048, 2048), np.uint8)
    yy, xx = np.ogrid[:2048, :2048]
    for _ in range(4):
        cy, cx, ry, rx = rng.integers(200, 1800, 2).tolist() + rng.integers(20, 300, 2).tolist()
        m[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1
    for order in ORDERS:
        text = encode(m, order)
        assert text == kaggle_encode(m, order)
        np.testing.assert_array_equal(decode(text, m.shape, order), m)


# ------------------------------------------------------------------------------------------------ #
# Validation: one case per rule, each message naming the problem
# ------------------------------------------------------------------------------------------------ #
@pytest.mark.parametrize("text,message", [
    ("1 a", r"token 2 \('a'\) is not a non-negative integer"),
    ("1 1.5", r"token 2 \('1.5'\) is not a non-negative integer"),
    ("1 -2", r"token 2 \('-2'\) is not a non-negative integer"),
    ("+1 2", r"token 1 \('\+1'\) is not a non-negative integer"),
    ("1 2 3", r"odd number of tokens \(3\)"),
    ("0 2", r"run 1 \(start 0, length 2\): start must be >= 1"),
    ("1 1 5 0", r"run 2 \(start 5, length 0\): length must be positive"),
    ("5 1 3 1", r"run 2 \(start 3, length 1\): start is not after the previous start 5"),
    ("3 1 3 1", r"run 2 \(start 3, length 1\): start is not after the previous start 3"),
    ("1 5 3 1", r"run 2 \(start 3, length 1\): overlaps run 1 \(start 1, length 5\), which ends at pixel 5"),
    ("14 2", r"run 1 \(start 14, length 2\): ends at pixel 15, beyond the 2x7 image \(14 pixels\)"),
    ("20 1", r"run 1 \(start 20, length 1\): ends at pixel 20, beyond the 2x7 image"),
    ("1 99999999999999999999", r"token 2 \('99999999999999999999'\) is too large"),
    ("2 9223372036854775807", r"too large"),
])
def test_validate_errors(text, message):
    with pytest.raises(RLEError, match=message):
        validate(text, (2, 7))
    with pytest.raises(RLEError):
        decode(text, (2, 7))


def test_rle_error_is_value_error():
    assert issubclass(RLEError, ValueError)


def test_validate_returns_pairs():
    pairs = validate(GRID_ROW_MAJOR, GRID.shape)
    assert pairs.dtype == np.int64 and pairs.shape == (6, 2)
    np.testing.assert_array_equal(pairs[:, 0], [1, 4, 7, 9, 11, 14])


def test_bad_arguments():
    with pytest.raises(ValueError, match="pixel order"):
        encode(GRID, "diagonal")
    with pytest.raises(ValueError, match="2-D"):
        encode(np.zeros((2, 3, 4)))
    with pytest.raises(TypeError, match="bool or integer"):
        encode(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        decode("1 1", (0, 5))
    with pytest.raises(RLEError, match="expected an RLE string"):
        validate(12, (3, 5))


# ------------------------------------------------------------------------------------------------ #
# Column-major decode: the row-run path (edges from the runs alone) and its fill + transpose fallback
# ------------------------------------------------------------------------------------------------ #
def naive_decode(text: str, shape: tuple[int, int], order: str) -> np.ndarray:
    """Slice per run into a flat buffer, reshaped in the string's order: an independent oracle."""
    h, w = shape
    flat = np.zeros(h * w, np.uint8)
    values = [int(v) for v in text.split()]
    for start, length in zip(values[0::2], values[1::2]):
        flat[start - 1:start - 1 + length] = 1
    return flat.reshape(h, w) if order == "row-major" else flat.reshape(w, h).T


@pytest.fixture(params=["edges", "transpose"])
def column_path(request, monkeypatch):
    """Run a test through each column-major path: the edge path (limits raised so it always applies)
    and the fallback (limits at 0 so it never does)."""
    import competition.rle as codec

    limit = float("inf") if request.param == "edges" else 0.0
    monkeypatch.setattr(codec, "_MAX_RUNS_PER_PIXEL", limit)
    monkeypatch.setattr(codec, "_MAX_EDGES_PER_PIXEL", limit)
    return request.param


@pytest.mark.parametrize("text,shape,want", [
    # 2 x 3, column-major: pixel k is (k % 2, k // 2)
    ("1 1", (2, 3), [[1, 0, 0], [0, 0, 0]]),
    ("2 1", (2, 3), [[0, 0, 0], [1, 0, 0]]),
    ("6 1", (2, 3), [[0, 0, 0], [0, 0, 1]]),
    ("2 2", (2, 3), [[0, 1, 0], [1, 0, 0]]),                # wraps past the bottom of column 0
    ("1 2 3 2", (2, 3), [[1, 1, 0], [1, 1, 0]]),            # touching runs, one bound shared with b + h
    ("2 4", (2, 3), [[0, 1, 1], [1, 1, 0]]),                # head, one whole column, tail
    ("1 6", (2, 3), [[1, 1, 1], [1, 1, 1]]),
    ("1 1 4 1 5 1", (2, 3), [[1, 0, 1], [0, 1, 0]]),        # checkerboard: every pixel an edge
    ("2 3", (1, 5), [[0, 1, 1, 1, 0]]),                     # one row: columns of height 1
    ("2 3", (5, 1), [[0], [1], [1], [1], [0]]),             # one column
    ("3 4 9 2", (4, 3), [[0, 1, 1], [0, 1, 1], [1, 0, 0], [1, 0, 0]]),
])
def test_column_major_known_answers(column_path, text, shape, want):
    out = decode(text, shape, "column-major")
    assert out.dtype == np.uint8 and out.shape == shape and out.flags.c_contiguous
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(out, naive_decode(text, shape, "column-major"))


@pytest.mark.parametrize("order", ORDERS)
def test_grid_known_answers_on_both_paths(column_path, order):
    text = GRID_ROW_MAJOR if order == "row-major" else GRID_COLUMN_MAJOR
    out = decode(text, GRID.shape, order)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, GRID)
    np.testing.assert_array_equal(decode("", GRID.shape, order), np.zeros_like(GRID))


@settings(max_examples=150, deadline=None)
@given(masks(), st.sampled_from(["edges", "transpose", "default"]))
def test_column_major_round_trip_each_path(mask, path):
    import competition.rle as codec

    limit = {"edges": float("inf"), "transpose": 0.0}.get(path)
    saved = codec._MAX_RUNS_PER_PIXEL, codec._MAX_EDGES_PER_PIXEL
    try:
        if limit is not None:
            codec._MAX_RUNS_PER_PIXEL = codec._MAX_EDGES_PER_PIXEL = limit
        text = encode(mask, "column-major")
        out = decode(text, mask.shape, "column-major")
    finally:
        codec._MAX_RUNS_PER_PIXEL, codec._MAX_EDGES_PER_PIXEL = saved
    assert out.flags.c_contiguous and out.dtype == np.uint8
    np.testing.assert_array_equal(out, mask != 0)
    np.testing.assert_array_equal(out, naive_decode(text, mask.shape, "column-major"))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_touching_runs_column_major(h, w, seed):
    """Non-canonical strings (a run split in two touching halves) decode like the canonical one."""
    rng = np.random.default_rng(seed)
    mask = rng.random((h, w)) < 0.5
    pairs = validate(encode(mask, "column-major"), (h, w))
    split = []
    for start, length in pairs.tolist():
        cut = int(rng.integers(1, length)) if length > 1 else length
        split += [start, cut] + ([start + cut, length - cut] if cut < length else [])
    text = " ".join(map(str, split))
    np.testing.assert_array_equal(decode(text, (h, w), "column-major"), mask)


@pytest.mark.parametrize("shape", [(2048, 2048), (1500, 2100), (2100, 1500), (3, 4096)])
def test_large_non_square_column_major(shape):
    """Bone-sized ellipses and speckle (the edge path and, for noise, the fallback) on non-square masks."""
    rng = np.random.default_rng(2)
    h, w = shape
    yy, xx = np.ogrid[:h, :w]
    m = np.zeros(shape, np.uint8)
    for _ in range(4):
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        ry, rx = rng.integers(2, max(3, h // 4)), rng.integers(2, max(3, w // 4))
        m[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1
    for mask in (m, m ^ (rng.random(shape) < 0.002), rng.random(shape) < 0.5):
        for order in ORDERS:
            out = decode(encode(mask, order), shape, order)
            assert out.flags.c_contiguous
            np.testing.assert_array_equal(out, mask)
