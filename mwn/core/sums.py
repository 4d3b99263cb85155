"""The two things that change an iteration's arithmetic around a method written for fp32 in one
process, behind one door (`Sums`): the fp16 loss scale and the sums over torchrun's ranks.

- Sums over processes: inside one iteration the only cross-rank operation is a sum, injected
  into the pure step functions as `reduce`: `LOCAL` in one process (the identity), `AllReduce`
  under torchrun. Batch sizes are global, so a step's arithmetic does not depend on the number
  of processes except through BatchNorm's batch statistics (`sync_bn=true` makes those global
  too: mwn.core.batchnorm.synchronised, a differentiable sum inside BatchNorm).
- Dynamic loss scaling for float16 autocast, as functions of a tensor state (no host sync, so a
  step stays capturable in a CUDA graph): torch.amp.GradScaler's rule, branch-free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.func import grad_and_value

from mwn.core.types import Tensors

# ---------------------------------------------------------------- sums over the ranks


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


# ---------------------------------------------------------------- fp16 loss scale

GROWTH_INTERVAL = 2000  # as torch.amp.GradScaler: double the scale after this many good steps


def scaler_init(scale: float = 2.0**16, device: torch.device | str = "cpu") -> dict:
    """The loss-scale state: scale, good steps in a row, skipped steps so far."""
    t = lambda v: torch.tensor(v, dtype=torch.float32, device=device)
    return {"scale": t(scale), "good_steps": t(0.0), "skipped": t(0.0)}


def skip_if_overflow(old: dict, new: dict, *checked: Tensors) -> dict:
    """A step whose `checked` tensors overflowed keeps the old parameters and optimiser states
    (BatchNorm statistics still move, as in PyTorch) and halves the scale; after GROWTH_INTERVAL
    good steps in a row the scale doubles. Keeps the state's key order (a graphed step replays
    on its own outputs)."""
    finite = torch.stack([torch.isfinite(t).all() for d in checked for t in d.values()]).all()
    keep = lambda a, b: torch.where(finite, a, b)

    def pick(a, b):
        return {k: pick(a[k], b[k]) if isinstance(a[k], dict) else keep(a[k], b[k]) for k in a}

    s = old["scaler"]
    good = torch.where(finite, s["good_steps"] + 1, 0.0)
    grow = good >= GROWTH_INTERVAL
    scaler = {
        "scale": s["scale"] * torch.where(finite, torch.where(grow, 2.0, 1.0), 0.5),
        "good_steps": torch.where(grow, 0.0, good),
        "skipped": s["skipped"] + (~finite).float(),
    }
    fixed = {"buffers": new["buffers"], "scaler": scaler}
    return {k: fixed[k] if k in fixed else pick(new[k], old[k]) for k in old}


# ---------------------------------------------------------------- the one door


def _scaled(tensors: Tensors, factor: float | torch.Tensor) -> Tensors:
    if isinstance(factor, float) and factor == 1.0:
        return tensors
    return {k: v * factor for k, v in tensors.items()}


@dataclass(frozen=True)
class Sums:
    """Every gradient of an iteration goes through here: losses are multiplied by the fp16 loss
    scale and gradients divided by it; sums over the global batch add up the ranks' shards.
    fp32 in one process (scale 1, LOCAL): each method returns its input unchanged."""

    scale: float | torch.Tensor = 1.0
    reduce: Reduce = LOCAL

    def total(self, tensors: Tensors) -> Tensors:
        """Summed over the ranks."""
        return dict(zip(tensors, self.reduce.sum(list(tensors.values()))))

    def pull(self, pullback: Callable, weights: torch.Tensor, n: int) -> Tensors:
        """grad_w (1/n) sum_i weights_i L_i(w) over the global batch, from a VJP of the losses."""
        (g,) = pullback(weights * (self.scale / n))
        return _scaled(self.total(g), 1 / self.scale)

    def grad_of_mean(self, f: Callable, params: Tensors, has_aux: bool = False):
        """(gradient, value[, aux]) of the global mean loss whose shard f(params) is this rank's
        mean (or (mean, aux))."""
        share = self.scale / self.reduce.world

        def scaled(p):
            out = f(p)
            return (out[0] * share, out[1]) if has_aux else out * share

        g, value = grad_and_value(scaled, has_aux=has_aux)(params)
        loss = value[0] if has_aux else value
        *g_sum, loss = self.reduce.sum([*g.values(), loss])
        g = _scaled(dict(zip(g, g_sum)), 1 / self.scale)
        return (g, loss / self.scale, value[1]) if has_aux else (g, loss / self.scale)

    def tangent(self, g: Tensors) -> tuple[Tensors, float | torch.Tensor]:
        """A JVP tangent and the factor it was multiplied by: with fp16, g scaled to max |g| = 1
        to stay in range (the JVP is linear, so the caller divides the factor out again)."""
        if isinstance(self.scale, float):
            return g, 1.0
        t = 1 / torch.stack([v.abs().max() for v in g.values()]).max().clamp(min=1e-30)
        return {k: v * t for k, v in g.items()}, t

    def global_means(self, values: list[torch.Tensor]) -> torch.Tensor:
        """Per-rank means as means over the global batch (one sum over the ranks)."""
        return self.reduce.sum([torch.stack(values) / self.reduce.world])[0]
