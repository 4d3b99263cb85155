"""Runs that survive: atomic checkpoints, exact resume after SIGKILL, SIGTERM, corrupt files."""

import contextlib
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mwn.config import ConfigError
from mwn.report.sweep import read_job
from mwn.run import checkpoint
from mwn.run.checkpoint import CheckpointError
from mwn.run.files import HYDRA_FILES
from mwn.run.folder import NonFinite, hold
from mwn.run.launch import train

from conftest import ROOT, assert_same_run, make_cfg, run_cli

ARGS = [
    "train_iters=200",
    "val_every=50",
    "log_every=10",
    "model.width=4",
    "checkpoint_every=20",
    "device=cpu",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run."""
    folder = tmp_path_factory.mktemp("ref") / "run"
    proc = run_cli(*ARGS, f"hydra.run.dir={folder}", cwd=folder.parent)
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in checkpoint.checkpoints(folder)] == [
        "checkpoint-200.pt",
        "checkpoint-180.pt",
    ]
    return folder


def start_and_wait_for(folder: Path, name: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mwn.train", *ARGS, f"hydra.run.dir={folder}"],
        cwd=folder.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not (folder / name).exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return proc


def test_sigkill_then_the_same_command_resumes_bit_identically(reference, tmp_path):
    folder = tmp_path / "run"
    proc = start_and_wait_for(folder, "checkpoint-40.pt")
    proc.kill()
    proc.wait()
    assert not (folder / "summary.json").exists()  # it really died mid-run
    again = run_cli(*ARGS, f"hydra.run.dir={folder}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "resuming from" in (folder / "train.log").read_text()
    assert_same_run(reference, folder)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_write_a_checkpoint_and_exit_cleanly(reference, tmp_path, sig, code):
    folder = tmp_path / "run"
    proc = start_and_wait_for(folder, "checkpoint-40.pt")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"mwn: stopped by {sig.name} at iteration ") and "Traceback" not in err
    stopped_at = int(last.split("iteration ")[1].split(";")[0])
    assert checkpoint.checkpoints(folder)[0].name == f"checkpoint-{stopped_at}.pt"
    again = run_cli(*ARGS, f"hydra.run.dir={folder}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert_same_run(reference, folder)


FAST = ["train_iters=30", "val_every=10", "log_every=5", "model.width=4", "checkpoint_every=10"]


def test_ctrl_c_during_start_up_is_one_line_and_exit_130(tmp_path):
    """Before the training loop holds the signal (imports, config, data): no traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mwn.train", *ARGS, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)  # inside the imports
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "mwn: stopped by SIGINT outside training; rerun the same command to continue"
    )


