import os
import stat
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import competition.data.rle_csv  # noqa: F401  registers "rle_csv"
from competition.config import CompetitionConfig, load_competition
from competition.data.adapters import make_adapter
from competition.data.base import DataError
from competition.folds import FoldsError, load_folds, make_folds, run


def test_synthetic_data_is_generated_deterministically(tiny_project):
    ad = make_adapter(load_competition("tiny-hands"))
    assert len(ad.ids) == 12 and len(ad.test_ids) == 4
    groups = ad.groups()
    assert len(set(groups.values())) == 6  # two images per subject
    m = ad.load_mask(ad.ids[0])
    assert m.shape == (12, 64, 64) and m[:6].reshape(6, -1).any(1).all()
    truth = pd.read_csv(tiny_project / "data/tiny-hands/test_truth.csv", keep_default_na=False)
    assert len(truth) == 4 * 12 and {"height", "width"} <= set(truth.columns)


def test_no_group_spans_two_folds_and_every_fold_is_used(tiny_project):
    comp = load_competition("tiny-hands")
    ad = make_adapter(comp)
    df = make_folds(comp, ad, 3, seed=1)
    assert (df.groupby("group")["fold"].nunique() == 1).all()
    assert sorted(df["fold"].unique()) == [0, 1, 2]
    assert sorted(df["id"]) == sorted(ad.ids)


@pytest.mark.parametrize("by", ["none", "class_presence", "rare_class"])
def test_stratification_modes(tiny_project, by):
    base = load_competition("tiny-hands")
    comp = type(base).model_validate({**base.model_dump(), "stratify": {"by": by}})
    df = make_folds(comp, make_adapter(comp), 3, seed=0)
    assert (df.groupby("group")["fold"].nunique() == 1).all()
    assert ("stratum" in df.columns) == (by != "none")


def test_seed_changes_split_and_is_reproducible(tiny_project):
    comp = load_competition("tiny-hands")
    ad = make_adapter(comp)
    a, b, c = (make_folds(comp, ad, 3, s)["fold"].tolist() for s in (0, 0, 5))
    assert a == b and a != c


def test_refuses_overwrite_and_detects_stale_file(tiny_project):
    comp = load_competition("tiny-hands")
    ad = make_adapter(comp)
    path, df, created = run(comp, ad)
    assert created and path == tiny_project / "folds/tiny-hands.csv"
    before = path.read_text()
    _, _, created = run(comp, ad, seed=123)  # exists and matches: kept, not overwritten
    assert not created and path.read_text() == before
    # A stale file (an id gone, a new one) is an error listing the ids.
    stale = df.copy()
    stale.loc[0, "id"] = "ID999/ghost"
    stale.to_csv(path, index=False)
    with pytest.raises(FoldsError, match=r"ghost.*" + df.loc[0, "id"].replace("/", ".")):
        load_folds(comp, ad)
    _, _, created = run(comp, ad, force=True)
    assert created and load_folds(comp, ad) is not None


def test_leaky_folds_file_is_refused(tiny_project):
    comp = load_competition("tiny-hands")
    ad = make_adapter(comp)
    path, df, _ = run(comp, ad)
    g = df["group"].iloc[0]
    rows = df.index[df["group"] == g]
    df.loc[rows[0], "fold"] = (df.loc[rows[1], "fold"] + 1) % 3
    df.to_csv(path, index=False)
    with pytest.raises(FoldsError, match=f"{g}.*span more than one fold"):
        load_folds(comp, ad)


def test_cli_folds_prints_summary(tiny_project, capsys):
    from competition.cli import main
    assert main(["folds", "--comp", "tiny-hands"]) == 0
    out = capsys.readouterr().out
    assert "no group spans two folds" in out and "groups" in out
    assert main(["folds", "--comp", "tiny-hands"]) == 0
    assert "kept it" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------- #
# Folds file checks: garbage, non-integer folds, a single fold, groups recomputed from the data
# --------------------------------------------------------------------------------------------- #
@pytest.fixture
def folds_file(tiny_project):
    comp = load_competition("tiny-hands")
    ad = make_adapter(comp)
    path, df, _ = run(comp, ad)
    return comp, ad, path, df


