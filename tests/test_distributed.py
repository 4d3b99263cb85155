"""Data parallel: two real processes (torchrun, gloo on CPU) compute what one process computes.

The step functions are checked in float64 against the one-process step on the whole batch
(tests/distributed_worker.py runs under torchrun); the trainer is checked end to end through
`torchrun -m mwn.train`, including a SIGTERM and a resume.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from distributed_worker import BATCH, CASES, LR, make_case, reweighter_run, run
from torch.utils._pytree import tree_flatten

from mwn.cli import check_ranks
from mwn.config import ConfigError, check_config
from mwn.core.baselines import erm_step
from mwn.run import checkpoint
from mwn.run.ranks import Ranks

from conftest import assert_same_run, final_state, rel_err

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# PYTHONFAULTHANDLER: a rank that aborts prints where it was (Python's traceback) to stderr
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
GROUPS = ("params", "buffers", "momentum", "meta_params")


def failed(proc: subprocess.CompletedProcess) -> str:
    """What a failed torchrun printed: the start and the end of both streams."""

    def ends(text: str) -> str:
        return text if len(text) < 6000 else f"{text[:2000]}\n[...]\n{text[-4000:]}"

    return f"exit {proc.returncode}\nstdout:\n{ends(proc.stdout)}\nstderr:\n{ends(proc.stderr)}"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """Every case's states after each iteration, on rank 0 and on rank 1."""
    out = tmp_path_factory.mktemp("ranks")
    worker = ROOT / "tests" / "distributed_worker.py"
    proc = subprocess.run(
        [*TORCHRUN, str(worker), str(out)], env=ENV, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, failed(proc)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("case", [c for c, (_, sync_bn, _) in CASES.items() if sync_bn])
def test_two_ranks_compute_the_one_process_step_in_float64(two_ranks, case):
    """With sync_bn (global BatchNorm statistics), sharding the global batch changes nothing:
    parameters, BatchNorm buffers, momentum, meta-net and metrics after each of 3 iterations
    equal the one-process run on the whole batch to float64 rounding."""
    reference = run(case)
    for rank in two_ranks:
        for it, (got, want) in enumerate(zip(rank[case], reference)):
            for group in GROUPS:
                for k, v in want["state"][group].items():
                    err = rel_err(got["state"][group][k], v)
                    assert err < 1e-10, (case, it, group, k, err)
            for k, v in want["metrics"].items():
                assert rel_err(got["metrics"][k], v) < 1e-10, (case, it, k)


def test_every_rank_holds_the_same_state_after_every_iteration(two_ranks):
    for case in CASES:
        for a, b in zip(two_ranks[0][case], two_ranks[1][case], strict=True):
            (ta, spec_a), (tb, spec_b) = tree_flatten(a["state"]), tree_flatten(b["state"])
            assert spec_a == spec_b and len(ta) > 40
            assert all(torch.equal(u, v) for u, v in zip(ta, tb)), case


def test_local_batchnorm_erm_is_the_mean_of_the_shards_own_steps(two_ranks):
    """Without sync_bn each rank normalises with its own shard's statistics, as DDP does: the
    ERM step is then the SGD step on the mean of the shards' gradients (SGD is linear in the
    gradient: the mean of the two shards' own steps), and the running statistics are averaged."""
    _, _, hp = CASES["erm_local_bn"]
    model, meta_net, state, batches = make_case()
    half = BATCH // 2
    for it, ((x, y), _) in enumerate(batches):
        steps = [
            erm_step(model, None, state, (x[s], y[s]), None, LR, hp)[0]
            for s in (slice(0, half), slice(half, None))
        ]
        state = {
            g: {
                k: (v + steps[1][g][k]) / 2 if v.is_floating_point() else v
                for k, v in steps[0][g].items()
            }
            for g in ("params", "buffers", "momentum")
        }
        got = two_ranks[0]["erm_local_bn"][it]["state"]
        for group in ("params", "buffers", "momentum"):
            for k, v in state[group].items():
                assert rel_err(got[group][k], v) < 1e-10, (it, group, k)
    # and the global batch statistics do matter: sync_bn gives another model
    synced = two_ranks[0]["erm_sync"][-1]["state"]["params"]
    local = two_ranks[0]["erm_local_bn"][-1]["state"]["params"]
    assert max(rel_err(local[k], v) for k, v in synced.items()) > 1e-3


def test_mwn_with_local_batchnorm_trains_and_differs_from_global_statistics(two_ranks):
    local = two_ranks[0]["mwn_local_bn"][-1]
    synced = run("mwn_local_bn")[-1]  # the one-process run = global statistics
    assert all(torch.isfinite(v).all() for v in local["state"]["params"].values())
    assert (
        max(rel_err(local["state"]["params"][k], v) for k, v in synced["state"]["params"].items())
        > 1e-3
    )


def test_the_reweighter_with_sync_bn_on_two_ranks_is_the_one_process_step_for_torchvision(
    two_ranks,
):
    """torchvision's resnet18 in mwn.MetaReweighter(sync_bn=True) on two ranks: its own
    BatchNorm, adopted and synchronised, gives the one-process step on the whole batch (float64,
    two iterations); with sync_bn=False each rank normalises with its shard, a different model
    (so the synchronisation is real, not left per process)."""
    reference = reweighter_run()
    for rank in two_ranks:
        for got, want in zip(rank["reweighter_sync_bn=True"], reference, strict=True):
            floats = {k: v for k, v in want.items() if v.is_floating_point()}
            assert rel_err({k: got[k] for k in floats}, floats) < 1e-10
    local, want = two_ranks[0]["reweighter_sync_bn=False"][-1], reference[-1]
    assert rel_err(local["conv1.weight"], want["conv1.weight"]) > 1e-4


def test_batch_sizes_must_split_evenly_over_the_processes(tmp_path):
    from conftest import make_cfg

    cfg = make_cfg("batch_size=99")
    check_config(cfg)
    check_config(cfg, torchrun_world=1)
    with pytest.raises(
        ConfigError,
        match=r"^batch_size=99: allowed values are multiples of the "
        r"number of torchrun's 2 processes$",
    ):
        check_config(cfg, torchrun_world=2)
    with pytest.raises(ConfigError, match=r"^meta_batch_size=51: allowed values are multiples"):
        check_config(make_cfg("meta_batch_size=51"), torchrun_world=2)
    with pytest.raises(
        ConfigError,
        match=r"^meta_grad=double_backward: allowed values are jvp \| finite_difference "
        r"under torchrun's 1 process$",
    ):
        check_config(make_cfg("meta_grad=double_backward"), torchrun_world=1)
    with pytest.raises(ConfigError, match=r"^compile=true: allowed values are false under"):
        check_config(make_cfg("compile=true"), torchrun_world=2)
    torchrun = Ranks(0, 1, 0, torchrun=True)
    assert "torchrun trains one run" in check_ranks(["-m", "seed=0,1"], torchrun)
    assert check_ranks(["-m", "seed=0,1"], Ranks()) is None
    assert check_ranks(["seed=1"], torchrun) is None


def test_shards_partition_the_global_batch():
    rows = [Ranks(r, 4).shard(100) for r in range(4)]
    assert [list(range(100))[s] for s in rows] == [
        list(range(25 * r, 25 * r + 25)) for r in range(4)
    ]


# ---------------------------------------------------------------- the trainer under torchrun

CLI = [
    "model.depth=8",
    "model.width=4",
    "train_iters=12",
    "val_every=6",
    "log_every=1",
    "checkpoint_every=4",
    "progress=none",
    "sync_bn=true",
    "device=cpu",
]


def torchrun(folder: Path, *args: str, wait: bool = True, nproc: int = 2):
    cmd = [
        *TORCHRUN[:-1],
        f"--nproc_per_node={nproc}",
        "-m",
        "mwn.train",
        *CLI,
        *args,
        f"hydra.run.dir={folder}",
    ]
    if not wait:
        return subprocess.Popen(
            cmd,
            cwd=folder.parent,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    return subprocess.run(
        cmd, cwd=folder.parent, env=ENV, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory) -> Path:
    """An uninterrupted 2-process run."""
    folder = tmp_path_factory.mktemp("torchrun") / "run"
    proc = torchrun(folder)
    assert proc.returncode == 0, failed(proc)
    assert (
        proc.stdout.count("on digits, long tail IF 20: final test acc") == 1
    )  # rank 0 alone reports
    return folder


def assert_close_models(a: Path, b: Path, tol: float = 1e-4) -> None:
    """The final states of two run folders agree within `tol` (relative, per tensor)."""
    sa, sb = final_state(a), final_state(b)
    for group in GROUPS:
        for k, v in sb[group].items():
            assert rel_err(sa[group][k], v) < tol, (group, k)


def test_torchrun_trains_the_run_one_process_trains(torchrun_run, tmp_path):
    """`torchrun --nproc_per_node=2 -m mwn.train ... sync_bn=true` and `python -m mwn.train`
    give the same model (float32, 12 iterations); rank 0 alone writes, into one run folder."""
    one = tmp_path / "one"
    proc = subprocess.run(
        [sys.executable, "-m", "mwn.train", *CLI, f"hydra.run.dir={one}"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, failed(proc)
    worlds = [
        torch.load(checkpoint.checkpoints(f)[0], weights_only=True)["world"]
        for f in (torchrun_run, one)
    ]
    assert worlds == [2, 1]
    assert_close_models(torchrun_run, one)
    # one folder, rank 0's files only: each metrics line once, one log, no stray run folders
    assert sorted(p.name for p in torchrun_run.parent.iterdir()) == ["run"]
    lines = (torchrun_run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iter"] for line in lines] == list(range(1, 13))
    assert (torchrun_run / "summary.json").read_text().count('"processes": 2') == 1
    # torchrun with one process runs the same distributed path (process group, all-reduces,
    # BatchNorm through the cross-rank sum): still the one-process model
    single = tmp_path / "single"
    proc = torchrun(single, nproc=1)
    assert proc.returncode == 0, failed(proc)
    assert "torchrun, world size 1: each rank takes 100 of every 100" in proc.stdout
    assert_close_models(single, one)


def test_torchrun_stops_on_sigterm_and_the_same_command_resumes_bit_identically(
    torchrun_run, tmp_path
):
    """SIGTERM to torchrun (as SLURM sends before a time limit) reaches both ranks, which agree
    on one iteration, checkpoint it and stop; rerunning the same command resumes exactly."""
    folder = tmp_path / "run"
    proc = torchrun(folder, wait=False)
    deadline = time.monotonic() + 300
    while not (folder / "checkpoint-4.pt").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "stopped by SIGTERM at iteration" in err
    saved = checkpoint.checkpoints(folder)[0]
    assert 4 <= int(saved.stem.split("-")[1]) < 12
    again = torchrun(folder)
    assert again.returncode == 0, failed(again)
    assert "resuming from" in again.stdout + again.stderr
    assert_same_run(folder, torchrun_run)  # state, metrics.jsonl and summary, bit for bit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(folder: Path, cwd: Path) -> list[subprocess.Popen]:
    """Two torchrun agents on this machine, 2 nodes x 1 process, each in its own folder; node 0
    (which hosts the rendezvous store) first. Another port if the chosen one was taken."""
    for _ in range(3):
        port, nodes = free_port(), []
        for node in (0, 1):
            (cwd / f"node{node}").mkdir(exist_ok=True)
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node_rank={node}",
                "--nproc_per_node=1",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                "-m",
                "mwn.train",
                *CLI,
                f"hydra.run.dir={folder}",
            ]
            pipe = subprocess.PIPE
            nodes.append(
                subprocess.Popen(
                    cmd, cwd=cwd / f"node{node}", env=ENV, text=True, stdout=pipe, stderr=pipe
                )
            )
            time.sleep(2 if node == 0 else 0)
        if nodes[0].poll() is None or nodes[0].returncode == 0:
            return nodes
        for p in nodes:  # node 0 could not start (the port was taken meanwhile): try another
            p.kill()
            p.communicate()
    raise AssertionError("no free port for the rendezvous")


def test_two_nodes_train_the_run_one_node_trains(torchrun_run, tmp_path):
    """Multi-node torchrun, emulated as 2 nodes x 1 process on this machine, each node started
    in its own working folder: rank 0's run folder is the run's, and the model is bit-identical
    to the one-node 2-process run (same ranks, same sums)."""
    folder = tmp_path / "run"
    nodes = start_nodes(folder, tmp_path)
    outs = [p.communicate(timeout=600) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], [err[-3000:] for _, err in outs]
    assert not any(list((tmp_path / f"node{n}").iterdir()) for n in (0, 1))  # nothing stray
    assert_same_run(folder, torchrun_run)
