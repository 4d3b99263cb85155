"""One training iteration, as pure functions of explicit state and a batch.

State is a plain dict:
    params, buffers    classifier parameters and BatchNorm buffers   {name: tensor}
    momentum           SGD momentum buffers, same keys as params
    meta_params        meta-net parameters                           {name: tensor}
    meta_opt           Adam state of the meta-net (step, exp_avg, exp_avg_sq)
    scaler             fp16 only: the dynamic loss scale (mwn.fp16)
Nothing here reads a clock, a file or a global RNG, so one iteration can later be vmapped.

The meta-gradient methods (d meta loss / d Theta through the lookahead) live in one registry,
META_GRADS: `jvp` (the identity, exact and cheap) and `double_backward` (autodiff through the
unrolled step, the reference). A method is written for fp32 in one process; the two things that
change the arithmetic around it, the fp16 loss scale and the sums over torchrun's ranks, enter
through one object, `Sums`, that it takes every gradient through.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import Enum
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, jvp, vjp

from mwn.batchnorm import jvp_rule
from mwn.distributed import LOCAL, Reduce
from mwn.fp16 import scaler_init, skip_if_overflow
from mwn.optim import adam_init, adam_step, sgd_init, sgd_lookahead_scale, sgd_step

# torch.func's JVP of batch norm scripts a decomposition once; torch warns about its own use
warnings.filterwarnings(
    "ignore", message="`torch.jit.script` is deprecated", category=FutureWarning
)

Tensors = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]  # images (B, C, H, W) float, labels (B,) int64


@dataclass(frozen=True)
class StepHP:
    """The hyperparameters of one iteration that stay fixed during a run. No defaults here: the
    composed config (conf/config.yaml) is their one source, through `from_config`."""

    momentum: float
    weight_decay: float
    nesterov: bool
    meta_lr: float
    meta_weight_decay: float
    normalize_weights: bool  # weights * n / sum(weights), as the paper-era MWN scripts
    rollback: bool  # redo the classifier step with the updated meta-net (Algorithm 1)
    fp16: bool  # float16 autocast for the classifier, dynamic loss scaling
    bf16: bool  # bfloat16 autocast for the classifier (fp32's range: no loss scaling)
    meta_grad: str  # a key of META_GRADS
    focal_gamma: float  # method=focal: the exponent of (1 - p)

    @classmethod
    def from_config(cls, cfg) -> StepHP:
        """The fields of the same names in a composed config (names of a set as plain str)."""
        value = lambda v: v.value if isinstance(v, Enum) else v
        return cls(**{f.name: value(cfg[f.name]) for f in fields(cls)})

    @property
    def amp(self) -> torch.dtype | None:
        """The autocast dtype of the classifier's forward passes (None: fp32)."""
        return torch.float16 if self.fp16 else torch.bfloat16 if self.bf16 else None

    def sgd(self, params: Tensors, grads: Tensors, momentum: Tensors, lr: float):
        """The classifier's optimiser step (the real one and the lookahead are the same rule)."""
        return sgd_step(
            params, grads, momentum, lr, self.momentum, self.weight_decay, self.nesterov
        )


def init_state(params: Tensors, buffers: Tensors, meta_params: Tensors, fp16: bool = False) -> dict:
    """The state at iteration 0: zero momentum, a fresh Adam state, the fp16 loss scale."""
    state = {
        "params": params,
        "buffers": buffers,
        "momentum": sgd_init(params),
        "meta_params": meta_params,
        "meta_opt": adam_init(meta_params),
    }
    if fp16:
        state["scaler"] = scaler_init(device=next(iter(params.values())).device)
    return state


# ---------------------------------------------------------------- losses and weights


def per_sample_loss(
    model: nn.Module,
    params: Tensors,
    buffers: Tensors,
    x: torch.Tensor,
    y: torch.Tensor,
    amp: torch.dtype | None = None,
) -> tuple[torch.Tensor, Tensors]:
    """Cross-entropy per sample (B,) in training mode, and the BatchNorm buffers it updated;
    the forward under autocast to `amp` (float16, bfloat16) when given, the loss in fp32.

    BatchNorm writes its running statistics in place into the buffers it is given, so it gets
    copies: the caller's buffers stay untouched and the updated ones come back explicitly.
    """
    new_buffers = {k: v.clone() for k, v in buffers.items()}
    with torch.autocast(x.device.type, dtype=amp or torch.float16, enabled=amp is not None):
        logits = functional_call(model, (params, new_buffers), (x,), strict=True)
    if amp is not None:
        logits = logits.float()  # the loss itself in fp32
    return F.cross_entropy(logits, y, reduction="none"), new_buffers


