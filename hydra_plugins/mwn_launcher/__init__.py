"""`hydra/launcher=vmap`: a sweep's jobs trained in vectorised groups, in this process
(mwn.run.launch.train_groups).

Hydra instantiates launchers only from the `hydra_plugins` package, hence this thin module. Each
job gets its folder and `.hydra/` files exactly as Hydra's basic launcher makes them (through
Hydra's own `run_job`, with a task that only notes the composed config); then the jobs train in
groups of at most `max_runs` (conf/hydra/launcher/vmap.yaml).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict


class VmapLauncher(Launcher):
    def __init__(self, max_runs: int = 16) -> None:
        if not isinstance(max_runs, int) or max_runs < 1:
            raise ValueError(f"hydra.launcher.max_runs={max_runs!r}: allowed values are >= 1")
        self.max_runs = max_runs
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config, self.hydra_context = config, hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list:
        from mwn.config import ConfigError, check_schedule_overrides
        from mwn.run.folder import Preempted, exit_code
        from mwn.run.launch import train_groups
        from mwn.train import finished_job

        assert self.config is not None and self.hydra_context is not None
        hydra = self.config.hydra
        configure_log(hydra.hydra_logging, hydra.verbose)
        Path(str(hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        jobs: list[JobReturn] = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            print(f"#{idx} : {' '.join(filter_overrides(overrides))}", flush=True)
            config = self.hydra_context.config_loader.load_sweep_config(
                self.config, list(overrides)
            )
            with open_dict(config):
                config.hydra.job.id = idx
                config.hydra.job.num = idx
            jobs.append(
                run_job(  # the job folder and its .hydra/ files; the task only notes the folder
                    hydra_context=self.hydra_context,
                    task_function=lambda cfg: Path(HydraConfig.get().runtime.output_dir),
                    config=config,
                    job_dir_key="hydra.sweep.dir",
                    job_subdir_key="hydra.sweep.subdir",
                    configure_logging=False,
                )
            )
        for job in jobs:  # what each job's command line typed, against its composed config
            try:
                check_schedule_overrides(job.cfg, list(job.overrides))
            except ConfigError as e:
                print(f"mwn: error: {e}", file=sys.stderr)
                sys.exit(2)
        try:
            summaries = train_groups(
                [job.cfg for job in jobs],
                [job.return_value for job in jobs],
                self.max_runs,
                on_finish=finished_job,
            )
        except Preempted as e:  # the whole sweep stops, resumable (as mwn.train's main)
            print(f"mwn: {e}", file=sys.stderr)
            sys.exit(exit_code(e))
        for job, summary in zip(jobs, summaries):
            job.status = JobStatus.COMPLETED  # a failed job: None, and its error.json
            job.return_value = None if summary is None else summary["final_test_acc"]
        return jobs
