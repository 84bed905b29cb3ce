"""Optimizers (any timm optimizer) and learning-rate schedules behind one small interface.

``build_optimizer(model, cfg)`` -> ``timm.optim.create_optimizer_v2`` (no weight decay on biases and
norm layers, timm's default). ``build_scheduler(optimizer, cfg, epochs, steps_per_epoch)`` -> a
``Scheduler`` the training loop drives the same way whatever the schedule:

    sched.step_batch()          after every optimizer step (cosine and onecycle move per step)
    sched.step_epoch(metric)    after each validation (plateau watches the metric, higher = better)
    sched.lr                    the current learning rate (first param group), for logging
    sched.state_dict() / sched.load_state_dict(d)   plain data, loads with torch.load(weights_only=True)

Schedules: ``cosine`` (timm CosineLRScheduler, per step: linear warmup from ``min_lr`` over
``warmup_epochs``, then cosine to ``min_lr`` at the last step), ``onecycle`` (torch OneCycleLR: peak =
the optimizer's lr, warmup share = warmup_epochs / epochs or torch's 0.3, ending at ``min_lr``; the
optimizer's momentum is left as configured), ``plateau`` (torch ReduceLROnPlateau, mode max), ``none``.
"""
from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import CosineLRScheduler

from competition.config import ConfigError, OptimizerConfig, SchedulerConfig

__all__ = ["build_optimizer", "build_scheduler", "Scheduler", "SCHEDULERS"]

SCHEDULERS = ("none", "cosine", "onecycle", "plateau")


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    name = cfg.name.lower()
    valid = list_optimizers()
    if name.removeprefix("lookahead_") not in valid:
        raise ConfigError(f"optimizer.name: unknown optimizer {cfg.name!r}; valid (timm): {', '.join(valid)} "
                          f"(any of them may be prefixed with 'lookahead_')")
    try:
        return create_optimizer_v2(model, opt=name, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                   momentum=cfg.momentum, **cfg.kwargs)
    except TypeError as e:
        raise ConfigError(f"optimizer.kwargs for {name}: {e}") from None


class Scheduler:
    """The uniform interface over the schedules (see the module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer, name: str, impl, total_steps: int):
        self.optimizer, self.name, self.impl, self.total_steps = optimizer, name, impl, total_steps
        self.steps = 0
        self.epochs = 0

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def hold(self, lr: float) -> None:
        """From now on a constant learning rate (stochastic weight averaging's phase)."""
        self.held = lr
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def step_batch(self) -> None:
        self.steps += 1
        if getattr(self, "held", None) is not None:
            return
        if self.name == "cosine":
            self.impl.step_update(num_updates=self.steps)
        elif self.name == "onecycle" and self.steps < self.total_steps:
            # OneCycleLR raises past its last step; a final partial step just keeps the last lr.
            self.impl.step()

    def step_epoch(self, metric: float | None = None) -> None:
        self.epochs += 1
        if self.name == "plateau" and getattr(self, "held", None) is None:
            if metric is None:
                raise ValueError("the plateau scheduler needs the validation metric: step_epoch(metric)")
            self.impl.step(metric)

    def state_dict(self) -> dict:
        return {"name": self.name, "steps": self.steps, "epochs": self.epochs, "total_steps": self.total_steps,
                "impl": self.impl.state_dict() if self.impl is not None else None}

    def load_state_dict(self, state: dict, recompute: bool = False) -> None:
        """Restore the schedule; ``recompute``: keep this (longer) schedule and restore only the
        position in it, as when a finished run is extended to more epochs."""
        if state.get("name") != self.name:
            raise ValueError(f"scheduler state is for {state.get('name')!r}, this run uses {self.name!r}")
        self.steps, self.epochs = int(state["steps"]), int(state["epochs"])
        if self.impl is not None and not (recompute and self.name in ("cosine", "onecycle")):
            self.impl.load_state_dict(state["impl"])
        if self.name == "cosine":
            self.impl.step_update(num_updates=self.steps)  # the lr for where we resume
        elif self.name == "onecycle" and recompute and 0 < self.steps < self.total_steps:
            self.impl.last_epoch = self.steps - 1
            self.impl.step()


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, epochs: int,
                    steps_per_epoch: int) -> Scheduler:
    name = cfg.name.lower()
    if name not in SCHEDULERS:
        raise ConfigError(f"scheduler.name: unknown scheduler {cfg.name!r}; valid: {', '.join(SCHEDULERS)}")
    if epochs < 1 or steps_per_epoch < 1:
        raise ValueError(f"build_scheduler needs epochs >= 1 and steps_per_epoch >= 1, got {epochs}, {steps_per_epoch}")
    total = epochs * steps_per_epoch
    warmup = cfg.warmup_epochs * steps_per_epoch
    if cfg.warmup_epochs and name in ("plateau", "none"):
        raise ConfigError(f"scheduler.warmup_epochs applies to cosine and onecycle, not {name}; set it to 0")
    if cfg.warmup_epochs >= epochs and name in ("cosine", "onecycle"):
        raise ConfigError(f"scheduler.warmup_epochs ({cfg.warmup_epochs}) must be less than train.epochs ({epochs})")
    peak = optimizer.param_groups[0]["lr"]
    impl = None
    if name == "cosine":
        # warmup_prefix: the cosine part then spans exactly the steps after warmup.
        impl = CosineLRScheduler(optimizer, t_initial=total - warmup, lr_min=cfg.min_lr, warmup_t=warmup,
                                 warmup_lr_init=min(cfg.min_lr, peak), warmup_prefix=True, t_in_epochs=False)
    elif name == "onecycle":
        start = peak / 25.0  # torch's default div_factor
        impl = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total,
            pct_start=warmup / total if warmup else 0.3, cycle_momentum=False,
            final_div_factor=max(start / cfg.min_lr, 1.0) if cfg.min_lr > 0 else 1e4)
    elif name == "plateau":
        impl = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.factor,
                                                          patience=cfg.patience, min_lr=cfg.min_lr)
    return Scheduler(optimizer, name, impl, total)