def mean_loss(model: nn.Module, params: Tensors, buffers: Tensors, x, y, amp=None):
    return per_sample_loss(model, params, buffers, x, y, amp)[0].mean()


def sample_weights(
    meta_net: nn.Module,
    meta_params: Tensors,
    losses: torch.Tensor,
    normalize: bool,
    reduce: Reduce = LOCAL,
) -> torch.Tensor:
    """V(L_i; Theta) for detached losses (B,); normalised to mean 1 (over the global batch: the
    sum goes through the ranks, differentiably) when asked."""
    w = functional_call(meta_net, meta_params, (losses.detach(),), strict=True)
    if not normalize:
        return w
    return w * (w.numel() * reduce.world / reduce.sum_over_ranks(w.sum()))


# ---------------------------------------------------------------- fp16 scale and rank sums


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


# ---------------------------------------------------------------- meta-gradient methods


class TrainPass(NamedTuple):
    """The forward of the training batch at w, shared by the meta-gradient and the step."""

    losses: torch.Tensor  # L_i(w), (B,)
    pullback: Callable  # u -> (sum_i u_i grad_w L_i(w),); callable more than once
    new_buffers: Tensors  # BatchNorm statistics after this batch
    weights: torch.Tensor  # V(L_i; Theta), normalised when asked
    weights_pullback: Callable  # u -> (sum_i u_i d weights_i / d Theta,)


class MetaGrad(NamedTuple):
    """What a meta-gradient method returns."""

    meta_grad: Tensors  # d meta loss / d Theta through the lookahead
    meta_loss: torch.Tensor  # mean cross-entropy of the meta batch at the lookahead
    ahead: tuple[Tensors, Tensors]  # lookahead parameters and momentum (the step without roll back)


def train_pass(model, meta_net, state: dict, batch: Batch, hp: StepHP, reduce: Reduce):
    """Losses at w with their VJP, and the meta-net's weights with theirs."""
    x, y = batch
    losses, pullback, new_buffers = vjp(
        lambda p: per_sample_loss(model, p, state["buffers"], x, y, hp.amp),
        state["params"],
        has_aux=True,
    )
    weights, weights_pullback = vjp(
        lambda th: sample_weights(meta_net, th, losses, hp.normalize_weights, reduce),
        state["meta_params"],
    )
    return TrainPass(losses, pullback, new_buffers, weights, weights_pullback)


def jvp_meta_grad(
    model, meta_net, state, batch, meta_batch, lr, hp: StepHP, train: TrainPass, sums: Sums
) -> MetaGrad:
    """The identity: w' = w - a * grad_w (1/n) sum_i v_i L_i(w) + (terms free of v), with a = lr
    (lr * (1 + momentum) for Nesterov), so d L_meta(w') / d v_i = -(a/n) g . grad_w L_i(w) with
    g = grad L_meta(w'). The n dot products are ONE forward-mode JVP of the loss vector along g:
    no double backward. The chain rule through v(Theta) is the weights' small VJP."""
    params, buffers = state["params"], state["buffers"]
    (_, y), (xm, ym) = batch, meta_batch
    n = y.shape[0] * sums.reduce.world  # the global batch size
    # lookahead w'(Theta): the real optimiser's step on the weighted loss
    g_train = sums.pull(train.pullback, train.weights, n)
    ahead = hp.sgd(params, g_train, state["momentum"], lr)
    # g = grad of the meta loss at w' (BatchNorm in training mode; real running stats untouched)
    g_meta, meta_loss = sums.grad_of_mean(
        lambda p: mean_loss(model, p, buffers, xm, ym, hp.amp), ahead[0]
    )
    # (J g)_i = g . grad L_i(w) for all i in one JVP, then the VJP through v(Theta)
    jg, t = loss_dots(model, params, buffers, batch, g_meta, hp, sums)
    a = sgd_lookahead_scale(lr, hp.momentum, hp.nesterov)
    (meta_grad,) = train.weights_pullback(jg * (-a / n) / t)
    return MetaGrad(sums.total(meta_grad), meta_loss, ahead)


