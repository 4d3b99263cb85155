"""What every step function shares: the hyperparameters of an iteration, the state at iteration 0,
the per-sample loss, the meta-net's weights, and the dot products of one JVP.

State is a plain dict:
    params, buffers    classifier parameters and BatchNorm buffers   {name: tensor}
    momentum           the classifier optimiser's state: SGD's momentum buffers (same keys as
                       params), or Adam(W)'s {step, exp_avg, exp_avg_sq}
    meta_params        meta-net parameters                           {name: tensor}
    meta_opt           Adam state of the meta-net (step, exp_avg, exp_avg_sq)
    scaler             fp16 only: the dynamic loss scale (mwn.core.sums)
    <other keys>       run constants a method or meta-net puts there (class_weights, ...)
Nothing here reads a clock, a file or a global RNG, so one iteration can be vmapped.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from mwn.core.batchnorm import jvp_rule
from mwn.core.optim import (
    adam_init,
    adam_step,
    adam_step_and_scale,
    sgd_init,
    sgd_lookahead_scale,
    sgd_step,
)
from mwn.core.sums import LOCAL, Reduce, Sums, scaler_init
from mwn.core.tangents import loss_tangent
from mwn.core.types import Batch, Tensors

# torch.func's JVP of batch norm scripts a decomposition once; torch warns about its own use
warnings.filterwarnings(
    "ignore", message="`torch.jit.script` is deprecated", category=FutureWarning
)

# the keys of the optimisation state (hp: a vectorised group's per-run hyperparameters); any
# other top-level key is a run constant
STATE_KEYS = ("params", "buffers", "momentum", "meta_params", "meta_opt", "scaler", "hp")


@dataclass(frozen=True)
class StepHP:
    """The hyperparameters of one iteration that stay fixed during a run. No defaults here: the
    composed config (conf/config.yaml) is their one source, through `from_config`."""

    optimizer: str  # the classifier's: a key of OPTIMIZERS (sgd | adam | adamw)
    momentum: float  # sgd
    weight_decay: float  # sgd, adam: L2 in the gradient; adamw: decoupled
    nesterov: bool  # sgd
    adam_betas: tuple[float, float]  # adam, adamw
    adam_eps: float  # adam, adamw
    meta_lr: float
    meta_weight_decay: float
    normalize_weights: bool  # weights * n / sum(weights), as the paper-era MWN scripts
    rollback: bool  # redo the classifier step with the updated meta-net (Algorithm 1)
    fp16: bool  # float16 autocast for the classifier, dynamic loss scaling
    bf16: bool  # bfloat16 autocast for the classifier (fp32's range: no loss scaling)
    meta_grad: str  # a key of mwn.core.meta.META_GRADS
    finite_difference_eps: float  # meta_grad=finite_difference: the step, as a parameter norm
    focal_gamma: float  # method=focal: the exponent of (1 - p)
    class_balanced_beta: float  # method=class_balanced: its run constant's beta

    @classmethod
    def from_config(cls, cfg) -> StepHP:
        """The fields of the same names in a composed config (names of a set as plain str)."""

        def value(v):
            if isinstance(v, Enum):
                return v.value
            return tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v

        return cls(**{f.name: value(cfg[f.name]) for f in fields(cls)})

    @property
    def amp(self) -> torch.dtype | None:
        """The autocast dtype of the classifier's forward passes (None: fp32)."""
        return torch.float16 if self.fp16 else torch.bfloat16 if self.bf16 else None

    def update(self, params: Tensors, grads: Tensors, opt_state, lr, differentiable=False):
        """The classifier's optimiser step -> (new params, new optimiser state); the real step
        and the lookahead are the same rule (`differentiable`: autodiff will go through it)."""
        if self.optimizer == "sgd":
            return sgd_step(
                params, grads, opt_state, lr, self.momentum, self.weight_decay, self.nesterov
            )
        return adam_step(params, grads, opt_state, lr, *self._adam(), differentiable)

    def update_and_scale(self, params: Tensors, grads: Tensors, opt_state, lr: float):
        """`update` and -d(new params)/d(gradient) at these gradients: a float for SGD (it
        does not depend on them), one tensor per parameter (a diagonal) for Adam and AdamW,
        from the same moments -> (new params, new optimiser state, scale)."""
        if self.optimizer == "sgd":
            new = self.update(params, grads, opt_state, lr)
            return *new, sgd_lookahead_scale(lr, self.momentum, self.nesterov)
        return adam_step_and_scale(params, grads, opt_state, lr, *self._adam())

    def _adam(self) -> tuple:
        betas = tuple(self.adam_betas)
        return betas, self.adam_eps, self.weight_decay, self.optimizer == "adamw"

    def sums(self, state: dict, reduce: Reduce) -> Sums:
        """The iteration's door for gradients and rank sums (mwn.core.sums): the state's loss
        scale when fp16."""
        return Sums(state["scaler"]["scale"] if self.fp16 else 1.0, reduce)


