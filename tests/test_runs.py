"""`competition runs`: the local table of finished runs (built from constructed run folders, no
training) and the per-class Dice PNG."""
import json

import pytest
import yaml

from competition import runs_table

EXP = {"name": "x", "competition": "c", "model": {"arch": "Unet", "encoder": "resnet18", "kwargs": {}},
       "optimizer": {"name": "adamw", "lr": 0.001}, "data": {"input_size": 64, "workers": 2},
       "train": {"epochs": 10, "progress": True}, "tracking": {"wandb": True, "group": None}}


def make_run(root, exp, fold, dice: dict, **changes):
    d = root / "runs" / exp / f"fold{fold}"
    d.mkdir(parents=True)
    cfg = json.loads(json.dumps(EXP))
    cfg["name"] = exp
    for key, value in changes.items():
        section, k = key.split("__")
        cfg[section][k] = value
    (d / "config.yaml").write_text(yaml.safe_dump({"experiment": cfg, "competition": {}, "fold": fold}))
    (d / "metrics.json").write_text(json.dumps({
        "experiment": exp, "fold": fold, "best_epoch": 7, "epochs_run": 10, "train_seconds": 12.5 + fold,
        "val_dice": sum(dice.values()) / len(dice), "val_dice_per_class": dice}))


@pytest.fixture
def runs(project):
    make_run(project, "base", 0, {"a": 0.9, "b": 0.5, "c": 0.7, "d": 0.8})
    make_run(project, "base", 1, {"a": 0.8, "b": 0.4, "c": 0.6, "d": 0.9})
    # Differs in lr and encoder, and in keys that do not change what is learned (workers, progress, W&B).
    make_run(project, "fast", 0, {"a": 0.95, "b": 0.9, "c": 0.2, "d": 0.93}, optimizer__lr=0.01,
             model__encoder="tu-resnet10t", data__workers=0, train__progress=False, tracking__group="study")
    (project / "runs/unfinished/fold0").mkdir(parents=True)  # training: no metrics.json yet
    (project / "runs/unfinished/fold0/config.yaml").write_text(yaml.safe_dump({"experiment": EXP}))
    (project / "runs/studies").mkdir()
    (project / "runs/studies/s.db").write_bytes(b"")  # tuning storage lives beside the runs
    return project


def test_table_shows_differing_params_best_dice_and_worst_classes(runs):
    df, per_class = runs_table.collect()
    t = runs_table.table(df)
    assert list(t.columns) == ["experiment", "fold", "model.encoder", "optimizer.lr",
                               "val_dice", "worst_classes", "epochs", "converged", "train_s"]
    assert t[["experiment", "fold"]].values.tolist() == [["fast", 0], ["base", 0], ["base", 1]]  # best first
    assert t["val_dice"].tolist() == pytest.approx([0.745, 0.725, 0.675])
    assert t.loc[0, "worst_classes"] == "c 0.20, b 0.90, d 0.93"
    assert t.loc[2, "epochs"] == "7/10" and t.loc[2, "train_s"] == 13.5
    assert t.loc[1, "optimizer.lr"] == 0.001 and t.loc[0, "model.encoder"] == "tu-resnet10t"
    assert set(per_class) == {"base/fold0", "base/fold1", "fast/fold0"}
    asc = runs_table.table(df, sort="train_s", ascending=True)
    assert asc["train_s"].tolist() == [12.5, 12.5, 13.5]
    with pytest.raises(ValueError, match="--sort 'nope': not a column; choose from experiment, fold"):
        runs_table.table(df, sort="nope")


def test_the_table_says_which_runs_were_still_improving(runs):
    import math
    rising = [0.9 * (1 - math.exp(-0.1 * e)) for e in range(1, 11)]
    (runs / "runs/base/fold0/history.csv").write_text(
        "epoch,val_dice\n" + "".join(f"{e},{v}\n" for e, v in enumerate(rising, 1)))
    (runs / "runs/base/fold1/history.csv").write_text(  # flat after epoch 3
        "epoch,val_dice\n" + "".join(f"{e},{min(0.7, 0.3 * e)}\n" for e in range(1, 11)))
    t = runs_table.table(runs_table.collect()[0])
    got = dict(zip(zip(t["experiment"], t["fold"]), t["converged"]))
    assert got == {("base", 0): "NO", ("base", 1): "yes", ("fast", 0): "-"}  # fast: no history.csv


def test_flatten_nests_keys_and_keeps_lists_whole():
    flat = runs_table.flatten({"a": {"b": 1, "c": {}}, "x": None, "r": [-12.3456789, 12.3456789],
                               "loss": {"terms": [{"name": "bce"}, {"name": "dice", "weight": 0.5, "kwargs": {}}]}})
    assert flat == {"a.b": 1, "x": None, "r": "[-12.35,12.35]", "loss.terms.n": 2, "loss.terms.0.name": "bce",
                    "loss.terms.1.name": "dice", "loss.terms.1.weight": 0.5}


def test_cli_prints_filters_and_plots(runs, capsys):
    from competition.cli import main
    assert main(["runs", "--plot", "out/dice.png"]) == 0
    out = capsys.readouterr().out
    assert "optimizer.lr" in out and "worst_classes" in out and "wrote out/dice.png" in out
    assert "data.workers" not in out and "unfinished" not in out and "studies" not in out
    png = (runs / "out/dice.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert main(["runs", "--exp", "ba*"]) == 0
    out = capsys.readouterr().out
    assert "base" in out and "fast" not in out
    assert "optimizer.lr" not in out  # among base's folds nothing differs


def test_default_plot_path_and_empty_project(project, capsys):
    from competition.cli import main
    assert main(["runs", "--plot"]) == 0
    assert "no finished runs under runs/" in capsys.readouterr().out
    make_run(project, "only", 0, {"a": 0.5})
    assert main(["runs", "--plot"]) == 0
    assert (project / "runs/per_class_dice.png").is_file()


def test_corrupt_metrics_is_a_clear_error(runs, capsys):
    from competition.cli import main
    (runs / "runs/base/fold1/metrics.json").write_text("{not json")
    assert main(["runs"]) == 2
    err = capsys.readouterr().err
    assert "runs/base/fold1/metrics.json: unreadable metrics file" in err and "Traceback" not in err
