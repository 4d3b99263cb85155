"""Runs trained together (`hydra/launcher=vmap`): K runs that differ only in what one step can
take per run are stacked along a leading dimension and advanced by one `torch.func.vmap`ped step.

What may differ within a group (VECTORISED): the seed (init, meta split, long tail, batch order,
augmentation, noise), the learning rate and its schedule, the weight decays, the meta learning
rate, the imbalance factor, the label noise, the meta set's size, the focal and class-balanced
constants, and the meta-net's hidden size: every run's meta-net is padded to the group's largest
with inert units (incoming and outgoing weights zero; with ReLU, their gradients and Adam
updates are exactly zero, so they stay zero and the first `hidden_size` units train as the
unpadded net would). Anything else (dataset, model, method, batch sizes, ...) puts jobs into
groups of their own.

Every run keeps its own data on the device, its own batches, and its own run folder with what a
single run writes there (metrics.jsonl, checkpoints of its own unpadded state, summary.json,
plots): a run can be resumed by either launcher. A run that diverges is frozen (its slice is
still computed, never recorded) and fails alone; a run with a shorter schedule finishes early.
"""

from __future__ import annotations

import json
from dataclasses import replace

import torch
from omegaconf import DictConfig, OmegaConf
from torch.func import vmap
from torch.utils._pytree import tree_map

from mwn.config import ConfigError
from mwn.core.methods import Schedule, build_steps
from mwn.core.sums import LOCAL, Reduce
from mwn.run import checkpoint
from mwn.run.accel import make_step
from mwn.run.build import new_meta_net

# StepHP fields that may differ per run: they travel in the stacked state, one value per run
PER_RUN_HP = ("meta_lr", "weight_decay", "meta_weight_decay", "focal_gamma")
# the settings (dotted) that may differ within a group; the rest must be equal
VECTORISED = {
    "seed",
    "imbalance",
    "noise",
    "noise_rate",
    "meta_per_class",
    "val_per_class",
    "train_per_class",
    "lr",
    "lr_milestones",
    "lr_gamma",
    "epochs",
    "lr_epochs",
    "train_iters",
    "hidden_size",
    "meta_init",
    "class_balanced_beta",
    "resume",
    "resume_fallback",
    *PER_RUN_HP,
}


# ---------------------------------------------------------------- the vectorised step


def vectorised(step):
    """A step function (mwn.core.methods) over K stacked runs: every tensor of the state, the
    batches and the learning rates has a leading run dimension; state["hp"] holds the per-run
    values of PER_RUN_HP. Same signature as `step`, so mwn.run.accel.make_step wraps it alike."""

    def group_step(model, meta_net, state, batch, meta_batch, lr, hp, reduce: Reduce = LOCAL):
        def one(state, batch, meta_batch, lr):
            return step(model, meta_net, state, batch, meta_batch, lr, replace(hp, **state["hp"]))

        in_dims = (0, 0, None if meta_batch is None else 0, 0)  # ERM: no meta batch
        return vmap(one, in_dims, randomness="error")(state, batch, meta_batch, lr)

    return group_step


def stack(trees: list) -> dict:
    """K pytrees of tensors (equal structure and shapes) as one of stacked tensors."""
    return tree_map(lambda *leaves: torch.stack(leaves), *trees)


