"""Vectorised groups (hydra/launcher=vmap, mwn.group): K runs in one vmapped step equal the same
K runs done one by one.

Not bit for bit: vmap turns K convolutions into one grouped convolution and K matrix products
into one batched product, which sum in another order, and a padded meta-net sums over extra
(zero) hidden units. So the exactness test is in float64, where that rounding is ~1e-16 per
operation, against an independent loop over single-run steps; the fp32 end-to-end tests allow
the rounding of fp32 (a few 1e-7 per step, grown over a few steps)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from mwn.cli import check_ranks
from mwn.core.methods import METHODS
from mwn.core.models import ClassAwareMetaNet, MetaNet, build_classifier, extract_state
from mwn.core.step import init_state
from mwn.report import plot_run_or_note
from mwn.run import checkpoint
from mwn.run.folder import hold
from mwn.run.group import PER_RUN_HP, group_state, meta_shapes, plan_groups, run_state, vectorised
from mwn.run.launch import train

from conftest import FAST, ROOT, make_cfg, rel_err, run_cli, step_hp

STEPS = {name: m.step for name, m in METHODS.items()}

# four runs: seeds (initial weights, batches), meta learning rates, hidden sizes 50 and 100,
# learning rates and weight decays, and batches of two label mixes (as two imbalance factors
# give: the long tail's head class, 0, is most of run 2's and 3's batches)
RUNS = [
    dict(seed=0, hidden=50, lr=0.1, meta_lr=1e-2, weight_decay=5e-4, head=0.1),
    dict(seed=1, hidden=100, lr=0.1, meta_lr=1e-3, weight_decay=5e-4, head=0.1),
    dict(seed=2, hidden=50, lr=0.05, meta_lr=1e-3, weight_decay=1e-3, head=0.6),
    dict(seed=3, hidden=100, lr=0.2, meta_lr=1e-2, weight_decay=0.0, head=0.6),
]


def _run(r: dict, method: str):
    """A run's float64 model, meta-net, state and hyperparameters."""
    torch.manual_seed(r["seed"])
    model = build_classifier("resnet", 10, 1, 8, 4).double()
    cmw = method == "cmw"  # class groups of the run's own counts: a run constant
    meta_net = (
        ClassAwareMetaNet(r["hidden"], 1, groups=3) if cmw else MetaNet(r["hidden"], 1)
    ).double()
    params, buffers = extract_state(model)
    state = init_state(params, buffers, extract_state(meta_net)[0])
    if cmw:
        head = int(1000 * r["head"])
        state.update(meta_net.constants([head, 300, 200, 90, 60, 40, 20, 10, 5, 1 + r["seed"]]))
    hp = step_hp(meta_lr=r["meta_lr"], weight_decay=r["weight_decay"], nesterov=True)
    if method == "focal":
        hp = replace(hp, focal_gamma=2.0)
    return model, meta_net, state, hp


def _batches(r: dict, it: int):
    g = torch.Generator().manual_seed(1000 * r["seed"] + it)
    x = torch.randn(16, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (16,), generator=g)
    y = torch.where(torch.rand(16, generator=g) < r["head"], 0, y)
    xm = torch.randn(10, 1, 6, 6, generator=g, dtype=torch.float64)
    return (x, y), (xm, torch.randint(0, 10, (10,), generator=g))


