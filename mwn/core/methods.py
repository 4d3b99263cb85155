"""The training methods (the `method` setting): each one record of what a run needs from it.

A step function has one signature,
    step(model, meta_net, state, batch, meta_batch, lr, hp, reduce) -> (new state, metrics),
and a new method is its step function and one line in METHODS (the config's `method` values
are METHODS' keys; nothing outside this file names a method). A `Schedule` says which of a
method's steps runs at each iteration: plain cross-entropy before `meta_start`, then the
method's step with its meta update every `meta_interval`-th iteration and the step between meta
updates at the others (at every one when the meta-net is fixed).
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
    """A training method (a `method=` value): its step functions, and what a run must give it
    (a meta batch, a meta-net, run constants from the class counts)."""

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

    def step_of(self, role: str) -> StepFn:
        """The step of a Schedule role: meta (with the meta update), between, or plain."""
        return {"meta": self.step, "between": self.between, "plain": erm_step}[role]


@dataclass(frozen=True)
class Schedule:
    """Which step runs at iteration `it`: "plain" (ERM's) before meta_start, then "meta" (the
    method's, with its meta update) at meta_start and every meta_interval-th iteration after,
    "between" (the weighted step with the current meta-net) at the others, or at all of them
    when the meta-net is fixed (meta_lr = 0: it would not change)."""

    meta_interval: int = 1
    meta_start: int = 0
    fixed: bool = False

    def role(self, it: int) -> str:
        if it < self.meta_start:
            return "plain"
        if self.fixed or (it - self.meta_start) % self.meta_interval:
            return "between"
        return "meta"

    def roles(self, train_iters: int) -> list[str]:
        """The roles that occur in iterations 0..train_iters-1, in a fixed order (so that only
        the steps a run takes are built)."""
        used = {"plain": self.meta_start > 0 and train_iters > 0}
        used["meta"] = not self.fixed and train_iters > self.meta_start
        used["between"] = train_iters > self.meta_start and (self.fixed or self.meta_interval > 1)
        return [r for r in ("meta", "between", "plain") if used[r]]

    @classmethod
    def of(cls, cfg) -> Schedule:
        """A composed config's (its schedule resolved to iterations); a method without a
        meta-net has its own step only."""
        if not METHODS[str(cfg.method)].meta_net:
            return cls(int(cfg.meta_interval))
        return cls(int(cfg.meta_interval), int(cfg.meta_start), float(cfg.meta_lr) == 0.0)


METHODS: dict[str, Method] = {
    "mwn": Method(mwn_step, between=mwn_weighted_step, meta_batch=True, meta_net=True),
    "erm": Method(erm_step),
    "focal": Method(focal_step),
    "class_balanced": Method(class_balanced_step, constants=class_balanced_constants),
    "l2rw": Method(l2rw_step, meta_batch=True),
}
"""The methods by name: the config's `method` values, and `MetaReweighter(method=...)`'s."""


def build_steps(method: Method, schedule: Schedule, train_iters: int, wrap) -> dict:
    """{role: wrap(step)} for the roles the schedule takes in train_iters iterations."""
    return {r: wrap(method.step_of(r)) for r in schedule.roles(train_iters)}