OPTIMIZERS = ("sgd", "adam", "adamw")  # torch.optim.SGD | Adam | AdamW, by their rules


def init_state(
    params: Tensors,
    buffers: Tensors,
    meta_params: Tensors | None,
    fp16: bool = False,
    optimizer: str = "sgd",
) -> dict:
    """The state at iteration 0: the classifier optimiser's fresh state (zero momentum, or
    Adam's zero moments), a fresh Adam state of the meta-net (none without one: a method that
    learns no meta-net), the fp16 loss scale."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}: allowed values are {' | '.join(OPTIMIZERS)}")
    state = {
        "params": params,
        "buffers": buffers,
        "momentum": sgd_init(params) if optimizer == "sgd" else adam_init(params),
    }
    if meta_params is not None:
        state.update(meta_params=meta_params, meta_opt=adam_init(meta_params))
    if fp16:
        state["scaler"] = scaler_init(device=next(iter(params.values())).device)
    return state


def run_constants(state: dict) -> Tensors:
    """The run constants in a state: what a method or meta-net put there at iteration 0."""
    return {k: v for k, v in state.items() if k not in STATE_KEYS}


# ---------------------------------------------------------------- losses and weights


def per_sample_loss(
    model: nn.Module,
    params: Tensors,
    buffers: Tensors,
    x: torch.Tensor,
    y: torch.Tensor,
    amp: torch.dtype | None = None,
    saved: list | None = None,
) -> tuple[torch.Tensor, Tensors]:
    """Cross-entropy per sample (B,) in training mode, and the BatchNorm buffers it updated;
    the forward under autocast to `amp` (float16, bfloat16) when given, the loss in fp32.
    With `saved` (a model that saves activations, mwn.core.tangents), the model's activations
    and then the logits are appended to it.

    BatchNorm writes its running statistics in place into the buffers it is given, so it gets
    copies: the caller's buffers stay untouched and the updated ones come back explicitly.
    """
    new_buffers = {k: v.clone() for k, v in buffers.items()}
    with torch.autocast(x.device.type, dtype=amp or torch.float16, enabled=amp is not None):
        kwargs = {} if saved is None else {"saved": saved}
        logits = functional_call(model, (params, new_buffers), (x,), kwargs, strict=True)
    if amp is not None:
        logits = logits.float()  # the loss itself in fp32
    if saved is not None:
        saved.append(logits)
    return F.cross_entropy(logits, y, reduction="none"), new_buffers


def mean_loss(model: nn.Module, params: Tensors, buffers: Tensors, x, y, amp=None):
    return per_sample_loss(model, params, buffers, x, y, amp)[0].mean()


def sample_weights(
    meta_net: nn.Module,
    meta_params: Tensors,
    losses: torch.Tensor,
    labels: torch.Tensor | None,
    constants: Tensors,
    normalize: bool,
    reduce: Reduce = LOCAL,
) -> torch.Tensor:
    """V(L_i, y_i; Theta) for detached losses (B,), their labels (None: a curve over losses
    alone) and the run constants; normalised to mean 1 (over the global batch: the sum goes
    through the ranks, differentiably) when asked."""
    w = functional_call(meta_net, meta_params, (losses.detach(), labels, constants), strict=True)
    if not normalize:
        return w
    return w * (w.numel() * reduce.world / reduce.sum_over_ranks(w.sum()))


def scaled_tangent(g: Tensors, scale: float | Tensors) -> tuple[Tensors, float]:
    """(tangent, factor) for the dot products (D g) . grad L_i of a lookahead scale D
    (StepHP.update_and_scale): a diagonal (Adam, AdamW) goes into the tangent, D g and 1; a
    number (SGD) stays a factor of the dot products, g and D."""
    if isinstance(scale, dict):
        return {k: scale[k] * v for k, v in g.items()}, 1.0
    return g, scale


def loss_dots(model, params, buffers, batch: Batch, g: Tensors, hp: StepHP, sums: Sums, saved=None):
    """(J g, t): the dot products g . grad_w L_i(w) for every sample i, all in one forward-mode
    JVP of the loss vector, times t (the factor `Sums.tangent` scaled g by; 1.0 in fp32). With
    the activations the training forward `saved` at these parameters, the tangent pass alone
    (mwn.core.tangents), without the primal forward."""
    x, y = batch
    tangent, t = sums.tangent(g)
    if saved is not None:
        return loss_tangent(model, params, saved, y, tangent), t
    # BatchNorm's cheaper forward-mode rule (mwn.core.batchnorm); attention by its composite
    # kernel (the fused CPU and flash kernels of scaled_dot_product_attention have no forward AD)
    with jvp_rule(), sdpa_kernel(SDPBackend.MATH):
        _, jg = jvp(
            lambda p: per_sample_loss(model, p, buffers, x, y, hp.amp)[0], (params,), (tangent,)
        )
    return jg, t
