"""The convergence verdict: known curves."""
import math
import time

import pytest
import torch

from competition.config import load_experiment
from competition.convergence import judge, summarize
from competition.train.loop import fit


def rising(n, rate=0.1):
    return [0.9 * (1 - math.exp(-rate * e)) for e in range(1, n + 1)]


def test_an_under_trained_run_is_still_improving_and_says_how_to_extend_it():
    v = judge(rising(25), 25)  # the EM case: best epoch the last, curve still rising
    assert v.status == "still_improving" and v.best_epoch == 25 and v.suggest_epochs == 50
    assert v.message.startswith("still improving at epoch 25 of 25")
    assert "--set train.epochs=50" in v.message


def test_a_plateaued_run_has_converged_even_when_noise_puts_its_best_epoch_last():
    plateau = [min(0.9, 0.1 * e) for e in range(1, 31)]
    plateau[-1] += 0.001  # the best epoch is the last one, by noise
    v = judge(plateau, 30)
    assert v.status == "converged" and v.best_epoch == 30 and "added only" in v.message


def test_an_early_best_epoch_and_early_stopping_are_converged():
    curve = rising(20, rate=0.8)[:10] + [0.85] * 10
    assert judge(curve, 20).status == "converged"
    v = judge(rising(12, 0.8), 40, stopped_early=True)
    assert v.status == "stopped_early" and "stopped early at epoch 12 of 40" in v.message


def test_too_few_epochs_are_not_judged():
    assert judge([0.1, 0.2], 2).status == "too_short"
    short = judge([0.3, 0.5, 0.68, 0.66], 4)  # a dip at the last of 4 epochs is no plateau
    assert short.status == "too_short" and "4 epochs are too few" in short.message
    assert judge([0.1, 0.2, 0.3, 0.6], 4).status == "still_improving"  # rising at the end says so at any length
    assert judge([], 5).status == "too_short"


def test_summary_over_folds():
    vs = {0: judge(rising(25), 25), 1: judge([min(0.9, 0.1 * e) for e in range(1, 26)], 25)}
    line = summarize(vs)
    assert line.startswith("still improving: fold(s) 0 of 2") and "train.epochs=50" in line
    assert summarize({1: vs[1]}).startswith("converged")


# --------------------------------------------------------------------------------------------- #
# Real training: the verdict printed at the end of a fold, and --budget's clean stop
# --------------------------------------------------------------------------------------------- #
@pytest.fixture
def folded(tiny_project):
    from competition.cli import main
    assert main(["folds", "--comp", "tiny-hands"]) == 0
    return tiny_project


def test_an_under_trained_fold_says_still_improving_and_a_converged_one_does_not(folded):
    from tests.test_train import write_exp
    write_exp(folded, "short", train={"epochs": 5})  # Dice still climbing steeply after 5 epochs
    said = []
    m = fit(load_experiment("short"), fold=0, log=said.append)
    assert m["convergence"]["status"] == "still_improving", m["convergence"]
    assert any("still improving at epoch 5 of 5" in s and "--set train.epochs=10" in s for s in said)
    # No learning at all: early stopping ends it, and nothing says "still improving".
    write_exp(folded, "flat", optimizer={"lr": 1e-12}, train={"epochs": 8, "early_stopping": 2})
    said = []
    m = fit(load_experiment("flat"), fold=0, log=said.append)
    assert m["convergence"]["status"] in ("stopped_early", "converged") and m["epochs_run"] < 8
    assert not any("still improving" in s for s in said)
    assert any(f"fold 0: {m['convergence']['message']}" == s for s in said)


def test_a_budget_stops_between_epochs_and_the_run_continues_from_there(folded):
    from tests.test_train import write_exp
    write_exp(folded, "timed", train={"epochs": 4})
    said = []
    m = fit(load_experiment("timed"), fold=0, log=said.append, deadline=time.time() + 0.5)
    assert m["epochs_run"] == 1 and m["stopped_by_budget"] is True  # epoch 1 always runs; no room for 2
    assert any(s.startswith("budget: stopping after epoch 1 of 4") for s in said)
    last = torch.load(folded / "runs/timed/fold0/last.pt", weights_only=True)
    assert last["state"]["epoch"] == 1
    m = fit(load_experiment("timed"), fold=0, log=lambda *_: None)  # no budget: on to the end
    assert m["epochs_run"] == 4 and "stopped_by_budget" not in m
