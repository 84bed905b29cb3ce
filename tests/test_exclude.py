"""Curated data (``data.exclude``): excluded images stay in the folds file and in the OOF store, but
never reach training, the validation Dice, OOF scores or the ensemble's choice unless asked; the
suspects table becomes an exclusion list; the run folder, recipe and ledger carry the list's hash."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml
from test_ensemble_util import blurred, fold_project, good, write_member

from competition import ledger, paths
from competition.cli import main
from competition.config import ConfigError, ExperimentConfig, load_recipe, validate
from competition.cv import oofscore
from competition.cv import views as store
from competition.folds import excluded, ids_hash, training_ids, validation_ids
from competition.metrics import dice_per_class
from competition.store import tiles

QUIET = {"log": lambda *_: None}


def set_exclude(project, exp: str, value) -> None:
    path = project / "configs/experiments" / f"{exp}.yaml"
    data = yaml.safe_load(path.read_text())
    data.setdefault("data", {})["exclude"] = value
    path.write_text(yaml.safe_dump(data))


def pick(folds: pd.DataFrame) -> list[str]:
    """Two images to exclude: the first of fold 0 and the last of fold 2."""
    return [folds.loc[folds["fold"] == 0, "id"].iloc[0], folds.loc[folds["fold"] == 2, "id"].iloc[-1]]


def direct_dice(view, adapter, rows) -> np.ndarray:
    """Known answer: (len(rows), C) Dice of the stored OOF at >= 128 against the masks, image by image."""
    return np.concatenate([dice_per_class(view.image(r)[None] >= 128, adapter.load_mask(view.ids[r])[None])
                           for r in rows])


@pytest.fixture
def member(tiny_project):
    comp, adapter, folds = fold_project(tiny_project)
    write_member(tiny_project, "m1", good, seed=1)
    return comp, adapter, folds


# -- reading the list ------------------------------------------------------------------------------------
def test_ids_and_split_selection(member):
    comp, adapter, folds = member
    out = pick(folds)
    excl = excluded(out, folds)
    assert excl.ids == frozenset(out) and excl.sha256 == ids_hash(reversed(out))  # order does not matter
    every = folds["id"].tolist()
    for k in (0, 1, 2):
        train, val = training_ids(folds, k, excl.ids), validation_ids(folds, k, excl.ids)
        assert train == [i for i in every if i not in out and folds.set_index("id").loc[i, "fold"] != k]
        assert val == [i for i in every if i not in out and folds.set_index("id").loc[i, "fold"] == k]
    assert training_ids(folds, None, excl.ids) == [i for i in every if i not in out]  # the all-data run
    assert training_ids(folds, 0) == folds.loc[folds["fold"] != 0, "id"].tolist()  # nothing excluded
    fold0 = folds.loc[folds["fold"] == 0, "id"].tolist()
    with pytest.raises(ConfigError, match=r"data.exclude leaves out all 4 of fold 0's held-out images"):
        validation_ids(folds, 0, fold0)


def test_unknown_ids_are_refused_naming_them(member, tiny_project, capsys):
    comp, adapter, folds = member
    with pytest.raises(ConfigError, match=r"data.exclude: 1 id\(s\) not in the folds file.*'?nope"):
        excluded([folds["id"].iloc[0], "nope"], folds)
    many = [f"ghost{i:02d}" for i in range(12)]
    with pytest.raises(ConfigError, match=r"12 id\(s\).*ghost09 \.\.\. \(12 in all\)") as e:
        excluded(many, folds)
    assert "ghost10" not in str(e.value)
    set_exclude(tiny_project, "m1", ["nope"])
    assert main(["oof", "m1"]) == 2
    err = capsys.readouterr().err
    assert "data.exclude" in err and "nope" in err and len(err.strip().splitlines()) == 1


def test_csv_form_with_reason_column(member, tiny_project):
    comp, adapter, folds = member
    out = pick(folds)
    (tiny_project / "curated").mkdir()
    csv = tiny_project / "curated/exclude.csv"
    csv.write_text(f"id,reason,reviewer\n{out[1]},\"swapped thumb, index\",ann\n{out[0]}, artefact ,bob\n")
    excl = excluded("curated/exclude.csv", folds)
    assert excl.ids == frozenset(out) and excl.reasons == {out[1]: "swapped thumb, index", out[0]: "artefact"}
    assert excl.sha256 == excluded(out, folds).sha256  # a list and a CSV naming the same images agree
    assert excl.source == "curated/exclude.csv"
    csv.write_text(f"id\n{out[0]}\n")
    with pytest.raises(ConfigError, match=r"curated/exclude.csv: missing column\(s\) \['reason'\]"):
        excluded("curated/exclude.csv", folds)
    csv.write_text(f"id,reason\n{out[0]},a\n ,b\n")
    with pytest.raises(ConfigError, match=r"curated/exclude.csv: empty id at line\(s\) 3"):
        excluded("curated/exclude.csv", folds)
    csv.write_text(f"id,reason\n{out[0]},a\n{out[0]},b\n")
    with pytest.raises(ConfigError, match=r"listed twice, at line 3"):
        excluded("curated/exclude.csv", folds)
    with pytest.raises(ConfigError, match=r"data.exclude.*missing.csv.*not found"):
        excluded("curated/missing.csv", folds)
    with pytest.raises(ConfigError, match=r"data.exclude is a list of image ids or the path of a CSV"):
        validate(ExperimentConfig, {"name": "x", "data": {"exclude": out[0]}}, "x.yaml")


# -- scoring ---------------------------------------------------------------------------------------------
def test_oof_scores_differ_exactly_by_the_excluded_images(member, tiny_project, capsys):
    comp, adapter, folds = member
    out = pick(folds)
    set_exclude(tiny_project, "m1", out)
    clean = oofscore.run("m1", **QUIET)
    every = oofscore.run("m1", options=oofscore.OofOptions(include_excluded=True), **QUIET)
    t_clean, t_all = clean["table"], every["table"]
    assert len(t_all) == 12 and len(t_clean) == 10 and set(t_all["id"]) - set(t_clean["id"]) == set(out)
    assert t_all.set_index("id")["excluded"].to_dict() == {i: i in out for i in t_all["id"]}
    same = t_all[~t_all["excluded"]].drop(columns="excluded").reset_index(drop=True)
    pd.testing.assert_frame_equal(same, t_clean.drop(columns="excluded").reset_index(drop=True))
    # Known answer: each mean is the direct Dice over its own images, and the excluded ones make the gap.
    view = store.open_experiment("m1", folds, comp.classes, comp.task)
    rows = {i: r for r, i in enumerate(view.ids)}
    want_all = direct_dice(view, adapter, range(12))
    want_clean = direct_dice(view, adapter, [rows[i] for i in view.ids if i not in out])
    assert every["mean"] == pytest.approx(want_all.mean(), abs=1e-9)
    assert clean["mean"] == pytest.approx(want_clean.mean(), abs=1e-9)
    assert clean["mean"] != pytest.approx(every["mean"], abs=1e-6)
    assert clean["excluded"] == {"count": 2, "sha256": ids_hash(out), "scored": False}
    # The OOF of the excluded images is still in the store: including them needed no prediction.
    assert every["produced"] == [] and out[0] in tiles.open_store(paths.oof_dir("m1", 0)).ids
    assert main(["oof", "m1"]) == 0
    text = capsys.readouterr().out
    assert f"OOF Dice {want_clean.mean():.4f} over 10 images" in text and "2 image(s)" in text
    assert main(["oof", "m1", "--include-excluded"]) == 0
    assert f"OOF Dice {want_all.mean():.4f} over 12 images" in capsys.readouterr().out


def _swap_two(tiny_project, folds):
    """Member m2: the truth itself, except two images with two classes' predictions swapped (one
    thumb/index, one middle/ring), i.e. confident disagreements: label suspects."""
    def exact(truth, rng):
        return np.where(truth > 0, 240, 10).astype(np.uint8)
    write_member(tiny_project, "m2", exact)
    victims = [folds.loc[folds["fold"] == 1, "id"].iloc[0], folds.loc[folds["fold"] == 2, "id"].iloc[1]]
    for v, pair in zip(victims, ([0, 1], [2, 3])):
        k = int(folds.set_index("id").loc[v, "fold"])
        d = paths.oof_dir("m2", k)
        st = tiles.open_store(d)
        probs = [st.image(r) for r in range(len(st))]
        r = st.ids.index(v)
        order = list(range(len(probs[r])))
        order[pair[0]], order[pair[1]] = pair[1], pair[0]
        probs[r] = probs[r][order]
        w = tiles.StoreWriter(d, st.ids, st.meta["classes"], {i: p.shape[1:] for i, p in zip(st.ids, probs)},
                              {k2: v2 for k2, v2 in st.meta.items() if k2 not in ("classes", "original_sizes")})
        for row, p in enumerate(probs):
            w.add(row, p)
        w.close()
    return victims


def test_write_exclude_lists_the_suspects_in_rank_order(tiny_project, capsys):
    comp, adapter, folds = fold_project(tiny_project)
    victims = _swap_two(tiny_project, folds)
    (tiny_project / "curated").mkdir()
    assert main(["oof", "m2", "--suspects", "--top", "4", "--write-exclude", "curated/x.csv"]) == 0
    sus = pd.read_csv(tiny_project / "runs/m2/suspects/suspects.csv", keep_default_na=False)
    ranked = list(dict.fromkeys(sus["id"]))
    assert set(ranked) == set(victims) and len(sus) == 4
    written = pd.read_csv(tiny_project / "curated/x.csv", keep_default_na=False)
    assert list(written.columns) == ["id", "reason"] and written["id"].tolist() == ranked
    first = sus.iloc[0]
    assert written["reason"].iloc[0].startswith(
        f"suspect rank 1: class {first['class']} dice {first['dice']:.2f} vs fold mean ")
    for image, reason in zip(written["id"], written["reason"]):  # every suspect row of the image, by rank
        ranks = [k + 1 for k, i in enumerate(sus["id"]) if i == image]
        assert [int(x.split(":")[0]) for x in reason.split("suspect rank ")[1:]] == ranks
        assert "matches the truth of" in reason
    assert "wrote curated/x.csv: 2 image(s)" in capsys.readouterr().out
    # A reviewed list is never overwritten by accident.
    before = (tiny_project / "curated/x.csv").read_bytes()
    assert main(["oof", "m2", "--write-exclude", "curated/x.csv"]) == 2
    assert "exists" in capsys.readouterr().err and (tiny_project / "curated/x.csv").read_bytes() == before
    assert main(["oof", "m2", "--write-exclude", "curated/x.csv", "--top", "1", "--force"]) == 0
    assert pd.read_csv(tiny_project / "curated/x.csv")["id"].tolist() == ranked[:1]
    # Pointed at by data.exclude, the list takes them out of the score and the suspects.
    set_exclude(tiny_project, "m2", "curated/x.csv")
    r = oofscore.run("m2", options=oofscore.OofOptions(suspects=True), **QUIET)
    assert ranked[0] not in set(r["table"]["id"]) and ranked[0] not in set(r["suspects"]["id"])
    assert set(r["suspects"]["id"]) == {ranked[1]}


# -- training --------------------------------------------------------------------------------------------
def test_training_never_sees_excluded_images_and_records_them(member, tiny_project, monkeypatch):
    from competition.train import loop
    comp, adapter, folds = member
    folds_before = paths.folds_file(comp.name).read_bytes()
    out = [folds.loc[folds["fold"] == 0, "id"].iloc[1], folds.loc[folds["fold"] == 1, "id"].iloc[0]]
    (tiny_project / "configs/experiments/t.yaml").write_text(yaml.safe_dump({
        "competition": "tiny-hands", "model": {"arch": "Unet", "encoder": "tu-test_resnet"},
        "data": {"input_size": 32, "batch_size": 4, "workers": 0, "exclude": out},
        "train": {"epochs": 1, "progress": False}, "oof": {"tta": []}, "tracking": {"wandb": False}}))
    seen = []

    class Spy(loop.SegDataset):
        def __init__(self, adapter, ids, *a, **k):
            super().__init__(adapter, ids, *a, **k)
            seen.append((self.mode, list(self.ids)))

        def __getitem__(self, i):
            assert self.ids[i] not in out, f"excluded image {self.ids[i]} reached a {self.mode} batch"
            return super().__getitem__(i)

    monkeypatch.setattr(loop, "SegDataset", Spy)
    from competition.config import load_experiment
    m = loop.fit(load_experiment("t"), 0, **QUIET)
    by_mode = dict(seen)
    fold0 = folds.loc[folds["fold"] == 0, "id"].tolist()
    assert by_mode["train"] == [i for i in folds["id"] if i not in fold0 and i != out[1]]
    assert by_mode["val"] == [i for i in fold0 if i != out[0]]
    assert paths.folds_file(comp.name).read_bytes() == folds_before  # the split never changes
    # Predicted into the OOF all the same; scored without it.
    run = tiny_project / "runs/t/fold0"
    oof = tiles.open_store(run / "oof")
    assert oof.ids == fold0
    keep = [r for r, i in enumerate(oof.ids) if i != out[0]]
    want = np.concatenate([dice_per_class(oof.image(r)[None] >= 128, adapter.load_mask(oof.ids[r])[None])
                           for r in keep])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["oof_dice"] == pytest.approx(want.mean(), abs=1e-9) == m["oof_dice"]
    assert metrics["n_val"] == 3 and metrics["n_train"] == 7
    assert metrics["excluded"] == {"count": 2, "sha256": ids_hash(out), "source": "data.exclude (list)",
                                   "in_fold": 1}
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["exclude"] == {"count": 2, "sha256": ids_hash(out), "source": "data.exclude (list)",
                                "ids": sorted(out)}


# -- ensemble, recipe, ledger ----------------------------------------------------------------------------
def test_recipe_and_ledger_carry_the_hash(member, tiny_project, capsys):
    comp, adapter, folds = member
    write_member(tiny_project, "m3", blurred, seed=2)
    out = pick(folds)
    (tiny_project / "exclude.csv").write_text("id,reason\n" + "".join(f"{i},artefact\n" for i in out))
    set_exclude(tiny_project, "m1", "exclude.csv")
    set_exclude(tiny_project, "m3", out[:1])  # the members' union is left out
    assert main(["ensemble", "--name", "cur", "m1", "m3", "--no-nested", "--no-postprocess", "--workers", "1",
                 "--truth-csv", "truth.csv"]) == 0
    text = capsys.readouterr().out
    rec = load_recipe("cur")
    assert rec.excluded.count == 2 and rec.excluded.sha256 == ids_hash(out) and not rec.excluded.scored
    assert rec.scores["images"] == 10 and "members exclude different images" in text
    truth = pd.read_csv(tiny_project / "truth.csv", keep_default_na=False)
    assert truth[comp.submission.id_column].nunique() == 10  # the truth of the images chosen on
    assert f"2 data.exclude image(s) (sha256 {ids_hash(out)})" in (tiny_project / "ensembles/cur.md").read_text()
    assert main(["ensemble", "--name", "all", "m1", "m3", "--no-nested", "--no-postprocess", "--workers", "1",
                 "--include-excluded"]) == 0
    everything = load_recipe("all")
    assert everything.scores["images"] == 12 and everything.excluded.scored
    # The ledger row says which images the recipe's CV left out; a ledger from before the column reads.
    result = SimpleNamespace(path=tiny_project / "submissions/a.csv", images=4, seconds=1.0)
    row = ledger.row_for(result, rec, "abc", comp.name)
    assert row["excluded"] == f"2 sha256:{ids_hash(out)}"
    old = {k: v for k, v in row.items() if k != "excluded"}
    (tiny_project / "submissions").mkdir()
    pd.DataFrame([old]).to_csv(tiny_project / "submissions/ledger.csv", index=False)
    assert ledger.read()["excluded"].tolist() == [""]
    ledger.append(row)
    assert ledger.read()["excluded"].tolist() == ["", f"2 sha256:{ids_hash(out)}"]
