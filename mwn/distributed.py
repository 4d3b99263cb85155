"""Data parallelism over processes with torch.distributed (launched by torchrun).

Every rank draws the same global batches (they depend only on seed and iteration) and takes its
shard. Inside one iteration the only cross-rank operation is a sum, injected into the pure step
functions as `reduce` (`Reduce.sum`): `LOCAL` in one process (the identity), `AllReduce` under
torchrun. Batch sizes in the config are global, so the arithmetic of a step does not depend on
the number of processes except through BatchNorm's batch statistics, which `sync_bn=true` makes
global too (`mwn.batchnorm.synchronised`: a differentiable sum inside BatchNorm).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

Tensors = dict[str, torch.Tensor]


class Reduce:
    """One process: sums over ranks are the identity."""

    world = 1

    def sum(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each tensor summed over the ranks."""
        return tensors

    def sum_over_ranks(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks, differentiable (reverse and forward mode)."""
        return x

    def buffers(self, buffers: Tensors) -> Tensors:
        """BatchNorm running statistics made equal on every rank."""
        return buffers


LOCAL = Reduce()


class AllReduce(Reduce):
    """Sums over the ranks of the default process group, in one collective per call.

    BatchNorm running statistics are averaged over the ranks after each step (with local batch
    statistics, the mean of the ranks' running means is the global one); with `sync_bn` they
    are equal already and stay untouched.
    """

    def __init__(self, world: int, sync_bn: bool) -> None:
        self.world, self.sync_bn = world, sync_bn

    def sum(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        out, start = [], 0
        for t in tensors:  # back in each tensor's shape and memory format (channels-last)
            out.append(torch.empty_like(t).copy_(flat[start : start + t.numel()].view(t.shape)))
            start += t.numel()
        return out

    def sum_over_ranks(self, x: torch.Tensor) -> torch.Tensor:
        return sum_over_ranks(x)

    def buffers(self, buffers: Tensors) -> Tensors:
        if self.sync_bn:
            return buffers
        floats = [k for k, v in buffers.items() if v.is_floating_point()]
        summed = self.sum([buffers[k] for k in floats])
        return {**buffers, **{k: s / self.world for k, s in zip(floats, summed)}}


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(sum) as a differentiable function: its derivative in both directions is the
    sum over ranks of the cotangents (backward) or tangents (forward mode, for the JVP)."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _SumOverRanks.forward(grad)

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor) -> torch.Tensor:
        return _SumOverRanks.forward(tangent)


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    return _SumOverRanks.apply(x)


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
    finally:
        dist.destroy_process_group()
