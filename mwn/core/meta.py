"""Meta-Weight-Net: the meta-gradient methods and the MWN steps, as pure functions of explicit
state and a batch (the state's layout: mwn.core.step).

The meta-gradient methods (d meta loss / d Theta through the lookahead) live in one registry,
META_GRADS: `jvp` (the identity, exact and cheap), `double_backward` (autodiff through the
unrolled step, the reference) and `finite_difference` (the identity's dot products by central
differences, as DARTS and Betty's `darts` hypergradient: approximate). A method is written for
fp32 in one process; the two things that change the arithmetic around it, the fp16 loss scale
and the sums over torchrun's ranks, enter through one object, `Sums` (mwn.core.sums), that it
takes every gradient through.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from torch.func import vjp
from torch.utils._pytree import tree_map

from mwn.core.optim import adam_step
from mwn.core.step import (
    StepHP,
    loss_dots,
    mean_loss,
    per_sample_loss,
    run_constants,
    sample_weights,
    scaled_tangent,
)
from mwn.core.sums import LOCAL, Reduce, Sums, skip_if_overflow
from mwn.core.tangents import saves_activations
from mwn.core.types import Batch, Tensors

# ---------------------------------------------------------------- meta-gradient methods


class TrainPass(NamedTuple):
    """The forward of the training batch at w, shared by the meta-gradient and the step."""

    losses: torch.Tensor  # L_i(w), (B,)
    pullback: Callable  # u -> (sum_i u_i grad_w L_i(w),); callable more than once
    new_buffers: Tensors  # BatchNorm statistics after this batch
    weights: torch.Tensor  # V(L_i; Theta), normalised when asked
    weights_pullback: Callable  # u -> (sum_i u_i d weights_i / d Theta,)
    saved: list | None  # the forward's activations for the tangent pass (None: a full JVP)


class MetaGrad(NamedTuple):
    """What a meta-gradient method returns."""

    meta_grad: Tensors  # d meta loss / d Theta through the lookahead
    meta_loss: torch.Tensor  # mean cross-entropy of the meta batch at the lookahead
    # lookahead parameters and optimiser state (the step without roll back)
    ahead: tuple[Tensors, dict]


def training_forward(model, state: dict, batch: Batch, hp: StepHP):
    """(losses L_i(w), their VJP, the BatchNorm buffers after the batch, the activations saved
    for the tangent pass or None): with meta_grad=jvp, a model that has a tangent pass keeps
    what it needs (mwn.core.tangents)."""
    x, y = batch
    keep = hp.meta_grad == "jvp" and saves_activations(model, hp.amp)

    def forward(p):
        saved = [] if keep else None
        losses, new_buffers = per_sample_loss(model, p, state["buffers"], x, y, hp.amp, saved)
        return losses, (new_buffers, saved or [])  # (aux may not hold None)

    losses, pullback, (new_buffers, saved) = vjp(forward, state["params"], has_aux=True)
    return losses, pullback, new_buffers, saved or None


def train_pass(model, meta_net, state: dict, batch: Batch, hp: StepHP, reduce: Reduce):
    """Losses at w with their VJP, and the meta-net's weights with theirs."""
    y, constants = batch[1], run_constants(state)
    losses, pullback, new_buffers, saved = training_forward(model, state, batch, hp)
    weights, weights_pullback = vjp(
        lambda th: sample_weights(meta_net, th, losses, y, constants, hp.normalize_weights, reduce),
        state["meta_params"],
    )
    return TrainPass(losses, pullback, new_buffers, weights, weights_pullback, saved)


def jvp_meta_grad(
    model, meta_net, state, batch, meta_batch, lr, hp: StepHP, train: TrainPass, sums: Sums
) -> MetaGrad:
    """The identity: w' = U(w, G) with G = grad_w (1/n) sum_i v_i L_i(w) the weighted gradient
    and U the optimiser's step, so d L_meta(w') / d v_i = -(1/n) (D g) . grad_w L_i(w) with
    g = grad L_meta(w') and D = -dU/dG: for SGD a number, lr (lr * (1 + momentum) for Nesterov);
    for Adam(W) a diagonal, elementwise in G (mwn.core.optim.adam_step_and_scale). The n dot
    products are ONE forward-mode JVP of the loss vector along D g: no double backward. The
    chain rule through v(Theta) is the weights' small VJP."""
    return through_lookahead(model, state, batch, meta_batch, lr, hp, train, sums, loss_dots)


