"""Starting runs: one run (`train`, what `python -m mwn.train` and torchrun's ranks call), or a
sweep's jobs in vectorised groups (`train_groups`, what `hydra/launcher=vmap` calls). Both
build each run, resume it from its own folder, and hand it to the one loop (mwn.run.loop).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from mwn.run import checkpoint, folder
from mwn.run.build import build_run
from mwn.run.folder import KNOWN_ERRORS, clear_error, fail_job, run_folder
from mwn.run.group import Vmapped, plan_groups
from mwn.run.loop import Member, Plain, loop
from mwn.run.monitor import Progress
from mwn.run.ranks import ONE, Ranks
from mwn.run.recorder import Recorder, StopFlag, resume

log = logging.getLogger(__name__)


def train(cfg: DictConfig, out_dir: Path, ranks: Ranks = ONE) -> dict | None:
    """One run. Writes metrics.jsonl and summary.json into out_dir; returns the summary.
    With several ranks (process group initialised): rank 0's out_dir is the run folder, and
    only rank 0 writes into it and returns the summary (the others return None)."""
    with contextlib.ExitStack() as held:
        stop = StopFlag()  # SIGTERM / Ctrl-C: checkpoint, then stop (caught once it is built)
        member = start(cfg, out_dir, ranks, stop)
        held.enter_context(member.lock)
        held.enter_context(stop)
        held.enter_context(member.recorder)
        train_members([member], Plain, stop)
        return member.summary


def start(
    cfg: DictConfig,
    job_dir: Path,
    ranks: Ranks,
    stop: StopFlag,
    label: str = "",
    isolated: bool = False,
    on_finish: Callable[[Member], None] | None = None,
) -> Member:
    """A run ready for the loop: built (checks, data, models, the step), its folder held (rank
    0: one run per folder), resumed (a fresh state or the newest checkpoint's), its Recorder
    open (metrics.jsonl, progress, checkpoints). A refusal on the way puts back the Hydra files
    the folder's checkpoints kept, releases the folder and raises. label, isolated, on_finish:
    as Recorder's label and Member's fields."""
    lock, out_dir = contextlib.ExitStack(), run_folder(cfg, job_dir)
    folder.stop_logs_on_full_disk(out_dir)
    try:
        with folder.held_back_log(out_dir):
            run = build_run(cfg, job_dir, ranks)
            if ranks.main:
                lock.enter_context(folder.hold(run.out_dir))
            state, tally = resume(run)
            recorder = Recorder(run, tally, stop, label)
    except Exception:
        if ranks.main:
            with contextlib.suppress(OSError):  # a full disk: the error that says so goes on
                folder.restore_hydra_files(out_dir)
        lock.close()
        raise
    return Member(job_dir, run, tally, recorder, lock, state, isolated, on_finish)


def train_members(members: list[Member], runs_of: Callable, stop: StopFlag) -> None:
    """Finish the members whose schedule was done before, and loop over the others together
    (`runs_of`: Plain for a single run, Vmapped for a group, which gets a progress display of
    its own)."""
    for m in members:
        if m.tally.start >= m.run.cfg.train_iters:  # done before: only the summary is missing
            m.finish(m.state)
    members = [m for m in members if not m.ended]
    if not members:
        return
    runs, progress = runs_of(members), None
    if runs.own_progress:
        end = max(m.run.cfg.train_iters for m in members)
        progress = Progress(members[0].run.cfg.progress, end, members[0].tally.start)
    loop(members, runs, stop, progress)


def train_groups(
    cfgs: list[DictConfig],
    job_dirs: list[Path],
    max_runs: int,
    on_finish: Callable[[Member], None] | None = None,
) -> list[dict | None]:
    """Train the jobs (composed configs and Hydra's job folders) in vectorised groups of at most
    max_runs; returns each job's summary, or None where it failed (its error.json says why).
    `on_finish` is called for each run as its schedule ends (plots, its result line)."""
    results: list[dict | None] = [None] * len(cfgs)
    groups = plan_groups(cfgs, max_runs)
    for n, ids in enumerate(groups):
        names = ", ".join(job_dirs[i].name for i in ids)
        log.info(f"vectorised group {n + 1} of {len(groups)}: {len(ids)} runs ({names})")
        summaries = train_group([cfgs[i] for i in ids], [job_dirs[i] for i in ids], on_finish)
        for i, summary in zip(ids, summaries):
            results[i] = summary
    return results


def train_group(
    cfgs: list[DictConfig], job_dirs: list[Path], on_finish: Callable | None = None
) -> list[dict | None]:
    """Build every run as a single run would, resume each from its own checkpoints, and train
    those that start at the same iteration together."""
    with contextlib.ExitStack() as stack:
        stop = stack.enter_context(StopFlag())
        members = []
        for cfg, job_dir in zip(cfgs, job_dirs):
            clear_error(job_dir)
            stack.enter_context(_log_to(job_dir / "train.log"))
            try:
                m = start(
                    cfg, job_dir, ONE, stop, label=job_dir.name, isolated=True, on_finish=on_finish
                )
            except KNOWN_ERRORS as e:  # this job fails alone
                fail_job(job_dir, e)
                continue
            m.recorder.rng = checkpoint.rng_states()  # as this run left them (never drawn from)
            stack.enter_context(m.lock)
            stack.enter_context(m.recorder)
            members.append(m)
        by_start: dict[int, list[Member]] = {}
        for m in members:
            by_start.setdefault(m.tally.start, []).append(m)
        for together in by_start.values():
            train_members(together, Vmapped, stop)
        by_dir = {m.job_dir: m.summary for m in members}
        return [by_dir.get(job_dir) for job_dir in job_dirs]


@contextlib.contextmanager
def _log_to(path: Path):
    """Within the block, the log also goes to `path` (each job's train.log gets its group's)."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    folder.stop_on_full_disk(handler)
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
