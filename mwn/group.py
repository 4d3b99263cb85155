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

import contextlib
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.func import vmap
from torch.utils._pytree import tree_map

from mwn import checkpoint
from mwn.accel import make_step
from mwn.distributed import LOCAL, ONE, Reduce
from mwn.models import MetaNet
from mwn.monitor import Progress
from mwn.optim import step_lr
from mwn.report import plot_run_or_note
from mwn.train import (
    KNOWN_ERRORS,
    NonFinite,
    Preempted,
    Recorder,
    Run,
    StopFlag,
    Tally,
    after_step,
    build_run,
    fail_job,
    result_line,
    resume,
    run_folder,
    step_at,
    step_functions,
    summarise,
)

log = logging.getLogger(__name__)

# StepHP fields that may differ per run: they travel in the stacked state, one value per run
PER_RUN_HP = ("meta_lr", "weight_decay", "meta_weight_decay", "focal_gamma")
# the settings (dotted) that may differ within a group; the rest must be equal
VECTORISED = {
    "seed",
    "imbalance",
    "noise",
    "noise_rate",
    "meta_per_class",
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
    """A step function (mwn.methods.STEPS) over K stacked runs: every tensor of the state, the
    batches and the learning rates has a leading run dimension; state["hp"] holds the per-run
    values of PER_RUN_HP. Same signature as `step`, so mwn.accel.make_step wraps it alike."""

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


# ---------------------------------------------------------------- training a group


@dataclass
class Member:
    """One run of a group: what a single run carries, and how it ended."""

    job_dir: Path  # Hydra's job folder (error.json goes there, as for a single run)
    run: Run
    tally: Tally
    recorder: Recorder
    lock: contextlib.ExitStack  # holds the run folder
    state: dict | None  # the run's own state until the group stacks it
    shapes: dict[str, torch.Size] = field(default_factory=dict)  # its meta-net's parameters
    summary: dict | None = None
    ended: bool = False  # finished or failed: its slice is no longer recorded

    def live(self, it: int) -> bool:
        return not self.ended and it < self.run.cfg.train_iters

    def finish(self, state: dict) -> None:
        """Its schedule is done: summary.json, plots, the result line."""
        self.recorder.__exit__(None, None, None)
        self.tally.elapsed_s = self.recorder.elapsed_s(self.tally)
        try:
            self.summary = summarise(self.run, state, self.tally)
        except KNOWN_ERRORS as e:
            return self.fail(e)
        self.lock.close()
        self.ended = True
        plot_run_or_note(self.run.out_dir)
        print(f"{self.run.out_dir.name}: {result_line(self.summary)}", flush=True)

    def fail(self, e: Exception) -> None:
        fail_job(self.job_dir, e)
        self.lock.close()
        self.ended = True


def train_groups(cfgs: list[DictConfig], job_dirs: list[Path], max_runs: int) -> list[dict | None]:
    """Train the jobs (composed configs and Hydra's job folders) in vectorised groups of at most
    max_runs; returns each job's summary, or None where it failed (its error.json says why)."""
    results: list[dict | None] = [None] * len(cfgs)
    groups = plan_groups(cfgs, max_runs)
    for n, ids in enumerate(groups):
        names = ", ".join(job_dirs[i].name for i in ids)
        log.info(f"vectorised group {n + 1} of {len(groups)}: {len(ids)} runs ({names})")
        summaries = train_group([cfgs[i] for i in ids], [job_dirs[i] for i in ids])
        for i, summary in zip(ids, summaries):
            results[i] = summary
    return results


def train_group(cfgs: list[DictConfig], job_dirs: list[Path]) -> list[dict | None]:
    """Build every run as a single run would, resume each from its own checkpoints, and train
    those that start at the same iteration together."""
    with contextlib.ExitStack() as stack:
        stop = stack.enter_context(StopFlag())
        members = []
        for cfg, job_dir in zip(cfgs, job_dirs):
            (job_dir / "error.json").unlink(missing_ok=True)
            stack.enter_context(_log_to(job_dir / "train.log"))
            lock = stack.enter_context(contextlib.ExitStack())
            try:
                run = build_run(cfg, job_dir, ONE)
                lock.enter_context(checkpoint.hold(run.out_dir))
                state, tally = resume(run)
                recorder = Recorder(run, tally, stop, label=job_dir.name)
            except KNOWN_ERRORS as e:
                checkpoint.restore_hydra_files(run_folder(cfg, job_dir))  # as mwn.train's train
                fail_job(job_dir, e)
                lock.close()
                continue
            recorder.rng = checkpoint.rng_states()  # as this run left them (never drawn from)
            stack.enter_context(recorder)
            members.append(Member(job_dir, run, tally, recorder, lock, state))
        by_start: dict[int, list[Member]] = {}
        for m in members:
            by_start.setdefault(m.tally.start, []).append(m)
        for together in by_start.values():
            train_together(together, stop)
        by_dir = {m.job_dir: m.summary for m in members}
        return [by_dir.get(job_dir) for job_dir in job_dirs]


def train_together(members: list[Member], stop: StopFlag) -> None:
    """The loop of mwn.train, for K runs at once: every run's batches and learning rate, one
    vectorised step, then each live run's share of what follows a step (mwn.train.after_step)."""
    for m in members:
        if m.tally.start >= m.run.cfg.train_iters:  # done before: only the summary is missing
            m.finish(m.state)
    members = [m for m in members if not m.ended]
    if not members:
        return
    first = members[0].run
    cfg, device = first.cfg, first.device
    meta_net = MetaNet(max(m.run.cfg.hidden_size for m in members), cfg.num_layers).to(device)
    shapes = meta_shapes(meta_net)
    for m in members:
        m.shapes = meta_shapes(m.run.meta_net)
    hps = [{k: getattr(m.run.hp, k) for k in PER_RUN_HP} for m in members]
    state = group_state([m.state for m in members], hps, shapes)
    for m in members:
        m.state = None
    steps = [
        make_step(vectorised(fn), first.model, meta_net, first.hp, cfg.compile, cfg.cuda_graphs)
        for fn in step_functions(cfg)
    ]
    start, end = members[0].tally.start, max(m.run.cfg.train_iters for m in members)
    progress = Progress(cfg.progress, end, start)
    try:
        for it in range(start, end):
            # every run's batches and learning rate (finished and failed runs' too: the stacked
            # shapes stay; their slices are never recorded)
            drawn = [m.run.batches(it) for m in members]
            batch = stack([d[0] for d in drawn])
            meta_batch = None if drawn[0][1] is None else stack([d[1] for d in drawn])
            lrs = [
                step_lr(m.run.cfg.lr, it, m.run.cfg.lr_milestones, m.run.cfg.lr_gamma)
                for m in members
            ]
            step = step_at(steps, it, cfg.meta_interval)
            state, metrics = step(state, batch, meta_batch, torch.tensor(lrs, device=device))
            finite = torch.isfinite(torch.stack(list(metrics.values()), 1)).tolist()
            stopped = []
            for k, m in enumerate(members):
                if not m.live(it):
                    continue
                bad = [] if cfg.fp16 else [n for n, ok in zip(metrics, finite[k]) if not ok]
                own = lambda s, k=k, m=m: lambda: run_state(s, k, m.shapes)
                args = (own(state), own(step.last_state), {n: v[k] for n, v in metrics.items()})
                try:
                    after_step(
                        m.run, it, lrs[k], *args, bad, drawn[k][0], drawn[k][2], m.tally, m.recorder
                    )
                except NonFinite as e:
                    m.fail(e)
                except Preempted:
                    stopped.append(m.run.out_dir.name)
                else:
                    if it + 1 == m.run.cfg.train_iters:
                        m.finish(own(state)())
            progress.update(it + 1, None)
            if stopped:
                raise Preempted(
                    f"stopped by {stop.raised or 'SIGTERM'} at iteration {it + 1}; checkpoints "
                    f"of {len(stopped)} runs ({', '.join(stopped)}); rerun the same command to "
                    "resume"
                )
    except (Preempted, KeyboardInterrupt):
        raise
    except Exception as e:  # a bug in the shared step fails every run still going
        for m in members:
            if not m.ended:
                m.fail(e)
    finally:
        progress.close()


@contextlib.contextmanager
def _log_to(path: Path):
    """Within the block, the log also goes to `path` (each job's train.log gets its group's)."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