@pytest.mark.parametrize("method", ["mwn", "erm", "l2rw", "focal", "mwn_jvp_rule", "cmw"])
def test_a_group_step_equals_its_runs_one_by_one_in_float64(method, monkeypatch):
    if method == "mwn_jvp_rule":  # BatchNorm's own forward-mode rule (CIFAR-sized activations)
        monkeypatch.setattr("mwn.core.batchnorm.JVP_RULE_MIN_SIZE", 0)
        method = "mwn"
    runs = [_run(r, method) for r in RUNS]
    step = STEPS["mwn" if method == "cmw" else method]
    singles = [state for _, _, state, _ in runs]
    # the group: one meta-net of the largest hidden size, the runs' states padded to it
    template = (
        ClassAwareMetaNet(100, 1, groups=3) if method == "cmw" else MetaNet(100, 1)
    ).double()
    shapes, own_shapes = meta_shapes(template), [meta_shapes(m) for _, m, _, _ in runs]
    hps = [{k: getattr(hp, k) for k in PER_RUN_HP} for *_, hp in runs]
    group = group_state(singles, hps, shapes)
    group_step = vectorised(step)
    for it in range(4):
        drawn = [_batches(r, it) for r in RUNS]
        for k, (model, meta_net, _, hp) in enumerate(runs):  # one by one
            singles[k], _ = step(model, meta_net, singles[k], *drawn[k], RUNS[k]["lr"], hp)
        batch = tuple(torch.stack([d[0][i] for d in drawn]) for i in (0, 1))
        meta_batch = tuple(torch.stack([d[1][i] for d in drawn]) for i in (0, 1))
        lrs = torch.tensor([r["lr"] for r in RUNS], dtype=torch.float64)
        group, _ = group_step(runs[0][0], template, group, batch, meta_batch, lrs, runs[0][3])
    for k in range(len(RUNS)):
        mine = run_state(group, k, own_shapes[k])
        for part in ("params", "buffers", "momentum", "meta_params"):
            assert rel_err(mine[part], singles[k][part]) < 1e-12, (k, part)
        assert rel_err(mine["meta_opt"]["exp_avg"], singles[k]["meta_opt"]["exp_avg"]) < 1e-12
    if method == "cmw":  # the runs' own class groups differ
        assert len({tuple(s["meta_groups"].tolist()) for s in singles}) > 1
    if method in ("mwn", "cmw"):  # the meta-nets did move (different meta learning rates, per run)
        moved = [
            rel_err(run_state(group, k, own_shapes[k])["meta_params"], s["meta_params"])
            for k, s in enumerate(_run(r, method)[2] for r in RUNS)
        ]
        assert min(moved) > 1e-6


def test_padded_hidden_units_stay_exactly_zero_and_the_rest_trains_as_unpadded():
    r = RUNS[0]  # hidden size 50, in a group padded to 100
    model, meta_net, state, hp = _run(r, "mwn")
    hp = replace(hp, meta_lr=0.05, meta_weight_decay=1e-3)  # large: the net moves a lot
    template = MetaNet(100, 1).double()
    shapes, own = meta_shapes(template), meta_shapes(meta_net)
    group = group_state([state], [{k: getattr(hp, k) for k in PER_RUN_HP}], shapes)
    for it in range(5):
        (x, y), (xm, ym) = _batches(r, it)
        state, _ = STEPS["mwn"](model, meta_net, state, (x, y), (xm, ym), 0.1, hp)
        stacked = ((x[None], y[None]), (xm[None], ym[None]))
        group, _ = vectorised(STEPS["mwn"])(
            model, template, group, *stacked, torch.tensor([0.1], dtype=torch.float64), hp
        )
    padded = {k: v[0] for k, v in group["meta_params"].items()}
    moments = [
        {k: v[0] for k, v in group["meta_opt"][m].items()} for m in ("exp_avg", "exp_avg_sq")
    ]
    for tensors in (padded, *moments):  # units 50..99: incoming, bias and outgoing weights
        assert tensors["net.0.weight"][50:].eq(0).all()
        assert tensors["net.0.bias"][50:].eq(0).all()
        assert tensors["net.2.weight"][:, 50:].eq(0).all()
    first = run_state(group, 0, own)["meta_params"]
    assert rel_err(first, state["meta_params"]) < 1e-12
    assert rel_err(first, extract_state(meta_net)[0]) > 1e-3  # and they did train


def test_jobs_group_by_what_they_share_in_job_order_and_at_most_max_runs():
    cfgs = [
        make_cfg("seed=0"),
        make_cfg("seed=1", "meta_lr=1e-3", "hidden_size=50", "imbalance=10"),
        make_cfg("method=erm"),
        make_cfg("seed=2", "noise=uniform", "noise_rate=0.2", "lr=0.05"),
        make_cfg("batch_size=50"),
        make_cfg("seed=3"),
    ]
    assert plan_groups(cfgs, 16) == [[0, 1, 3, 5], [2], [4]]
    assert plan_groups(cfgs, 3) == [[0, 1, 3], [5], [2], [4]]


