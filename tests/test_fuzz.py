"""Fuzz suite: random damage to every file kind the runner reads must end in a clear error (a
``UserError`` whose first line names the file) or in the correct result: never a traceback, a hang or a
wrong result accepted.

Each reader gets a valid file, then one of: truncation, byte flips, inserted bytes, a Latin-1 byte
(another encoding), a line duplicated or dropped, an empty file; the store readers also get arrays of
the wrong dtype or shape and NaN. Derandomized (the same examples on every run) and bounded
(``max_examples``) so the whole file takes well under a minute on 2 cores.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from competition import rle
from competition.errors import UserError

FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
KINDS = ["truncate", "flip", "insert", "latin1", "dup_line", "drop_line", "empty"]


@st.composite
def damage(draw):
    """A function bytes -> damaged bytes, drawn once per example."""
    kind = draw(st.sampled_from(KINDS))
    where = draw(st.floats(0, 1))
    n = draw(st.integers(1, 4))
    noise = draw(st.binary(min_size=1, max_size=8))
    byte = draw(st.integers(1, 255))

    def apply(data: bytes) -> bytes:
        if not data or kind == "empty":
            return b""
        at = min(int(where * len(data)), len(data) - 1)
        lines = data.split(b"\n")
        line = min(int(where * len(lines)), len(lines) - 1)
        if kind == "truncate":
            return data[:at]
        if kind == "flip":
            out = bytearray(data)
            for k in range(n):
                out[(at + 97 * k) % len(out)] ^= byte
            return bytes(out)
        if kind == "insert":
            return data[:at] + noise + data[at:]
        if kind == "latin1":
            return data[:at] + "é".encode("latin-1") + data[at:]
        if kind == "dup_line":
            return b"\n".join(lines[:line + 1] + lines[line:])
        return b"\n".join(lines[:line] + lines[line + 1:])
    apply.kind = kind
    return apply


def outcome(fn, *names):
    """``fn()``'s result, or None when it raised a UserError whose first line names one of ``names``;
    anything else (a traceback) fails the test."""
    try:
        return fn()
    except UserError as e:
        first = str(e).splitlines()[0] if str(e) else ""
        assert any(str(n) in first for n in names), f"the error does not name the file: {e}"
        return None


def damaged_copy(src: Path, dst: Path, name: str, dmg) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    p = dst / name
    p.write_bytes(dmg(p.read_bytes()))
    return p


# --------------------------------------------------------------------------------------------- #
# Recipes and YAML configs
# --------------------------------------------------------------------------------------------- #
RECIPE = {"name": "r", "competition": "c", "task": "multilabel", "classes": ["a", "b"], "folds_sha256": "f",
          "members": [{"experiment": "e", "folds": [0, 1], "weights": [0.25, 0.75],
                       "checkpoints": [{"path": "runs/e/fold0/best.pt", "sha256": "0123456789abcdef"},
                                       {"path": "runs/e/fold1/best.pt", "sha256": "fedcba9876543210"}]}],
          "thresholds": [0.5, 0.4], "postprocess": {"a": {"min_area": 10}}}


@FUZZ
@given(dmg=damage())
def test_recipe(tmp_path_factory, dmg):
    from competition.config import load_recipe
    p = tmp_path_factory.mktemp("recipe") / "r.yaml"
    p.write_bytes(dmg(yaml.safe_dump(RECIPE).encode()))
    rec = outcome(lambda: load_recipe(p), p)
    if rec is not None:  # still a recipe: then one the submission can use as it is
        assert all(0 < t < 1 for t in rec.thresholds) and len(rec.thresholds) == len(rec.classes)
        for m in rec.members:
            assert all(np.isfinite(w) and w >= 0 for w in m.weights) and len(m.checkpoints) == len(m.folds)


@FUZZ
@given(dmg=damage())
def test_experiment_yaml(tmp_path_factory, dmg):
    from competition.config import ExperimentConfig, read_yaml, validate
    src = Path(__file__).resolve().parent.parent / "configs/experiments/baseline.yaml"
    p = tmp_path_factory.mktemp("exp") / "baseline.yaml"
    p.write_bytes(dmg(src.read_bytes()))

    def load():
        return validate(ExperimentConfig, read_yaml(p), p)
    outcome(load, p)


# --------------------------------------------------------------------------------------------- #
# The probability store (OOF, pseudo-labels, saved test probabilities, the truth cache)
# --------------------------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from competition.store import tiles
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("store") / "oof"
    sizes = {"a": (40, 50), "b": (33, 17), "c": (64, 64)}
    w = tiles.StoreWriter(d, list(sizes), ["x", "y"], sizes, {"task": "multilabel"}, tile=16)
    probs = {}
    for r, (i, hw) in enumerate(sizes.items()):
        p = np.zeros((2, *hw), np.uint8)
        p[0, : hw[0] // 2] = 255
        p[1, 5:20, 3:12] = rng.integers(0, 256, (min(15, hw[0] - 5), 9), dtype=np.uint8)
        probs[i] = p
        w.add(r, p)
    w.close()
    return d, probs


@FUZZ
@given(name=st.sampled_from(["meta.json", "ids.json", "index.npy", "tiles.bin", "sums.npy"]), dmg=damage())
def test_tile_store(store, tmp_path_factory, name, dmg):
    from competition.store import tiles
    src, probs = store
    d = tmp_path_factory.mktemp("s") / "oof"
    damaged_copy(src, d, name, dmg)

    def read():
        s = tiles.open_store(d)
        return s, [s.image(i) for i in range(len(s))]
    got = outcome(read, d)
    if got is not None:  # opened: then every image is exactly what was written, under its own id
        s, images = got
        assert s.ids == list(probs) and s.classes == ["x", "y"] and s.meta.get("task") == "multilabel"
        for i, img in zip(s.ids, images):
            np.testing.assert_array_equal(img, probs[i])


@pytest.mark.parametrize("array", ["float64", "object", "shape", "nan"])
def test_tile_store_arrays_of_the_wrong_kind(store, tmp_path, array):
    from competition.store import tiles
    src, _ = store
    d = tmp_path / "oof"
    shutil.copytree(src, d)
    index = np.load(d / "index.npy")
    if array == "float64":
        np.save(d / "index.npy", index.astype(np.float64))
    elif array == "object":  # never unpickled: refused as it is read
        np.save(d / "index.npy", index.astype(object), allow_pickle=True)
    elif array == "shape":
        np.save(d / "index.npy", index[:, :4].copy())
    else:
        np.save(d / "sums.npy", np.full(3, np.nan))
    with pytest.raises(tiles.StoreError, match=str(d)):
        s = tiles.open_store(d)
        [s.image(i) for i in range(len(s))]


# --------------------------------------------------------------------------------------------- #
# Submission and truth CSVs, RLE strings
# --------------------------------------------------------------------------------------------- #
CLASSES = ["thumb", "index"]


@pytest.fixture(scope="module")
def csvs(tmp_path_factory):
    from competition.config import CompetitionConfig, validate
    base = yaml.safe_load(
        (Path(__file__).resolve().parent.parent / "configs/competitions/synthetic-hands.yaml").read_text())
    base.update(classes=CLASSES)
    base["submission"] = {**base["submission"], "sample_submission": None, "test_truth": None}
    cfg = validate(CompetitionConfig, base, "test")
    d = tmp_path_factory.mktemp("csv")
    rng = np.random.default_rng(1)
    rows_t, rows_s = [], []
    for k in range(4):
        for c in CLASSES:
            m = rng.random((16, 16)) > 0.6
            rows_t.append(f"img{k},{c},{rle.encode(m)},16,16")
            rows_s.append(f"img{k},{c},{rle.encode(m & (rng.random((16, 16)) > 0.3))}")
    (d / "truth.csv").write_text("image_name,class,rle,height,width\n" + "\n".join(rows_t) + "\n")
    (d / "sub.csv").write_text("image_name,class,rle\n" + "\n".join(rows_s) + "\n")
    return d, cfg


@FUZZ
@given(which=st.sampled_from(["sub.csv", "truth.csv"]), dmg=damage())
def test_submission_and_truth_csv(csvs, tmp_path_factory, which, dmg):
    from competition.score import score_files
    src, cfg = csvs
    d = tmp_path_factory.mktemp("c") / "x"
    damaged_copy(src, d, which, dmg)
    # a damaged truth may show as a submission with rows the truth lacks: either file may be named
    res = outcome(lambda: score_files(d / "sub.csv", d / "truth.csv", cfg), d / "sub.csv", d / "truth.csv")
    if res is not None:
        assert 0.0 <= res.mean <= 1.0 and len(res.per_row) == 8


@FUZZ
@given(text=st.text(alphabet="0123456789 -x\n\t", max_size=40))
def test_rle_strings(text):
    mask = outcome(lambda: rle.decode(text, (8, 8)), "")
    if mask is not None:  # accepted: then it is a mask of the image, and it encodes back to itself
        assert mask.shape == (8, 8)
        np.testing.assert_array_equal(rle.decode(rle.encode(mask), (8, 8)), mask)


@FUZZ
@given(bits=st.binary(min_size=8, max_size=8), order=st.sampled_from(["row-major", "column-major"]))
def test_rle_round_trip(bits, order):
    m = np.unpackbits(np.frombuffer(bits, np.uint8)).reshape(8, 8).astype(bool)
    np.testing.assert_array_equal(rle.decode(rle.encode(m, order), (8, 8), order).astype(bool), m)


# --------------------------------------------------------------------------------------------- #
# Labels and images of a dataset (polygon JSON, image files), folds, the ledger, checkpoints
# --------------------------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_data_cache):
    from conftest import tiny_competition
    root = tmp_path_factory.mktemp("tiny")
    (root / "configs/competitions").mkdir(parents=True)
    (root / "configs/competitions/tiny-hands.yaml").write_text(yaml.safe_dump(tiny_competition()))
    shutil.copytree(tiny_data_cache, root / "data/tiny-hands")
    return root


def _label_and_image(tiny):
    from competition.config import load_competition
    from competition.data.adapters import make_adapter
    adapter = make_adapter(load_competition(tiny / "configs/competitions/tiny-hands.yaml"))
    i = adapter.ids[0]
    return adapter, i


@FUZZ
@given(dmg=damage(), what=st.sampled_from(["label", "image"]))
def test_polygon_label_and_image_files(tiny, monkeypatch, dmg, what):
    monkeypatch.chdir(tiny)
    adapter, i = _label_and_image(tiny)
    path = adapter.label_path(i) if what == "label" else adapter.image_path(i)
    good = path.read_bytes()
    try:
        path.write_bytes(dmg(good))
        from competition.config import load_competition
        from competition.data.adapters import make_adapter
        fresh = make_adapter(load_competition("tiny-hands"))
        if what == "label":
            m = outcome(lambda: fresh.load_mask(i), path)
            if m is not None:
                assert m.dtype == np.uint8 and m.shape[0] == len(fresh.classes) and m.max(initial=0) <= 1
        else:
            img = outcome(lambda: fresh.load_image(i), path)
            if img is not None:
                assert img.dtype == np.uint8 and img.ndim == 2
    finally:
        path.write_bytes(good)


@FUZZ
@given(dmg=damage())
def test_folds_file(tiny, monkeypatch, dmg):
    from competition import folds
    from competition.config import load_competition
    from competition.data.adapters import make_adapter
    monkeypatch.chdir(tiny)
    cfg = load_competition("tiny-hands")
    adapter = make_adapter(cfg)
    p = Path("folds/tiny-hands.csv")
    if not p.is_file():
        folds.run(cfg, adapter)
    good = p.read_bytes()
    ref = folds.load_folds(cfg, adapter)
    try:
        p.write_bytes(dmg(good))
        df = outcome(lambda: folds.load_folds(cfg, adapter), p)
        if df is not None:  # accepted: the same split
            assert dict(zip(df["id"], df["fold"])) == dict(zip(ref["id"], ref["fold"]))
    finally:
        p.write_bytes(good)


@FUZZ
@given(dmg=damage())
def test_ledger(tmp_path_factory, dmg, monkeypatch):
    from competition import ledger
    d = tmp_path_factory.mktemp("led")
    monkeypatch.chdir(d)
    (d / "submissions").mkdir()
    p = d / "submissions/ledger.csv"
    row = ",".join(["2026-01-01 00:00:00", "submissions/a.csv", "c", "r", "abc", "e(f0)x1.00", "0.9", "", "", "",
                    "e:identity@1", "", "4", "1.0", "", ""])
    p.write_bytes(dmg((",".join(ledger.COLUMNS) + "\n" + row + "\n").encode()))
    outcome(ledger.read, p)


@FUZZ
@given(dmg=damage())
def test_checkpoint_against_its_recipe_hash(tmp_path_factory, dmg):
    """A bundle's or a project's checkpoint is read only after its sha256 matched the recipe's."""
    import torch

    from competition.config import RecipeCheckpoint, RecipeMember
    from competition.io import file_hash
    from competition.predict.members import verify_checkpoint
    root = tmp_path_factory.mktemp("ck")
    p = root / "runs/e/fold0/best.pt"
    p.parent.mkdir(parents=True)
    torch.save({"model": {"w": torch.arange(6.0)}, "config": {}}, p)
    c = RecipeCheckpoint(path="runs/e/fold0/best.pt", sha256=file_hash(p))
    member = RecipeMember(experiment="e", folds=[0], weights=[1.0], checkpoints=[c])
    good = p.read_bytes()
    bad = dmg(good)
    p.write_bytes(bad)
    got = outcome(lambda: verify_checkpoint(member, 0, c, root, "recipe.yaml"), p, "runs/e/fold0/best.pt")
    assert (got is not None) == (bad == good)


