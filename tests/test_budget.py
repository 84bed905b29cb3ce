"""`competition init --budget`: the plan from measured costs (known answers with fixed costs), and
init writing it on a real folder."""
from __future__ import annotations

import pytest
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


def test_the_plan_is_the_largest_size_affording_min_epochs(monkeypatch):
    comp = type("C", (), {"folds": 5})()
    monkeypatch.setattr(budget, "measure", fake_costs(1e-6))
    exp = {"data": {"input_size": 256}, "train": {"epochs": 25}}
    p = budget.plan(exp, comp, FakeAdapter(), 3600.0, log=lambda *_: None)
    # 80 training + 20 validation images, 720 s a fold. At 384²: an epoch 80 x 0.147 + 20 x 0.049 = 12.8 s,
    # the OOF and start-up 20 x 0.049 x 3 + 12 = 14.9 s: 55 epochs. At 512²: 22.7 s and 27.7 s: 30 epochs.
    c = p.candidate
    assert c.n_train == 80 and c.n_val == 20 and c.folds == 5
    assert [s for s, _ in p.tried] == [128, 192, 256, 384, 512]
    assert [e for _, e in p.tried][3:] == [55, 30]
    assert c.input_size == 384 and p.epochs == 55
    assert c.total_s(p.epochs) <= 3600 < c.total_s(p.epochs + 1)
    two = budget.plan(exp, comp, FakeAdapter(), 3600.0, gpus=2, log=lambda *_: None)
    assert two.candidate.input_size == 512 and two.epochs == 62  # twice the throughput buys the next size


def test_a_budget_too_small_warns_and_plans_the_smallest_size(monkeypatch):
    comp = type("C", (), {"folds": 5})()
    monkeypatch.setattr(budget, "measure", fake_costs(1e-5))
    said = []
    p = budget.plan({"data": {"input_size": 256}, "train": {"epochs": 25}}, comp, FakeAdapter(), 120.0,
                    log=said.append)
    assert p.candidate.input_size == 128 and p.epochs == 1
    assert any("WARNING" in s and "plan on at least" in s for s in said)


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