def _metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("shared", ["meta_interval=1", "meta_interval=2"])
def test_a_vectorised_group_writes_what_single_runs_write(tmp_path, shared):
    """fp32, the real trainer: seeds, meta learning rates, hidden sizes 50 and 100, two
    imbalance factors; each job's folder as a single run's, values within fp32 rounding; also
    with the meta-net updated every second iteration (the group's step between meta updates)."""
    from mwn.run.launch import train_groups
    from mwn.train import finished_job

    jobs = [
        f"seed=0 hidden_size=50 imbalance=10 {shared}",
        f"seed=1 meta_lr=1e-3 imbalance=50 weight_decay=1e-3 {shared}",
    ]
    cfgs = [make_cfg(*FAST, "checkpoint_every=3", *j.split()) for j in jobs]
    dirs = [tmp_path / "group" / str(i) for i in range(len(jobs))]
    made = [d for d in dirs if d.mkdir(parents=True) is None]
    summaries = train_groups(cfgs, made, 16, on_finish=finished_job)  # as the launcher does
    for i in range(len(cfgs)):
        single = tmp_path / "single" / str(i)
        expected = train(make_cfg(*FAST, "checkpoint_every=3", *jobs[i].split()), single)
        plot_run_or_note(single)  # as mwn.train's main does after train()
        group = dirs[i]
        assert sorted(p.name for p in group.iterdir() if p.suffix != ".log") == sorted(
            p.name for p in single.iterdir()
        )
        assert summaries[i]["train_class_counts"] == expected["train_class_counts"]
        assert summaries[i]["final_test_acc"] == pytest.approx(expected["final_test_acc"], abs=0.21)
        a, b = _metrics(group), _metrics(single)
        assert [m["iter"] for m in a] == [m["iter"] for m in b]
        for ma, mb in zip(a, b):
            assert ("meta_loss" in ma) == ("meta_loss" in mb)  # a meta update, or not
            for key in ("loss", "weighted_loss", "meta_loss", "mean_weight"):
                if key in mb:
                    assert ma[key] == pytest.approx(mb[key], rel=1e-4), (i, ma["iter"], key)
        newest = [checkpoint.checkpoints(f)[0] for f in (group, single)]
        size, single_size = (p.stat().st_size for p in newest)
        assert abs(size - single_size) < 0.05 * single_size  # its own run, not the group's
        sa, sb = [checkpoint.read(p) for p in newest]
        assert sa["config"] == sb["config"] and sa["iteration"] == sb["iteration"] == 6
        for part in ("params", "momentum", "meta_params"):
            assert {k: v.shape for k, v in sa["state"][part].items()} == {
                k: v.shape for k, v in sb["state"][part].items()
            }
            # the momentum holds the newest gradient, where one unit whose input is within
            # rounding of zero can take the other side of a ReLU with another CPU's kernels
            # (7e-4 with PyTorch's AVX2 kernels, ATEN_CPU_CAPABILITY=avx2); another run's
            # state is O(1) away, and the float64 test above holds the exactness
            tol = 1e-2 if part == "momentum" else 1e-4
            assert rel_err(sa["state"][part], sb["state"][part]) < tol, (i, part)


def test_a_refused_job_of_a_group_leaves_its_hydra_files_as_its_checkpoints_kept(tmp_path):
    """As a single run (test_checkpoint.py): the launcher's Hydra files, rewritten for a sweep
    rerun whose job is refused (here: another run holds its folder), are put back, and no
    error.json is written there; the other job resumes and describes itself."""
    from mwn.run.launch import train_groups

    dirs = [tmp_path / str(i) for i in range(2)]
    for d in dirs:
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "config.yaml").write_text("first")
    cfgs = [make_cfg(*FAST, f"seed={i}") for i in range(2)]
    train_groups(cfgs, dirs, 16)
    for d in dirs:
        (d / ".hydra" / "config.yaml").write_text("rerun")
    more = [make_cfg(*FAST, f"seed={i}", "train_iters=8") for i in range(2)]
    with hold(dirs[0]):
        summaries = train_groups(more, dirs, 16)
    # refused, and nothing written into the folder another run holds
    assert summaries[0] is None and not (dirs[0] / "error.json").exists()
    assert (dirs[0] / ".hydra" / "config.yaml").read_text() == "first"
    assert summaries[1]["iterations"] == 8
    assert (dirs[1] / ".hydra" / "config.yaml").read_text() == "rerun"


