"""The OOF of an experiment (all folds as one view, completeness checks), the truth store,
`competition oof` and its label-suspect report."""
import json

import numpy as np
import pandas as pd
import pytest
from test_ensemble_util import fold_project, good, write_member

from competition import paths
from competition.cli import main
from competition.cv import views as store
from competition.io import file_hash
from competition.store import tiles


@pytest.fixture
def member(tiny_project):
    comp, adapter, folds = fold_project(tiny_project)
    write_member(tiny_project, "m1", good, seed=1)
    return comp, adapter, folds


def _rewrite(d, ids, probs, meta):
    """Publish ``probs`` (per id, (C, H, W)) as the store ``d`` in the order of ``ids``."""
    w = tiles.StoreWriter(d, ids, meta["classes"], {i: p.shape[1:] for i, p in zip(ids, probs)},
                          {k: v for k, v in meta.items() if k not in ("classes", "original_sizes")})
    for r, p in enumerate(probs):
        w.add(r, p)
    w.close()


def test_view_assembles_every_fold_in_canonical_order(member):
    comp, adapter, folds = member
    view = store.open_experiment("m1", folds, comp.classes, comp.task)
    ids, fold_of = store.canonical_order(folds)
    assert view.ids == ids and len(view) == 12 and view.fold_of.tolist() == sorted(fold_of.tolist())
    expect = [tiles.open_store(paths.oof_dir("m1", k)).image(r) for k in (0, 1, 2) for r in range(4)]
    for i in range(12):
        np.testing.assert_array_equal(view.image(i), expect[i])
        assert view.image(i).shape == (len(comp.classes), *adapter.image_size(ids[i]))


def test_rows_are_matched_by_id_not_position(member):
    comp, adapter, folds = member
    d = paths.oof_dir("m1", 1)
    st = tiles.open_store(d)
    before = [store.open_experiment("m1", folds, comp.classes, comp.task).image(i) for i in range(12)]
    perm = [3, 1, 0, 2]
    _rewrite(d, [st.ids[i] for i in perm], [st.image(i) for i in perm], st.meta)
    after = store.open_experiment("m1", folds, comp.classes, comp.task)
    for i in range(12):
        np.testing.assert_array_equal(after.image(i), before[i])


def test_missing_fold_is_refused_naming_it(member):
    comp, adapter, folds = member
    import shutil
    shutil.rmtree(paths.oof_dir("m1", 2))
    with pytest.raises(store.OOFIncomplete, match=r"'m1' has no OOF for fold\(s\) \[2\].*competition oof m1"):
        store.open_experiment("m1", folds, comp.classes, comp.task)


def test_missing_or_foreign_id_is_refused_naming_it(member):
    comp, adapter, folds = member
    d = paths.oof_dir("m1", 0)
    st = tiles.open_store(d)
    ids, probs = list(st.ids), [st.image(r) for r in range(len(st))]
    other = folds.loc[folds["fold"] == 1, "id"].iloc[0]
    _rewrite(d, ids[:-1] + [other], probs[:-1] + [np.zeros((12, *adapter.image_size(other)), np.uint8)], st.meta)
    with pytest.raises(store.OOFIncomplete, match=rf"fold 0 .*missing id\(s\) \['{ids[-1]}'\].*not in fold 0.*{other}"):
        store.open_experiment("m1", folds, comp.classes, comp.task)
    (d / "ids.json").write_text(json.dumps(ids[:-1] + [ids[0]]))  # edited by hand
    with pytest.raises(tiles.StoreError, match=r"ids.json: expected a list of distinct image ids"):
        store.open_experiment("m1", folds, comp.classes, comp.task)


def test_truth_store_is_built_once_and_matches_the_adapter(member, monkeypatch):
    comp, adapter, folds = member
    ids, _ = store.canonical_order(folds)
    sha = file_hash(paths.folds_file(comp.name))
    truth = store.truth_store(comp, adapter, ids, sha, log=lambda *_: None)
    for r, i in enumerate(ids):
        np.testing.assert_array_equal(truth.image(r) > 0, adapter.load_mask(i) != 0)
    assert truth.folder.parent.name == "_truth"
    with monkeypatch.context() as mp:
        mp.setattr(type(adapter), "load_mask", lambda *a, **k: pytest.fail("the store was rebuilt"))
        again = store.truth_store(comp, adapter, ids, sha, log=lambda *_: None)
    assert again.folder == truth.folder
    other = store.truth_store(comp, adapter, ids, "f" * 16, log=lambda *_: None)  # a new split
    assert other.folder != truth.folder and not truth.folder.exists()


def test_oof_command_scores_per_class_fold_and_image(member, capsys):
    comp, adapter, folds = member
    assert main(["oof", "m1"]) == 0
    out = capsys.readouterr().out
    table = pd.read_csv(paths.project() / "runs/m1/oof_scores.csv")
    assert len(table) == 12 and list(table.columns[:3]) == ["id", "fold", "mean"] and "thumb" in table.columns
    # Known answer: the Dice of the stored OOF at >= 128 against the masks at the original size, directly.
    from competition.metrics import dice_per_class
    view = store.open_experiment("m1", folds, comp.classes, comp.task)
    want = np.concatenate([dice_per_class(view.image(r)[None] >= 128, adapter.load_mask(i)[None])
                           for r, i in enumerate(view.ids)])
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
    st = tiles.open_store(d)
    probs = [st.image(r) for r in range(len(st))]
    r = st.ids.index(victim)
    probs[r] = probs[r][[1, 0] + list(range(2, len(probs[r])))]
    _rewrite(d, st.ids, probs, st.meta)
    assert main(["oof", "m2", "--suspects", "--top", "3"]) == 0
    sus = pd.read_csv(paths.project() / "runs/m2/suspects/suspects.csv", keep_default_na=False)
    assert len(sus) == 2  # only disagreeing image x class pairs are listed
    top2 = sus.head(2)
    assert set(top2["id"]) == {victim} and set(top2["class"]) == {"thumb", "index"}
    assert set(top2["matches_truth_of"]) == {"thumb", "index"}
    for png in sus["png"]:
        assert (paths.project() / "runs/m2/suspects" / png).is_file()
    assert "label suspects" in capsys.readouterr().out


def test_a_dense_store_of_an_earlier_version_is_refused_with_the_remedy(member, capsys):
    import shutil
    d = paths.oof_dir("m1", 0)
    shutil.rmtree(d)
    d.mkdir()
    np.save(d / "probs.npy", np.zeros((4, 12, 8, 8), np.uint8))
    (d / "ids.json").write_text("[]")
    (d / "meta.json").write_text("{}")
    assert main(["ensemble", "--name", "e", "m1"]) == 2
    err = capsys.readouterr().err
    assert f"{d}: a dense store (probs.npy) from an earlier version" in err and "competition oof" in err
