"""`competition ensemble` end to end: the recipe it writes, its scores, refusals; one slow test that
trains two tiny experiments on every fold, as a new user would."""
import re
import shutil

import numpy as np
import pytest
import yaml
from test_ensemble_util import blurred, fold_project, good, noise, write_member

from competition import paths
from competition.cli import main
from competition.config import load_recipe
from competition.io import file_hash
from competition.store import tiles


@pytest.fixture
def members(tiny_project):
    fold_project(tiny_project)
    write_member(tiny_project, "good", good, seed=1)
    write_member(tiny_project, "soft", blurred, seed=2)
    write_member(tiny_project, "noise", noise, seed=3)
    return tiny_project


def test_recipe_weights_scores_and_hashes(members, capsys):
    assert main(["ensemble", "--name", "b1", "good", "soft", "noise"]) == 0
    out = capsys.readouterr().out
    rec = load_recipe("b1")
    s = rec.scores
    assert rec.competition == "tiny-hands" and rec.task == "multilabel" and len(rec.thresholds) == 12
    assert rec.folds_sha256 == file_hash(members / "folds/tiny-hands.csv")
    assert sum(m.weights[0] for m in rec.members) == pytest.approx(1.0)
    assert "noise" not in [m.experiment for m in rec.members] and s["dropped_members"] == ["noise"]
    for m in rec.members:
        assert m.folds == [0, 1, 2] and len(m.checkpoints) == 3
        for c in m.checkpoints:
            assert c.sha256 == file_hash(members / c.path)
    # Only plain OOF exists: every member is the plain variant, and submit applies exactly that.
    assert all(m.tta == ["identity"] and m.tta_scales == [1.0] for m in rec.members)
    assert "oof_size" not in rec.model_dump(exclude_none=True)  # one resolution: the original sizes
    # In-sample is at least the best single experiment (untuned and tuned), and the ensemble gains here.
    assert s["in_sample"] >= s["best_single"]["oof_at_threshold"]
    assert s["in_sample"] >= s["best_single"]["in_sample"] > 0
    assert s["gain_over_best_single"]["in_sample"] > 0.01
    assert 0 < s["nested"] <= 1 and set(map(str, s["nested_per_fold"])) == {"0", "1", "2"}
    assert s["chosen"] == "search" and "nested" in s["chosen_because"]
    assert "native-resolution CV" in out and f"{s['nested']:.4f}" in out and "gain over best single" in out
    for member in ("good", "soft", "noise"):  # one line per candidate variant, kept or not
        assert any(line.strip().startswith(f"variant {member} ") for line in out.splitlines())
    assert "not kept" in next(line for line in out.splitlines() if line.strip().startswith("variant noise "))
    md = (members / "ensembles/b1.md").read_text()
    assert "| class | threshold | post-processing |" in md and md.count("\n| ") >= 12 + 3
    # The recipe's thresholds are written as probabilities: level 128 is exactly 0.5.
    assert all(0 < t < 1 for t in rec.thresholds)


def test_per_class_optuna_without_nested(members, capsys):
    assert main(["ensemble", "--name", "b2", "good", "soft", "--per-class", "--method", "optuna", "--trials", "8",
                 "--no-postprocess", "--no-nested", "--force-blend"]) == 0
    rec = load_recipe("b2")
    w = np.array([m.weights for m in rec.members])
    assert w.shape == (2, 12)
    np.testing.assert_allclose(w.sum(0), 1.0)
    assert rec.postprocess == {} and rec.scores["nested"] is None
    assert rec.scores["chosen_because"] == "forced by --force-blend"


def test_incomplete_oof_is_refused(members, capsys):
    shutil.rmtree(paths.oof_dir("soft", 1))
    assert main(["ensemble", "--name", "b3", "good", "soft"]) == 2
    err = capsys.readouterr().err
    assert "'soft' has no OOF for fold(s) [1]" in err and "Traceback" not in err
    assert not (members / "ensembles/b3.yaml").exists()


def test_bad_names_and_options_are_clear_errors(members, capsys):
    assert main(["ensemble", "--name", "../x", "good"]) == 2
    assert "ensemble name" in capsys.readouterr().err
    assert main(["ensemble", "--name", "x", "good", "good"]) == 2
    assert "listed twice" in capsys.readouterr().err
    assert main(["oof", "good", "--tta", "identity", "rot90"]) == 2  # not in the competition's tta list
    err = capsys.readouterr().err
    assert "rot90" in err and "['identity', 'hflip']" in err and "Traceback" not in err


