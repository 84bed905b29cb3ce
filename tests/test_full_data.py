"""``--fold all-data`` (nnU-Net's ``fold all``) on the tiny synthetic competition: every training image,
no validation and no OOF, the epoch count from the CV folds' best epochs, resumable like a fold; and a
recipe whose member submits with its full-data model while its weight stays chosen on the folds' OOF
(recipe, report, ledger, bundle). Tiny models at 32 px, one or two epochs."""
from __future__ import annotations

import functools
import json
import shutil

import pandas as pd
import pytest
import torch
import yaml
from pydantic import ValidationError
from test_ensemble_util import fold_project, good, write_member
from test_init_from import TINY as INIT_TINY
from test_init_from import write_exp as init_write_exp

from competition import paths
from competition.config import ConfigError, RecipeCheckpoint, RecipeMember, load_experiment, load_recipe
from competition.io import file_hash

TINY = {**INIT_TINY, "train": {**INIT_TINY["train"], "epochs": 5}}
write_exp = functools.partial(init_write_exp, base=TINY)

pytestmark = pytest.mark.usefixtures("one_thread")


def fold_metrics(name: str, best: dict[int, int]) -> None:
    """The CV folds' metrics.json as training writes them (only best_epoch matters here)."""
    for k, e in best.items():
        rp = paths.run(name, k)
        rp.root.mkdir(parents=True, exist_ok=True)
        rp.metrics.write_text(json.dumps({"experiment": name, "fold": k, "best_epoch": e, "val_dice": 0.5}))


class Stop(Exception):
    pass


def test_epoch_rule(tiny_project):
    from competition.train.alldata import plan_epochs
    write_exp(tiny_project, "e", train={"epochs": 7})
    exp = load_experiment("e")
    p = plan_epochs(exp, [0, 1, 2])
    assert (p.epochs, p.from_folds) == (7, {}) and p.line == "all-data: 7 epochs = train.epochs (no CV fold of e " \
                                                            "has a metrics.json yet)"
    fold_metrics("e", {0: 1, 2: 2})  # mean 1.5 rounds half up
    p = plan_epochs(exp, [0, 1, 2])
    assert p.epochs == 2 and p.from_folds == {"0": 1, "2": 2}
    assert p.line == "all-data: 2 epochs = mean best epoch of folds 0, 2 (1, 2); fold(s) 1 not finished"
    fold_metrics("e", {0: 12, 1: 15, 2: 14, 3: 16, 4: 13})
    assert plan_epochs(exp, [0, 1, 2, 3, 4]).line == "all-data: 14 epochs = mean best epoch of folds 0-4 " \
                                                     "(12, 15, 14, 16, 13)"


def test_all_data_trains_on_every_image_without_oof_and_resumes(tiny_project):
    from competition.cli import main
    from competition.train.loop import fit
    _, _, folds = fold_project(tiny_project)
    write_exp(tiny_project, "full")
    write_exp(tiny_project, "ref")
    for name in ("full", "ref"):
        fold_metrics(name, {0: 1, 1: 2, 2: 2})  # -> 2 epochs, not train.epochs (5)
    assert main(["train", "--exp", "full", "--fold", "all-data", "--check"]) == 0
    logs = []

    def stop_after_one(epoch, val_dice):
        assert val_dice is None  # no validation
        raise Stop  # an interrupted run: last.pt of epoch 1 is on disk
    with pytest.raises(Stop):
        fit(load_experiment("full"), paths.ALL_DATA, log=logs.append, on_epoch=stop_after_one)
    assert "all-data: 2 epochs = mean best epoch of folds 0-2 (1, 2, 2)" in logs
    m = fit(load_experiment("full"), paths.ALL_DATA, log=logs.append)
    assert any(line.startswith("resuming full fold all-data from") for line in logs)
    run = tiny_project / "runs/full/all-data"
    hist = pd.read_csv(run / "history.csv")
    assert hist["epoch"].tolist() == [1, 2] and (hist["train_images"] == len(folds)).all()  # every image
    assert "val_dice" not in hist.columns
    assert m["n_train"] == len(folds) == 12 and m["n_val"] == 0 and m["epochs"] == 2 and m["epochs_run"] == 2
    assert m["epochs_from_folds"] == {"0": 1, "1": 2, "2": 2} and m["best_is"] == "final epoch"
    assert json.loads((run / "metrics.json").read_text())["epochs_rule"] == "mean best epoch of folds 0-2 (1, 2, 2)"
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == [
        "best.pt", "config.yaml", "history.csv", "last.pt", "metrics.json"]  # no OOF
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["fold"] == "all-data" and cfg["all_data"]["epochs"] == 2 and cfg["experiment"]["train"]["epochs"] == 2
    best, last = (torch.load(run / f, weights_only=True) for f in ("best.pt", "last.pt"))
    for k, v in last["model"].items():  # best.pt is the final weights
        torch.testing.assert_close(best["model"][k], v, rtol=0, atol=0)
    assert paths.RunPaths.of(run) == paths.all_data_run("full")
    assert paths.trained_folds("full") == {}  # the CV folds' listing never includes it
    # Resumed = uninterrupted (deterministic CPU settings).
    fit(load_experiment("ref"), paths.ALL_DATA, log=lambda *_: None)
    ref = pd.read_csv(tiny_project / "runs/ref/all-data/history.csv")
    pd.testing.assert_series_equal(hist["train_loss"], ref["train_loss"], rtol=1e-4)


