"""How a prediction runs: the flags ``competition submit``, ``competition predict`` and a bundle's run.py share.

One frozen value travels whole from the command line to :func:`competition.predict.run.run_recipe`, so
a new flag is added here and where it is read, not to every function in between.
"""
from __future__ import annotations

from dataclasses import dataclass

from competition.config import ConfigError
from competition.predict.runtime import RUNTIMES


@dataclass(frozen=True)
class Inference:
    """``device``: auto (cuda when available), cpu, cuda, cuda:1, ...
    ``batch_size`` / ``workers``: images per batch and DataLoader workers; None: the experiments' (a batch
    size applies only where the members' images share one size).
    ``rle_workers``: threads encoding the CSV's RLE cells; None: the writer's default.
    ``progress``: show a progress bar.
    ``force``: write a CSV that passes the format but cannot be right (:mod:`competition.predict.plausible`).
    ``save_probs``: keep each member's test probabilities under ``runs/<exp>/test[-<variant>]/``.
    ``from_probs``: blend those saved probabilities instead of running the models.
    ``runtime``: what runs the networks: ``torch`` (the modules) or ``onnx`` (ONNX Runtime on their ONNX
    export; :mod:`competition.predict.runtime`); everything around the network is the same code.
    ``compile``: ``torch.compile`` the networks first (``--runtime torch`` only; meant for a GPU).
    """
    device: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    rle_workers: int | None = None
    progress: bool = True
    force: bool = False
    save_probs: bool = False
    from_probs: bool = False
    runtime: str = "torch"
    compile: bool = False

    def check(self) -> None:
        """Refuse values no run can use, naming the flag. Called by ``run_recipe``, not on construction:
        a missing recipe or a bad competition config is reported before a bad flag."""
        for flag, v, least in (("--batch-size", self.batch_size, 1), ("--workers", self.workers, 0)):
            if v is not None and v < least:
                raise ConfigError(f"{flag} {v}: expected a number >= {least}")
        if self.from_probs and self.save_probs:
            raise ConfigError("--from-probs and --save-probs: the saved probabilities are what --from-probs reads")
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"--runtime {self.runtime}: expected one of {', '.join(RUNTIMES)}")
        if self.compile and self.runtime != "torch":
            raise ConfigError(f"--compile applies to --runtime torch, not {self.runtime} (ONNX Runtime optimises "
                              f"its graph itself)")
        if self.from_probs and (self.compile or self.runtime != "torch"):
            raise ConfigError("--from-probs runs no network: --runtime and --compile do not apply")
