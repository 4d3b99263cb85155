"""The run folder: where a run lives, the lock that keeps one process in it, the Hydra files and
log lines a refused attempt puts back or holds back, and how a run that stops early says so
(its errors, error.json; a full disk as one line).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import sys
from collections.abc import Iterator
from logging.handlers import MemoryHandler
from pathlib import Path

from hydra.utils import to_absolute_path
from omegaconf import DictConfig

from mwn.config import ConfigError
from mwn.data.images import DataError
from mwn.run import checkpoint
from mwn.run.files import ERROR, HYDRA_DIR, HYDRA_FILES, LOCK, METRICS

log = logging.getLogger(__name__)


class NonFinite(RuntimeError):
    """A loss or meta-gradient went non-finite in fp32; the last good state was saved."""


class Preempted(RuntimeError):
    """The run was asked to stop (SIGTERM, SIGINT) and saved a checkpoint first."""


# the errors of bad settings, data or checkpoints, and divergence: one line, no traceback
KNOWN_ERRORS = (ConfigError, DataError, checkpoint.CheckpointError, NonFinite)

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(checkpoint.CheckpointError):
    """A write into the run folder (or its log) found no space left."""


def disk_full(e: Exception, folder: Path) -> Exception:
    """A full disk met anywhere (the lock, the log, Hydra's files) as one line naming the file;
    other errors as they are."""
    if isinstance(e, OSError) and not isinstance(e, DiskFull) and e.errno in DISK_FULL:
        where = e.filename or folder
        return DiskFull(
            f"{where}: cannot write ({e.strerror}); what is written is kept whole: free space "
            "and rerun the same command to resume"
        )
    return e


def exit_code(e: Preempted) -> int:
    """128 + the signal that stopped the run, as if it had ended the process."""
    return 130 if "SIGINT" in str(e) else 143


def hydra_files_on_a_full_disk() -> None:
    """Hydra writes a job's .hydra/ files before the task starts; a disk with no room for them
    ends in one line and exit code 2, as a full disk met later does, not in Hydra's traceback.
    (Hydra's private `_save_config`: where Hydra has none, its own error stays.)"""
    import hydra.core.utils as hydra_utils

    save = getattr(hydra_utils, "_save_config", None)
    if save is None:
        return

    def save_or_stop(cfg, filename, output_dir):
        try:
            save(cfg, filename, output_dir)
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
            e.filename = e.filename or str(Path(output_dir) / filename)  # (Hydra writes them again)
            print(f"mwn: error: {disk_full(e, Path(output_dir))}", file=sys.stderr)
            sys.exit(2)

    hydra_utils._save_config = save_or_stop


def fail_job(job_dir: Path, e: Exception) -> None:
    """A sweep job failed: log it and write its error.json (its row in the sweep summary),
    unless the folder is another process's (Held): a refused attempt writes nothing there."""
    known = isinstance(e, KNOWN_ERRORS)
    message = str(e) if known else f"{type(e).__name__}: {e}"
    if isinstance(e, Held):  # not into the holder's train.log
        print(f"mwn: error: {message}", file=sys.stderr)
        return
    log.error("mwn: error: %s", message, exc_info=None if known else e)
    (job_dir / ERROR).write_text(json.dumps({"error": message}) + "\n")


def clear_error(job_dir: Path) -> None:
    """Remove a job's error.json before it runs again, unless another process holds the folder
    (its run is under way there, and what it writes is its own)."""
    if not held_elsewhere(job_dir):
        (job_dir / ERROR).unlink(missing_ok=True)


class Held(checkpoint.CheckpointError):
    """The run folder is held by another process's run."""


def held_elsewhere(folder: Path) -> bool:
    """Whether another open lock (another process, or another run of this one) holds `folder`."""
    path = folder / LOCK
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def run_folder(cfg: DictConfig, out_dir: Path) -> Path:
    """Where the run lives: the folder named by `resume` (a run continued in its own folder),
    else Hydra's output folder."""
    return Path(to_absolute_path(cfg.resume)) if cfg.resume else out_dir


def check_resumable(cfg: DictConfig, folder: Path) -> None:
    """resume=<folder> names a folder this process can continue a run in."""
    if cfg.resume and not folder.is_dir():
        raise ConfigError(f"resume={cfg.resume!r}: no such run folder")
    if cfg.resume and not os.access(folder, os.W_OK | os.X_OK):  # (root passes any folder)
        raise ConfigError(f"resume={cfg.resume!r}: the run folder is not writable here")


@contextlib.contextmanager
def hold(folder: Path):
    """An exclusive OS lock on the run folder (its `.lock` file, which names the holder's PID)
    for the block: a second run in the same folder stops with one line instead of writing
    beside the first. The OS releases it when the process dies, however it dies; a run that
    ends removes the file."""
    with open(folder / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "unknown"
            raise Held(
                f"{folder}: another run (PID {pid}) is training in this folder; wait for it to "
                "end, or choose another folder"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:  # the file goes while still held, so no finished folder keeps a stale one
            with contextlib.suppress(OSError):
                (folder / LOCK).unlink()
            fcntl.flock(f, fcntl.LOCK_UN)


def hydra_files(folder: Path) -> dict[str, str]:
    """The text of the run folder's Hydra files that exist, by name."""
    paths = {name: folder / HYDRA_DIR / name for name in HYDRA_FILES}
    return {name: p.read_text() for name, p in paths.items() if p.is_file()}


def write_hydra_files(folder: Path, files: dict[str, str]) -> None:
    """Write those of `files` (from hydra_files) whose text in the folder's .hydra/ differs."""
    for name, text in files.items():
        path = folder / HYDRA_DIR / name
        if not path.is_file() or path.read_text() != text:
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)


def restore_hydra_files(folder: Path) -> None:
    """Put back the Hydra files the folder's newest readable checkpoint kept (checkpoints older
    than this keep none). Hydra rewrites .hydra/ before a run starts; when that attempt is
    refused (settings, lock, metrics, a config error), the folder goes on describing the run
    its checkpoints hold."""
    try:
        ckpt = checkpoint.load(folder, "cpu", fallback=True)
    except checkpoint.CheckpointError:  # none readable: nothing kept to put back
        return
    if ckpt is not None:
        write_hydra_files(folder, ckpt.get("hydra_files", {}))


def holds_a_run(folder: Path) -> bool:
    """Whether an earlier attempt left a run in the folder (its metrics or a checkpoint)."""
    return (folder / METRICS).exists() or bool(checkpoint.checkpoints(folder))


def _file_handlers(path: Path) -> list[tuple[int, logging.FileHandler]]:
    root = logging.getLogger()
    return [
        (i, h)
        for i, h in enumerate(root.handlers)
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve()
    ]


@contextlib.contextmanager
def held_back_log(folder: Path) -> Iterator[None]:
    """While a run starts (built, its folder held, resumed), its log lines for the folder's
    train.log wait in memory: they are written once it has started, or once a start in a folder
    without an earlier run fails; a refused attempt on an earlier run (its settings, the lock,
    its checkpoints) adds nothing to that run's log. The console gets every line either way."""
    root, held = logging.getLogger(), []
    for i, handler in _file_handlers(folder / "train.log"):
        waiting = MemoryHandler(10**9, flushLevel=logging.CRITICAL + 1, target=handler)
        waiting.setLevel(handler.level)
        root.handlers[i] = waiting
        held.append((waiting, handler))
    write = True
    try:
        yield
    except BaseException as e:
        write = not isinstance(e, Held) and not holds_a_run(folder)
        raise
    finally:
        for waiting, handler in held:
            root.handlers[root.handlers.index(waiting)] = handler
            if not write:
                waiting.buffer.clear()
            waiting.flush()  # into the file handler (a full disk: DiskFull from there)
            waiting.target = None


def stop_on_full_disk(handler: logging.FileHandler) -> None:
    """A log file that meets a full disk stops the run with one line (DiskFull), cut back to
    its last whole line, instead of logging's `--- Logging error ---` blocks and a run that
    goes on without its log."""

    def handle_error(record: logging.LogRecord) -> None:
        e = sys.exc_info()[1]
        if not (isinstance(e, OSError) and e.errno in DISK_FULL):
            return logging.Handler.handleError(handler, record)
        logging.getLogger().removeHandler(handler)
        stream, handler.stream = handler.stream, None
        with contextlib.suppress(OSError):
            stream.close()  # its buffer cannot be written; the file is closed all the same
        path = Path(handler.baseFilename)
        data = path.read_bytes()
        with open(path, "r+b") as f:  # truncating needs no space
            f.truncate(data.rfind(b"\n") + 1)
        raise DiskFull(
            f"{path}: cannot append to the log ({e.strerror}); the file is kept whole up to its "
            "last line: free space and rerun the same command to resume"
        ) from None

    handler.handleError = handle_error


def stop_logs_on_full_disk(folder: Path) -> None:
    """stop_on_full_disk for the handlers that write the folder's train.log."""
    for _, handler in _file_handlers(folder / "train.log"):
        stop_on_full_disk(handler)