def finite_difference_meta_grad(
    model, meta_net, state, batch, meta_batch, lr, hp: StepHP, train: TrainPass, sums: Sums
) -> MetaGrad:
    """The same identity with its dot products from central differences, as DARTS (Liu et al.
    2019) and Betty's `darts` hypergradient: (D g) . grad L_i(w) ~ (L_i(w + r D g) -
    L_i(w - r D g)) / 2r with r = finite_difference_eps / ||D g||, two forwards of the training
    batch in place of the JVP. Approximate: its error is O(r^2) from the curvature plus the
    losses' rounding over 2r."""
    return through_lookahead(model, state, batch, meta_batch, lr, hp, train, sums, difference_dots)


def through_lookahead(model, state, batch, meta_batch, lr, hp, train, sums, dots) -> MetaGrad:
    """The lookahead, the meta loss at it and the chain rule down to Theta, with the n dot
    products (D g) . grad L_i(w) from `dots` (loss_dots: exact; difference_dots: approximate)."""
    params, buffers = state["params"], state["buffers"]
    (_, y), (xm, ym) = batch, meta_batch
    n = y.shape[0] * sums.reduce.world  # the global batch size
    # lookahead w'(Theta): the real optimiser's step on the weighted loss
    g_train = sums.pull(train.pullback, train.weights, n)
    *ahead, a = hp.update_and_scale(params, g_train, state["momentum"], lr)
    # g = grad of the meta loss at w' (BatchNorm in training mode; real running stats untouched)
    g_meta, meta_loss = sums.grad_of_mean(
        lambda p: mean_loss(model, p, buffers, xm, ym, hp.amp), ahead[0]
    )
    # (J D g)_i = (D g) . grad L_i(w) for all i, then the VJP through v(Theta)
    tangent, a = scaled_tangent(g_meta, a)
    jg, t = dots(model, params, buffers, batch, tangent, hp, sums, train.saved)
    (meta_grad,) = train.weights_pullback(jg * (-a / n) / t)
    return MetaGrad(sums.total(meta_grad), meta_loss, tuple(ahead))


def difference_dots(
    model, params, buffers, batch: Batch, g: Tensors, hp: StepHP, sums: Sums, saved=None
):
    """(dots, 1): g . grad_w L_i(w) for every sample i by a central difference along g, of
    step r = finite_difference_eps / ||g|| in parameter space (DARTS's choice: relative to the
    norm, so the parameters move by finite_difference_eps whatever g's scale). The forwards are
    in training mode like the JVP's (BatchNorm on the batch's statistics); their running
    statistics are dropped. (`saved`: the exact method's activations, not needed here.)"""
    x, y = batch
    norm = torch.stack([v.square().sum() for v in g.values()]).sum().sqrt()
    r = hp.finite_difference_eps / norm.clamp(min=1e-30)  # g = 0: both sides at w, dots 0
    with torch.no_grad():
        side = [
            per_sample_loss(
                model, {k: p + s * g[k] for k, p in params.items()}, buffers, x, y, hp.amp
            )[0]
            for s in (r, -r)
        ]
    return (side[0] - side[1]) / (2 * r), 1.0


def double_backward_meta_grad(
    model, meta_net, state, batch, meta_batch, lr, hp: StepHP, train: TrainPass, sums: Sums
) -> MetaGrad:
    """Reference: plain autograd through the unrolled lookahead (create_graph=True), as the
    original MWN code does: its own forward, a differentiable backward, a backward through both.
    fp32 in one process only (the config refuses it with fp16, bf16 or torchrun)."""
    (x, y), (xm, ym) = batch, meta_batch
    params = {k: v.detach().requires_grad_() for k, v in state["params"].items()}
    theta = {k: v.detach().requires_grad_() for k, v in state["meta_params"].items()}
    losses, _ = per_sample_loss(model, params, state["buffers"], x, y)
    weights = sample_weights(meta_net, theta, losses, y, run_constants(state), hp.normalize_weights)
    grads = torch.autograd.grad(
        (weights * losses).mean(),
        list(params.values()),
        create_graph=True,
        materialize_grads=True,  # a parameter the batch does not reach: a zero gradient
    )
    ahead, momentum = hp.update(params, dict(zip(params, grads)), state["momentum"], lr, True)
    meta_loss = mean_loss(model, ahead, state["buffers"], xm, ym)
    g = torch.autograd.grad(meta_loss, list(theta.values()))
    ahead = tree_map(torch.Tensor.detach, (ahead, momentum))
    return MetaGrad(dict(zip(theta, g)), meta_loss.detach(), ahead)


