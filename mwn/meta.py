"""One training iteration, as pure functions of explicit state and a batch.

State is a plain dict:
    params, buffers    classifier parameters and BatchNorm buffers   {name: tensor}
    momentum           SGD momentum buffers, same keys as params
    meta_params        meta-net parameters                           {name: tensor}
    meta_opt           Adam state of the meta-net (step, exp_avg, exp_avg_sq)
Nothing here reads a clock, a file or a global RNG, so one iteration can later be vmapped.
Under torchrun each rank passes its shard of the global batch and a `reduce` that sums over the
ranks (mwn.distributed); in one process `reduce` is the identity.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, jvp, vjp

from mwn.distributed import LOCAL, Reduce
from mwn.models import jvp_rule
from mwn.optim import adam_step, sgd_lookahead_scale, sgd_step

# torch.func's JVP of batch norm scripts a decomposition once; torch warns about its own use
warnings.filterwarnings(
    "ignore", message="`torch.jit.script` is deprecated", category=FutureWarning
)

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
    fp16: bool = False  # float16 autocast for the classifier, dynamic loss scaling
    bf16: bool = False  # bfloat16 autocast for the classifier (fp32's range: no loss scaling)
    meta_grad: str = "jvp"  # jvp (one JVP) | double_backward (the original code's reference)

    @property
    def amp(self) -> torch.dtype | None:
        """The autocast dtype of the classifier's forward passes (None: fp32)."""
        return torch.float16 if self.fp16 else torch.bfloat16 if self.bf16 else None

    def sgd(self, params: Tensors, grads: Tensors, momentum: Tensors, lr: float):
        """The classifier's optimiser step (the real one and the lookahead are the same rule)."""
        return sgd_step(
            params, grads, momentum, lr, self.momentum, self.weight_decay, self.nesterov
        )


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


def _summed(reduce: Reduce, tensors: Tensors) -> Tensors:
    return dict(zip(tensors, reduce.sum(list(tensors.values()))))


def _scaled(tensors: Tensors, factor: float | torch.Tensor) -> Tensors:
    if isinstance(factor, float) and factor == 1.0:
        return tensors
    return {k: v * factor for k, v in tensors.items()}