def test_metrics_json_is_read_through_the_checked_reader(tmp_path):
    from competition.io import ReadError, read_json
    p = tmp_path / "metrics.json"
    p.write_bytes(json.dumps({"oof_dice": 0.5}).encode()[:-3])
    with pytest.raises(ReadError, match="metrics.json: metrics file is not valid JSON"):
        read_json(p, "metrics file")


# --------------------------------------------------------------------------------------------- #
# The sample cache and pseudo-label sets: damage is re-read or refused, never trained on
# --------------------------------------------------------------------------------------------- #
def _samples(ds):
    return [ds[i] for i in range(len(ds))]


def _same(a, b):
    import torch
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k


@FUZZ
@given(name=st.sampled_from(["images.npy", "masks.npy", "filled.npy", "sums.npy", "meta.json"]), dmg=damage())
def test_sample_cache(tiny, monkeypatch, name, dmg):
    from competition.config import ExperimentConfig, load_competition
    from competition.data import cache as cache_mod
    from competition.data.adapters import make_adapter
    from competition.data.dataset import SegDataset
    monkeypatch.chdir(tiny)
    monkeypatch.setattr(cache_mod, "_logged", set())
    monkeypatch.setattr(cache_mod, "log_once", lambda msg, log=None: None)

    def exp(cache):
        return ExperimentConfig.model_validate({"name": "t", "competition": "tiny-hands",
                                                "data": {"input_size": 32, "batch_size": 2, "workers": 0,
                                                         "cache": cache}})
    ad = make_adapter(load_competition("tiny-hands"))
    ref = _samples(SegDataset(ad, ad.ids, exp(False), "multilabel", "val"))
    _same(_samples(SegDataset(ad, ad.ids, exp(True), "multilabel", "val")), ref)  # fills the cache
    (folder,) = [p for p in (tiny / "runs/_cache").iterdir() if p.name.startswith("tiny-hands-train")]
    p = folder / name
    p.write_bytes(dmg(p.read_bytes()))
    _same(_samples(SegDataset(ad, ad.ids, exp(True), "multilabel", "val")), ref)


