"""The one training loop, for a single run and for a vectorised group alike.

Each iteration: every run's learning rate and batches (seeded by iteration: replayable), one
step (the plain step for a single run, the vmapped one for a group: `Plain` or
mwn.run.group.Vmapped put the runs together and take each one's share back out), then for each
run still going what follows a step (`after_step`): the finiteness check, validation and
logging, checkpoints, as `after(done, cfg)` decides from the iteration and the schedule.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mwn.core.optim import step_lr
from mwn.run.build import Run
from mwn.run.folder import KNOWN_ERRORS, NonFinite, Preempted, fail_job
from mwn.run.monitor import Progress
from mwn.run.recorder import (
    Recorder,
    StopFlag,
    Tally,
    best_key,
    summarise,
    validation,
    validation_line,
)

NOT_LOGGED = ("confusion",)  # in the validation, not in metrics.jsonl lines (C x C numbers)


@dataclass(frozen=True)
class After:
    """What follows the step of one iteration."""

    log: bool  # a metrics.jsonl line
    validate: bool  # test accuracy, the meta-net's weighting
    checkpoint: bool


def after(done: int, cfg) -> After:
    """What follows iteration `done` (1-based) under the run's schedule: a pure function."""
    last = done == cfg.train_iters
    validate = done % cfg.val_every == 0 or last
    return After(
        log=validate or done % cfg.log_every == 0,
        validate=validate,
        checkpoint=done % cfg.checkpoint_every == 0 or last,
    )


@dataclass
class Member:
    """One run in the loop: what a run carries, and how it ended."""

    job_dir: Path  # Hydra's job folder (error.json goes there)
    run: Run
    tally: Tally
    recorder: Recorder
    lock: contextlib.ExitStack  # holds the run folder
    state: dict | None  # the run's own state until the loop takes it
    isolated: bool = False  # a group's run: its errors fail it alone, as error.json
    on_finish: Callable[[Member], None] | None = None  # after its summary (plots, result line)
    summary: dict | None = None
    ended: bool = False  # finished or failed: its share is no longer recorded

    def live(self, it: int) -> bool:
        return not self.ended and it < self.run.cfg.train_iters

    def finish(self, state: dict) -> None:
        """Its schedule is done: summary.json (rank 0), the lock released, then on_finish."""
        self.recorder.__exit__(None, None, None)
        self.tally.elapsed_s = self.recorder.elapsed_s(self.tally)
        try:
            if self.run.ranks.main:
                self.summary = summarise(self.run, state, self.tally)
        except KNOWN_ERRORS as e:
            if not self.isolated:
                raise
            return self.fail(e)
        self.lock.close()
        self.ended = True
        if self.on_finish is not None and self.summary is not None:
            self.on_finish(self)

    def fail(self, e: Exception) -> None:
        fail_job(self.job_dir, e)
        self.lock.close()
        self.ended = True


class Plain:
    """A single run: its own state and its plain (not vmapped) step, so its arithmetic is the
    step's own. Its Recorder shows the progress."""

    own_progress = False  # the loop shows none of its own

    def __init__(self, members: list[Member]) -> None:
        (member,) = members
        self.steps, self.state = member.run.steps, member.state
        self.schedule = member.run.schedule

    def inputs(self, drawn: list, lrs: list[float]) -> tuple:
        (batch, meta_batch, _), lr = drawn[0], lrs[0]
        return batch, meta_batch, lr

    def finite(self, metrics: dict) -> list[list[bool]]:
        """Per run, whether each metric is finite (one host sync for all)."""
        return [torch.isfinite(torch.stack(list(metrics.values()))).tolist()]

    def own(self, state: dict, k: int) -> dict:
        return state

    def metrics(self, metrics: dict, k: int) -> dict:
        return metrics


