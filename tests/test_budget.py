"""`competition init --budget`: the plan from measured costs (known answers with fixed costs), and
init writing it on a real folder."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
import yaml

from competition.cli import main
from competition.config import ConfigError
from competition.init import budget
from competition.train.measure import Costs
from tests.test_init import make_cells


@pytest.mark.parametrize("text, seconds", [("30m", 1800), ("4h", 14400), ("1h30m", 5400), ("90s", 90),
                                           ("1.5h", 5400), ("2d", 172800)])
def test_budgets_parse(text, seconds):
    assert budget.parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["30", "ten minutes", "", "30s"])
def test_bad_budgets_are_refused_naming_the_flag(text):
    with pytest.raises(ConfigError, match="--budget"):
        budget.parse_budget(text)


def test_candidate_sizes_keep_the_aspect_ratio_and_stop_at_the_image():
    assert budget.sizes(256, 256) == [128, 192, 256]
    assert budget.sizes(768, 1024) == [[96, 128], [128, 192], [192, 256], [288, 384], [384, 512], [576, 768],
                                       [768, 1024]]


class FakeAdapter:
    def __init__(self, n=100, size=(512, 512)):
        self.ids, self.size = [f"i{k}" for k in range(n)], size

    def image_size(self, _):
        return self.size


def fake_costs(per_pixel_s):
    """Costs growing with the pixel count, as a real network's do."""
    def measure(exp, comp, adapter, size):
        h, w = (size, size) if isinstance(size, int) else size
        return Costs(per_pixel_s * h * w, per_pixel_s * h * w / 3, 8, "cpu")
    return measure


STARTER = {"data": {"input_size": 256, "batch_size": 8}, "train": {"epochs": 25}}


def planned(budget_s: float, said: list | None = None, gpus: int = 1) -> budget.Plan:
    """The plan for the starter on 100 images in 5 folds, with the costs the test put in place."""
    comp = type("C", (), {"folds": 5})()
    return budget.plan(STARTER, comp, FakeAdapter(), budget_s, gpus=gpus,
                       log=said.append if said is not None else lambda *_: None)


def test_the_plan_is_the_largest_size_affording_min_epochs(monkeypatch):
    monkeypatch.setattr(budget, "measure", fake_costs(1e-6))
    p = planned(3600.0)
    # 80 training + 20 validation images, 720 s a fold. At 384²: an epoch 80 x 0.147 + 20 x 0.049 = 12.8 s,
    # the OOF and start-up 20 x 0.049 x 3 + 12 = 14.9 s: 55 epochs. At 512²: 22.7 s and 27.7 s: 30 epochs.
    c = p.candidate
    assert c.n_train == 80 and c.n_val == 20 and c.folds == 5
    assert [s for s, _, _ in p.tried] == [128, 192, 256, 384, 512]
    assert [e for _, _, e in p.tried][3:] == [55, 30]
    assert c.input_size == 384 and p.epochs == 55
    assert c.total_s(p.epochs) <= 3600 < c.total_s(p.epochs + 1)
    two = planned(3600.0, gpus=2)
    assert two.candidate.input_size == 512 and two.epochs == 62  # twice the throughput buys the next size


def test_a_tight_budget_trades_folds_before_input_size(monkeypatch):
    monkeypatch.setattr(budget, "measure", fake_costs(1e-5))
    said = []
    p = planned(900.0, said)
    # 128²: 0.164 s a training image, 0.055 s a validation image. 5 folds (80 + 20 images): 180 s a fold,
    # 15.2 s of it fixed (OOF, start-up), an epoch 14.2 s: 11 epochs. 4 folds (75 + 25): 225 s, 16.1 s,
    # 13.7 s: 15. 3 folds (66 + 34): 300 s, 17.6 s, 12.7 s: 22. Still short of 40: 96² (0.092 s) with 3
    # folds, an epoch 7.1 s: 39; 64² (0.041 s): 3.2 s an epoch and 13.4 s fixed: 90.
    assert [(s, k) for s, k, _ in p.tried] == [(128, 5), (128, 4), (128, 3), (96, 3), (64, 3)]
    assert [e for _, _, e in p.tried] == [11, 15, 22, 39, 90]
    assert p.candidate.input_size == 64 and p.candidate.folds == 3 and p.epochs == 90
    assert p.candidate.n_train == 66 and p.candidate.n_val == 34
    assert p.total_s() <= 900 < p.candidate.total_s(91)
    assert not any("WARNING" in s for s in said)
    enough = planned(1900.0)
    assert enough.candidate.input_size == 128 and enough.candidate.folds == 3 and enough.epochs >= 40


