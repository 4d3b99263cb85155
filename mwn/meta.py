"""One training iteration, as pure functions of explicit state and a batch.

State is a plain dict:
    params, buffers    classifier parameters and BatchNorm buffers   {name: tensor}
    momentum           SGD momentum buffers, same keys as params
    meta_params        meta-net parameters                           {name: tensor}
    meta_opt           Adam state of the meta-net (step, exp_avg, exp_avg_sq)
Nothing here reads a clock, a file or a global RNG, so one iteration can later be vmapped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, jvp, vjp

from mwn.optim import adam_step, sgd_lookahead_scale, sgd_step

Tensors = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]  # images (B, C, H, W) float, labels (B,) int64


@dataclass(frozen=True)
class StepHP:
    """The hyperparameters of one iteration that stay fixed during a run."""

    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    meta_lr: float = 1e-5
    meta_weight_decay: float = 0.0
    normalize_weights: bool = False  # weights * n / sum(weights), as the paper-era MWN scripts
    rollback: bool = True  # redo the classifier step with the updated meta-net (Algorithm 1)


def per_sample_loss(
    model: nn.Module, params: Tensors, buffers: Tensors, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, Tensors]:
    """Cross-entropy per sample (B,) in training mode, and the BatchNorm buffers it updated.

    BatchNorm writes its running statistics in place into the buffers it is given, so it gets
    copies: the caller's buffers stay untouched and the updated ones come back explicitly.
    """
    new_buffers = {k: v.clone() for k, v in buffers.items()}
    logits = functional_call(model, (params, new_buffers), (x,), strict=True)
    if logits.dtype in (torch.float16, torch.bfloat16):  # mixed precision: the loss in fp32
        logits = logits.float()
    return F.cross_entropy(logits, y, reduction="none"), new_buffers


def mean_loss(model: nn.Module, params: Tensors, buffers: Tensors, x, y) -> torch.Tensor:
    return per_sample_loss(model, params, buffers, x, y)[0].mean()


def sample_weights(
    meta_net: nn.Module, meta_params: Tensors, losses: torch.Tensor, normalize: bool
):
    """V(L_i; Theta) for detached losses (B,); normalised to mean 1 when asked."""
    w = functional_call(meta_net, meta_params, (losses.detach(),), strict=True)
    return w * (w.numel() / w.sum()) if normalize else w


def exact_meta_grad(
    model: nn.Module,
    meta_net: nn.Module,
    state: dict,
    batch: Batch,
    meta_batch: Batch,
    lr: float,
    hp: StepHP,
) -> dict:
    """The lookahead, the meta loss at it, and d(meta loss)/d(Theta) through it, exactly.

    The identity: the lookahead is w' = w - a * (grad_w (1/n) sum_i v_i L_i(w) + terms free of v),
    with a = lr (lr * (1 + momentum) for Nesterov; weight decay and the momentum buffer do not
    depend on v). So d L_meta(w') / d v_i = -(a/n) * g . grad_w L_i(w) with g = grad L_meta(w'),
    and all n dot products are ONE forward-mode JVP of the loss vector L(w) along g: no double
    backward. The chain rule through v(Theta) (meta-net, normalisation) is one small VJP.
    Returns the pieces the caller needs, so no forward is done twice.
    """
    params, buffers = state["params"], state["buffers"]
    (x, y), (xm, ym) = batch, meta_batch
    n = y.shape[0]

    # train losses at w; `pullback(u)` = sum_i u_i grad L_i(w), callable more than once
    losses, pullback, new_buffers = vjp(
        lambda p: per_sample_loss(model, p, buffers, x, y), params, has_aux=True
    )
    weights, weights_pullback = vjp(
        lambda th: sample_weights(meta_net, th, losses, hp.normalize_weights), state["meta_params"]
    )
    # lookahead w'(Theta): the real optimiser's step on the weighted loss
    (g_train,) = pullback(weights.detach() / n)
    ahead, ahead_momentum = sgd_step(
        params, g_train, state["momentum"], lr, hp.momentum, hp.weight_decay, hp.nesterov
    )
    # meta loss at w' (BatchNorm in training mode; real running stats untouched)
    g_meta, meta_loss = grad_and_value(lambda p: mean_loss(model, p, buffers, xm, ym))(ahead)
    # exact meta-gradient: (J g)_i = g . grad L_i(w) in one JVP, then the VJP through v(Theta)
    _, jg = jvp(lambda p: per_sample_loss(model, p, buffers, x, y)[0], (params,), (g_meta,))
    scale = sgd_lookahead_scale(lr, hp.momentum, hp.nesterov)
    (meta_grad,) = weights_pullback(-(scale / n) * jg)
    return {
        "losses": losses,
        "pullback": pullback,
        "new_buffers": new_buffers,
        "weights": weights.detach(),
        "ahead": (ahead, ahead_momentum),
        "meta_loss": meta_loss,
        "meta_grad": meta_grad,
    }


def mwn_step(
    model: nn.Module,
    meta_net: nn.Module,
    state: dict,
    batch: Batch,
    meta_batch: Batch,
    lr: float,
    hp: StepHP,
) -> tuple[dict, dict]:
    """One Meta-Weight-Net iteration (Algorithm 1). Returns (new state, metrics as tensors)."""
    # 1-4. weights, lookahead, meta loss and its exact gradient in Theta
    out = exact_meta_grad(model, meta_net, state, batch, meta_batch, lr, hp)
    # 5. meta-net update: Adam on Theta
    meta_params, meta_opt = adam_step(
        state["meta_params"],
        out["meta_grad"],
        state["meta_opt"],
        hp.meta_lr,
        weight_decay=hp.meta_weight_decay,
    )
    # 6. classifier update: with the updated meta-net (roll back), or keep the lookahead
    if hp.rollback:
        weights = sample_weights(meta_net, meta_params, out["losses"], hp.normalize_weights)
        (g_train,) = out["pullback"](weights / batch[1].shape[0])
        params, momentum = sgd_step(
            state["params"],
            g_train,
            state["momentum"],
            lr,
            hp.momentum,
            hp.weight_decay,
            hp.nesterov,
        )
    else:
        weights = out["weights"]
        params, momentum = out["ahead"]
    new_state = {
        "params": params,
        "buffers": out["new_buffers"],  # running stats moved once, by the train batch
        "momentum": momentum,
        "meta_params": meta_params,
        "meta_opt": meta_opt,
    }
    metrics = {
        "loss": out["losses"].mean(),
        "weighted_loss": (weights * out["losses"]).mean(),
        "meta_loss": out["meta_loss"],
        "mean_weight": weights.mean(),
    }
    return new_state, metrics


def erm_step(
    model: nn.Module,
    meta_net: nn.Module | None,
    state: dict,
    batch: Batch,
    meta_batch: Batch | None,
    lr: float,
    hp: StepHP,
) -> tuple[dict, dict]:
    """Plain training with uniform weights: the baseline, same signature as `mwn_step`."""
    x, y = batch
    loss, g, new_buffers = _loss_grad(model, state["params"], state["buffers"], x, y)
    params, momentum = sgd_step(
        state["params"], g, state["momentum"], lr, hp.momentum, hp.weight_decay, hp.nesterov
    )
    new_state = {**state, "params": params, "buffers": new_buffers, "momentum": momentum}
    return new_state, {"loss": loss, "weighted_loss": loss}


def _loss_grad(model, params, buffers, x, y):
    def f(p):
        losses, new_buffers = per_sample_loss(model, p, buffers, x, y)
        return losses.mean(), new_buffers

    g, (loss, new_buffers) = grad_and_value(f, has_aux=True)(params)
    return loss, g, new_buffers


def meta_grad_double_backward(
    model: nn.Module,
    meta_net: nn.Module,
    state: dict,
    batch: Batch,
    meta_batch: Batch,
    lr: float,
    hp: StepHP,
) -> tuple[Tensors, torch.Tensor]:
    """Reference: d(meta loss)/d(Theta) by plain autograd through the unrolled lookahead
    (create_graph=True), as the original MWN code does. Slow; used by tests and the benchmark."""
    (x, y), (xm, ym) = batch, meta_batch
    params = {k: v.detach().requires_grad_() for k, v in state["params"].items()}
    theta = {k: v.detach().requires_grad_() for k, v in state["meta_params"].items()}
    losses, _ = per_sample_loss(model, params, state["buffers"], x, y)
    weights = sample_weights(meta_net, theta, losses, hp.normalize_weights)
    inner = (weights * losses).mean()
    grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
    ahead, _ = sgd_step(
        params,
        dict(zip(params, grads)),
        state["momentum"],
        lr,
        hp.momentum,
        hp.weight_decay,
        hp.nesterov,
    )
    meta_loss = mean_loss(model, ahead, state["buffers"], xm, ym)
    g = torch.autograd.grad(meta_loss, list(theta.values()))
    return dict(zip(theta, g)), meta_loss.detach()
