import pandas as pd
import pytest

from competition.config import load_competition
from competition.data.adapters import make_adapter
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