# name (the meta_grad setting) -> method(model, meta_net, state, batch, meta_batch, lr, hp,
# train, sums); a new method is one function of that signature and one line here
META_GRADS: dict[str, Callable[..., MetaGrad]] = {
    "jvp": jvp_meta_grad,
    "double_backward": double_backward_meta_grad,
    "finite_difference": finite_difference_meta_grad,
}


# ---------------------------------------------------------------- one iteration


def mwn_step(
    model: nn.Module,
    meta_net: nn.Module,
    state: dict,
    batch: Batch,
    meta_batch: Batch,
    lr: float,
    hp: StepHP,
    reduce: Reduce = LOCAL,
) -> tuple[dict, dict]:
    """One Meta-Weight-Net iteration (Algorithm 1). Returns (new state, metrics as tensors).
    Under torchrun: this rank's shards of the batches, and `reduce` summing over the ranks."""
    n = batch[1].shape[0] * reduce.world  # the global batch size
    sums = hp.sums(state, reduce)
    # 1. losses at w and the meta-net's weights for them
    train = train_pass(model, meta_net, state, batch, hp, reduce)
    # 2-4. lookahead w'(Theta), meta loss at w', and its exact gradient in Theta
    method = META_GRADS[hp.meta_grad]
    out = method(model, meta_net, state, batch, meta_batch, lr, hp, train, sums)
    # 5. meta-net update: Adam on Theta
    meta_params, meta_opt = adam_step(
        state["meta_params"],
        out.meta_grad,
        state["meta_opt"],
        hp.meta_lr,
        weight_decay=hp.meta_weight_decay,
    )
    # 6. classifier update: with the updated meta-net (roll back), or keep the lookahead
    if hp.rollback:
        y, constants = batch[1], run_constants(state)
        weights = sample_weights(
            meta_net, meta_params, train.losses, y, constants, hp.normalize_weights, reduce
        )
        params, momentum = hp.update(
            state["params"], sums.pull(train.pullback, weights, n), state["momentum"], lr
        )
    else:
        weights = train.weights
        params, momentum = out.ahead
    new_state = {
        **state,
        "params": params,
        "buffers": reduce.buffers(train.new_buffers),  # moved once, by the train batch
        "momentum": momentum,
        "meta_params": meta_params,
        "meta_opt": meta_opt,
    }
    if hp.fp16:  # overflow anywhere shows in the meta-gradient or the new parameters
        new_state = skip_if_overflow(state, new_state, out.meta_grad, params)
    losses = train.losses
    means = [losses.mean(), (weights * losses).mean(), weights.mean()]
    means = sums.global_means(means)  # over the global batch
    grad_norm = torch.stack([g.square().sum() for g in out.meta_grad.values()]).sum().sqrt()
    return new_state, {
        "loss": means[0],
        "weighted_loss": means[1],
        "meta_loss": out.meta_loss,
        "mean_weight": means[2],
        "meta_grad_norm": grad_norm,
    }


def mwn_weighted_step(
    model: nn.Module,
    meta_net: nn.Module,
    state: dict,
    batch: Batch,
    meta_batch: Batch | None,
    lr: float,
    hp: StepHP,
    reduce: Reduce = LOCAL,
) -> tuple[dict, dict]:
    """An iteration between meta-net updates (meta_interval > 1): the classifier step on the
    weights of the current meta-net; the meta-net and its Adam state stay as they are."""
    n = batch[1].shape[0] * reduce.world
    sums = hp.sums(state, reduce)
    train = train_pass(model, meta_net, state, batch, hp, reduce)
    g = sums.pull(train.pullback, train.weights, n)
    params, momentum = hp.update(state["params"], g, state["momentum"], lr)
    new_state = {
        **state,
        "params": params,
        "buffers": reduce.buffers(train.new_buffers),
        "momentum": momentum,
    }
    if hp.fp16:
        new_state = skip_if_overflow(state, new_state, params)
    losses, weights = train.losses, train.weights
    means = [losses.mean(), (weights * losses).mean(), weights.mean()]
    means = sums.global_means(means)
    return new_state, {"loss": means[0], "weighted_loss": means[1], "mean_weight": means[2]}