def test_a_budget_too_small_warns_and_plans_the_cheapest(monkeypatch):
    monkeypatch.setattr(budget, "measure", fake_costs(1e-5))
    said = []
    p = planned(120.0, said)
    assert p.candidate.input_size == 64 and p.candidate.folds == 3 and p.epochs == 8
    assert any("WARNING" in s and "affords only 8 epochs of 3 folds at input 64" in s and "plan on at least" in s
               for s in said)
    assert 'the budget is short of 40 epochs' in p.note() and 'expect "still improving"' in p.note()


def test_a_size_that_runs_out_of_memory_ends_the_search(monkeypatch):
    cheap = fake_costs(1e-7)

    def measure(exp, comp, adapter, size):
        if max(size if isinstance(size, list) else [size]) >= 384:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return cheap(exp, comp, adapter, size)

    monkeypatch.setattr(budget, "measure", measure)
    said = []
    p = planned(3600.0, said)
    assert p.candidate.input_size == 256 and p.epochs == budget.MAX_EPOCHS
    assert any("input 384 at batch 8 does not fit" in s for s in said)


def test_the_epoch_overhead_is_paid_every_epoch():
    c = budget.Candidate(128, Costs(0.1, 0.05, 8, "cpu", epoch_overhead_s=2.0), 5, 80, 20)
    assert c.epoch_s() == pytest.approx(80 * 0.1 + 20 * 0.05 + 2.0)
    assert c.total_s(10) == pytest.approx(5 * (10 * 11.0 + 20 * 0.05 * 3 + budget.FOLD_OVERHEAD_S))
    three = c.with_folds(3)
    assert (three.folds, three.n_train, three.n_val) == (3, 66, 34) and three.costs is c.costs


@pytest.fixture
def proj(tmp_path, monkeypatch, one_thread):
    (tmp_path / "configs/competitions").mkdir(parents=True)
    (tmp_path / "configs/experiments").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_init_writes_the_plan_and_its_measured_cost(proj, capsys):
    make_cells(proj / "data/cells")
    assert main(["init", "data/cells", "--budget", "10m"]) == 0
    out = capsys.readouterr().out
    text = (proj / "configs/experiments/cells-baseline.yaml").read_text()
    exp = yaml.safe_load(text)
    print(text)
    text = " ".join(line.strip().lstrip("#").strip() for line in text.splitlines())  # comments are wrapped
    assert "plan: measured on this machine" in out and "planned for a budget of 10 min 00 s" in out
    assert "Plan: measured on this machine" in text and "planned for --budget 10 min 00 s" in text
    assert 1 <= exp["train"]["epochs"] <= budget.MAX_EPOCHS
    assert main(["init", "data/cells", "--force"]) == 0  # without a budget: the quick default, timed
    out = capsys.readouterr().out
    exp = yaml.safe_load((proj / "configs/experiments/cells-baseline.yaml").read_text())
    assert exp["train"]["epochs"] == 25 and "plan: measured on this machine" in out
    assert main(["init", "data/cells", "--force", "--budget", "soon"]) == 2
    assert "--budget 'soon'" in capsys.readouterr().err


def test_init_writes_fewer_folds_when_the_budget_needs_them(proj, monkeypatch, capsys):
    make_cells(proj / "data/cells")
    assert main(["init", "data/cells"]) == 0
    folds = yaml.safe_load((proj / "configs/competitions/cells.yaml").read_text())["folds"]
    assert folds > 3  # else there is nothing to trade
    monkeypatch.setattr(budget, "measure", fake_costs(2e-5))  # 0.33 s a training image at 128²
    assert main(["init", "data/cells", "--force", "--budget", "2m"]) == 0
    capsys.readouterr()
    text = (proj / "configs/competitions/cells.yaml").read_text()
    assert yaml.safe_load(text)["folds"] == 3
    assert f"planned for --budget: {folds} folds did not afford 40 epochs at input 64" in " ".join(
        line.strip().lstrip("#").strip() for line in text.splitlines())
    exp = yaml.safe_load((proj / "configs/experiments/cells-baseline.yaml").read_text())
    assert exp["data"]["input_size"] == 64 and exp["train"]["epochs"] >= 1  # the images' own size: none smaller
    assert main(["folds", "--comp", "cells"]) == 0  # the planned config is one `make folds` accepts
    assert len(set(pd.read_csv(proj / "folds/cells.csv")["fold"])) == 3
