"""What a user sees of a running run: a progress bar or periodic log lines, and TensorBoard.

Both only read the records the training loop writes to metrics.jsonl; neither changes a result.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch

from mwn.config import ConfigError

log = logging.getLogger(__name__)
LOG_PERIOD_S = 30.0  # progress=log: at most one line per this many seconds (and at validation)


class Progress:
    """progress=bar: a tqdm bar with iteration, loss, meta loss, lr, it/s and ETA; progress=log:
    the same as a plain log line every LOG_PERIOD_S; auto: bar on a terminal, log otherwise;
    none: neither. Validation results and checkpoints are logged in every mode (`write`)."""

    def __init__(self, mode: str, total: int, start: int) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode, self.total, self.start = mode, total, start
        self.t0 = self.t_last = time.perf_counter()
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                initial=start,
                unit="it",
                dynamic_ncols=True,
                desc="train",
                file=sys.stderr,
            )

    def update(self, done: int, record: dict | None) -> None:
        """After iteration `done`; record is the metrics.jsonl line written now, if any."""
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            if record is not None:
                self.bar.set_postfix_str(_fields(record), refresh=False)
            return
        if self.mode != "log" or record is None:
            return
        now = time.perf_counter()
        if now - self.t_last < LOG_PERIOD_S and done < self.total:
            return
        self.t_last = now
        rate = (done - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        log.info(
            "iter %d/%d  %s  %.2f it/s  ETA %s",
            done,
            self.total,
            _fields(record),
            rate,
            _duration(eta),
        )

    def write(self, message: str) -> None:
        """A log line that does not break the bar."""
        if self.bar is not None:
            self.bar.clear()
        log.info(message)
        if self.bar is not None:
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fields(record: dict) -> str:
    out = f"loss {record['loss']:.4f}"
    if "meta_loss" in record:
        out += f"  meta loss {record['meta_loss']:.4f}"
    return out + f"  lr {record['lr']:g}"


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


SCALARS = (
    "loss",
    "weighted_loss",
    "meta_loss",
    "mean_weight",
    "meta_grad_norm",
    "lr",
    "loss_scale",
    "skipped_steps",
    "test_acc",
    "many_acc",
    "medium_acc",
    "few_acc",
)


class TensorBoard:
    """logger=tensorboard: the scalars of every metrics.jsonl record, and at each validation the
    histogram of the latest batch's weights, in <run>/tensorboard. A resumed run drops the events
    written after its checkpoint (purge_step), as metrics.jsonl does."""

    def __init__(self, out_dir: Path, start: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError(
                "logger=tensorboard: needs the tensorboard package "
                "(pip install -e '.[tensorboard]'); allowed values without it: none"
            ) from e
        self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start + 1)

    def write(self, record: dict) -> None:
        step = record["iter"]
        for key in SCALARS:
            if record.get(key) is not None:
                group = "test" if key.endswith("acc") else "train"
                self.writer.add_scalar(f"{group}/{key}", record[key], step)
        if "batch" in record:
            self.writer.add_histogram(
                "train/batch_weight", torch.tensor(record["batch"]["weight"]), step
            )

    def close(self) -> None:
        self.writer.close()