def exact_meta_grad(
    model: nn.Module,
    meta_net: nn.Module,
    state: dict,
    batch: Batch,
    meta_batch: Batch,
    lr: float,
    hp: StepHP,
    scale: float = 1.0,
    reduce: Reduce = LOCAL,
) -> dict:
    """The lookahead, the meta loss at it, and d(meta loss)/d(Theta) through it, exactly.

    The identity: the lookahead is w' = w - a * (grad_w (1/n) sum_i v_i L_i(w) + terms free of v),
    with a = lr (lr * (1 + momentum) for Nesterov; weight decay and the momentum buffer do not
    depend on v). So d L_meta(w') / d v_i = -(a/n) * g . grad_w L_i(w) with g = grad L_meta(w'),
    and all n dot products are ONE forward-mode JVP of the loss vector L(w) along g: no double
    backward. The chain rule through v(Theta) (meta-net, normalisation) is one small VJP.
    `scale` is the fp16 loss scale: gradients are taken of scaled losses, then unscaled.
    With several ranks, batch and meta_batch are this rank's shards; every sum over the global
    batch goes through `reduce`, so the result is the one-process result (see mwn.distributed).
    Returns the pieces the caller needs, so no forward is done twice.
    """
    params, buffers = state["params"], state["buffers"]
    (x, y), (xm, ym) = batch, meta_batch
    n = y.shape[0] * reduce.world  # the global batch size

    # train losses at w; `pullback(u)` = sum_i u_i grad L_i(w), callable more than once
    losses, pullback, new_buffers = vjp(
        lambda p: per_sample_loss(model, p, buffers, x, y, hp.amp), params, has_aux=True
    )
    weights, weights_pullback = vjp(
        lambda th: sample_weights(meta_net, th, losses, hp.normalize_weights, reduce),
        state["meta_params"],
    )
    pieces = {"losses": losses, "pullback": pullback, "new_buffers": new_buffers,
              "weights": weights}  # fmt: skip
    if hp.meta_grad == "double_backward":  # the reference: autodiff through the unrolled step
        return {**pieces, **meta_grad_double_backward(model, meta_net, state, batch, meta_batch,
                                                      lr, hp)}  # fmt: skip
    # lookahead w'(Theta): the real optimiser's step on the weighted loss
    (g_train,) = pullback(weights * (scale / n))
    g_train = _summed(reduce, g_train)
    ahead, ahead_momentum = hp.sgd(params, _scaled(g_train, 1 / scale), state["momentum"], lr)
    # meta loss at w' (BatchNorm in training mode; real running stats untouched)
    g_meta, meta_loss = grad_and_value(  # this rank's share of the global mean
        lambda p: mean_loss(model, p, buffers, xm, ym, hp.amp) * (scale / reduce.world)
    )(ahead)
    *g_sum, meta_loss = reduce.sum([*g_meta.values(), meta_loss])
    g_meta = _scaled(dict(zip(g_meta, g_sum)), 1 / scale)
    # exact meta-gradient: (J g)_i = g . grad L_i(w) in one JVP, then the VJP through v(Theta)
    tangent, t = g_meta, 1.0
    if hp.fp16:  # keep the fp16 tangents in range: the JVP is linear, so run it at max |g| = 1
        t = 1 / torch.stack([v.abs().max() for v in g_meta.values()]).max().clamp(min=1e-30)
        tangent = {k: v * t for k, v in g_meta.items()}
    with jvp_rule():  # BatchNorm's cheaper forward-mode rule (mwn.models)
        _, jg = jvp(
            lambda p: per_sample_loss(model, p, buffers, x, y, hp.amp)[0], (params,), (tangent,)
        )
    a = sgd_lookahead_scale(lr, hp.momentum, hp.nesterov)
    (meta_grad,) = weights_pullback(jg * (-a / n) / t)
    meta_grad = _summed(reduce, meta_grad)
    return {
        **pieces,
        "ahead": (ahead, ahead_momentum),
        "meta_loss": meta_loss / scale,
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
    reduce: Reduce = LOCAL,
) -> tuple[dict, dict]:
    """One Meta-Weight-Net iteration (Algorithm 1). Returns (new state, metrics as tensors).
    Under torchrun: this rank's shards of the batches, and `reduce` summing over the ranks."""
    n = batch[1].shape[0] * reduce.world  # the global batch size
    scale = state["scaler"]["scale"] if hp.fp16 else 1.0
    # 1-4. weights, lookahead, meta loss and its exact gradient in Theta
    out = exact_meta_grad(model, meta_net, state, batch, meta_batch, lr, hp, scale, reduce)
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
        weights = sample_weights(meta_net, meta_params, out["losses"], hp.normalize_weights,
                                 reduce)  # fmt: skip
        (g_train,) = out["pullback"](weights * (scale / n))
        g_train = _summed(reduce, g_train)
        params, momentum = hp.sgd(
            state["params"], _scaled(g_train, 1 / scale), state["momentum"], lr
        )
    else:
        weights = out["weights"]
        params, momentum = out["ahead"]
    new_state = {
        **state,
        "params": params,
        "buffers": reduce.buffers(out["new_buffers"]),  # moved once, by the train batch
        "momentum": momentum,
        "meta_params": meta_params,
        "meta_opt": meta_opt,
    }
    losses = out["losses"]
    means = [losses.mean(), (weights * losses).mean(), weights.mean()]
    means = reduce.sum([torch.stack(means) / reduce.world])[0]  # over the global batch
    metrics = {
        "loss": means[0],
        "weighted_loss": means[1],
        "meta_loss": out["meta_loss"],
        "mean_weight": means[2],
        "meta_grad_norm": torch.stack([g.square().sum() for g in out["meta_grad"].values()])
        .sum()
        .sqrt(),
    }
    if hp.fp16:  # overflow anywhere shows in the meta-gradient or the new parameters
        new_state = _skip_if_overflow(state, new_state, out["meta_grad"], params)
    return new_state, metrics


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
    x, y = batch
    scale = state["scaler"]["scale"] if hp.fp16 else 1.0

    def scaled_loss(p):  # this rank's share of the global mean
        losses, new_buffers = per_sample_loss(model, p, state["buffers"], x, y, hp.amp)
        return losses.mean() * (scale / reduce.world), new_buffers

    g, (loss, new_buffers) = grad_and_value(scaled_loss, has_aux=True)(state["params"])
    *g_sum, loss = reduce.sum([*g.values(), loss])
    g = dict(zip(g, g_sum))
    params, momentum = hp.sgd(state["params"], _scaled(g, 1 / scale), state["momentum"], lr)
    new_state = {**state, "params": params, "buffers": reduce.buffers(new_buffers),
                 "momentum": momentum}  # fmt: skip
    if hp.fp16:
        new_state = _skip_if_overflow(state, new_state, params)
    return new_state, {"loss": loss / scale, "weighted_loss": loss / scale}