@pytest.mark.parametrize("content, pattern", [
    (b"", r"not a folds file: it is empty; expected a CSV with columns id,group,fold"),
    (b"\n\n", r"not a folds file: it is empty; expected a CSV with columns id,group,fold"),
    (b"id,group,fold\na,b,0,9,9\n", r"not a folds file: it is not a readable CSV \(line 2 has 5 cells but the "
                                   r"header has 3\); expected a CSV with columns id,group,fold"),
    (b"just some text\nmore\n", r"not a folds file: missing column\(s\) \['id', 'group', 'fold'\].*"
                                r"expected a CSV with columns id,group,fold"),
    (b"\x89PNG\r\n\x1a\n\x00\xff", r"folds file is not UTF-8 text"),
])
def test_empty_or_garbage_folds_file(folds_file, content, pattern):
    comp, ad, path, _ = folds_file
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"tiny-hands\.csv: " + pattern):
        load_folds(comp, ad)
    with pytest.raises(FoldsError):  # FoldsError is a DataError: the CLI reports both the same way
        load_folds(comp)


@pytest.mark.parametrize("value", ["x", "1.5", "-1", "", " "])
def test_non_integer_fold_names_the_row(folds_file, value):
    comp, ad, path, df = folds_file
    df["fold"] = df["fold"].astype(str)
    df.loc[3, "fold"] = value
    df.to_csv(path, index=False)
    with pytest.raises(FoldsError, match=rf"fold value\(s\) that are not integers at line 5 \(id "
                                         rf"'{df.loc[3, 'id']}', fold '{value}'\); folds must be integers") as e:
        load_folds(comp, ad)
    assert "leakage" not in str(e.value)


def test_folds_are_read_as_integers_and_ids_as_text(folds_file):
    comp, ad, path, df = folds_file
    got = load_folds(comp, ad)
    assert got["fold"].dtype == np.int64 and got["fold"].tolist() == df["fold"].tolist()
    assert got["id"].tolist() == df["id"].tolist() and got["group"].tolist() == df["group"].tolist()


@pytest.mark.parametrize("folds", [[0], [2]])
def test_a_single_fold_is_refused(folds_file, folds):
    comp, ad, path, df = folds_file
    df["fold"] = folds[0]
    df.to_csv(path, index=False)
    with pytest.raises(FoldsError, match=rf"every image in fold {folds[0]}; training needs at least 2 folds.*"
                                         rf"make folds COMP=tiny-hands FORCE=1"):
        load_folds(comp, ad)
    df.head(0).to_csv(path, index=False)
    with pytest.raises(FoldsError, match=r"lists no images; training needs at least 2 folds"):
        load_folds(comp)


def test_groups_are_recomputed_from_the_data_not_trusted_from_the_file(folds_file):
    """An image relabelled into another group (and moved to that group's fold) looks consistent to a
    check of the file alone, but its real subject now spans two folds."""
    comp, ad, path, df = folds_file
    groups = df.groupby("group")["fold"].first()
    victim = df.index[0]
    own = df.loc[victim, "group"]
    other = next(g for g, f in groups.items() if f != groups[own])
    df.loc[victim, ["group", "fold"]] = [other, groups[other]]
    df.to_csv(path, index=False)
    load_folds(comp)  # without the data the file is self-consistent
    with pytest.raises(FoldsError, match=rf"group column disagrees with the data for image\(s\) "
                                         rf"'{df.loc[victim, 'id']}' \(file: '{other}', data: '{own}'\); with the "
                                         rf"data's groups, group\(s\) {own} span more than one fold \(leakage\)"):
        load_folds(comp, ad)


def test_relabelled_groups_without_leakage_are_refused_too(folds_file):
    comp, ad, path, df = folds_file
    df["group"] = "S-" + df["group"]  # a renamed column: nothing leaks, but the file no longer describes the data
    df.to_csv(path, index=False)
    with pytest.raises(FoldsError, match=r"group column disagrees with the data .*file: 'S-ID0.*Groups come from the "
                                         r"data") as e:
        load_folds(comp, ad)
    assert "leakage" not in str(e.value)


# --------------------------------------------------------------------------------------------- #
# make folds validates RLE labels
# --------------------------------------------------------------------------------------------- #
def rle_project(root: Path, bad_rle: str) -> CompetitionConfig:
    for i, s in (("a", "p1"), ("b", "p1"), ("c", "p2"), ("d", "p2"), ("e", "p3"), ("f", "p3")):
        (root / "data/train_images" / s).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "data/train_images" / s / f"{i}.png"), np.zeros((8, 10), np.uint8))
    pd.DataFrame({"id": ["p1/a", "p2/c", "p3/e"], "class": ["x", "x", "y"], "rle": ["1 3", bad_rle, "5 2"]}) \
        .to_csv(root / "data/train.csv", index=False)
    return CompetitionConfig(name="rle", data_root=str(root / "data"), format="rle_csv", classes=["x", "y"],
                             groups={"source": "folder"}, stratify={"by": "none"}, folds=2)