def loss_dots(model, params, buffers, batch: Batch, g: Tensors, hp: StepHP, sums: Sums):
    """(J g, t): the dot products g . grad_w L_i(w) for every sample i, all in one forward-mode
    JVP of the loss vector, times t (the factor `Sums.tangent` scaled g by; 1.0 in fp32)."""
    x, y = batch
    tangent, t = sums.tangent(g)
    with jvp_rule():  # BatchNorm's cheaper forward-mode rule (mwn.batchnorm)
        _, jg = jvp(
            lambda p: per_sample_loss(model, p, buffers, x, y, hp.amp)[0], (params,), (tangent,)
        )
    return jg, t


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
    weights = sample_weights(meta_net, theta, losses, hp.normalize_weights)
    grads = torch.autograd.grad((weights * losses).mean(), list(params.values()), create_graph=True)
    ahead, momentum = hp.sgd(params, dict(zip(params, grads)), state["momentum"], lr)
    meta_loss = mean_loss(model, ahead, state["buffers"], xm, ym)
    g = torch.autograd.grad(meta_loss, list(theta.values()))
    detached = lambda d: {k: v.detach() for k, v in d.items()}
    return MetaGrad(dict(zip(theta, g)), meta_loss.detach(), (detached(ahead), detached(momentum)))


# name (the meta_grad setting) -> method(model, meta_net, state, batch, meta_batch, lr, hp,
# train, sums); a new method is one function of that signature and one line here
META_GRADS: dict[str, Callable[..., MetaGrad]] = {
    "jvp": jvp_meta_grad,
    "double_backward": double_backward_meta_grad,
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
    sums = Sums(state["scaler"]["scale"] if hp.fp16 else 1.0, reduce)
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
        weights = sample_weights(meta_net, meta_params, train.losses, hp.normalize_weights, reduce)
        params, momentum = hp.sgd(
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
    means = reduce.sum([torch.stack(means) / reduce.world])[0]  # over the global batch
    grad_norm = torch.stack([g.square().sum() for g in out.meta_grad.values()]).sum().sqrt()
    return new_state, {
        "loss": means[0],
        "weighted_loss": means[1],
        "meta_loss": out.meta_loss,
        "mean_weight": means[2],
        "meta_grad_norm": grad_norm,
    }


def erm_step(
    model: nn.Module,
    meta_net: nn.Module | None,
    state: dict,
    batch: Batch,
    meta_batch: Batch | None,
    lr: float,
    hp: StepHP,
    reduce: Reduce = LOCAL,
) -> tuple[dict, dict]:
    """Plain training with uniform weights: the baseline, same signature as `mwn_step`."""
    return loss_step(model, state, batch, lr, hp, reduce, lambda ce, y: ce)


def loss_step(model, state, batch, lr, hp: StepHP, reduce: Reduce, transform) -> tuple[dict, dict]:
    """One SGD step on the batch mean of transform(CE per sample, labels) (ERM: CE itself)."""
    x, y = batch
    sums = Sums(state["scaler"]["scale"] if hp.fp16 else 1.0, reduce)

    def mean_and_aux(p):
        ce, new_buffers = per_sample_loss(model, p, state["buffers"], x, y, hp.amp)
        return transform(ce, y).mean(), (new_buffers, ce.detach())

    g, loss, (new_buffers, ce) = sums.grad_of_mean(mean_and_aux, state["params"], has_aux=True)
    params, momentum = hp.sgd(state["params"], g, state["momentum"], lr)
    new_state = {
        **state,
        "params": params,
        "buffers": reduce.buffers(new_buffers),
        "momentum": momentum,
    }
    if hp.fp16:
        new_state = skip_if_overflow(state, new_state, params)
    (ce_mean,) = reduce.sum([ce.mean() / reduce.world])
    return new_state, {"loss": ce_mean, "weighted_loss": loss}


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
    sums = Sums(state["scaler"]["scale"] if hp.fp16 else 1.0, reduce)
    train = train_pass(model, meta_net, state, batch, hp, reduce)
    g = sums.pull(train.pullback, train.weights, n)
    params, momentum = hp.sgd(state["params"], g, state["momentum"], lr)
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
    means = reduce.sum([torch.stack(means) / reduce.world])[0]
    return new_state, {"loss": means[0], "weighted_loss": means[1], "mean_weight": means[2]}
