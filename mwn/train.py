"""The entry point: `python -m mwn.train [overrides]` (Hydra).

Checks the command line (mwn.cli), composes the config, trains one run (mwn.run.launch.train:
build, resume, the loop, the summary), draws its plots and prints its result line; bad settings,
data or checkpoints end in one line and exit code 2, a divergence in 3, a stop by SIGTERM or
Ctrl-C in 143 or 130 after a checkpoint. Under `torchrun --nproc_per_node=N -m mwn.train`, every
rank trains on its shard of each global batch and rank 0 alone validates and writes.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def _ctrl_c(signum, frame) -> None:
    """SIGINT outside the training loop (which checkpoints on it): exit at once, one line, 0
    after a result line (a KeyboardInterrupt inside the imports leaves modules half built)."""
    done = getattr(sys.modules.get("mwn.train"), "FINISHED", None)
    if not done:
        print("mwn: stopped by SIGINT outside training; rerun the same command to continue",
              file=sys.stderr)  # fmt: skip
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if done else 130)


if __name__ == "__main__":  # from the first line on, before the slow imports below
    signal.signal(signal.SIGINT, _ctrl_c)

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from mwn.cli import QUIET_RANK, check_command_line, check_ranks
from mwn.config import CONF_DIR, check_schedule_overrides, register_schema
from mwn.report import plot_run_or_note
from mwn.run import folder
from mwn.run.files import result_line
from mwn.run.folder import KNOWN_ERRORS, NonFinite, Preempted, exit_code, fail_job, run_folder
from mwn.run.launch import train
from mwn.run.loop import Member
from mwn.run.ranks import finish, process_group, ranks_from_env

__all__ = ["main", "train"]

register_schema()


FINISHED: list[Path] = []  # the runs of this process that printed their result line


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    ranks = ranks_from_env()  # torchrun's processes, or one
    if ranks.main:  # a failed sweep job's row in the sweep summary, from an earlier attempt
        folder.clear_error(out_dir)
    try:
        check_schedule_overrides(cfg, list(HydraConfig.get().overrides.task))
        with process_group(ranks):
            summary = train(cfg, out_dir, ranks)
    except Preempted as e:  # stop: a run or a whole sweep, resumable
        print(f"mwn: {e}", file=sys.stderr)
        sys.exit(exit_code(e))
    except Exception as e:
        e = folder.disk_full(e, out_dir)  # no space for the lock, the log, ...: one line
        known = isinstance(e, KNOWN_ERRORS)
        if sweep:  # the job fails, the sweep goes on; the summary shows the error
            fail_job(out_dir, e)
            return None
        if not known or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise  # a bug's traceback; or the user asked for it all
        print(f"mwn: error: {e}", file=sys.stderr)
        sys.exit(3 if isinstance(e, NonFinite) else 2)
    if summary is None:  # a rank other than 0
        return None
    plot_run_or_note(done := run_folder(cfg, out_dir).absolute())
    print(f"run folder {done}\n{result_line(summary)}", flush=True)
    FINISHED.append(out_dir)  # a Ctrl-C from here on does not undo the run
    return summary["final_test_acc"]


def finished_job(member: Member) -> None:
    """A vectorised group's run is done: its plots and its labelled result line."""
    plot_run_or_note(member.run.out_dir)
    print(f"{member.run.out_dir.name}: {result_line(member.summary)}", flush=True)


def register_launcher() -> None:
    """Make `hydra/launcher=vmap` known to Hydra wherever mwn is installed: Hydra finds
    launchers by scanning the `hydra_plugins` namespace, which an editable install does not
    expose outside the repository, so the launcher is registered by hand as well."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.mwn_launcher import VmapLauncher

    Plugins.instance().register(VmapLauncher)


if __name__ == "__main__":
    argv, ranks = sys.argv[1:], ranks_from_env()
    if problem := check_command_line(argv, CONF_DIR) or check_ranks(argv, ranks):
        for line in problem.splitlines():  # a sweep: one line per bad value
            print(f"mwn: error: {line}", file=sys.stderr)
        sys.exit(2)
    if not ranks.main:
        sys.argv += QUIET_RANK
    register_launcher()
    folder.hydra_files_on_a_full_disk()
    # the importable module's task, not __main__'s: joblib and submitit pickle it by reference
    from mwn.train import main as importable_main

    importable_main()
    finish(ranks)  # a finished torchrun rank leaves without the interpreter's teardown
