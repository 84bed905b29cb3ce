"""torchrun/DDP helpers: rank-0 writes, reductions, barriers. World size 1 needs no process group.

One machine or many: torchrun sets RANK (global), LOCAL_RANK (the GPU on this machine) and WORLD_SIZE;
rank 0 (on node 0) is the only writer, so on several machines the run's files appear on node 0.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from competition.errors import UserError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup() -> Dist:
    """Join the process group torchrun describes in RANK/WORLD_SIZE/LOCAL_RANK (its own protocol)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
    return Dist(rank, world, local)


def device_for(d: Dist) -> torch.device:
    return torch.device(f"cuda:{d.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, d: Dist):
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def same_on_all_ranks(t: torch.Tensor, d: Dist) -> bool:
    """True when every rank holds the same tensor (checked on a cheap fingerprint of it)."""
    if not d.enabled:
        return True
    fp = torch.stack([t.sum(), (t * torch.arange(1, t.numel() + 1, dtype=t.dtype, device=t.device)).sum()])
    allfp = [torch.zeros_like(fp) for _ in range(d.world)]
    dist.all_gather(allfp, fp)
    return all(torch.equal(allfp[0], x) for x in allfp[1:])


def require_same(value, d: Dist, what: str) -> None:
    """Stop every rank, naming ``what``, unless all ranks hold the same ``value`` (small, picklable).

    On several machines each node reads its own disk: a rank that saw another run folder (no last.pt
    there, or an older one) would otherwise train a different schedule and hang at the next collective.
    """
    if not d.enabled:
        return
    values = [None] * d.world
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        raise UserError(f"DDP ranks disagree on {what}: {values} (by rank); on several machines every node must "
                        "see the same project folder (runs/ on a shared filesystem), or run from a fresh start")


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
