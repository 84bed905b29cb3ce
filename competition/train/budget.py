"""``train --budget``: stop a fold between epochs before it would run past its deadline."""
from __future__ import annotations

import time

from competition.train import distributed as dd
from competition.train.foldrun import FoldRun

# The OOF written at the end of a fold (the plain store and the flipped variant) costs about a quarter of
# an epoch at the default 4:1 split; half an epoch is kept free for it.
OOF_RESERVE_EPOCHS = 0.5


def out_of_time(run: FoldRun) -> bool:
    """--budget: would the next epoch (as long as the recent ones) end past the deadline, with room left
    for the OOF? Decided on rank 0's clock and shared, so every DDP rank stops at the same epoch."""
    if run.deadline is None or not run.state.history:
        return False
    recent = [r["seconds"] for r in run.state.history[-3:] if "seconds" in r]
    epoch_s = sum(recent) / len(recent) if recent else 0.0
    late = time.time() + epoch_s * (1 + OOF_RESERVE_EPOCHS) > run.deadline
    late = bool(dd.broadcast_object(late, run.d)) if run.d.enabled else late
    if late and not run.stopped_by_budget:
        run.stopped_by_budget = True
        if run.d.main:
            run.log(f"budget: stopping after epoch {run.state.epoch} of {run.exp.train.epochs} (another epoch of "
                    f"~{epoch_s:.0f}s would end past the budget); last.pt is complete: train again without "
                    f"--budget (or with a new one) to continue from epoch {run.state.epoch + 1}")
    return late