def test_a_corrupt_checkpoint_is_an_error_unless_fallback_is_asked(tmp_path):
    train(make_cfg(*FAST), tmp_path)
    metrics = (tmp_path / "metrics.jsonl").read_text()
    newest = checkpoint.checkpoints(tmp_path)[0]
    assert newest.name == "checkpoint-30.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a full disk
    with pytest.raises(CheckpointError, match=r"checkpoint-30.pt: unreadable checkpoint"):
        train(make_cfg(*FAST), tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == metrics  # nothing lost meanwhile
    train(make_cfg(*FAST, "resume_fallback=true"), tmp_path)  # from checkpoint-20.pt
    assert (tmp_path / "metrics.jsonl").read_text() == metrics


def test_resume_refuses_other_settings_and_names_the_difference(tmp_path):
    train(make_cfg(*FAST), tmp_path)
    with pytest.raises(CheckpointError, match=r"was written with lr=0.05, this run has lr=0.2"):
        train(make_cfg(*FAST, "lr=0.2"), tmp_path)


def test_resume_points_at_another_run_folder(tmp_path):
    first = tmp_path / "first"
    train(make_cfg(*FAST, "train_iters=20"), first)
    # a longer schedule continues the same run, in its folder
    summary = train(make_cfg(*FAST, f"resume={first}"), tmp_path / "elsewhere")
    assert summary["iterations"] == 30
    assert json.loads((first / "summary.json").read_text())["iterations"] == 30
    lines = (first / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["iter"] for s in lines] == [5, 10, 15, 20, 25, 30]
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no checkpoint-\*.pt"):
        train(make_cfg(*FAST, f"resume={tmp_path / 'empty'}"), tmp_path / "x")
    with pytest.raises(ConfigError, match=r"resume='.*nowhere': no such run folder"):
        train(make_cfg(*FAST, f"resume={tmp_path / 'nowhere'}"), tmp_path / "y")


def test_resume_of_a_read_only_folder_is_one_line(tmp_path, monkeypatch):
    """The folder's permissions through os.access (root, who runs these tests, may write
    anywhere, so a chmod would not show it)."""
    train(make_cfg(*FAST, "train_iters=10"), tmp_path / "run")
    real_access = os.access
    read_only = lambda path, mode: (
        real_access(path, mode) and not (Path(path) == tmp_path / "run" and mode & os.W_OK)
    )
    monkeypatch.setattr(os, "access", read_only)
    with pytest.raises(ConfigError, match=r"resume='.*run': the run folder is not writable here"):
        train(make_cfg(*FAST, f"resume={tmp_path / 'run'}"), tmp_path / "other")


def test_checkpoint_files_are_written_atomically(tmp_path):
    path = checkpoint.save(tmp_path, 7, {"x": torch.ones(3)})
    assert path.name == "checkpoint-7.pt" and not list(tmp_path.glob("*.tmp"))
    for i in (8, 9):
        checkpoint.save(tmp_path, i, {"x": torch.ones(3)})
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == [
        "checkpoint-9.pt",
        "checkpoint-8.pt",
    ]
    (tmp_path / ".checkpoint-10.pt.tmp").write_bytes(b"half")  # a crash mid-write
    assert checkpoint.load(tmp_path, torch.device("cpu"))["x"].tolist() == [1, 1, 1]


def test_a_non_finite_loss_stops_the_run_after_saving_the_last_good_state(tmp_path):
    with pytest.raises(NonFinite, match=r"iteration (\d+): non-finite (loss|weighted_loss|meta)"):
        train(make_cfg(*FAST, "lr=1e30"), tmp_path)
    newest = checkpoint.checkpoints(tmp_path)[0]
    saved = checkpoint.read(newest)
    assert all(bool(torch.isfinite(v).all()) for v in saved["state"]["params"].values())
    assert not (tmp_path / "summary.json").exists()


def test_a_rerun_sweep_skips_finished_jobs_and_resumes_the_others(tmp_path):
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "seed=0,1",
        "train_iters=20",
        "val_every=10",
        "checkpoint_every=10",
        "model.width=4",
        f"hydra.sweep.dir={sweep}",
    ]
    first = run_cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    metrics = {j: (sweep / j / "metrics.jsonl").read_text() for j in ("0", "1")}
    # job 1 was cut short after its first checkpoint: remove what came later
    (sweep / "1" / "checkpoint-20.pt").unlink()
    (sweep / "1" / "summary.json").unlink()
    second = run_cli(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "checkpoint-20.pt at iteration 20" in (sweep / "0" / "train.log").read_text()
    assert "checkpoint-10.pt at iteration 10" in (sweep / "1" / "train.log").read_text()
    for j in ("0", "1"):
        assert (sweep / j / "metrics.jsonl").read_text() == metrics[j]
        assert json.loads((sweep / j / "summary.json").read_text())["iterations"] == 20


def test_flipped_bytes_in_a_checkpoint_are_caught_by_its_checksum(tmp_path):
    train(make_cfg(*FAST), tmp_path)
    newest = checkpoint.checkpoints(tmp_path)[0]
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2] ^= 0x10  # inside the tensor data: torch.load alone would not notice
    newest.write_bytes(bytes(raw))
    with pytest.raises(
        CheckpointError,
        match=r"checkpoint-30.pt: unreadable checkpoint \(.*"
        r"corrupt checkpoint \(its checksum does not match\)",
    ):
        train(make_cfg(*FAST, "train_iters=40"), tmp_path)
    summary = train(make_cfg(*FAST, "train_iters=40", "resume_fallback=true"), tmp_path)
    assert summary["iterations"] == 40  # resumed from checkpoint-20.pt


