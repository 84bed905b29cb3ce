"""`competition tune`: search-space validation, value mapping, a real study end to end (resume, more
trials, the tuned config, the report), pruning, two worker processes on one study, a killed study."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from competition.config import ConfigError, load_experiment, load_search, to_plain

TINY_EXP = {"competition": "tiny-hands",
            "model": {"arch": "Unet", "encoder": "tu-test_resnet", "decoder_channels": [16, 16, 8, 8, 8]},
            "loss": {"terms": [{"name": "bce"}, {"name": "dice"}]},
            "optimizer": {"name": "adamw", "lr": 0.003},
            "scheduler": {"name": "cosine", "warmup_epochs": 0},
            "augment": {"train": [{"name": "Affine", "p": 0.5, "rotate": [-10, 10]}]},
            "data": {"input_size": 32, "batch_size": 4, "workers": 0},
            "train": {"epochs": 7, "progress": False, "seed": 0}}

TINY_SPACE = {"trials": 2,
              "budget": {"epochs": 2, "folds": [0]},
              "sampler": {"seed": 0, "startup_trials": 2},
              "pruner": {"name": "median", "startup_trials": 1, "warmup_epochs": 0},
              "fixed": {"tracking.wandb": False},
              "params": {"optimizer.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
                         "optimizer.name": {"type": "categorical", "choices": ["adamw", "sgd"]},
                         "loss.terms.1.weight": {"type": "float", "low": 0.5, "high": 1.5},
                         "augment.train.0.rotate": {"type": "float", "low": 0, "high": 20, "symmetric": True}}}


def write(project: Path, kind: str, name: str, data: dict) -> None:
    (project / "configs" / kind).mkdir(parents=True, exist_ok=True)
    (project / "configs" / kind / f"{name}.yaml").write_text(yaml.safe_dump(data))


@pytest.fixture
def tune_project(tiny_project):
    import torch

    from competition.cli import main
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds contention on a shared 2-core box
    assert main(["folds", "--comp", "tiny-hands"]) == 0
    write(tiny_project, "experiments", "tiny", TINY_EXP)
    write(tiny_project, "search", "tiny", TINY_SPACE)
    yield tiny_project
    torch.set_num_threads(threads)


def load(project: Path, name: str = "tiny-tiny") -> optuna.Study:
    url = f"sqlite:///{project / 'runs/studies' / f'{name}.db'}"
    return optuna.load_study(study_name=name, storage=url)


# -- the search space ------------------------------------------------------------------------------
@pytest.mark.parametrize("param, message", [
    ({"optimizer.lr": {"type": "float", "low": 0.1, "high": 0.01}}, "params.optimizer.lr"),
    ({"optimizer.lr": {"type": "float", "low": 0, "high": 0.1, "log": True}}, "`log: true` needs `low` > 0"),
    ({"model.arch": {"type": "categorical"}}, "needs a non-empty `choices`"),
    ({"data.input_size": {"type": "int", "low": 32.5, "high": 64}}, "whole `low`/`high`"),
])
def test_bad_search_space_names_the_key(project, param, message):
    write(project, "search", "bad", {**TINY_SPACE, "params": param})
    with pytest.raises(ConfigError, match="bad.yaml") as e:
        load_search("bad")
    assert message in str(e.value)


@pytest.mark.parametrize("param, message", [
    ({"optimizer.lrr": {"type": "float", "low": 0.001, "high": 0.01}}, "optimizer.lrr: unknown key"),
    ({"loss.terms.5.weight": {"type": "float", "low": 0.5, "high": 1}}, "'loss.terms' is a list of 2 item(s)"),
    ({"data.input_size": {"type": "categorical", "choices": [64, 8]}}, "data.input_size"),
    ({"optimizer.lr.x": {"type": "float", "low": 0.5, "high": 1}}, "'optimizer.lr' is a value"),
])
def test_search_keys_are_checked_against_the_experiment_before_training(tune_project, param, message):
    from competition.tune.study import prepare
    write(tune_project, "search", "bad", {**TINY_SPACE, "params": param})
    with pytest.raises(ConfigError) as e:
        prepare("tiny", "bad")
    assert message in str(e.value)
    assert not (tune_project / "runs/studies/tiny-bad.db").exists()  # nothing created for a bad space


def test_sampled_values_become_config_values(project):
    from competition.config import SearchParam
    from competition.tune import space as sp
    write(project, "experiments", "tiny", TINY_EXP)
    params = {"loss.terms": SearchParam(type="categorical", choices={
                  "bce_dice": [{"name": "bce"}, {"name": "dice"}], "focal": [{"name": "focal"}]}),
              "augment.train.0.rotate": SearchParam(type="float", low=0, high=30, symmetric=True),
              "data.input_size": SearchParam(type="int", low=32, high=64, step=16)}
    trial = optuna.trial.FixedTrial({"loss.terms": "focal", "augment.train.0.rotate": 12.5, "data.input_size": 48})
    values = sp.suggest(trial, params)
    assert values == {"loss.terms": [{"name": "focal"}], "augment.train.0.rotate": [-12.5, 12.5],
                      "data.input_size": 48}
    exp = sp.build(to_plain(load_experiment("tiny")), values, "test")
    assert [t.name for t in exp.loss.terms] == ["focal"] and exp.data.input_size == 48
    assert exp.augment.train[0].model_dump()["rotate"] == [-12.5, 12.5]
    assert exp.optimizer.lr == 0.003  # untouched keys keep the base experiment's values


def test_pruner_choice_and_hyperband_resource(project):
    from competition.tune.study import make_pruner
    write(project, "search", "hb", {**TINY_SPACE, "budget": {"epochs": 4, "folds": [0, 1]},
                                    "pruner": {"name": "hyperband", "min_resource": 2}})
    hb = make_pruner(load_search("hb"), n_folds=2)
    assert isinstance(hb, optuna.pruners.HyperbandPruner) and hb._max_resource == 8  # steps = epochs x folds
    write(project, "search", "none", {**TINY_SPACE, "pruner": {"name": "none"}})
    assert isinstance(make_pruner(load_search("none"), 1), optuna.pruners.NopPruner)


# -- studies ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_study_runs_resumes_grows_and_writes_a_tuned_config(tune_project, capsys):
    from competition.cli import main
    assert main(["tune", "--exp", "tiny", "--space", "tiny"]) == 0  # trials: 2 from the space
    study = load(tune_project)
    assert [t.number for t in study.trials] == [0, 1]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    best = study.best_trial
    # Each trial trained for the budget in its own run folder; checkpoints of finished trials are tidied.
    run = tune_project / f"runs/tiny-tiny-t{best.number}/fold0"
    assert (run / "metrics.json").is_file() and (run / "best.pt").is_file() and not (run / "last.pt").exists()
    assert len((run / "history.csv").read_text().strip().splitlines()) == 1 + 2
    assert (yaml.safe_load((run / "config.yaml").read_text())["experiment"]["optimizer"]["lr"]
            == best.params["optimizer.lr"])

    # The tuned config: the base experiment with the best values, the base's epochs, ready to train.
    tuned = load_experiment("tiny-tuned")
    assert tuned.name == "tiny-tuned" and tuned.train.epochs == 7
    assert tuned.optimizer.lr == pytest.approx(best.params["optimizer.lr"])
    assert tuned.optimizer.name == best.params["optimizer.name"]
    assert tuned.loss.terms[1].weight == pytest.approx(best.params["loss.terms.1.weight"])
    r = best.params["augment.train.0.rotate"]
    assert tuned.augment.train[0].model_dump()["rotate"] == pytest.approx([-r, r])
    assert tuned.tracking.wandb is True  # `fixed` values (tracking.wandb: false) are tuning-only
    text = (tune_project / "configs/experiments/tiny-tuned.yaml").read_text()
    assert text.startswith("# Written by `competition tune`") and "extends: tiny" in text

    # The same command again resumes the same study: nothing left to run.
    capsys.readouterr()
    assert main(["tune", "--exp", "tiny", "--space", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "2 finished trial(s) of 2; running 0 more" in out and "nothing to run" in out
    assert len(load(tune_project).trials) == 2
    # A larger target continues the search, numbering on.
    assert main(["tune", "--exp", "tiny", "--space", "tiny", "--trials", "3"]) == 0
    study = load(tune_project)
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert study.trials[2].params != study.trials[0].params  # a resumed sampler does not replay draws

    # --report: the trials table, and files for people.
    capsys.readouterr()
    assert main(["tune", "--exp", "tiny", "--space", "tiny", "--report"]) == 0
    out = capsys.readouterr().out
    assert "trial" in out and "state" in out and "optimizer.lr" in out and "best: trial" in out
    assert "importances" in out
    studies = tune_project / "runs/studies/tiny-tiny"
    assert (studies / "trials.csv").is_file()
    assert (studies / "history.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tune_project / "wandb").exists()  # tracking.wandb: false in `fixed` means no W&B at all


def test_changed_search_space_refuses_to_reuse_the_study(tune_project):
    from competition.tune.study import Options, prepare
    prepare("tiny", "tiny")
    prepare("tiny", "tiny", Options(trials=5))  # `trials` is not part of a study's identity
    write(tune_project, "search", "tiny", {**TINY_SPACE, "budget": {"epochs": 3, "folds": [0]}})
    with pytest.raises(ConfigError, match="different space_hash"):
        prepare("tiny", "tiny")
    prepare("tiny", "tiny", Options(study="tiny-v2"))  # a new study name is fine


def test_set_overrides_reach_every_trial_and_the_tuned_config(tune_project, capsys):
    from competition.cli import main
    args = ["tune", "--exp", "tiny", "--space", "tiny", "--trials", "1", "--study", "withset"]
    assert main(args + ["--set", "data.batch_size=2", "--set", "train.seed=3"]) == 0
    study = load(tune_project, "withset")
    run = tune_project / f"runs/withset-t{study.trials[0].number}/fold0/config.yaml"
    trained = yaml.safe_load(run.read_text())["experiment"]
    assert trained["data"]["batch_size"] == 2 and trained["train"]["seed"] == 3
    tuned = load_experiment("tiny-tuned")
    assert tuned.data.batch_size == 2 and tuned.train.seed == 3
    capsys.readouterr()
    # other overrides would make the study's trials incomparable; an unknown key lists the valid ones
    assert main(args + ["--set", "data.batch_size=4"]) == 2
    assert "different overrides" in capsys.readouterr().err
    assert main(["tune", "--exp", "tiny", "--space", "tiny", "--set", "train.epoch=3"]) == 2
    assert "train.epoch: unknown key; valid keys here:" in capsys.readouterr().err


def test_report_without_a_study_is_a_clear_error(tune_project, capsys):
    from competition.cli import main
    assert main(["tune", "--exp", "tiny", "--space", "tiny", "--report"]) == 2
    assert "no study 'tiny-tiny'" in capsys.readouterr().err
    assert not (tune_project / "runs/studies/tiny-tiny.db").exists()


def test_pruned_trial_stops_its_training_and_keeps_no_checkpoints(tune_project):
    from wandb_offline import read_offline_run

    from competition.tune.objective import Objective
    from competition.tune.study import Job
    write(tune_project, "search", "tiny", {**TINY_SPACE, "budget": {"epochs": 3, "folds": [0]},
                                           "fixed": {"tracking.wandb": True}})
    job = Job(exp="tiny", space="tiny", study="s", storage="", trials=1, folds=(0,))
    # A threshold no Dice reaches: pruned after the first epoch, deterministically.
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=1.1))
    study.optimize(Objective(job, load_search("tiny")), n_trials=1)
    t = study.trials[0]
    assert t.state == TrialState.PRUNED and list(t.intermediate_values) == [1]
    assert t.user_attrs["stopped"] == "pruned at fold 0, epoch 1"
    run = tune_project / "runs/s-t0/fold0"
    assert len((run / "history.csv").read_text().strip().splitlines()) == 2  # header + epoch 1 only
    assert not (run / "last.pt").exists() and not (run / "best.pt").exists() and not (run / "metrics.json").exists()
    # Its W&B run is grouped by study and says why it stopped.
    run_dir = next((tune_project / "wandb").glob("offline-run-*"))
    deadline = time.time() + 60  # W&B's service writes the file behind the run
    while not (wb := read_offline_run(run_dir))["finished"] and time.time() < deadline:
        time.sleep(0.1)
    assert wb["run"]["group"] == "s" and wb["run"]["name"] == "s-t0-fold0" and wb["run"]["job_type"] == "tune"
    assert wb["summary"]["stopped_by"] == "TrialPruned" and len(wb["history"]) == 1


@pytest.mark.slow
def test_two_worker_processes_share_one_study(tune_project, capfd):
    from competition.cli import main
    write(tune_project, "search", "tiny", {**TINY_SPACE, "budget": {"epochs": 1, "folds": [0]}})
    # Two spawned worker processes train the trials; this process only prepares and reports.
    assert main(["tune", "--exp", "tiny", "--space", "tiny", "--trials", "4", "--workers", "2"]) == 0
    out = capfd.readouterr().out
    study = load(tune_project)
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]  # no number twice, none lost
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    assert "running 4 more on 2 worker processes" in out
    assert out.count(" w1] params:") == 2 and out.count("] params:") == 4  # two trials each
    assert (tune_project / "configs/experiments/tiny-tuned.yaml").is_file()


@pytest.mark.slow
def test_killed_study_resumes_to_its_target(tune_project, capsys):
    from competition.cli import main
    # No pruning and 6 epochs: the second trial is surely still training when it is killed.
    write(tune_project, "search", "tiny", {**TINY_SPACE, "trials": 3, "budget": {"epochs": 6, "folds": [0]},
                                           "pruner": {"name": "none"}})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "competition", "tune", "--exp", "tiny", "--space", "tiny"],
                            cwd=tune_project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = tune_project / "runs/tiny-tiny-t1/fold0/history.csv"
    deadline = time.time() + 300
    while time.time() < deadline and not second.is_file():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert second.is_file(), "the study must be killed during its second trial"
    assert main(["tune", "--exp", "tiny", "--space", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "1 finished trial(s) of 3; running 2 more" in out, out[:300]
    study = load(tune_project)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 3
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    # The killed trial is the only unfinished one (running until its heartbeat goes stale, then failed).
    assert [t.number for t in study.trials if t not in finished] == [1]
