"""The baselines of the MWN paper's Table 1, as step functions with `mwn_step`'s signature:
ERM (uniform weights), focal loss, class-balanced loss, and learning to reweight (L2RW).

- Focal loss (Lin et al. 2017): L_i = (1 - p_i)^gamma * CE_i with p_i = exp(-CE_i), the
  predicted probability of the true class; gamma = 0 is cross-entropy.
- Class-balanced loss (Cui et al. 2019): class c with n_c training images weighs
  (1 - beta) / (1 - beta^n_c), normalised so that the C weights sum to C; the step minimises
  the batch mean of w_{y_i} CE_i. The weights are a constant of the run, kept in the state
  (`class_weights`), so that runs with other class counts can share one vectorised step.
- L2RW (Ren et al. 2018): per iteration, the weights are u_i = -d L_meta(w'(eps)) / d eps_i at
  eps = 0, where w'(eps) is the optimiser's step on sum_i eps_i L_i(w):
  u_i = (D g) . grad L_i(w) with g = grad L_meta(w'(0)) and D the lookahead scale (lr, or
  lr (1 + momentum) with Nesterov; a diagonal for Adam(W)). The n dot products are one JVP, as
  in MWN's exact meta-gradient. Then
  v = max(u, 0) / sum max(u, 0) (all zero when no u_i is positive) and a real step on
  sum_i v_i L_i. No meta-net is learned.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import vjp

from mwn.core.step import StepHP, loss_dots, mean_loss, per_sample_loss, scaled_tangent
from mwn.core.sums import LOCAL, Reduce, Sums, skip_if_overflow
from mwn.core.types import Batch, Tensors


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
    """One optimiser step on the batch mean of transform(CE per sample, labels) (ERM: CE itself)."""
    x, y = batch
    sums = hp.sums(state, reduce)

    def mean_and_aux(p):
        ce, new_buffers = per_sample_loss(model, p, state["buffers"], x, y, hp.amp)
        return transform(ce, y).mean(), (new_buffers, ce.detach())

    g, loss, (new_buffers, ce) = sums.grad_of_mean(mean_and_aux, state["params"], has_aux=True)
    params, momentum = hp.update(state["params"], g, state["momentum"], lr)
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


def focal(ce: torch.Tensor, gamma: float) -> torch.Tensor:
    """Focal loss per sample from the cross-entropy per sample."""
    return (1 - torch.exp(-ce)).pow(gamma) * ce


def class_balanced_weights(counts: list[int], beta: float) -> torch.Tensor:
    """Cui et al.'s effective-number weights of the classes, summing to the number of classes."""
    n = torch.tensor(counts, dtype=torch.float64)
    w = (1 - beta) / (1 - beta**n)
    return (w * len(counts) / w.sum()).float()


def class_balanced_constants(counts: list[int], hp: StepHP) -> Tensors:
    """The run constant of method=class_balanced: its class weights, in the state."""
    return {"class_weights": class_balanced_weights(counts, hp.class_balanced_beta)}


def focal_step(
    model: nn.Module,
    meta_net: nn.Module | None,
    state: dict,
    batch: Batch,
    meta_batch: Batch | None,
    lr: float,
    hp: StepHP,
    reduce: Reduce = LOCAL,
) -> tuple[dict, dict]:
    """Plain training on the focal loss (gamma = hp.focal_gamma)."""
    return loss_step(model, state, batch, lr, hp, reduce, lambda ce, y: focal(ce, hp.focal_gamma))


def class_balanced_step(
    model: nn.Module,
    meta_net: nn.Module | None,
    state: dict,
    batch: Batch,
    meta_batch: Batch | None,
    lr: float,
    hp: StepHP,
    reduce: Reduce = LOCAL,
) -> tuple[dict, dict]:
    """Plain training on the class-balanced cross-entropy (state["class_weights"])."""
    w = state["class_weights"]
    return loss_step(model, state, batch, lr, hp, reduce, lambda ce, y: w[y] * ce)


def l2rw_scores(model, state, batch, meta_batch, lr, hp: StepHP, sums: Sums):
    """u_i = -d L_meta(w'(eps)) / d eps_i at eps = 0 for this rank's samples, the meta loss,
    and the train pass (losses, their VJP, the BatchNorm buffers they moved)."""
    params, buffers = state["params"], state["buffers"]
    (x, y), (xm, ym) = batch, meta_batch
    losses, pullback, new_buffers = vjp(
        lambda p: per_sample_loss(model, p, buffers, x, y, hp.amp), params, has_aux=True
    )
    # w'(0): the optimiser's step with no loss gradient (momentum and weight decay still move w)
    zero = {k: torch.zeros_like(v) for k, v in params.items()}
    ahead, _, a = hp.update_and_scale(params, zero, state["momentum"], lr)
    g_meta, meta_loss = sums.grad_of_mean(
        lambda p: mean_loss(model, p, buffers, xm, ym, hp.amp), ahead
    )
    # (J D g)_i = (D g) . grad L_i(w) for all i in one JVP, as in MWN's exact meta-gradient
    tangent, a = scaled_tangent(g_meta, a)
    jg, t = loss_dots(model, params, buffers, batch, tangent, hp, sums)
    u = jg * (a / t)
    return u, meta_loss, (losses, pullback, new_buffers)


def l2rw_step(
    model: nn.Module,
    meta_net: nn.Module | None,
    state: dict,
    batch: Batch,
    meta_batch: Batch,
    lr: float,
    hp: StepHP,
    reduce: Reduce = LOCAL,
) -> tuple[dict, dict]:
    """One L2RW iteration: weights from the meta batch's gradient, then the weighted step."""
    n = batch[1].shape[0] * reduce.world
    sums = hp.sums(state, reduce)
    u, meta_loss, (losses, pullback, new_buffers) = l2rw_scores(
        model, state, batch, meta_batch, lr, hp, sums
    )
    # v = max(u, 0) / sum max(u, 0) over the global batch, zero when nothing is positive
    kept = u.clamp(min=0).detach()
    total = reduce.sum_over_ranks(kept.sum())
    v = torch.where(total > 0, kept / total.clamp(min=torch.finfo(kept.dtype).tiny), 0.0)
    # the real step on sum_i v_i L_i = (1/n) sum_i (n v_i) L_i
    params, momentum = hp.update(
        state["params"], sums.pull(pullback, v * n, n), state["momentum"], lr
    )
    new_state = {
        **state,
        "params": params,
        "buffers": reduce.buffers(new_buffers),
        "momentum": momentum,
    }
    if hp.fp16:
        new_state = skip_if_overflow(state, new_state, params)
    stats = [losses.mean(), (v * n * losses).mean(), (u > 0).float().mean()]
    loss, weighted, kept_fraction = sums.global_means(stats)
    return new_state, {
        "loss": loss,
        "weighted_loss": weighted,
        "meta_loss": meta_loss,
        "kept_fraction": kept_fraction,
    }