@FUZZ
@given(dmg=damage())
def test_pseudo_label_set_meta(tiny, tmp_path_factory, monkeypatch, dmg):
    import torch

    from competition import paths
    from competition.config import load_competition
    from competition.data import pseudo as data_pseudo
    from competition.data.adapters import make_adapter
    from competition.store import tiles
    monkeypatch.chdir(tiny)
    comp = load_competition("tiny-hands")
    ad = make_adapter(comp)
    ids = list(ad.test_ids)
    d = paths.pseudo_store("fz", 0)
    if not tiles.exists(d):
        rng = np.random.default_rng(2)
        sizes = {i: ad.image_size(i, "test") for i in ids}
        w = tiles.StoreWriter(d, ids, list(comp.classes), sizes,
                              {"task": comp.task, "thresholds": [0.5] * len(comp.classes), "split": "test",
                               "kept": ids, "min_confidence": 0.0})
        for r, i in enumerate(ids):
            w.add(r, rng.integers(0, 256, (len(comp.classes), *sizes[i]), dtype=np.uint8))
        w.close()
    meta = d / "meta.json"
    good = meta.read_bytes()
    ref = data_pseudo.PseudoLabels(ad, "fz", 0, comp.classes, comp.task)
    want = {i: ref.load_mask(i) for i in ref.ids}
    try:
        meta.write_bytes(dmg(good))

        def read():
            pl = data_pseudo.PseudoLabels(ad, "fz", 0, comp.classes, comp.task)
            return pl, {i: pl.load_mask(i) for i in pl.ids}
        got = outcome(read, d)
        if got is not None:  # accepted: the same labels (a `kept` list may only be shorter)
            pl, masks = got
            assert set(masks) <= set(want) and torch.equal(pl.thresholds, ref.thresholds)
            for i, m in masks.items():
                np.testing.assert_array_equal(m, want[i])
    finally:
        meta.write_bytes(good)
