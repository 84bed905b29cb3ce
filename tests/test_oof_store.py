"""The OOF store (all folds as one view, completeness checks), the truth cache, `competition oof`
and its label-suspect report."""
import json

import numpy as np
import pandas as pd
import pytest

from competition import oof, paths
from competition.cli import main
from competition.ensemble import store
from competition.train.checkpoint import file_hash
from test_ensemble_util import fold_project, good, write_member


@pytest.fixture
def member(tiny_project):
    comp, adapter, folds = fold_project(tiny_project)
    write_member(tiny_project, "m1", good, seed=1)
    return comp, adapter, folds


def test_view_assembles_every_fold_in_canonical_order(member):
    comp, adapter, folds = member
    view = store.open_experiment("m1", folds, comp.classes, comp.task)
    ids, fold_of = store.canonical_order(folds)
    assert view.ids == ids and view.shape == (12, 12, 64, 64) and view.fold_of.tolist() == sorted(fold_of.tolist())
    expect = np.concatenate([oof.read(paths.oof_dir("m1", k))[0] for k in (0, 1, 2)])
    np.testing.assert_array_equal(view.read(0, 12), expect)
    np.testing.assert_array_equal(view.read(3, 9), expect[3:9])  # spans a fold boundary
    np.testing.assert_array_equal(view[5], expect[5])
    np.testing.assert_array_equal(view[[1, 10]], expect[[1, 10]])


def test_rows_are_matched_by_id_not_position(member):
    comp, adapter, folds = member
    d = paths.oof_dir("m1", 1)
    probs, ids, meta = oof.read(d)
    before = store.open_experiment("m1", folds, comp.classes, comp.task).read(0, 12)
    perm = [3, 1, 0, 2]
    oof.write(d, [ids[i] for i in perm], [(list(range(4)), np.asarray(probs)[perm])], comp.classes, (64, 64),
              {k: v for k, v in meta.items() if k not in ("size", "classes", "quantization")})
    after = store.open_experiment("m1", folds, comp.classes, comp.task)
    np.testing.assert_array_equal(after.read(0, 12), before)


def test_missing_fold_is_refused_naming_it(member):
    comp, adapter, folds = member
    import shutil
    shutil.rmtree(paths.oof_dir("m1", 2))
    with pytest.raises(store.OOFIncomplete, match=r"'m1' has no OOF for fold\(s\) \[2\].*competition oof m1"):
        store.open_experiment("m1", folds, comp.classes, comp.task)


def test_missing_or_foreign_id_is_refused_naming_it(member):
    comp, adapter, folds = member
    d = paths.oof_dir("m1", 0)
    ids = json.loads((d / "ids.json").read_text())
    other = folds.loc[folds["fold"] == 1, "id"].iloc[0]
    (d / "ids.json").write_text(json.dumps(ids[:-1] + [other]))
    with pytest.raises(store.OOFIncomplete, match=rf"fold 0 .*missing id\(s\) \['{ids[-1]}'\].*not in fold 0.*{other}"):
        store.open_experiment("m1", folds, comp.classes, comp.task)
    (d / "ids.json").write_text(json.dumps(ids[:-1] + [ids[0]]))
    with pytest.raises(store.OOFIncomplete, match=r"listed twice"):
        store.open_experiment("m1", folds, comp.classes, comp.task)


def test_truth_cache_is_built_once_and_matches_the_adapter(member, monkeypatch):
    comp, adapter, folds = member
    ids, _ = store.canonical_order(folds)
    sha = file_hash(paths.folds_file(comp.name))
    truth = store.truth_cache(comp, adapter, ids, (32, 32), sha, log=lambda *_: None)
    want = np.stack([adapter.load_mask(i, (32, 32)) for i in ids]).astype(bool)
    np.testing.assert_array_equal(truth.read(0, 12), want)
    assert truth.shape == (12, 12, 32, 32) and truth.path.parent.name == "_truth"
    with monkeypatch.context() as mp:
        mp.setattr(type(adapter), "load_mask", lambda *a, **k: pytest.fail("the cache was rebuilt"))
        again = store.truth_cache(comp, adapter, ids, (32, 32), sha, log=lambda *_: None)
    assert again.path == truth.path
    other = store.truth_cache(comp, adapter, ids, (32, 32), "f" * 16, log=lambda *_: None)  # a new split
    assert other.path != truth.path and not truth.path.exists()


def test_oof_command_scores_per_class_fold_and_image(member, capsys):
    comp, adapter, folds = member
    assert main(["oof", "m1"]) == 0
    out = capsys.readouterr().out
    table = pd.read_csv(paths.project() / "runs/m1/oof_scores.csv")
    assert len(table) == 12 and list(table.columns[:3]) == ["id", "fold", "mean"] and "thumb" in table.columns
    # Known answer: the Dice of the stored OOF at >= 128 against the masks, computed directly.
    from competition.metrics import dice_per_class
    view = store.open_experiment("m1", folds, comp.classes, comp.task)
    want = dice_per_class(view.read(0, 12) >= 128, np.stack([adapter.load_mask(i, (64, 64)) for i in view.ids]))
    assert table["mean"].mean() == pytest.approx(want.mean(), abs=1e-6)
    assert f"OOF Dice {want.mean():.4f}" in out and "per fold:" in out and "per class:" in out


def test_oof_command_refuses_an_untrained_fold(member, capsys):
    import shutil
    shutil.rmtree(paths.run_dir("m1", 1))
    assert main(["oof", "m1"]) == 2
    err = capsys.readouterr().err
    assert "no OOF for fold(s) [1]" in err and "make train EXP=m1 FOLD=1" in err


def test_suspects_find_swapped_labels_and_draw_them(tiny_project, capsys):
    comp, adapter, folds = fold_project(tiny_project)
    victim = folds.loc[folds["fold"] == 1, "id"].iloc[0]

    def swapped(truth, rng):
        p = np.where(truth > 0, 240, 10).astype(np.uint8)
        return p

    write_member(tiny_project, "m2", swapped)
    # The truth of `victim` has its thumb and index labels swapped: the model (right) disagrees confidently.
    d = paths.oof_dir("m2", 1)
    probs, ids, meta = oof.read(d)
    probs = np.array(probs)
    r = ids.index(victim)
    probs[r, [0, 1]] = probs[r, [1, 0]]
    oof.write(d, ids, [(list(range(len(ids))), probs)], comp.classes, (64, 64),
              {k: v for k, v in meta.items() if k not in ("size", "classes", "quantization")})
    assert main(["oof", "m2", "--suspects", "--top", "3"]) == 0
    sus = pd.read_csv(paths.project() / "runs/m2/suspects/suspects.csv", keep_default_na=False)
    assert len(sus) == 2  # only disagreeing image x class pairs are listed
    top2 = sus.head(2)
    assert set(top2["id"]) == {victim} and set(top2["class"]) == {"thumb", "index"}
    assert set(top2["matches_truth_of"]) == {"thumb", "index"}
    for png in sus["png"]:
        assert (paths.project() / "runs/m2/suspects" / png).is_file()
    assert "label suspects" in capsys.readouterr().out