def test_multiclass_competition(project, tiny_data_cache, capsys):
    from conftest import tiny_competition
    (project / "configs/competitions/tiny-hands.yaml").write_text(
        yaml.safe_dump(tiny_competition(task="multiclass")))
    shutil.copytree(tiny_data_cache, project / "data/tiny-hands")
    fold_project(project)

    def onehot(truth, rng, soft=False):
        lab = (truth * np.arange(1, truth.shape[1] + 1)[None, :, None, None]).max(1)  # the last class wins
        p = np.stack([np.where(lab == k + 1, 200, 4) for k in range(truth.shape[1])], 1)
        if soft:
            p[:, :, :, :4] = 0  # blind on the left edge
        return p.astype(np.uint8)
    write_member(project, "a", onehot)
    write_member(project, "b", lambda t, r: onehot(t, r, soft=True))
    write_member(project, "n", lambda t, r: (r.random(t.shape) * 40).astype(np.uint8))
    assert main(["ensemble", "--name", "mc", "a", "b", "n"]) == 0
    rec = load_recipe("mc")
    assert rec.task == "multiclass" and rec.thresholds == [0.5] * 12
    assert rec.scores["in_sample"] >= rec.scores["best_single"]["oof_at_threshold"]
    assert "n" not in [m.experiment for m in rec.members]
    assert main(["ensemble", "--name", "mc2", "a", "b", "--per-class"]) == 2
    assert "per-class weights are for multilabel" in capsys.readouterr().err


@pytest.mark.slow
def test_two_trained_experiments_end_to_end(tiny_project, capsys):
    """Two tiny experiments x 3 folds x 2 epochs; one fold's OOF deleted and rebuilt by `competition oof`."""
    from test_train import write_exp
    comp, adapter, _ = fold_project(tiny_project)
    base = {"data": {"input_size": 32, "batch_size": 4, "workers": 0}, "train": {"epochs": 2},
            "tracking": {"wandb": False}}
    write_exp(tiny_project, "ea", model={"arch": "Unet", "encoder": "tu-test_resnet"}, **base)
    write_exp(tiny_project, "eb", model={"arch": "unet3plus", "encoder": "tu-test_resnet",
                                         "kwargs": {"cat_channels": 8}}, optimizer={"lr": 0.01}, **base)
    for e in ("ea", "eb"):
        assert main(["train", "--exp", e, "--fold", "all"]) == 0
    shutil.rmtree(paths.oof_dir("eb", 2))
    capsys.readouterr()
    assert main(["oof", "eb"]) == 0
    assert "eb fold 2: predicting its" in capsys.readouterr().out
    # Rebuilt in the tile format at each image's original size (64 px), not the model's 32 px output.
    rebuilt = tiles.open_store(paths.oof_dir("eb", 2))
    assert not (paths.oof_dir("eb", 2) / "probs.npy").exists() and len(rebuilt) > 0
    for r, i in enumerate(rebuilt.ids):
        assert rebuilt.image(r).shape == (len(comp.classes), *adapter.image_size(i))
    assert main(["ensemble", "--name", "e2e", "ea", "eb"]) == 0
    out = capsys.readouterr().out
    rec = load_recipe("e2e")
    s = rec.scores
    assert s["nested"] is not None and "native-resolution CV" in out
    # Training wrote the plain OOF and the competition's TTA variant: four candidate members.
    assert sorted(v["member"] for v in s["variants"]) == ["ea", "ea[identity+hflip]", "eb", "eb[identity+hflip]"]
    assert all(c.sha256 == file_hash(tiny_project / c.path) for m in rec.members for c in m.checkpoints)
    # Every candidate's weights are printed and kept, so the search's survive when another candidate wins.
    for p, label in (("search", "weighted ensemble"), ("equal", "equal weights")):
        w = s["candidates"][p]["weights"]
        assert w and abs(sum(w.values()) - 1) < 1e-4
        assert re.search(rf"^    {label} +" + ", ".join(rf"{re.escape(k)} {v:.3f}" for k, v in w.items()) + "$",
                         out, re.M)
    assert len(s["candidates"]["equal"]["weights"]) == 4 and len(s["candidates"]["single"]["weights"]) == 1
    # What `submit` judges a test prediction against: the share of training images holding each class.
    assert set(s["truth_share"]) == set(comp.classes) and all(0 <= v <= 1 for v in s["truth_share"].values())
