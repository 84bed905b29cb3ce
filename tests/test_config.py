import pytest
import yaml

from competition.config import ConfigError, load_competition, load_experiment


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))


def test_builtin_default_competition_and_experiment_validate():
    comp = load_competition("synthetic-hands")
    assert comp.task == "multilabel" and comp.num_classes == len(comp.classes) >= 8
    exp = load_experiment("baseline")
    assert exp.competition == "synthetic-hands" and exp.model.encoder_weights is None


def test_unknown_key_names_the_key_and_lists_valid_ones(project):
    p = project / "configs/competitions/bad.yaml"
    data = yaml.safe_load((project / "configs/competitions/tiny-hands.yaml").read_text())
    data["submission"]["pixel_ordr"] = "row-major"
    write(p, data)
    with pytest.raises(ConfigError) as e:
        load_competition("bad")
    msg = str(e.value)
    assert "bad.yaml" in msg and "submission.pixel_ordr" in msg and "pixel_order" in msg


def test_bad_literal_names_allowed_values(project):
    data = yaml.safe_load((project / "configs/competitions/tiny-hands.yaml").read_text())
    data["task"] = "binary"
    write(project / "configs/competitions/bad.yaml", data)
    with pytest.raises(ConfigError, match=r"task: .*'multilabel'.*'multiclass'.*'binary'"):
        load_competition("bad")


def test_unknown_competition_lists_known(project):
    with pytest.raises(ConfigError, match="known: .*tiny-hands"):
        load_competition("nope")


def test_experiment_typo_and_extends(project):
    write(project / "configs/experiments/a.yaml",
          {"competition": "tiny-hands", "optimizer": {"name": "sgd", "lr": 0.1}, "train": {"epochs": 3}})
    write(project / "configs/experiments/b.yaml", {"extends": "a", "optimizer": {"lr": 0.01}})
    b = load_experiment("b")
    assert b.name == "b" and b.optimizer.name == "sgd" and b.optimizer.lr == 0.01 and b.train.epochs == 3
    write(project / "configs/experiments/c.yaml", {"extends": "a", "trian": {"epochs": 1}})
    with pytest.raises(ConfigError, match=r"trian: unknown key; valid keys here: .*train"):
        load_experiment("c")
    write(project / "configs/experiments/d.yaml", {"extends": "a", "model": {"encoder_wieghts": None}})
    with pytest.raises(ConfigError, match=r"model.encoder_wieghts: unknown key; valid keys here: .*encoder_weights"):
        load_experiment("d")


def test_extends_cycle_is_an_error(project):
    write(project / "configs/experiments/x.yaml", {"extends": "y"})
    write(project / "configs/experiments/y.yaml", {"extends": "x"})
    with pytest.raises(ConfigError, match="cycle"):
        load_experiment("x")


def test_overrides_are_validated(project):
    write(project / "configs/experiments/a.yaml", {"competition": "tiny-hands"})
    assert load_experiment("a", {"optimizer.lr": 0.5}).optimizer.lr == 0.5
    with pytest.raises(ConfigError, match="optimizer.lr"):
        load_experiment("a", {"optimizer.lr": -1})


def test_channels_follow_the_task_and_the_images():
    comp = load_competition("synthetic-hands")
    assert (comp.task, comp.num_classes, comp.out_channels) == ("multilabel", 12, 12)
    one_of = comp.model_copy(update={"task": "multiclass"})
    assert one_of.out_channels == 13  # the background is a channel when the classes exclude each other
    assert comp.in_channels == (1 if comp.image.channels == "grayscale" else 3)
    rgb = comp.model_copy(update={"image": comp.image.model_copy(update={"channels": "rgb"})})
    gray = comp.model_copy(update={"image": comp.image.model_copy(update={"channels": "grayscale"})})
    assert (rgb.in_channels, gray.in_channels) == (3, 1)
