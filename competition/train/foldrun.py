"""One fold's training run as two objects: ``FoldRun``, everything the run built (handed whole to each
stage of ``loop.py``), and ``FoldState``, where training stands (what ``last.pt`` resumes from)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch.utils.data import DataLoader, Dataset

from competition import paths, tracking
from competition.config import CompetitionConfig, ExperimentConfig
from competition.data.base import Adapter
from competition.data.dataset import EpochSampler, SegDataset
from competition.train.averaging import Swa, TopK
from competition.train.distributed import Dist
from competition.train.engine import Engine


@dataclass
class FoldState:
    """Where a fold's training stands. In ``last.pt`` it is the plain dict of :meth:`as_dict` (checkpoints
    are read with ``weights_only=True``: plain data only), key for key as runs have always written it,
    so existing runs resume."""

    epoch: int = 0  # epochs finished
    best_score: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0  # epochs since the last improvement (train.early_stopping)
    history: list[dict] = field(default_factory=list)  # one row per epoch, as in history.csv
    top_k: list[list] | None = None  # [[score, epoch]] kept by train.average_top_k; None without it
    # Set after the last epoch, so never in last.pt: each weight average's score, and the one that
    # became best.pt (if any beat every epoch).
    averaging: dict[str, float] = field(default_factory=dict)
    best_averaged: str | None = None

    def as_dict(self) -> dict:
        """The checkpoint's ``state``: ``top_k`` only with train.average_top_k, as before this class."""
        out = {"epoch": self.epoch, "best_score": self.best_score, "best_epoch": self.best_epoch,
               "bad_epochs": self.bad_epochs, "history": self.history}
        if self.top_k is not None:
            out["top_k"] = self.top_k
        return out

    @classmethod
    def from_dict(cls, state: dict) -> FoldState:
        return cls(**state)


@dataclass
class FoldRun:
    """One fold of one experiment, built by ``loop._start``: configuration, run folder, engine (model,
    optimizer, scheduler), data, tracker and state."""

    exp: ExperimentConfig
    comp: CompetitionConfig
    adapter: Adapter
    fold: int | str  # a CV fold, or paths.ALL_DATA
    d: Dist
    rp: paths.RunPaths
    run_cfg: dict  # the resolved configuration, as in config.yaml and every checkpoint
    engine: Engine
    train_ds: Dataset
    sampler: EpochSampler
    train_loader: DataLoader
    val_ids: list[str]  # empty for the all-data run
    val_ds: SegDataset
    val_loader: DataLoader  # this rank's shard of val_ds
    tracker: tracking.Tracker
    log: Callable[[str], None]
    state: FoldState
    topk: TopK | None = None
    swa: Swa | None = None
    deadline: float | None = None  # --budget: time.time() by which the fold, OOF included, must be done
    stopped_by_budget: bool = False
