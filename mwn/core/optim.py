"""Functional optimisers over dicts of tensors, with PyTorch's update rules.

Each `*_step(params, grads, state, ...)` returns new `(params, state)` and never writes in place,
so the same step serves the real update and the differentiable lookahead.
"""

from __future__ import annotations

import torch

from mwn.core.types import Tensors


def sgd_init(params: Tensors) -> Tensors:
    """Momentum buffers, zero: with dampening 0, PyTorch's first buffer equals the first step."""
    return {k: torch.zeros_like(p) for k, p in params.items()}


def sgd_step(
    params: Tensors,
    grads: Tensors,
    momentum_buf: Tensors,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> tuple[Tensors, Tensors]:
    """torch.optim.SGD (dampening 0): d = g + wd*p; buf = m*buf + d; p -= lr*(d + m*buf or buf)."""
    new_params, new_buf = {}, {}
    for k, p in params.items():
        d = decayed(grads[k], p, weight_decay)
        buf = momentum * momentum_buf[k] + d
        step = d + momentum * buf if nesterov else buf
        new_params[k], new_buf[k] = p - lr * step, buf
    return new_params, new_buf


def decayed(g: torch.Tensor, p: torch.Tensor, weight_decay: float | torch.Tensor) -> torch.Tensor:
    """g + wd * p (L2 weight decay in the gradient). A float 0 adds nothing; a tensor (one value
    per run of a vectorised group, mwn.run.group) is always added, as vmap cannot branch on it."""
    if isinstance(weight_decay, torch.Tensor) or weight_decay:
        return g + weight_decay * p
    return g


def sgd_lookahead_scale(lr: float, momentum: float, nesterov: bool) -> float:
    """-d(new params)/d(gradient) of the step above: how far a gradient change moves them."""
    return lr * (1.0 + momentum) if nesterov else lr


def adam_init(params: Tensors) -> dict:
    """Adam state; the step count is a tensor so that a captured or compiled step can advance it."""
    p = next(iter(params.values()))
    return {
        "step": torch.zeros((), dtype=p.dtype, device=p.device),
        "exp_avg": {k: torch.zeros_like(p) for k, p in params.items()},
        "exp_avg_sq": {k: torch.zeros_like(p) for k, p in params.items()},
    }


def adam_step(
    params: Tensors,
    grads: Tensors,
    state: dict,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> tuple[Tensors, dict]:
    """torch.optim.Adam (L2 weight decay added to the gradient, bias-corrected moments)."""
    b1, b2 = betas
    t = state["step"] + 1
    c1, c2 = 1.0 - torch.pow(b1, t), 1.0 - torch.pow(b2, t)
    new_params, m_new, v_new = {}, {}, {}
    for k, p in params.items():
        g = decayed(grads[k], p, weight_decay)
        m = b1 * state["exp_avg"][k] + (1.0 - b1) * g
        v = b2 * state["exp_avg_sq"][k] + (1.0 - b2) * g * g
        new_params[k] = p - (lr / c1) * m / ((v / c2).sqrt() + eps)
        m_new[k], v_new[k] = m, v
    return new_params, {"step": t, "exp_avg": m_new, "exp_avg_sq": v_new}


def step_lr(base_lr: float, iteration: int, milestones: list[int], gamma: float) -> float:
    """Multi-step schedule: base_lr * gamma^(number of milestones passed); 0-based iterations."""
    return base_lr * gamma ** sum(iteration >= m for m in milestones)
