"""`--set` overrides, the one `extends:` merge rule, and extending a finished run."""
from __future__ import annotations

import pandas as pd
import pytest
import yaml
from test_train import write_exp

from competition.cli import main
from competition.config import ConfigError, load_experiment, merge, parse_overrides


def test_merge_rule_deep_with_name_reset():
    base = {"scheduler": {"name": "cosine", "warmup_epochs": 2, "min_lr": 0.0},
            "model": {"arch": "Unet", "kwargs": {"a": 1, "b": 2}}, "augment": {"train": [{"name": "Affine"}]}}
    child = {"scheduler": {"name": "onecycle"}, "model": {"kwargs": {"b": 3}}, "augment": {"train": []}}
    out = merge(base, child)
    assert out["scheduler"] == {"name": "onecycle"}  # the cosine keys do not leak into onecycle
    assert out["model"] == {"arch": "Unet", "kwargs": {"a": 1, "b": 3}}  # deep merge
    assert out["augment"]["train"] == []  # lists replace
    assert merge(base, {"scheduler": {"name": "cosine", "min_lr": 1e-6}})["scheduler"] == \
        {"name": "cosine", "warmup_epochs": 2, "min_lr": 1e-6}  # same name: merged


def test_extends_onecycle_child_trains_without_inherited_warmup(project):
    write_exp(project, "parent", scheduler={"name": "cosine", "warmup_epochs": 3}, train={"epochs": 2})
    (project / "configs/experiments/child.yaml").write_text(
        yaml.safe_dump({"extends": "parent", "scheduler": {"name": "plateau"}}))
    exp = load_experiment("child")
    assert exp.scheduler.name == "plateau" and exp.scheduler.warmup_epochs == 0


def test_set_overrides_are_validated_and_recorded(project):
    write_exp(project, "e")
    exp = load_experiment("e", parse_overrides(["train.epochs=3", "optimizer.lr=1.0e-3", "data.input_size=32"]))
    assert exp.train.epochs == 3 and exp.optimizer.lr == 1e-3 and exp.data.input_size == 32
    with pytest.raises(ConfigError, match="train.epochz"):
        load_experiment("e", parse_overrides(["train.epochz=3"]))
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        parse_overrides(["train.epochs"])
    assert load_experiment("e", parse_overrides(["scheduler.name=onecycle"])).scheduler.warmup_epochs == 0


@pytest.mark.slow
def test_set_on_train_and_extending_a_finished_run(tiny_project, capsys):
    assert main(["folds", "--comp", "tiny-hands"]) == 0
    write_exp(tiny_project, "ext", model={"arch": "Unet", "encoder": "tu-test_resnet"}, data={"input_size": 32},
              train={"epochs": 8}, tracking={"wandb": False})
    assert main(["train", "--exp", "ext", "--fold", "0", "--set", "train.epochs=2"]) == 0
    run = tiny_project / "runs/ext/fold0"
    assert yaml.safe_load((run / "config.yaml").read_text())["experiment"]["train"]["epochs"] == 2
    assert len(pd.read_csv(run / "history.csv")) == 2
    assert main(["train", "--exp", "ext", "--fold", "0", "--set", "train.bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["train", "--exp", "ext", "--fold", "0", "--set", "train.epochs=3"]) == 0  # extend 2 -> 3
    out = capsys.readouterr()
    assert "extending ext fold 0: train.epochs 2 -> 3" in out.out + out.err
    hist = pd.read_csv(run / "history.csv")
    assert list(hist["epoch"]) == [1, 2, 3]
    assert main(["train", "--exp", "ext", "--fold", "0", "--set", "train.epochs=3", "--set", "optimizer.lr=0.1"]) == 2
    assert "only raising train.epochs" in capsys.readouterr().err
