"""When the meta-net learns: a deferred meta start (meta_start, meta_start_epoch: plain
cross-entropy first, as CMW-Net's long-tail protocol) and a learned weighting reused
(meta_net.init=RUN_DIR, fixed with meta_lr=0)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mwn.config import ConfigError, check_config, check_schedule_overrides
from mwn.core.methods import Schedule
from mwn.core.optim import step_lr
from mwn.run import checkpoint
from mwn.run.build import build_run, initial_state, resolve_schedule
from mwn.run.group import group_schedule
from mwn.run.ranks import ONE

from conftest import FAST, final_state, make_cfg, run_cli

PARTS = ("params", "buffers", "momentum")


def lines(run: Path) -> dict[int, dict]:
    return {r["iter"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def state_at(run: Path, iteration: int) -> dict:
    return checkpoint.read(checkpoint.checkpoint_path(run, iteration))["state"]


def test_the_schedule_takes_plain_steps_then_the_meta_update_every_interval():
    s = Schedule(meta_interval=2, meta_start=3)
    assert [s.role(i) for i in range(8)] == ["plain"] * 3 + ["meta", "between"] * 2 + ["meta"]
    assert s.roles(8) == ["meta", "between", "plain"]
    assert Schedule().roles(5) == ["meta"]
    fixed = Schedule(meta_start=2, fixed=True)
    assert [fixed.role(i) for i in range(4)] == ["plain", "plain", "between", "between"]
    assert fixed.roles(4) == ["between", "plain"]
    assert Schedule.of(make_cfg("method=erm", "meta_interval=1")) == Schedule()


@pytest.fixture(scope="module")
def deferred(tmp_path_factory) -> tuple[Path, Path]:
    """A meta_start=4 run (checkpoints at 4 and 6) and ERM's run of 4 iterations."""
    tmp = tmp_path_factory.mktemp("deferred")
    runs = {
        "mwn": [*FAST, "meta_start=4", "checkpoint_every=4"],
        "erm": [*FAST, "method=erm", "train_iters=4"],
    }
    for name, args in runs.items():
        out = run_cli(*args, f"hydra.run.dir={tmp / name}", cwd=tmp)
        assert out.returncode == 0, out.stderr[-3000:]
    return tmp / "mwn", tmp / "erm"


def test_before_meta_start_the_run_is_erm_bit_for_bit(deferred, tmp_path):
    mwn, erm = deferred
    a, b = state_at(mwn, 4), final_state(erm)
    for part in PARTS:
        for k, v in b[part].items():
            assert torch.equal(a[part][k], v), (part, k)
    for it in (2, 3, 4):  # the logged losses, and the test accuracy of iteration 3
        assert lines(mwn)[it]["loss"] == lines(erm)[it]["loss"], it
    assert lines(mwn)[3]["test_acc"] == lines(erm)[3]["test_acc"]
    assert "meta_loss" not in lines(mwn)[4] and "meta_loss" in lines(mwn)[6]
    # the meta-net and its Adam state waited untouched: as they were built
    start = initial_state(build_run(make_cfg(*FAST, "meta_start=4"), tmp_path / "x", ONE))
    for k, v in start["meta_params"].items():
        assert torch.equal(a["meta_params"][k], v), k
    assert float(a["meta_opt"]["step"]) == 0
    assert all(not t.any() for t in a["meta_opt"]["exp_avg"].values())


def test_after_meta_start_it_is_mwn_from_that_state(deferred, tmp_path):
    mwn, _ = deferred
    run = build_run(make_cfg(*FAST, "meta_start=4", "checkpoint_every=4"), tmp_path / "y", ONE)
    assert set(run.steps) == {"meta", "plain"}
    state = state_at(mwn, 4)
    cfg = run.cfg
    for it in (4, 5):
        batch, meta_batch, _ = run.batches(it)
        lr = step_lr(cfg.lr, it, cfg.lr_milestones, cfg.lr_gamma)
        state, _ = run.steps["meta"](state, batch, meta_batch, lr)
    want = final_state(mwn)
    for part in (*PARTS, "meta_params"):
        for k, v in want[part].items():
            assert torch.equal(state[part][k], v), (part, k)
    assert float(want["meta_opt"]["step"]) == 2
    assert not torch.equal(
        want["meta_params"]["net.2.weight"], state_at(mwn, 4)["meta_params"]["net.2.weight"]
    )


def test_meta_start_epoch_is_in_epochs_of_the_training_set():
    cfg = make_cfg("meta_start_epoch=2", "epochs=5")
    resolved = resolve_schedule(cfg, per_epoch=3)
    assert (resolved.meta_start, resolved.train_iters) == (6, 15)
    assert cfg.meta_start == 0  # the config given stays as it is
    with pytest.raises(ConfigError, match=r"^meta_start=5: not read while meta_start_epoch=2"):
        check_schedule_overrides(make_cfg("meta_start_epoch=2", "meta_start=5"), ["meta_start=5"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=erm", "meta_start=3"], "meta_start=3: allowed values are 0 unless method=mwn"),
        (["method=focal", "meta_start_epoch=1"], "meta_start_epoch=1: allowed values are null"),
        (["method=erm", "meta_net.init=x"], "meta_net.init=x: allowed values are null unless"),
        (["meta_start=-1"], "meta_start=-1: allowed values are integers in [0, 10^9]"),
        (["meta_lr=-1e-3"], "meta_lr=-0.001: allowed values are finite real numbers >= 0"),
    ],
)
def test_settings_a_run_would_not_read_are_refused(overrides, message):
    with pytest.raises(ConfigError) as e:
        check_config(make_cfg(*overrides))
    assert str(e.value).startswith(message)