def test_what_all_data_cannot_do_is_refused(tiny_project, capsys):
    from competition.cli import main
    fold_project(tiny_project)
    write_exp(tiny_project, "plateau", scheduler={"name": "plateau", "warmup_epochs": 0})
    assert main(["train", "--exp", "plateau", "--fold", "all-data", "--check"]) == 2
    assert "scheduler.name: plateau steps on the validation score" in capsys.readouterr().err
    write_exp(tiny_project, "topk", train={"average_top_k": 2})
    assert main(["train", "--exp", "topk", "--fold", "all-data"]) == 2
    assert "train.average_top_k picks epochs by their validation score" in capsys.readouterr().err
    assert main(["train", "--exp", "topk", "--fold", "everything"]) == 2
    assert "--fold expects a fold number, 'all' (every CV fold) or 'all-data'" in capsys.readouterr().err
    assert not (tiny_project / "runs/topk").exists()


def test_recipe_member_validation():
    ck = [RecipeCheckpoint(path=f"runs/e/fold{k}/best.pt", sha256="0" * 16) for k in range(3)]
    one = [RecipeCheckpoint(path="runs/e/all-data/best.pt", sha256="1" * 16)]
    assert RecipeMember(experiment="e", folds=[0, 1, 2], checkpoints=one, weights=[1.0], full_data=True)
    with pytest.raises(ValidationError, match="full_data: true takes one checkpoint"):
        RecipeMember(experiment="e", folds=[0, 1, 2], checkpoints=ck, weights=[1.0], full_data=True)
    with pytest.raises(ValidationError, match="expected one per fold"):
        RecipeMember(experiment="e", folds=[0, 1, 2], checkpoints=one, weights=[1.0])


def test_a_full_data_member_submits_and_says_so(tiny_project, tmp_path, capsys):
    """The member's OOF (constructed) chooses its weight and the thresholds; submit runs its all-data
    model only (its fold 'models' here are stand-ins that cannot even be loaded)."""
    from competition.cli import main
    from competition.ensemble import EnsembleOptions, run
    from competition.predict.bundle import make_bundle, run_bundle
    from competition.predict.options import Inference
    from competition.train.loop import fit
    fold_project(tiny_project)
    write_member(tiny_project, "good", good, seed=1)  # OOF + stand-in fold best.pt files
    # The real model the all-data run trains, started from a plain state dict (its lineage goes into the recipe).
    from competition.models import build_model
    write_exp(tiny_project, "good", model={"init_from": "pretrained/good.pt"})
    (tiny_project / "pretrained").mkdir()
    torch.save(build_model(load_experiment("good").model, 12, 1).state_dict(), tiny_project / "pretrained/good.pt")
    fold_metrics("good", {0: 1, 1: 1, 2: 1})
    with pytest.raises(ConfigError, match="--full-data: none of \\['good'\\] has a finished all-data run"):
        run("fd", ["good"], EnsembleOptions(full_data=True), log=lambda *_: None)
    fit(load_experiment("good"), paths.ALL_DATA, log=lambda *_: None)
    capsys.readouterr()
    assert main(["ensemble", "--name", "fd", "good", "--full-data", "--no-nested"]) == 0
    rec = load_recipe("fd")
    whole = "runs/good/all-data/best.pt"
    for m in rec.members:
        assert m.full_data and m.folds == [0, 1, 2]
        assert [c.model_dump() for c in m.checkpoints] == [{"path": whole, "sha256": file_hash(tiny_project / whole)}]
        assert {k: c.model_dump() for k, c in m.init_from.items()} == {
            "all-data": {"path": "pretrained/good.pt", "sha256": file_hash(tiny_project / "pretrained/good.pt")}}
    md = (tiny_project / "ensembles/fd.md").read_text()
    assert "## Full-data members" in md and "every CV score on this page is the fold models'" in md
    assert "[all-data model]" in md and "| good | all-data | `pretrained/good.pt` |" in md
    # --force: a one-epoch model at 32 px may well predict what the plausibility checks refuse.
    assert main(["submit", "--ensemble", "fd", "--force", "--no-progress"]) == 0
    ledger = pd.read_csv(tiny_project / "submissions/ledger.csv", dtype=str, keep_default_na=False)
    row = ledger.iloc[-1]
    assert row["members"].startswith("good(all-data; OOF f0,1,2)x")
    csv = tiny_project / row["file"]
    assert csv.is_file()
    # The bundle carries the full-data model, and gives the same CSV.
    out = make_bundle("fd", tmp_path / "bundle", log=lambda *_: None)
    bundled = load_recipe(out / "recipe.yaml")
    assert [c.path for m in bundled.members for c in m.checkpoints][0] == "checkpoints/good-all-data.pt"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["good-all-data.pt"]
    shutil.rmtree(tiny_project / "runs/good/all-data")  # the bundle needs nothing of the project's runs
    r = run_bundle(out, str(tiny_project / "data/tiny-hands"), tmp_path / "bundle.csv",
                   Inference(progress=False, force=True))
    assert (tmp_path / "bundle.csv").read_bytes() == csv.read_bytes() and r.rows > 0
