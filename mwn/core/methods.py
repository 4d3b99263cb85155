"""The training methods (the `method` setting): each one record of what a run needs from it.

A step function has one signature,
    step(model, meta_net, state, batch, meta_batch, lr, hp, reduce) -> (new state, metrics),
and a new method is its step function and one line in METHODS (the config's `method` values
are METHODS' keys; nothing outside this file names a method).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mwn.core.baselines import (
    class_balanced_constants,
    class_balanced_step,
    erm_step,
    focal_step,
    l2rw_step,
)
from mwn.core.meta import mwn_step, mwn_weighted_step
from mwn.core.step import StepHP
from mwn.core.types import StepFn, Tensors


def _no_constants(counts: list[int], hp: StepHP) -> Tensors:
    return {}


@dataclass(frozen=True)
class Method:
    step: StepFn  # one iteration (with the meta update, for a method that has one)
    between: StepFn | None = None  # the iteration between meta updates; None: meta_interval=1
    meta_batch: bool = False  # reads the clean meta set (a meta batch every meta update)
    meta_net: bool = False  # learns a meta-net (its weighting is validated and reported)
    # the run constants it puts in the state at iteration 0, from the training set's class
    # counts (vectorised runs may differ in them: they travel in the stacked state)
    constants: Callable[[list[int], StepHP], Tensors] = _no_constants

    @property
    def has_constants(self) -> bool:
        """Whether it puts run constants in the state (it needs the class counts)."""
        return self.constants is not _no_constants

    def steps(self, meta_interval: int) -> list[StepFn]:
        """Its step; with meta_interval > 1 also the one between meta updates."""
        return [self.step] if meta_interval == 1 else [self.step, self.between]


METHODS: dict[str, Method] = {
    "mwn": Method(mwn_step, between=mwn_weighted_step, meta_batch=True, meta_net=True),
    "erm": Method(erm_step),
    "focal": Method(focal_step),
    "class_balanced": Method(class_balanced_step, constants=class_balanced_constants),
    "l2rw": Method(l2rw_step, meta_batch=True),
}


def step_at(steps: list, it: int, meta_interval: int):
    """The step of iteration `it` among Method.steps: the method's (with its meta update) every
    meta_interval-th iteration, the one between meta updates otherwise."""
    return steps[0] if it % meta_interval == 0 else steps[1]