def test_a_group_has_one_meta_start_and_is_fixed_only_when_every_run_is():
    runs = lambda *schedules: [SimpleNamespace(schedule=s) for s in schedules]
    with pytest.raises(ConfigError, match=r"^meta_start: the runs of one vectorised group"):
        group_schedule(runs(Schedule(1, 3), Schedule(1, 4)))
    mixed = group_schedule(runs(Schedule(1, 3, fixed=True), Schedule(1, 3)))
    assert mixed == Schedule(1, 3, fixed=False)  # Adam at lr 0 keeps the fixed run's net
    assert group_schedule(runs(Schedule(1, 3, True), Schedule(1, 3, True))).fixed


# ---------------------------------------------------------------- a learned weighting reused


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("source")
    for name, args in {"cmw": ["meta_net=cmw"], "erm": ["method=erm"]}.items():
        out = run_cli(*FAST, *args, f"hydra.run.dir={tmp / name}", cwd=tmp)
        assert out.returncode == 0, out.stderr[-3000:]
    return tmp


def test_a_reused_fixed_meta_net_trains_a_new_classifier_without_meta_updates(source, tmp_path):
    src = source / "cmw"
    run = tmp_path / "reuse"
    args = [*FAST, "seed=1", "meta_net=cmw", f"meta_net.init={src}", "meta_lr=0"]
    out = run_cli(*args, f"hydra.run.dir={run}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    theirs, mine = final_state(src), final_state(run)
    for k, v in theirs["meta_params"].items():
        assert torch.equal(mine["meta_params"][k], v), k  # started from it, kept it
    assert float(mine["meta_opt"]["step"]) == 0  # no meta update was computed
    assert all("meta_loss" not in r for r in lines(run).values())
    assert not torch.equal(mine["params"]["fc.weight"], theirs["params"]["fc.weight"])
    summary = json.loads((run / "summary.json").read_text())
    ckpt = checkpoint.checkpoints(src)[0]
    assert summary["meta_net_from"] == {
        "run": str(src.resolve()),
        "checkpoint": ckpt.name,
        "iteration": 6,
        "sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest(),
        "method": "mwn",
        "dataset": "digits",
        "seed": 0,
    }


def test_a_reused_meta_net_goes_on_learning_with_a_meta_lr(source, tmp_path):
    src = source / "cmw"
    run = tmp_path / "go-on"
    args = [*FAST, "meta_net=cmw", f"meta_net.init={src}", "meta_lr=1e-2"]
    out = run_cli(*args, f"hydra.run.dir={run}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    mine = final_state(run)
    assert float(mine["meta_opt"]["step"]) == 6
    moved = mine["meta_params"]["heads.weight"] - final_state(src)["meta_params"]["heads.weight"]
    assert moved.abs().max() > 0


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no checkpoint-*.pt there"),
        ("erm", "method=erm learns no meta-net"),
        (
            "other_net",
            "its meta-net (meta_net=cmw hidden_size=100 num_layers=1 meta_net.groups=3) "
            "is not this run's (meta_net=mlp",
        ),
        ("unfinished", "that run has done 6 of 60 iterations"),
    ],
)
def test_a_meta_net_that_cannot_be_reused_is_one_line(source, tmp_path, case, message):
    init, extra = {
        "missing": (tmp_path / "nothing", []),
        "erm": (source / "erm", []),
        "other_net": (source / "cmw", []),
        "unfinished": (source / "cmw", ["meta_net=cmw"]),
    }[case]
    if case == "unfinished":  # a copy of the run whose recorded length is longer
        folder = tmp_path / "unfinished"
        folder.mkdir()
        path = checkpoint.checkpoints(source / "cmw")[0]
        payload = checkpoint.read(path)
        payload["config"]["train_iters"] = 60
        checkpoint.save(folder, payload["iteration"], payload)
        init = folder
    run = tmp_path / "r"
    out = run_cli(*FAST, *extra, f"meta_net.init={init}", f"hydra.run.dir={run}", cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith(f"mwn: error: meta_net.init={init}: {message}"), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_the_successors_protocol_defers_the_meta_start_to_epoch_160_of_200():
    cfg = resolve_schedule(make_cfg("+experiment=long_tail_cifar10_deferred", "meta_net=cmw"), 123)
    assert (cfg.train_iters, cfg.meta_start, list(cfg.lr_milestones)) == (
        24600,
        19680,
        [19680, 22140],
    )
    assert (cfg.lr_gamma, cfg.meta_lr, cfg.meta_net.name) == (0.01, 1e-4, "cmw")
    assert Schedule.of(cfg).role(19679) == "plain" and Schedule.of(cfg).role(19680) == "meta"