def test_a_damaged_checksum_trailer_fails_closed_and_an_older_checkpoint_still_loads(tmp_path):
    """One byte of the trailer's tag damaged: the file is corrupt (it used to load unverified,
    so a second fault in its tensors went unnoticed); a checkpoint of the format before
    checksums (torch.save's bytes alone) loads as before."""
    payload = {"state": {"w": torch.arange(6.0)}, "iteration": 3}
    path = checkpoint.save(tmp_path, 3, payload)
    raw = bytearray(path.read_bytes())
    good = bytes(raw)
    raw[-33] ^= 0x01  # the tag's last byte
    raw[len(raw) // 2] ^= 0x10  # and one in the data
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="no checksum trailer, and not an older checkpoint"):
        checkpoint.read(path)
    path.write_bytes(good[: -(len(checkpoint.TRAILER) + 32)])  # the older format
    assert torch.equal(checkpoint.read(path)["state"]["w"], torch.arange(6.0))
    path.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(CheckpointError, match="corrupt checkpoint"):
        checkpoint.read(path)


def test_a_truncated_metrics_file_is_refused_not_padded(tmp_path):
    train(make_cfg(*FAST), tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:50])
    with pytest.raises(CheckpointError, match=r"metrics.jsonl: 50 bytes, but the checkpoint"):
        train(make_cfg(*FAST, "train_iters=40"), tmp_path)
    assert len(metrics.read_text()) == 50 and "\0" not in metrics.read_text()


