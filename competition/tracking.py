"""Weights & Biases, never blocking and never fatal, plus nothing else: the local record of a run is
its own files (history.csv, metrics.json), which exist whether or not W&B does.

Offline unless the user configured W&B (``WANDB_API_KEY`` or a ``wandb login``); ``make wandb-sync``
uploads offline runs later. ``tracking.wandb: false`` in an experiment turns it off.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path


def _configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


class Tracker:
    """A W&B run, or a no-op when disabled or when W&B fails; every call swallows W&B errors."""

    def __init__(self, enabled: bool, **init_kwargs):
        self.run = None
        if not enabled:
            return
        try:
            import wandb
            if "WANDB_MODE" not in os.environ and not _configured():
                init_kwargs.setdefault("mode", "offline")
            init_kwargs.setdefault("dir", str(Path.cwd()))
            # W&B's metadata scan and system-stats sampler compete with training for the CPU; on a
            # 2-core machine they made epochs up to 20x slower. GPU runs keep the stats (GPU utilisation).
            import torch
            settings = wandb.Settings(silent=True, console="off", init_timeout=30, x_disable_meta=True,
                                      x_disable_stats=not torch.cuda.is_available())
            self.run = wandb.init(reinit="finish_previous", **init_kwargs, settings=settings)
        except Exception as e:  # an unreachable server or a broken install must not stop training
            warnings.warn(f"W&B disabled for this run: {type(e).__name__}: {e}")
            self.run = None

    @property
    def dir(self) -> Path | None:
        return Path(self.run.dir) if self.run is not None else None

    def log(self, data: dict, step: int | None = None) -> None:
        self._safe(lambda: self.run.log(data, step=step))

    def summary(self, data: dict) -> None:
        self._safe(lambda: self.run.summary.update(data))

    def table(self, key: str, columns: list[str], rows: list[list]) -> None:
        import wandb
        self._safe(lambda: self.run.log({key: wandb.Table(columns=columns, data=rows)}))

    def images(self, key: str, images: list, captions: list[str]) -> None:
        import wandb
        self._safe(lambda: self.run.log({key: [wandb.Image(im, caption=c) for im, c in zip(images, captions)]}))

    def finish(self) -> None:
        self._safe(lambda: self.run.finish())
        self.run = None

    def _safe(self, fn) -> None:
        if self.run is None:
            return
        try:
            fn()
        except Exception as e:
            warnings.warn(f"W&B call failed and was skipped: {type(e).__name__}: {e}")


def for_training(exp, comp, fold: int, config: dict) -> Tracker:
    """Project per competition, group = experiment, job_type = fold<k>, name = <exp>-fold<k>."""
    return Tracker(exp.tracking.wandb, project=exp.tracking.project or comp.name, group=exp.name,
                   job_type=f"fold{fold}", name=f"{exp.name}-fold{fold}", config=config)
