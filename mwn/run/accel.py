"""Making one iteration fast without changing what it computes: channels-last memory format,
torch.compile, and CUDA graphs. `make_step` wraps a method's step function the same way for the
trainer and the benchmark.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from mwn.core.step import StepHP
from mwn.core.sums import LOCAL, Reduce
from mwn.core.types import Tensors

Step = Callable[..., tuple[dict, dict]]  # (state, batch, meta_batch, lr) -> (state, metrics)


def channels_last(tensors: Tensors) -> Tensors:
    """4-D tensors (conv weights, image batches) in NHWC order; others unchanged."""
    return {
        k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v
        for k, v in tensors.items()
    }


class CudaGraphStep:
    """A pure step captured once into a CUDA graph, then replayed.

    Each call copies its inputs into the captured input tensors, replays, and returns the
    captured outputs (overwritten by the next call). Valid because the step is a pure function
    with static shapes, no host syncs, and every changing value (lr, Adam's step count, the loss
    scale) a tensor: a float lr is copied into a device tensor. Captured at the first call,
    after a few warm-up calls on a side stream.
    """

    def __init__(self, step: Step, warmup: int = 3) -> None:
        self.step, self.warmup = step, warmup
        self.graph: torch.cuda.CUDAGraph | None = None

    def _capture(self, args: tuple) -> None:
        self.static_in = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, args)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.step(*self.static_in)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = self.step(*self.static_in)

    def __call__(self, state: dict, batch, meta_batch, lr) -> tuple[dict, dict]:
        if not isinstance(lr, torch.Tensor):  # a float would be frozen into the graph
            lr = torch.tensor(lr, device=batch[0].device)
        args = (state, batch, meta_batch, lr)
        if self.graph is None:
            self._capture(args)
        src, spec = tree_flatten(args)
        dst, static_spec = tree_flatten(self.static_in)
        if spec != static_spec:
            raise ValueError("CudaGraphStep: the inputs' structure differs from the captured one")
        pairs = [
            (d, s)
            for d, s in zip(dst, src, strict=True)
            if isinstance(d, torch.Tensor) and d is not s
        ]
        if pairs:
            torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])
        self.graph.replay()
        return self.static_out

    @property
    def last_state(self) -> dict:
        """The state the last call started from (its outputs are overwritten by the next)."""
        return self.static_in[0]


class PlainStep:
    """A step function called as it is, remembering the state the last call started from."""

    def __init__(self, step: Step) -> None:
        self.step, self.last_state = step, None

    def __call__(self, state: dict, batch, meta_batch, lr) -> tuple[dict, dict]:
        self.last_state = state
        return self.step(state, batch, meta_batch, lr)


def make_step(
    step: Step,
    model: nn.Module,
    meta_net: nn.Module | None,
    hp: StepHP,
    compile: bool = False,
    cuda_graphs: bool = False,
    reduce: Reduce = LOCAL,
) -> PlainStep | CudaGraphStep:
    """`step` with model, meta-net, hyperparameters and the cross-rank sum bound; compiled
    and/or graphed on request. Called as step(state, batch, meta_batch, lr); `.last_state` is
    the state the last call started from (what to save when its result is not finite)."""
    bound = functools.partial(step, model, meta_net, hp=hp, reduce=reduce)
    if compile:
        bound = torch.compile(bound)
    return CudaGraphStep(bound) if cuda_graphs else PlainStep(bound)
