"""The functional core as the command line uses it: the step's hyperparameters with the command
line's defaults, the state of iteration 0 for a model and a meta-net, and a method's step as a
pure function of (state, batch, meta batch, lr), which `torch.func.vmap` can map over runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields, replace

from torch import nn

from mwn.core.methods import METHODS
from mwn.core.models import extract_state
from mwn.core.step import OPTIMIZERS, StepHP
from mwn.core.step import init_state as _init_state
from mwn.core.sums import LOCAL, Reduce
from mwn.core.types import Batch


def hyperparams(**changes) -> StepHP:
    """The step's hyperparameters of `python -m mwn.train` (conf/config.yaml), with `changes`
    (StepHP's field names: optimizer, momentum, weight_decay, meta_lr, rollback, ...)."""
    from mwn.config import compose_config

    known = {f.name for f in fields(StepHP)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise TypeError(
            f"hyperparams: no setting {unknown[0]!r}; allowed: {', '.join(sorted(known))}"
        )
    if "optimizer" in changes and changes["optimizer"] not in OPTIMIZERS:
        raise ValueError(
            f"optimizer={changes['optimizer']!r}: allowed values are {' | '.join(OPTIMIZERS)}"
        )
    return replace(StepHP.from_config(compose_config()), **changes)


def init_state(
    model: nn.Module,
    meta_net: nn.Module | None = None,
    hp: StepHP | None = None,
    constants: dict | None = None,
) -> dict:
    """The state of iteration 0 (mwn.core.step) for a model and a meta-net (their current
    parameters and buffers, copied), with the optimiser state of `hp.optimizer` and the fp16
    loss scale when hp.fp16, and any run constants (class_weights for class_balanced, ...)."""
    hp = hp or hyperparams()
    params, buffers = extract_state(model)
    meta = extract_state(meta_net)[0] if meta_net is not None else None
    state = _init_state(params, buffers, meta, hp.fp16, hp.optimizer)
    return {**state, **(constants or {})}


def step_fn(
    model: nn.Module,
    meta_net: nn.Module | None,
    hp: StepHP,
    method: str = "mwn",
    reduce: Reduce = LOCAL,
) -> Callable[[dict, Batch, Batch | None, float], tuple[dict, dict]]:
    """`method`'s step as step(state, batch, meta_batch, lr) -> (new state, metrics): a pure
    function of its arguments (the model and meta-net are only its architecture)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: allowed values are {' | '.join(METHODS)}")
    run = METHODS[method].step

    def step(state: dict, batch: Batch, meta_batch: Batch | None, lr):
        return run(model, meta_net, state, batch, meta_batch, lr, hp, reduce)

    return step
