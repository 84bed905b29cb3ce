"""What an experiment costs on this machine: seconds per training image and per validation image,
measured on a few real batches through the training code (the loader with its augmentations, the
engine's forward, loss, backward and optimizer step; the validation forward), after a warm-up batch;
and what every epoch pays besides: the wait for each loader's first batch (its workers start anew
each epoch, and nothing overlaps that batch) and the write of ``last.pt``.

``competition init --budget`` plans from these figures; nothing is written.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from torch.utils.data import Subset

from competition import checkpoint as ckpt
from competition.config import CompetitionConfig, ExperimentConfig
from competition.data.dataset import SegDataset
from competition.models import build_model
from competition.train import distributed as dd
from competition.train.engine import build_engine, seed_everything
from competition.train.loop import make_loader, training_loader


@dataclass(frozen=True)
class Costs:
    train_s_per_image: float  # loading + augmenting + forward + loss + backward + optimizer step
    val_s_per_image: float  # loading + forward + scoring
    batch_size: int
    device: str
    epoch_overhead_s: float = 0.0  # per epoch: both loaders' first batch, and writing last.pt


def costs(exp: ExperimentConfig, comp: CompetitionConfig, adapter, ids: list[str], batches: int = 2) -> Costs:
    """Time ``batches`` training batches and as many validation batches of ``exp`` on ``ids``, each after
    one warm-up batch (the first pays for lazy initialisation, which a whole run pays once)."""
    d = dd.Dist()
    device = dd.device_for(d)
    seed_everything(exp.train.seed, exp.train.deterministic)
    model = build_model(exp.model, comp.out_channels, comp.in_channels, input_size=exp.data.input_hw)
    engine = build_engine(exp, comp, model, device, d, batches + 1)  # class weights do not change the cost
    n = (batches + 1) * exp.data.batch_size
    ids = (ids * (n // max(1, len(ids)) + 1))[:n]  # a small dataset: the same images again
    train_ds, sampler, loader = training_loader(exp, comp, adapter, ids, d, 0)
    sampler.set_epoch(1)
    train_ds.set_epoch(1)
    t = time.perf_counter()
    it = iter(loader)
    first = next(it)
    overhead = time.perf_counter() - t if exp.data.workers else 0.0  # without workers: in train_s already
    engine.train_epoch([first], 1)  # warm-up
    t = time.perf_counter()
    timed = list(islice(it, batches))
    engine.train_epoch(timed, 1)
    train_s = (time.perf_counter() - t) / (len(timed) * exp.data.batch_size)  # whole batches: n is a multiple
    del it
    val_ds = SegDataset(adapter, ids, exp, comp.task, "val")
    val_loader = make_loader(Subset(val_ds, range(exp.data.batch_size)), exp)
    t = time.perf_counter()
    next(iter(val_loader))
    overhead += time.perf_counter() - t if exp.data.workers else 0.0
    engine.validate(val_loader, exp.data.batch_size)  # warm-up
    val_loader = make_loader(Subset(val_ds, range(exp.data.batch_size, n)), exp)
    t = time.perf_counter()
    engine.validate(val_loader, n - exp.data.batch_size)
    val_s = (time.perf_counter() - t) / (n - exp.data.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        ckpt.save(engine.full_state({}, {}), Path(tmp) / "probe.pt")  # as big as every epoch's last.pt
        overhead += time.perf_counter() - t
    return Costs(train_s, val_s, exp.data.batch_size, str(device), overhead)