def loop(members: list[Member], runs, stop: StopFlag, progress: Progress | None) -> None:
    """Iterations from the members' common start to the end of the longest schedule: `runs`
    (Plain or Vmapped) holds their state and step. A member whose schedule ends finishes
    there; with isolated members a failure ends its member alone, else it propagates."""
    cfg = members[0].run.cfg
    isolated = members[0].isolated
    start, end = members[0].tally.start, max(m.run.cfg.train_iters for m in members)
    state = runs.state
    for m in members:  # a training set streamed from disk decodes ahead
        m.run.batches.plan(start, m.run.cfg.train_iters)
    try:
        for it in range(start, end):
            # every run's learning rate and batches (seeded by iteration: replayable); finished
            # and failed runs' too, so a group's stacked shapes stay (their shares go unrecorded)
            lrs = [
                step_lr(m.run.cfg.lr, it, m.run.cfg.lr_milestones, m.run.cfg.lr_gamma)
                for m in members
            ]
            drawn = [m.run.batches(it) for m in members]
            batch, meta_batch, lr = runs.inputs(drawn, lrs)

            # one iteration: weights, lookahead, meta-gradient, meta update, classifier update
            step = runs.steps[runs.schedule.role(it)]
            state, metrics = step(state, batch, meta_batch, lr)

            # what follows, for each run still going: finiteness, validation and logging,
            # checkpoints (fp16 skips non-finite steps itself)
            finite = None if cfg.fp16 else runs.finite(metrics)
            stop.look()  # one answer for every run of the group
            stopped = []
            for k, m in enumerate(members):
                if not m.live(it):
                    continue
                bad = [] if finite is None else [n for n, ok in zip(metrics, finite[k]) if not ok]
                own = lambda s, k=k: lambda: runs.own(s, k)  # noqa: E731
                try:
                    after_step(
                        m.run,
                        it,
                        lrs[k],
                        own(state),
                        own(step.last_state),
                        runs.metrics(metrics, k),
                        bad,
                        drawn[k][0],
                        drawn[k][2],
                        m.tally,
                        m.recorder,
                    )
                except NonFinite as e:
                    if not isolated:
                        raise
                    m.fail(e)
                except Preempted:
                    if not isolated:
                        raise
                    stopped.append(m.run.out_dir.name)
                else:
                    if it + 1 == m.run.cfg.train_iters:
                        m.finish(own(state)())
            if progress is not None:
                progress.update(it + 1, None)
            if stopped:
                raise Preempted(
                    f"stopped by {stop.seen or 'SIGTERM'} at iteration {it + 1}; checkpoints "
                    f"of {len(stopped)} runs ({', '.join(stopped)}); rerun the same command to "
                    "resume"
                )
    except (Preempted, KeyboardInterrupt):
        raise
    except Exception as e:  # a bug in the shared step fails every run of a group still going
        if not isolated:
            raise
        for m in members:
            if not m.ended:
                m.fail(e)
    finally:
        if progress is not None:
            progress.close()


def after_step(
    run: Run,
    it: int,
    lr: float,
    state: Callable[[], dict],
    last_state: Callable[[], dict],
    metrics: dict,
    bad: list[str],
    batch: tuple,
    batch_index: torch.Tensor,
    tally: Tally,
    recorder: Recorder,
) -> None:
    """What follows the step of iteration `it` for one run: stop on the non-finite metrics
    `bad`, validate and log, checkpoint. Raises NonFinite, or Preempted after the checkpoint
    when asked to stop. The states after and before the step come as functions, called only
    when needed (a group's run slices its own out of the stacked state)."""
    cfg = run.cfg
    # a non-finite loss or meta-gradient stops an fp32 run (the metrics are global sums, the
    # same on every rank, so every rank stops)
    if bad:
        saved = recorder.last_finite_checkpoint(it, last_state(), tally)
        raise NonFinite(f"iteration {it + 1}: non-finite {', '.join(bad)} at lr {lr:g}; {saved}")

    # validation and logging (rank 0)
    done = it + 1
    then = after(done, cfg)
    record = None
    if recorder.active and then.log:
        record = {"iter": done, "lr": lr, **{k: v.item() for k, v in metrics.items()}}
        if cfg.fp16:
            record.update(
                loss_scale=state()["scaler"]["scale"].item(),
                skipped_steps=int(state()["scaler"]["skipped"]),
            )
        if then.validate:
            tally.last_eval = validation(run, state(), batch, batch_index)
            record.update({k: v for k, v in tally.last_eval.items() if k not in NOT_LOGGED})
            key = best_key(run)  # validation accuracy, or test accuracy without a val set
            if tally.last_eval[key] > tally.best.get(key, -1.0):
                drop = ("weight_fn", "weight_fn_by_group", "batch", *NOT_LOGGED)
                tally.best = {k: v for k, v in tally.last_eval.items() if k not in drop}
                tally.best["iter"] = done
            recorder.note(validation_line(done, tally))
    recorder.log(done, record)

    # checkpoint: periodically, at the end, and when asked to stop (all ranks agree on
    # when: SIGTERM may reach them in different iterations)
    stopping = run.ranks.any(recorder.stop.seen is not None)
    if then.checkpoint or stopping:
        path = recorder.checkpoint(done, state(), tally)
        recorder.note(f"checkpoint {path.name}")
        if stopping and done < run.cfg.train_iters:  # at the last iteration: it has finished
            raise Preempted(
                f"stopped by {recorder.stop.seen or 'SIGTERM'} at iteration {done}; "
                f"checkpoint {path}; "
                "rerun the same command to resume"
            )
