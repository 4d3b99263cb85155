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
    decoupled: bool = False,
    differentiable: bool = False,
) -> tuple[Tensors, dict]:
    """torch.optim.Adam (L2 weight decay added to the gradient), or torch.optim.AdamW with
    `decoupled` (p * (1 - lr wd) before the update); bias-corrected moments, amsgrad off.
    `differentiable`: a square root whose derivative at 0 is 0 (autodiff through the step,
    where a zero gradient would otherwise give inf * 0); the same values."""
    out = _adam(params, grads, state, lr, betas, eps, weight_decay, decoupled, differentiable)
    return out[0], out[1]


def adam_step_and_scale(
    params: Tensors,
    grads: Tensors,
    state: dict,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled: bool = False,
) -> tuple[Tensors, dict, Tensors]:
    """`adam_step` and, from the same moments, -d(new params)/d(gradient) at these gradients:
    elementwise, so a diagonal D. With m0, v0 the moments before the step, m, v after it,
    s = sqrt(v / c2), q = s + eps:
        D = (lr / c1) ((1 - b1) / q - m (1 - b2) g / (c2 s q^2))
          = (lr / c1) ((1 - b1) eps + ((1 - b1) b2 v0 - (1 - b2) b1 m0 g) / (c2 s)) / q^2,
    the second form free of the first's cancellation (at Adam's first step D is
    (lr / c1) (1 - b1) eps / q^2 exactly, while the first form subtracts two numbers |g| / eps
    times larger). Where v = 0 every gradient so far was 0, and the fraction is taken as 0: the
    update is then (lr / c1) (1 - b1) g / (k |g| + eps), whose derivative at g = 0 is what
    remains."""
    return _adam(params, grads, state, lr, betas, eps, weight_decay, decoupled, False, True)


def _adam(
    params, grads, state, lr, betas, eps, weight_decay, decoupled, differentiable, scale=False
):
    b1, b2 = betas
    t = state["step"] + 1
    c1, c2 = 1.0 - torch.pow(b1, t), 1.0 - torch.pow(b2, t)
    sqrt = sqrt0 if differentiable else torch.sqrt
    new_params, m_new, v_new, diagonal = {}, {}, {}, {}
    for k, p in params.items():
        g = grads[k] if decoupled else decayed(grads[k], p, weight_decay)
        m0, v0 = state["exp_avg"][k], state["exp_avg_sq"][k]
        m = b1 * m0 + (1.0 - b1) * g
        v = b2 * v0 + (1.0 - b2) * g * g
        root = sqrt(v / c2)
        q = root + eps
        w = decayed_weights(p, lr, weight_decay) if decoupled else p
        new_params[k] = w - (lr / c1) * m / q
        m_new[k], v_new[k] = m, v
        if scale:
            fraction = ((1.0 - b1) * b2 * v0 - (1.0 - b2) * b1 * m0 * g) / (c2 * root)
            num = torch.where(root == 0, (1.0 - b1) * eps, fraction + (1.0 - b1) * eps)
            diagonal[k] = (lr / c1) * num / (q * q)
    new_state = {"step": t, "exp_avg": m_new, "exp_avg_sq": v_new}
    return (new_params, new_state, diagonal) if scale else (new_params, new_state)


def decayed_weights(p: torch.Tensor, lr: float, weight_decay: float | torch.Tensor):
    """p * (1 - lr wd): AdamW's decoupled weight decay (a float 0: p itself)."""
    if isinstance(weight_decay, torch.Tensor) or weight_decay:
        return p * (1.0 - lr * weight_decay)
    return p


def sqrt0(x: torch.Tensor) -> torch.Tensor:
    """sqrt(x) for x >= 0 whose derivative at 0 is 0 instead of inf (inf * 0 would put NaN into
    autodiff through an Adam step where a gradient is zero); same values, NaN stays NaN."""
    zero = x == 0
    return torch.where(zero, 0.0, torch.where(zero, 1.0, x).sqrt())


def step_lr(base_lr: float, iteration: int, milestones: list[int], gamma: float) -> float:
    """Multi-step schedule: base_lr * gamma^(number of milestones passed); 0-based iterations."""
    return base_lr * gamma ** sum(iteration >= m for m in milestones)