def test_a_checkpoint_of_another_run_with_another_log_every_is_refused(tmp_path):
    """Same settings but log_every: its recorded length falls inside a line of this folder's
    metrics.jsonl, or on other lines; the resume used to cut the file mid-line and exit 0."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    train(make_cfg(*FAST), ours)
    train(make_cfg(*FAST, "log_every=3"), theirs)
    for old in checkpoint.checkpoints(ours):
        old.unlink()
    newest = checkpoint.checkpoints(theirs)[-1]  # iteration 20: a length inside our file
    (ours / newest.name).write_bytes(newest.read_bytes())
    before = (ours / "metrics.jsonl").read_bytes()
    with pytest.raises(CheckpointError, match=r"are not the lines its checkpoint recorded"):
        train(make_cfg(*FAST, "train_iters=40"), ours)
    assert (ours / "metrics.jsonl").read_bytes() == before  # nothing cut


def test_a_garbled_line_of_metrics_is_refused_by_a_resume_and_named_by_compare(tmp_path, capsys):
    from mwn import compare

    train(make_cfg(*FAST), tmp_path / "a")
    train(make_cfg(*FAST), tmp_path / "b")
    metrics = tmp_path / "a" / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    lines[1] = lines[1][:5] + "#" * (len(lines[1]) - 6) + "\n"  # same length, not JSON
    metrics.write_text("".join(lines))
    with pytest.raises(CheckpointError, match=r"are not the lines its checkpoint recorded"):
        train(make_cfg(*FAST, "train_iters=40"), tmp_path / "a")
    with pytest.raises(SystemExit) as out:
        compare.main([str(tmp_path / "a"), str(tmp_path / "b")])
    assert out.value.code == 2
    assert "metrics.jsonl: line 2 is not JSON" in capsys.readouterr().err


def test_an_older_checkpoint_without_a_digest_still_checks_the_lines_it_keeps(tmp_path):
    """A checkpoint written before the digest: whole JSON lines still required."""
    train(make_cfg(*FAST), tmp_path)
    newest = checkpoint.checkpoints(tmp_path)[0]
    payload = checkpoint.read(newest)
    del payload["metrics_sha256"]
    checkpoint.save(tmp_path, payload["iteration"], payload)
    metrics = tmp_path / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    lines[0] = "{" + "x" * (len(lines[0]) - 2) + "\n"
    metrics.write_text("".join(lines))
    with pytest.raises(CheckpointError, match=r"hold a garbled line 1"):
        train(make_cfg(*FAST, "train_iters=40"), tmp_path)


def test_a_killed_checkpoint_writes_temporary_file_is_removed_by_the_next_run(tmp_path):
    """Under another checkpoint_every the same iteration is never written again, so the next
    run that holds the folder removes what a killed write left."""
    train(make_cfg(*FAST), tmp_path)
    stale = tmp_path / ".checkpoint-25.pt.tmp"
    stale.write_bytes(b"half a checkpoint")
    train(make_cfg(*FAST, "train_iters=40", "checkpoint_every=20"), tmp_path)
    assert not stale.exists()


def test_a_sweep_refused_by_a_running_one_writes_no_error_into_its_job_folders(tmp_path):
    """A job folder held by a run under way (here: by this process): the refused job writes no
    error.json there and removes none, so the running sweep's summary stays its own."""
    job = tmp_path / "sweep" / "0"
    job.mkdir(parents=True)
    with hold(job):
        r = run_cli("-m", "seed=0", *FAST, f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
        assert not (job / "error.json").exists()
        (job / "error.json").write_text('{"error": "the running job\'s own"}\n')
        run_cli("-m", "seed=0", *FAST, f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
        assert (job / "error.json").read_text() == '{"error": "the running job\'s own"}\n'
    assert "another run" in r.stderr + r.stdout or "another run" in (job / "train.log").read_text()


def test_a_full_disk_while_appending_metrics_keeps_whole_lines_and_resumes(tmp_path, monkeypatch):
    """ENOSPC in the middle of a metrics line (half of it written first, as a real full disk
    does): one error naming the file, the half line cut back, and once there is space again the
    same command resumes to the run an uninterrupted one trains."""
    import errno

    from mwn.run import recorder

    real, calls = os.write, []

    def full_disk(fd, data):
        calls.append(1)
        if len(calls) == 4:  # the fourth line: half of it, then no space left
            real(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(recorder, "_write", full_disk)
    with pytest.raises(
        CheckpointError,
        match=r"metrics.jsonl: cannot append the line of "
        r"iteration 20 \(No space left on device\); the file is kept whole",
    ):
        train(make_cfg(*FAST), tmp_path / "run")
    text = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())
    monkeypatch.setattr(recorder, "_write", real)  # space again
    train(make_cfg(*FAST), tmp_path / "run")
    train(make_cfg(*FAST), tmp_path / "straight")
    assert_same_run(tmp_path / "run", tmp_path / "straight")


def test_a_second_run_in_a_held_folder_names_the_holder(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    busy = rf"another run \(PID {os.getpid()}\) is training in this folder"
    with hold(tmp_path), pytest.raises(CheckpointError, match=busy):
        train(make_cfg(*FAST), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()
    train(make_cfg(*FAST), tmp_path)  # released: the folder is free again


def test_divergence_never_checkpoints_a_non_finite_state(tmp_path, monkeypatch):
    """A BatchNorm running variance gone to inf while the loss stays finite (what ERM at a huge
    learning rate does, after a number of steps that depends on the CPU's rounding; here made at
    step 15): the run stops at the checkpoint that would hold it, keeping the last finite one."""
    from mwn.run import loop

    class Overflowing:  # the real step, with one running variance set to inf after step 15
        def __init__(self, step):
            self.step, self.calls = step, 0

        def __call__(self, state, *args):
            state, metrics = self.step(state, *args)
            self.calls += 1
            if self.calls == 15:
                buffers = dict(state["buffers"])
                name = next(k for k in buffers if k.endswith("running_var"))
                buffers[name] = torch.full_like(buffers[name], float("inf"))
                state = {**state, "buffers": buffers}
            return state, metrics

        @property
        def last_state(self):
            return self.step.last_state

    plain_init = loop.Plain.__init__

    def init(self, members):
        plain_init(self, members)
        self.steps = {role: Overflowing(step) for role, step in self.steps.items()}

    monkeypatch.setattr(loop.Plain, "__init__", init)
    with pytest.raises(NonFinite, match=r"iteration 20: non-finite buffers/.*running_var in the "):
        cfg = ["train_iters=30", "val_every=10", "checkpoint_every=10", "method=erm"]
        train(make_cfg(*cfg), tmp_path)
    kept = checkpoint.checkpoints(tmp_path)
    assert [checkpoint.read(p)["iteration"] for p in kept] == [10]
    assert not (tmp_path / "summary.json").exists()
    for path in kept:
        state = checkpoint.read(path)["state"]
        assert all(
            bool(v.isfinite().all())
            for g in ("params", "buffers", "momentum")
            for v in state[g].values()
            if v.is_floating_point()
        )


def test_a_shorter_schedule_than_what_is_done_is_refused(tmp_path):
    train(make_cfg(*FAST), tmp_path)
    with pytest.raises(ConfigError, match=r"train_iters=20: the run in .* has done 30 iterations"):
        train(make_cfg(*FAST, "train_iters=20"), tmp_path)


def test_progress_and_logger_may_change_on_resume(tmp_path):
    train(make_cfg(*FAST, "train_iters=10"), tmp_path)
    summary = train(make_cfg(*FAST, "progress=none", "log_every=2"), tmp_path)
    assert summary["iterations"] == 30


def test_a_full_disk_removes_the_temporary_file_and_says_what_is_needed(tmp_path, monkeypatch):
    real_open = open

    def full(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode and str(path).endswith(".tmp"):
            f.write = lambda data: (_ for _ in ()).throw(OSError(28, "No space left on device"))
        return f

    monkeypatch.setattr("builtins.open", full)
    with pytest.raises(
        CheckpointError,
        match=r"cannot write checkpoint-3.pt \(No space left on "
        r"device\); it needs 0.0 MiB free there",
    ):
        checkpoint.save(tmp_path, 3, {"x": torch.zeros(3)})
    assert list(tmp_path.iterdir()) == []


def hydra_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / ".hydra").glob("*.yaml"))}


def test_a_refused_resume_leaves_the_folders_hydra_files_as_they_were(tmp_path):
    """Hydra rewrites .hydra/ before the run starts: a refused resume puts back the copies its
    checkpoint kept, so the folder still describes the run its checkpoints hold."""
    folder = tmp_path / "run"
    args = ["val_every=10", "checkpoint_every=10", "model.width=4", f"hydra.run.dir={folder}"]
    first = run_cli(*args, "train_iters=20", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before, log = hydra_files(folder), (folder / "train.log").read_bytes()
    assert sorted(before) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    for change, message in [
        (
            ["train_iters=20", "meta_grad=double_backward"],
            "was written with meta_grad='jvp', this run has meta_grad='double_backward'",
        ),
        (["train_iters=10"], f"train_iters=10: the run in {folder} has done 20 iterations"),
    ]:
        refused = run_cli(*args, *change, cwd=tmp_path)
        assert refused.returncode == 2, refused.stderr
        errors = [s for s in refused.stderr.splitlines() if s.startswith("mwn: error: ")]
        assert len(errors) == 1 and message in errors[0], refused.stderr
        assert "Traceback" not in refused.stderr
        assert hydra_files(folder) == before, change
        assert (folder / "train.log").read_bytes() == log, change  # its lines: console only
    # an accepted resume describes itself, and keeps that in its checkpoints
    resumed = run_cli(*args, "train_iters=30", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "- train_iters=30" in (folder / ".hydra" / "overrides.yaml").read_text()
    kept = checkpoint.read(checkpoint.checkpoints(folder)[0])["hydra_files"]
    assert {k: v.encode() for k, v in kept.items()} == hydra_files(folder)


def hydra_writes(folder: Path, text: str) -> None:
    """What Hydra does before every attempt at a run folder: write its .hydra/ files."""
    (folder / ".hydra").mkdir(parents=True, exist_ok=True)
    for name in HYDRA_FILES:
        (folder / ".hydra" / name).write_text(f"{name} of the {text} attempt\n")


@pytest.mark.parametrize("refusal", ["settings", "config", "metrics", "lock"])
def test_every_refused_attempt_leaves_the_folders_hydra_files_as_its_checkpoints_kept(
    tmp_path, refusal
):
    """In process, with Hydra's writes done by hand: a run keeps its .hydra files in its
    checkpoints, and an attempt refused for its settings, a bad setting, a truncated
    metrics.jsonl or another run holding the folder puts them back."""
    folder = tmp_path / "run"
    hydra_writes(folder, "first")
    with log_to(folder / "train.log"):
        train(make_cfg(*FAST), folder)
    before = hydra_files(folder)
    hydra_writes(folder, "refused")
    more = [*FAST, "train_iters=40"]  # a longer schedule: an accepted resume
    if refusal == "settings":
        attempt, error, match = more + ["lr=0.2"], CheckpointError, "lr"
    elif refusal == "config":
        attempt, error, match = more + ["batch_size=0"], ConfigError, "batch_size=0"
    else:
        attempt, error, match = more, CheckpointError, "truncated|another run"
    if refusal == "metrics":
        (folder / "metrics.jsonl").write_bytes(b"")
    held = hold(folder) if refusal == "lock" else contextlib.nullcontext()
    log = (folder / "train.log").read_bytes()
    with held, log_to(folder / "train.log"), pytest.raises(error, match=match):
        train(make_cfg(*attempt), folder)
    assert hydra_files(folder) == before
    assert (folder / "train.log").read_bytes() == log  # nothing of the refused attempt


@contextlib.contextmanager
def log_to(path: Path, handler: logging.Handler | None = None):
    """The run's train.log, as Hydra's file handler writes it, for the block."""
    handler = handler or logging.FileHandler(path)
    root = logging.getLogger()
    level, root.level = root.level, logging.INFO
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def test_a_failed_start_in_a_new_folder_keeps_its_log_lines(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    with log_to(folder / "train.log"), pytest.raises(ConfigError, match="the step needs logits"):
        train(make_cfg(*FAST, "+model._target_=torch.nn.Flatten"), folder)
    assert "digits: 383 train" in (folder / "train.log").read_text()  # what it got to


class FullAfter:
    """A log file's stream on a disk that fills up: whole writes up to `room` bytes, then half
    of the next one and ENOSPC, as a real full disk does."""

    def __init__(self, path: Path, room: int):
        self.f, self.room = open(path, "a"), room  # noqa: SIM115 (closed by the handler)

    def write(self, text: str) -> None:
        if len(text) > self.room:
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(text)
        self.f.write(text)

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def test_a_full_disk_under_the_log_stops_in_one_line_and_keeps_whole_lines(tmp_path):
    """No `--- Logging error ---` blocks and a run going on without its log: a DiskFull
    naming train.log, the half line cut back; with space again the same run resumes."""
    folder = tmp_path / "run"
    folder.mkdir()
    handler = logging.FileHandler(folder / "train.log", delay=True)
    handler.stream = FullAfter(folder / "train.log", room=150)
    with (
        log_to(folder / "train.log", handler),
        pytest.raises(
            CheckpointError,
            match=r"train.log: cannot append to the log \(No space left on device\)",
        ),
    ):
        train(make_cfg(*FAST), folder)
    text = (folder / "train.log").read_text()
    assert text and text.endswith("\n") and 0 < len(text) <= 150
    train(make_cfg(*FAST), folder)  # space again
    train(make_cfg(*FAST), tmp_path / "straight")
    assert_same_run(folder, tmp_path / "straight")


@pytest.fixture
def small_disk(tmp_path):
    """A real 3 MiB tmpfs (needs root and mount), unmounted after the test."""
    disk = tmp_path / "small"
    disk.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True
        ).returncode
    ):
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, free_kib: int) -> Path:
    """Fill the disk up to `free_kib` KiB left."""
    stat = os.statvfs(disk)
    size = stat.f_bavail * stat.f_frsize - free_kib * 1024
    path = disk / "fill"
    with open(path, "wb") as f:
        f.write(b"\0" * size)
    return path


@pytest.mark.parametrize("free_kib", [0, 12])
def test_a_full_real_disk_at_start_up_is_one_line_and_the_rerun_trains(small_disk, free_kib):
    """No room for Hydra's .hydra/ files (0 KiB), or for the log and the lock (12 KiB): one
    line naming the file, exit code 2, no traceback; once space is freed the same command
    trains the run."""
    args = [*FAST, "train_iters=10", f"hydra.run.dir={small_disk / 'run'}"]
    filler = fill(small_disk, free_kib)
    full = run_cli(*args, cwd=small_disk.parent)
    assert full.returncode == 2, full.stderr
    errors = [s for s in full.stderr.splitlines() if s.startswith("mwn: error: ")]
    assert len(errors) == 1 and "No space left on device" in errors[0], full.stderr
    assert "Traceback" not in full.stderr and "Logging error" not in full.stderr
    for path in (small_disk / "run").rglob("*.log"):
        assert path.read_text().endswith("\n") or not path.read_text()
    filler.unlink()
    again = run_cli(*args, cwd=small_disk.parent)
    assert again.returncode == 0, again.stderr
    assert json.loads((small_disk / "run" / "summary.json").read_text())["iterations"] == 10


def test_a_run_puts_its_hydra_files_back_when_it_checkpoints(tmp_path):
    """An attempt refused by the lock before the running run's first checkpoint has none to
    restore from: the running run rewrites its own at each checkpoint."""
    from mwn.run.build import build_run
    from mwn.run.ranks import ONE
    from mwn.run.recorder import Recorder, StopFlag, resume

    folder = tmp_path / "run"
    hydra_writes(folder, "running")
    run = build_run(make_cfg(*FAST), folder, ONE)
    state, tally = resume(run)
    with Recorder(run, tally, StopFlag()) as recorder:
        before = hydra_files(folder)
        hydra_writes(folder, "refused")
        recorder.checkpoint(0, state, tally)
    assert hydra_files(folder) == before


def test_a_refused_resume_of_a_sweep_leaves_each_jobs_hydra_files(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "seed=0,1", "train_iters=10", "val_every=10", "model.width=4"]
    first = run_cli(*args, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = {job: hydra_files(sweep / job) for job in ("0", "1")}
    refused = run_cli(*args, "lr=0.2", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert refused.returncode == 1 and "2 of 2 jobs failed" in refused.stderr
    for job in ("0", "1"):
        assert hydra_files(sweep / job) == before[job]
        row = read_job(sweep / job)  # the sweep summary's row: the job's own overrides
        assert row["overrides"] == {
            "seed": job,
            "train_iters": "10",
            "val_every": "10",
            "model.width": "4",
        }
        assert "was written with lr=0.05, this run has lr=0.2" in row["error"]


def test_a_checkpoint_without_hydra_files_still_resumes_and_refuses(tmp_path):
    train(make_cfg(*FAST, "train_iters=10"), tmp_path)
    newest = checkpoint.checkpoints(tmp_path)[0]
    payload = checkpoint.read(newest)
    del payload["hydra_files"]  # as written before checkpoints kept them
    checkpoint.save(tmp_path, payload["iteration"], payload)
    with pytest.raises(CheckpointError, match=r"was written with lr=0.05, this run has lr=0.2"):
        train(make_cfg(*FAST, "lr=0.2"), tmp_path)
    with pytest.raises(ConfigError, match=r"train_iters=5: the run in .* has done 10"):
        train(make_cfg(*FAST, "train_iters=5"), tmp_path)
    assert train(make_cfg(*FAST), tmp_path)["iterations"] == 30