@pytest.mark.parametrize("bad", ["81 2", "3 x", "5 2 1 1", "7"])
def test_make_folds_refuses_malformed_rle_naming_the_csv_row(tmp_path, monkeypatch, bad):
    monkeypatch.chdir(tmp_path)
    comp = rle_project(tmp_path, bad)
    with pytest.raises(DataError, match=r"train\.csv line 3 \(id 'p2/c', class 'x'\): malformed RLE for the 10x8 "
                                        r"image c\.png"):
        run(comp, make_adapter(comp))
    assert not (tmp_path / "folds/rle.csv").exists()


def test_make_folds_checks_rle_also_when_keeping_an_existing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    comp = rle_project(tmp_path, "1 2")
    path, _, created = run(comp, make_adapter(comp))
    assert created and path.is_file()
    rle_project(tmp_path, "79 5")  # edited after the folds were made: runs past the 80-pixel image
    with pytest.raises(DataError, match=r"line 3 \(id 'p2/c', class 'x'\): malformed RLE .*ends at pixel 83"):
        run(comp, make_adapter(comp))


def test_folds_file_is_written_atomically_with_a_normal_mode(tiny_project):
    comp = load_competition("tiny-hands")
    old = os.umask(0o022)
    try:
        path, _, _ = run(comp, make_adapter(comp))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["tiny-hands.csv"]  # no temp left behind


def test_writing_folds_removes_a_killed_writers_old_temp_only(tiny_project):
    comp = load_competition("tiny-hands")
    folder = tiny_project / "folds"
    folder.mkdir()
    stale, fresh = folder / ".tiny-hands.csv.abcd1234.tmp", folder / ".other.csv.wxyz5678.tmp"
    for p in (stale, fresh):
        p.write_text("half")
    os.utime(stale, (0, 0))
    run(comp, make_adapter(comp))
    assert not stale.exists() and fresh.exists()


# --------------------------------------------------------------------------------------------- #
# Lopsided folds: allowed, but warned about with the fold sizes and what to do
# --------------------------------------------------------------------------------------------- #
def test_balance_warning_names_the_sizes_and_the_remedies():
    from competition.folds import balance_warning
    df = pd.DataFrame({"id": [f"i{k}" for k in range(468)], "group": ["s1"] * 62 + ["s2"] * 101 + ["s3"] * 305,
                       "fold": [1] * 62 + [2] * 101 + [0] * 305})
    w = balance_warning(df, "seqs")
    assert w.startswith("warning: lopsided folds: fold 0 305, fold 1 62, fold 2 101 images (the largest 4.9x the "
                        "smallest), so fold 0 trains on only 163 of 468 images")
    assert "the largest, 's3', holds 305 images" in w and "`-k 2`, or `folds: 2` in configs/competitions/seqs.yaml" in w
    assert "different `groups` key" in w and "keep this split knowingly" in w and "\n" not in w
    balanced = df.assign(fold=np.arange(468) % 3)
    assert balance_warning(balanced, "seqs") is None
    two = df.assign(fold=(df["group"] == "s3").astype(int))  # 163 vs 305: within 2x
    assert balance_warning(two, "seqs") is None
    assert "fewer folds" not in balance_warning(df.assign(fold=(df["group"] == "s1").astype(int)), "seqs")


def test_cli_folds_warns_about_lopsided_folds(tmp_path, monkeypatch, capsys):
    import yaml

    from competition.cli import main
    monkeypatch.chdir(tmp_path)
    for s, n in (("p1", 2), ("p2", 3), ("p3", 9)):
        (tmp_path / "data/train_images" / s).mkdir(parents=True)
        for k in range(n):
            cv2.imwrite(str(tmp_path / "data/train_images" / s / f"{k}.png"), np.zeros((8, 10), np.uint8))
    pd.DataFrame({"id": ["p1/0"], "class": ["x"], "rle": ["1 3"]}).to_csv(tmp_path / "data/train.csv", index=False)
    (tmp_path / "configs/competitions").mkdir(parents=True)
    (tmp_path / "configs/competitions/lop.yaml").write_text(yaml.safe_dump(
        {"name": "lop", "data_root": "data", "format": "rle_csv", "classes": ["x"], "groups": {"source": "folder"},
         "stratify": {"by": "none"}, "folds": 3, "rle_csv": {"test_images": None}}))
    assert main(["folds", "--comp", "lop"]) == 0
    out = capsys.readouterr().out
    assert "warning: lopsided folds: fold 0 9, fold 1 3, fold 2 2 images (the largest 4.5x the smallest), so " \
           "fold 0 trains on only 5 of 14 images" in out
    assert main(["folds", "--comp", "lop"]) == 0  # kept: still said
    assert "warning: lopsided folds" in capsys.readouterr().out
