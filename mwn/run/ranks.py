"""Data parallelism over processes with torch.distributed (launched by torchrun): where this
process stands, and the process group.

Every rank draws the same global batches (they depend only on seed and iteration) and takes its
shard. Inside one iteration the only cross-rank operation is a sum, injected into the pure step
functions as `reduce` (mwn.core.sums: `LOCAL` in one process, `AllReduce` under torchrun).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: rank, world size, the rank on its node, and whether torchrun
    started it (then the distributed code path runs, also with one process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    torchrun: bool = False

    @property
    def main(self) -> bool:
        """Rank 0 validates, logs, plots and writes files; the others only train."""
        return self.rank == 0

    def shard(self, batch_size: int) -> slice:
        """This rank's rows of a global batch (batch_size is a multiple of world)."""
        n = batch_size // self.world
        return slice(self.rank * n, (self.rank + 1) * n)

    def broadcast(self, obj):
        """Rank 0's value of a picklable object, on every rank."""
        if not self.torchrun:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on some rank (a stop signal, agreed on)."""
        if not self.torchrun:
            return flag
        t = torch.tensor([float(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


ONE = Ranks()  # a plain one-process run


def ranks_from_env() -> Ranks:
    """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a plain `python -m` sets none."""
    env = os.environ
    return Ranks(
        int(env.get("RANK", 0)),
        int(env.get("WORLD_SIZE", 1)),
        int(env.get("LOCAL_RANK", 0)),
        "WORLD_SIZE" in env,
    )


@contextlib.contextmanager
def process_group(ranks: Ranks, timeout_min: float = 30) -> Iterator[Ranks]:
    """The default process group for the block under torchrun: gloo for CPU tensors, NCCL for
    CUDA ones (one GPU per rank: cuda:LOCAL_RANK)."""
    if not ranks.torchrun or dist.is_initialized():
        yield ranks
        return
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(ranks.local_rank)
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_min))
    try:
        yield ranks
        # every rank done before any takes its connections down: a rank that tore its group
        # down while another was still finishing could abort in gloo's teardown ("terminate
        # called without an active exception"); not on an error, where the others may be gone
        dist.barrier()
    finally:
        dist.destroy_process_group()


def finish(ranks: Ranks) -> None:
    """The end of a finished run's process. A torchrun rank exits without the interpreter's
    teardown: what that teardown frees includes gloo's transport (threads, sockets), and a rank
    has been seen to abort after finishing ("terminate called without an active exception",
    exit -6) while another was still writing. Everything the run leaves is written; what is
    buffered is flushed first. A plain process returns to the interpreter."""
    if not ranks.torchrun:
        return
    logging.shutdown()  # Hydra's file handlers: train.log complete
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
