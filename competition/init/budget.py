"""``competition init DATA --budget 30m [--gpus N]``: the starter experiment planned to a time budget.

A Kaggle team plans from the clock ("this must finish overnight"), nnU-Net from the dataset; this
does the first from measurements of the second kind. Each candidate input size (the long side at
128, 192, 256, 384, 512, … px, up to the images' own size) is measured on this machine through the
training code (:func:`competition.train.measure.costs`: seconds per training and per validation
image, after a warm-up batch), and the whole cross-validation is costed as

    folds x (epochs x (n_train x train_s + n_val x val_s + epoch_overhead) + OOF + FOLD_OVERHEAD_S)

where the OOF (written at the end of each fold) costs ``n_val x val_s x OOF_FORWARDS`` and the
epoch's overhead (loaders' first batches, ``last.pt``) is measured too. The plan is the largest
input size that still affords :data:`MIN_EPOCHS` epochs in the budget, with as many epochs as the
budget then allows (at most :data:`MAX_EPOCHS`). A budget too tight for that at 128 px trades folds
first (down to :data:`MIN_FOLDS`), then input size (96, 64 px), and warns when even that does not
reach :data:`MIN_EPOCHS`. Without ``--budget`` the quick default is kept and its expected time is
measured the same way. A size that runs out of device memory ends the search.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from competition.config import CompetitionConfig, ConfigError, ExperimentConfig, size_hw, validate
from competition.durations import duration, parse_budget  # noqa: F401 (parse_budget: init's flag)
from competition.init.decide import input_size_at
from competition.train.measure import Costs, costs

MIN_EPOCHS = 40  # fewer and most runs stop while still improving (the EM starter at 25: every fold)
MAX_EPOCHS = 400  # more buys little for a starter; a larger input size is the better use of the time
SIDES = (128, 192, 256, 384, 512, 768, 1024)  # candidate long sides, px
SMALL_SIDES = (96, 64)  # only when 128 px does not afford MIN_EPOCHS even with MIN_FOLDS folds
MIN_FOLDS = 3  # fewer leave too few folds for an OOF estimate worth choosing an ensemble on
FOLD_OVERHEAD_S = 12.0  # per fold: model and loader start, best.pt reload, metrics, W&B (offline)
OOF_FORWARDS = 3  # the plain OOF plus the hflip variant's two views, as training writes them


@dataclass(frozen=True)
class Candidate:
    input_size: int | list[int]
    costs: Costs
    folds: int
    n_train: int
    n_val: int
    gpus: int = 1

    def epoch_s(self) -> float:
        images = self.n_train * self.costs.train_s_per_image + self.n_val * self.costs.val_s_per_image
        return images / self.gpus + self.costs.epoch_overhead_s

    def with_folds(self, folds: int) -> Candidate:
        """The same measured costs with ``folds`` folds: more images train and validate per fold, fewer folds."""
        n = self.n_train + self.n_val
        n_val = math.ceil(n / folds)
        return Candidate(self.input_size, self.costs, folds, n - n_val, n_val, self.gpus)

    def fixed_s(self) -> float:
        """Per fold, whatever the epochs: the OOF and the start-up."""
        return self.n_val * self.costs.val_s_per_image * OOF_FORWARDS / self.gpus + FOLD_OVERHEAD_S

    def total_s(self, epochs: int) -> float:
        return self.folds * (epochs * self.epoch_s() + self.fixed_s())

    def affords(self, budget_s: float) -> int:
        return int((budget_s / self.folds - self.fixed_s()) // self.epoch_s())


def sizes(h: int, w: int) -> list[int | list[int]]:
    """The candidate input sizes for (h, w) images, smallest first: the aspect ratio kept, multiples of 32."""
    out = []
    for side in [s for s in SIDES if s < max(h, w)] + [max(h, w)]:
        size = input_size_at(h, w, side)
        if size not in out:
            out.append(size)
    return out[: next((i + 1 for i, s in enumerate(out) if max(size_hw(s)) >= SIDES[-1]), len(out))]


def measure(exp: dict, comp: CompetitionConfig, adapter, size) -> Costs:
    data = {**exp, "data": {**exp["data"], "input_size": size},
            "train": {**exp["train"], "progress": False}, "tracking": {"wandb": False}}
    cfg = validate(ExperimentConfig, {"name": "budget-probe", **data}, "the planned starter experiment")
    return costs(cfg, comp, adapter, list(adapter.ids))


@dataclass(frozen=True)
class Plan:
    candidate: Candidate
    epochs: int
    budget_s: float | None
    tried: list[tuple[int | list[int], int, int]]  # (input size, folds, epochs it affords)

    def total_s(self) -> float:
        return self.candidate.total_s(self.epochs)

    def note(self) -> str:
        c = self.candidate
        head = (f"measured on this machine ({c.costs.device}): {c.costs.train_s_per_image * 1000:.0f} ms per training "
                f"image, {c.costs.val_s_per_image * 1000:.0f} ms per validation image at input {c.input_size}, "
                f"batch {c.costs.batch_size}; {c.folds} folds x {self.epochs} epochs of {c.n_train} training + "
                f"{c.n_val} validation images{f' on {c.gpus} GPUs' if c.gpus > 1 else ''}: about "
                f"{duration(self.total_s())} for `make train-all`")
        if self.budget_s is None:
            return head
        short = (f"; the budget is short of {MIN_EPOCHS} epochs (about {duration(c.total_s(MIN_EPOCHS))}): expect "
                 f"\"still improving\"" if self.epochs < MIN_EPOCHS else "")
        return f"{head}, planned for a budget of {duration(self.budget_s)}{short}"


def plan(exp: dict, comp: CompetitionConfig, adapter, budget_s: float | None, gpus: int = 1, log=print) -> Plan:
    """The plan for starter experiment ``exp`` (a dict, as init writes it) on ``comp``'s data.

    With a budget, in order: the largest size from 128 px up affording :data:`MIN_EPOCHS` epochs of
    every fold; else 128 px with fewer folds (down to :data:`MIN_FOLDS`: 5 folds train each image 4
    times an epoch, 3 folds twice); else the largest of 96 and 64 px that affords them with those
    folds; else the cheapest of these with the epochs it affords, and a warning."""
    if gpus < 1:
        raise ConfigError(f"--gpus {gpus}: at least 1")
    n = len(adapter.ids)
    k = comp.folds

    def candidate(size, folds=k) -> Candidate | None:
        log(f"init: measuring training at input {size} ...")
        try:
            measured = measure(exp, comp, adapter, size)
        except torch.OutOfMemoryError:
            log(f"init: input {size} at batch {exp['data']['batch_size']} does not fit in this device's memory")
            return None
        n_val = math.ceil(n / k)
        return Candidate(size, measured, k, n - n_val, n_val, gpus).with_folds(folds)

    if budget_s is None:
        c = candidate(exp["data"]["input_size"])
        if c is None:
            raise ConfigError(f"data.input_size {exp['data']['input_size']} at batch {exp['data']['batch_size']} "
                              f"does not fit in this device's memory; plan with --budget")
        return Plan(c, int(exp["train"]["epochs"]), None, [])
    native = Counter(tuple(adapter.image_size(i)) for i in adapter.ids[:32]).most_common(1)[0][0]
    chosen, tried = None, []
    for size in sizes(*native):
        c = candidate(size)
        if c is None:
            break
        tried.append((size, c.folds, c.affords(budget_s)))
        if chosen is None or tried[-1][2] >= MIN_EPOCHS:
            chosen = c
        if tried[-1][2] < MIN_EPOCHS:
            break  # larger sizes only afford fewer epochs
    if chosen is None:
        raise ConfigError(f"input {sizes(*native)[0]} at batch {exp['data']['batch_size']} does not fit in this "
                          f"device's memory")
    if chosen.affords(budget_s) < MIN_EPOCHS:
        chosen = _cheaper(chosen, budget_s, tried, candidate)
    affords = chosen.affords(budget_s)
    epochs = max(1, min(MAX_EPOCHS, affords))
    if affords < MIN_EPOCHS:
        log(f"init: WARNING: a budget of {duration(budget_s)} affords only {max(0, affords)} epochs of "
            f"{chosen.folds} folds at input {chosen.input_size}; plan on at least "
            f"{duration(chosen.total_s(MIN_EPOCHS))} for {MIN_EPOCHS} epochs")
    return Plan(chosen, epochs, budget_s, tried)


def _cheaper(c: Candidate, budget_s: float, tried: list, candidate) -> Candidate:
    """Fewer folds at ``c``'s size, then smaller sizes at the fewest folds, as ``plan`` orders them."""
    for folds in range(c.folds - 1, min(c.folds, MIN_FOLDS) - 1, -1):
        c = c.with_folds(folds)
        tried.append((c.input_size, folds, c.affords(budget_s)))
        if tried[-1][2] >= MIN_EPOCHS:
            return c
    h, w = size_hw(c.input_size)
    for side in [x for x in SMALL_SIDES if x < max(h, w)]:
        small = candidate(input_size_at(h, w, side), c.folds)
        if small is None:
            continue
        tried.append((small.input_size, small.folds, small.affords(budget_s)))
        if small.affords(budget_s) > c.affords(budget_s):
            c = small
        if tried[-1][2] >= MIN_EPOCHS:
            break
    return c


def apply(exp: dict, why: dict, p: Plan) -> tuple[dict, dict]:
    """The starter experiment with the plan's input size and epochs, and the YAML comments saying why."""
    exp = {**exp, "data": {**exp["data"], "input_size": p.candidate.input_size},
           "train": {**exp["train"], "epochs": p.epochs}}
    why = dict(why)
    if p.budget_s is not None:
        tried = ", ".join(f"{s} x {k} folds: {e} epochs" for s, k, e in p.tried)
        why["data.input_size"] = (f"planned for --budget {duration(p.budget_s)}: the largest input size affording "
                                  f"{MIN_EPOCHS}+ epochs of every fold, else fewer folds, then smaller sizes "
                                  f"(measured here: {tried})")
        why["train.epochs"] = (f"planned: what the budget affords at this size (at most {MAX_EPOCHS}); "
                               f"{p.note()}")
    else:
        why["train.epochs"] = f"the quick default; {p.note()}"
    return exp, why