def resized(state: dict, shapes: dict[str, torch.Size]) -> dict:
    """The state with its meta-net parameters and Adam moments zero-padded to, or cut back to,
    `shapes` (the meta-net's parameter shapes at another hidden size)."""

    def fit(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if t.shape == shape:
            return t
        if all(a >= b for a, b in zip(t.shape, shape)):  # cut back
            return t[tuple(slice(0, n) for n in shape)]
        out = t.new_zeros(shape)
        out[tuple(slice(0, n) for n in t.shape)] = t
        return out

    fitted = lambda tensors: {k: fit(v, shapes[k]) for k, v in tensors.items()}
    opt = state["meta_opt"]
    return {
        **state,
        "meta_params": fitted(state["meta_params"]),
        "meta_opt": {
            **opt,
            "exp_avg": fitted(opt["exp_avg"]),
            "exp_avg_sq": fitted(opt["exp_avg_sq"]),
        },
    }


def meta_shapes(meta_net: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in meta_net.named_parameters()}


def run_state(state: dict, k: int, shapes: dict[str, torch.Size]) -> dict:
    """Run k's state out of the stacked one (views), as a single run holds it: no per-run
    hyperparameters, the meta-net at its own hidden size."""
    own = tree_map(lambda t: t[k], {key: v for key, v in state.items() if key != "hp"})
    return resized(own, shapes)


def group_state(states: list[dict], hps: list[dict], shapes: dict[str, torch.Size]) -> dict:
    """The stacked state of a group: each run's state padded to the group's meta-net, with its
    per-run hyperparameters as tensors of the parameters' dtype."""
    p = next(iter(states[0]["params"].values()))
    as_tensors = lambda hp: {
        k: torch.tensor(float(v), dtype=p.dtype, device=p.device) for k, v in hp.items()
    }
    return stack([{**resized(s, shapes), "hp": as_tensors(hp)} for s, hp in zip(states, hps)])


# ---------------------------------------------------------------- grouping jobs


def group_key(cfg: DictConfig) -> str:
    """What must be equal for two jobs to share a group (their settings but VECTORISED)."""
    flat = checkpoint.flat(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    return json.dumps({k: v for k, v in flat.items() if k not in VECTORISED}, sort_keys=True)


def plan_groups(cfgs: list[DictConfig], max_runs: int) -> list[list[int]]:
    """Job indices in groups of at most max_runs jobs that can share one step, in job order."""
    by_key: dict[str, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        by_key.setdefault(group_key(cfg), []).append(i)
    return [ids[i : i + max_runs] for ids in by_key.values() for i in range(0, len(ids), max_runs)]


# ---------------------------------------------------------------- the runs in the loop


def group_schedule(runs: list) -> Schedule:
    """The one schedule of a group's step: its runs' meta_start (in iterations) must agree; the
    meta-net is fixed only when every run's meta_lr is 0 (a run with meta_lr 0 among others
    takes the meta update, whose Adam step with learning rate 0 leaves its meta-net as it is)."""
    starts = sorted({r.schedule.meta_start for r in runs})
    if len(starts) > 1:
        raise ConfigError(
            f"meta_start: the runs of one vectorised group start meta-learning at iterations "
            f"{starts} (meta_start_epoch in epochs of training sets of different sizes); give "
            "meta_start in iterations, or run them with hydra/launcher=basic"
        )
    return replace(runs[0].schedule, fixed=all(r.schedule.fixed for r in runs))


class Vmapped:
    """What vmap adds to the loop (mwn.run.loop): the members' states stacked, padded to the
    group's meta-net, one vmapped step; their batches and learning rates stacked each
    iteration, each run's state and metrics sliced back out for what follows its step. The
    loop shows the group's progress (each run only notes its validations)."""

    own_progress = True

    def __init__(self, members: list) -> None:
        first = members[0].run
        cfg, device = first.cfg, first.device
        meta_net = new_meta_net(cfg, max(m.run.cfg.hidden_size for m in members)).to(device)
        shapes = meta_shapes(meta_net)
        self.shapes = [meta_shapes(m.run.meta_net) for m in members]  # each run's own
        hps = [{k: getattr(m.run.hp, k) for k in PER_RUN_HP} for m in members]
        self.state = group_state([m.state for m in members], hps, shapes)
        for m in members:
            m.state = None
        self.schedule = group_schedule([m.run for m in members])
        self.steps = build_steps(
            first.method,
            self.schedule,
            max(m.run.cfg.train_iters for m in members),
            lambda fn: make_step(
                vectorised(fn), first.model, meta_net, first.hp, cfg.compile, cfg.cuda_graphs
            ),
        )
        self.device = device

    def inputs(self, drawn: list, lrs: list[float]) -> tuple:
        batch = stack([d[0] for d in drawn])
        meta_batch = None if drawn[0][1] is None else stack([d[1] for d in drawn])
        return batch, meta_batch, torch.tensor(lrs, device=self.device)

    def finite(self, metrics: dict) -> list[list[bool]]:
        """Per run, whether each metric is finite (one host sync for all)."""
        return torch.isfinite(torch.stack(list(metrics.values()), 1)).tolist()

    def own(self, state: dict, k: int) -> dict:
        return run_state(state, k, self.shapes[k])

    def metrics(self, metrics: dict, k: int) -> dict:
        return {n: v[k] for n, v in metrics.items()}