def test_the_vmap_launcher_groups_a_sweep_and_a_diverging_job_fails_alone(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", *FAST, "seed=0", "lr=0.1,1e5", "method=mwn,erm", "progress=none"]
    out = run_cli(*args, "hydra/launcher=vmap", f"hydra.sweep.dir={sweep}", cwd=ROOT)
    assert out.returncode == 1, out.stderr  # some jobs failed: the sweep summary says which
    assert "vectorised group 1 of 2: 2 runs" in out.stderr + out.stdout
    jobs = {
        json.loads((sweep / str(i) / "error.json").read_text())["error"]
        if (sweep / str(i) / "error.json").exists()
        else "done"
        for i in range(4)
    }
    assert "done" in jobs and any("non-finite" in j for j in jobs)
    for i in range(4):
        job = sweep / str(i)
        assert (job / ".hydra" / "config.yaml").is_file() and (job / "train.log").is_file()
        assert (job / "summary.json").is_file() != (job / "error.json").is_file()
    table = (sweep / "summary.md").read_text()
    assert table.count("| done |") == 2 and table.count("failed: iteration") == 2


def test_a_group_resumes_from_its_jobs_checkpoints_bit_for_bit(tmp_path):
    from mwn.compare import differences

    base = [
        "-m",
        *FAST,
        "seed=1",
        "hidden_size=50,100",
        "checkpoint_every=3",
        "progress=none",
        "hydra/launcher=vmap",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_cli(*base, f"hydra.sweep.dir={straight}", cwd=ROOT).returncode == 0
    first = run_cli(*base, "train_iters=3", f"hydra.sweep.dir={resumed}", cwd=ROOT)
    assert first.returncode == 0, first.stderr
    again = run_cli(*base, f"hydra.sweep.dir={resumed}", cwd=ROOT)
    assert again.returncode == 0, again.stderr
    for i in range(2):
        assert differences(straight / str(i), resumed / str(i)) == []
    # a job stopped under the vmap launcher resumes under the basic one (the same checkpoints)
    basic = tmp_path / "basic"
    assert run_cli(*base, "train_iters=3", f"hydra.sweep.dir={basic}", cwd=ROOT).returncode == 0
    single = run_cli(*base[:-1], f"hydra.sweep.dir={basic}", cwd=ROOT)  # no hydra/launcher=vmap
    assert single.returncode == 0, single.stderr
    for i in range(2):
        a, b = _metrics(basic / str(i)), _metrics(straight / str(i))
        assert [m["iter"] for m in a] == [m["iter"] for m in b]
        assert a[-1]["loss"] == pytest.approx(b[-1]["loss"], rel=1e-4)


def test_vmap_under_torchrun_is_one_line():
    from mwn.run.ranks import Ranks

    ranks = Ranks(rank=0, world=2, local_rank=0, torchrun=True)
    message = check_ranks(["-m", "seed=0,1", "hydra/launcher=vmap"], ranks)
    assert message.startswith("hydra/launcher=vmap under torchrun")


def test_sigterm_checkpoints_every_run_of_the_group_and_the_sweep_resumes(tmp_path):
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "train_iters=60",
        "val_every=30",
        "log_every=3",
        "model.width=4",
        "checkpoint_every=1000",
        "seed=0,1",
        "progress=none",
        "hydra/launcher=vmap",
        f"hydra.sweep.dir={sweep}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mwn.train", *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    metrics, deadline = sweep / "1" / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("mwn: stopped by SIGTERM at iteration ") and "of 2 runs (0, 1)" in last
    stopped_at = int(last.split("iteration ")[1].split(";")[0])
    for job in ("0", "1"):
        assert checkpoint.checkpoints(sweep / job)[0].name == f"checkpoint-{stopped_at}.pt"
    again = run_cli(*args, cwd=ROOT)
    assert again.returncode == 0, again.stderr
    for job in ("0", "1"):
        iters = [m["iter"] for m in _metrics(sweep / job)]
        assert iters == list(range(3, 61, 3))  # no line lost, none twice
        assert json.loads((sweep / job / "summary.json").read_text())["iterations"] == 60