# ---------------------------------------------------------------- fp16 loss scaling

GROWTH_INTERVAL = 2000  # as torch.amp.GradScaler: double the scale after this many good steps


def scaler_init(scale: float = 2.0**16, device: torch.device | str = "cpu") -> dict:
    """Dynamic loss-scale state, as tensors (no host sync, capturable in a CUDA graph)."""
    t = lambda v: torch.tensor(v, dtype=torch.float32, device=device)
    return {"scale": t(scale), "good_steps": t(0.0), "skipped": t(0.0)}


def _skip_if_overflow(old: dict, new: dict, *checked: Tensors) -> dict:
    """GradScaler's rule, branch-free: a step whose gradients overflowed keeps the old
    parameters and optimiser states (BatchNorm statistics still move, as in PyTorch) and halves
    the scale; after GROWTH_INTERVAL good steps in a row the scale doubles."""
    finite = torch.stack([torch.isfinite(t).all() for d in checked for t in d.values()]).all()
    keep = lambda a, b: torch.where(finite, a, b)
    pick = lambda a, b: {k: pick(a[k], b[k]) if isinstance(a[k], dict) else keep(a[k], b[k])
                         for k in a}  # fmt: skip
    s = old["scaler"]
    good = torch.where(finite, s["good_steps"] + 1, 0.0)
    grow = good >= GROWTH_INTERVAL
    scaler = {
        "scale": s["scale"] * torch.where(finite, torch.where(grow, 2.0, 1.0), 0.5),
        "good_steps": torch.where(grow, 0.0, good),
        "skipped": s["skipped"] + (~finite).float(),
    }
    fixed = {"buffers": new["buffers"], "scaler": scaler}
    return {k: fixed[k] if k in fixed else pick(new[k], old[k]) for k in old}  # same key order


def meta_grad_double_backward(
    model: nn.Module,
    meta_net: nn.Module,
    state: dict,
    batch: Batch,
    meta_batch: Batch,
    lr: float,
    hp: StepHP,
) -> dict:
    """Reference: d(meta loss)/d(Theta) by plain autograd through the unrolled lookahead
    (create_graph=True), as the original MWN code does: its own forward, a differentiable
    backward, and a backward through both. Returns meta_grad, meta_loss and the lookahead."""
    (x, y), (xm, ym) = batch, meta_batch
    params = {k: v.detach().requires_grad_() for k, v in state["params"].items()}
    theta = {k: v.detach().requires_grad_() for k, v in state["meta_params"].items()}
    losses, _ = per_sample_loss(model, params, state["buffers"], x, y)
    weights = sample_weights(meta_net, theta, losses, hp.normalize_weights)
    inner = (weights * losses).mean()
    grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
    ahead, momentum = hp.sgd(params, dict(zip(params, grads)), state["momentum"], lr)
    meta_loss = mean_loss(model, ahead, state["buffers"], xm, ym)
    g = torch.autograd.grad(meta_loss, list(theta.values()))
    detached = lambda d: {k: v.detach() for k, v in d.items()}
    return {
        "meta_grad": dict(zip(theta, g)),
        "meta_loss": meta_loss.detach(),
        "ahead": (detached(ahead), detached(momentum)),
    }
