"""Optimizers by timm name and the uniform scheduler interface the training loop drives."""
import io

import pytest
import torch

from competition.config import ConfigError, OptimizerConfig, SchedulerConfig
from competition.optim import build_optimizer, build_scheduler


def tiny_model():
    torch.manual_seed(0)  # no conv bias before the norm: every parameter then gets a gradient
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))


def train_step(model, opt):
    opt.zero_grad()
    model(torch.randn(2, 1, 8, 8)).square().mean().backward()
    opt.step()


@pytest.mark.parametrize("name", ["sgd", "sgdp", "adam", "adamw", "adamp", "radam", "lamb", "lion"])
def test_each_optimizer_builds_and_steps(name):
    model = tiny_model()
    opt = build_optimizer(model, OptimizerConfig(name=name, lr=0.01, weight_decay=0.01))
    before = [p.detach().clone() for p in model.parameters()]
    train_step(model, opt)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    # timm's default: no weight decay on biases and norm layers.
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.01]


def test_optimizer_kwargs_pass_through_and_errors():
    opt = build_optimizer(tiny_model(), OptimizerConfig(name="adamw", kwargs={"betas": [0.8, 0.9]}))
    assert tuple(opt.param_groups[0]["betas"]) == (0.8, 0.9)
    with pytest.raises(ConfigError, match=r"unknown optimizer 'adamx'; valid \(timm\): .*adamw.*lion.*sgd"):
        build_optimizer(tiny_model(), OptimizerConfig(name="adamx"))
    with pytest.raises(ConfigError, match=r"optimizer.kwargs for adamw"):
        build_optimizer(tiny_model(), OptimizerConfig(name="adamw", kwargs={"betass": [0.8, 0.9]}))


def run(name, epochs=4, steps=5, metric=lambda e: 0.5, **cfg):
    model = tiny_model()
    opt = build_optimizer(model, OptimizerConfig(name="sgd", lr=0.1))
    sched = build_scheduler(opt, SchedulerConfig(name=name, **cfg), epochs, steps)
    lrs = []
    for e in range(epochs):
        for _ in range(steps):
            lrs.append(sched.lr)  # the lr this step trains with
            opt.step()
            sched.step_batch()
        sched.step_epoch(metric(e))
    return lrs, sched, opt


def test_cosine_warmup_rises_then_falls_to_min_lr():
    lrs, sched, _ = run("cosine", warmup_epochs=1, min_lr=1e-4)
    assert lrs[0] == pytest.approx(1e-4)
    assert all(a < b for a, b in zip(lrs[:5], lrs[1:6]))  # linear warmup over the first epoch
    assert max(lrs) == pytest.approx(0.1) and lrs.index(max(lrs)) == 5
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))  # then cosine decay
    assert sched.lr == pytest.approx(1e-4)  # after the last step


def test_cosine_without_warmup_starts_at_lr():
    lrs, _, _ = run("cosine", min_lr=0.0)
    assert lrs[0] == pytest.approx(0.1) and lrs[-1] < 0.002


def test_onecycle_rises_then_falls_and_survives_extra_steps():
    lrs, sched, _ = run("onecycle", warmup_epochs=1, min_lr=1e-5)
    peak = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(0.1) and 3 <= peak <= 6
    assert lrs[0] < 0.01 and lrs[-1] < 0.001
    sched.step_batch()  # one step more than planned must not raise


def test_plateau_reduces_lr_when_the_metric_stalls():
    lrs, sched, _ = run("plateau", patience=1, factor=0.5, metric=lambda e: [0.1, 0.2, 0.2, 0.2][e])
    assert lrs[:15] == [pytest.approx(0.1)] * 15  # improving, then one bad epoch within patience
    assert sched.lr == pytest.approx(0.05)
    lrs, _, _ = run("plateau", patience=1, metric=lambda e: 0.1 * e)  # always improving
    assert lrs == [pytest.approx(0.1)] * len(lrs)


def test_none_keeps_lr():
    lrs, _, _ = run("none")
    assert lrs == [pytest.approx(0.1)] * len(lrs)


@pytest.mark.parametrize("name", ["cosine", "onecycle", "plateau", "none"])
def test_scheduler_state_round_trips_through_a_weights_only_checkpoint(name):
    cfg = SchedulerConfig(name=name, warmup_epochs=1 if name in ("cosine", "onecycle") else 0, patience=0)
    model = tiny_model()
    opt = build_optimizer(model, OptimizerConfig(name="adamw", lr=0.1))
    sched = build_scheduler(opt, cfg, 4, 5)
    for _ in range(7):
        opt.step()
        sched.step_batch()
    sched.step_epoch(0.3)
    buf = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    model2 = tiny_model()
    opt2 = build_optimizer(model2, OptimizerConfig(name="adamw", lr=0.1))
    sched2 = build_scheduler(opt2, cfg, 4, 5)
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    assert sched2.lr == pytest.approx(sched.lr)
    for s, o in ((sched, opt), (sched2, opt2)):
        for _ in range(6):
            o.step()
            s.step_batch()
        s.step_epoch(0.2)
    assert sched2.lr == pytest.approx(sched.lr) and sched2.steps == sched.steps == 13


def test_scheduler_config_errors():
    opt = build_optimizer(tiny_model(), OptimizerConfig())
    with pytest.raises(ConfigError, match="warmup_epochs applies to cosine and onecycle, not plateau"):
        build_scheduler(opt, SchedulerConfig(name="plateau", warmup_epochs=1), 4, 5)
    with pytest.raises(ConfigError, match=r"warmup_epochs \(4\) must be less than train.epochs \(4\)"):
        build_scheduler(opt, SchedulerConfig(name="cosine", warmup_epochs=4), 4, 5)
    sched = build_scheduler(opt, SchedulerConfig(name="plateau"), 4, 5)
    with pytest.raises(ValueError, match="scheduler state is for 'cosine'"):
        sched.load_state_dict({"name": "cosine", "steps": 0, "epochs": 0, "impl": None})
