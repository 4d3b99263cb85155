"""The config (through Hydra's compose API), one run end to end, and the real command line."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from mwn import config
from mwn.cli import check_command_line
from mwn.config import CONF_DIR, ConfigError
from mwn.run.files import result_line
from mwn.run.launch import train

from conftest import FAST, ROOT, make_cfg, run_cli, write_cifar


def test_defaults_follow_the_reference_and_the_demo_scales_them_down():
    cifar = make_cfg("dataset=cifar100", "imbalance=50")
    assert (cifar.dataset.name, cifar.model.depth, cifar.model.width) == ("cifar100", 32, 16)
    assert cifar.imbalance == 50.0 and cifar.train_iters == 10_000 and cifar.val_every == 100
    assert list(cifar.lr_milestones) == [5000, 7500, 9000] and cifar.meta_lr == 1e-5
    assert (cifar.lr, cifar.momentum, cifar.weight_decay, cifar.batch_size) == (0.1, 0.9, 5e-4, 100)
    assert (cifar.dataset.crop_padding, cifar.dataset.flip, cifar.meta_per_class) == (4, True, 10)
    assert cifar.rollback and cifar.method == "mwn" and not cifar.fp16 and cifar.normalize_weights
    demo = make_cfg()
    assert demo.dataset.name == "digits" and demo.model.depth == 8 and demo.device.name == "auto"
    assert make_cfg("dataset=digits", "model=resnet32").model.depth == 32  # the user's choice wins


@pytest.mark.parametrize(
    "override,key,value",
    [
        ("meta_lr=1e-4", "meta_lr", 1e-4),
        ("hidden_size=200", "hidden_size", 200),
        ("rollback=false", "rollback", False),
        ("method=erm", "method", "erm"),
        ("seed=3", "seed", 3),
        ("device=cpu", "device.name", "cpu"),
        ("fp16=true", "fp16", True),
    ],
)
def test_overrides_work_as_written(override, key, value):
    assert OmegaConf.select(make_cfg(override), key) == value


@pytest.mark.parametrize(
    "override",
    [
        "hiden_size=3",
        "hidden_size=2.5",
        "rollback=maybe",
        "dataset=svhn",
        "device=tpu",
        "method=l2rv",
        "noise=gaussian",
        "model.arch=vgg",
        "meta_init=zero",
    ],
)
def test_typos_and_wrong_types_fail_at_composition(override):
    with pytest.raises(ConfigCompositionException):
        make_cfg(override)


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "imbalance=0.5",
            "imbalance=0.5: allowed values are null or real numbers >= 1",
        ),
        ("lr=0", "lr=0.0: allowed values are finite real numbers > 0"),
        ("batch_size=0", "batch_size=0: allowed values are integers in [1, 10^9]"),
        ("hidden_size=0", "hidden_size=0: allowed values are integers in [1, 10^9]"),
        ("fp16=true", "fp16=true: needs a CUDA device"),
        ("cuda_graphs=true", "cuda_graphs=true: needs a CUDA device"),
        ("model.depth=9", "model.depth=9: allowed values are 6n + 2 >= 8"),
        ("seed=-1", "seed=-1: allowed values are integers in [0, 2^32)"),
        ("train_per_class=0", "train_per_class=0: allowed values are null or integers >= 1"),
        ("lr=inf", "lr=inf: allowed values are finite real numbers > 0"),
        ("meta_lr=inf", "meta_lr=inf: allowed values are finite real numbers >= 0"),
        ("lr=nan", "lr=nan: allowed values are finite real numbers > 0"),
        ("momentum=inf", "momentum=inf: allowed values are finite real numbers >= 0"),
        ("weight_decay=inf", "weight_decay=inf: allowed values are finite real numbers >= 0"),
        ("focal_gamma=inf", "focal_gamma=inf: allowed values are finite real numbers >= 0"),
        ("dataset.std=[-1]", "dataset.std=[-1.0]: allowed values are null or lists of finite real"),
        ("dataset.std=[0]", "dataset.std=[0.0]: allowed values are null or lists of finite real"),
        ("dataset.mean=[inf]", "dataset.mean=[inf]: allowed values are null or lists of finite"),
        ("train_iters=99999999999999999999", "allowed values are integers in [1, 10^9]"),
    ],
)
def test_bad_values_raise_a_config_error_naming_the_setting(tmp_path, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(make_cfg("device=cpu", override), tmp_path)


@pytest.mark.parametrize("init", ["flat", "random"])
def test_the_run_starts_its_meta_net_as_meta_init_says(tmp_path, init):
    from mwn.run.build import build_run, initial_state
    from mwn.run.ranks import ONE

    run = build_run(make_cfg(*FAST, f"meta_init={init}"), tmp_path, ONE)
    meta = initial_state(run)["meta_params"]
    weight, bias = meta["net.2.weight"], meta["net.2.bias"]  # Linear, ReLU, Linear(100, 1)
    flat = init == "flat"
    assert bool((bias == 0).all()) == flat and (float(weight.abs().max()) < 1e-3) == flat
    assert float(weight.abs().max()) > 0  # near flat, never exactly constant


def test_a_short_run_writes_metrics_and_summary(tmp_path):
    summary = train(make_cfg(*FAST), tmp_path)
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in lines] == [2, 3, 4, 6]
    assert [("test_acc" in r) for r in lines] == [False, True, False, True]
    assert {"loss", "weighted_loss", "meta_loss", "mean_weight", "lr"} <= set(lines[0])
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_test_acc"] == lines[-1]["test_acc"]
    assert summary["best_test_acc"] == max(r["test_acc"] for r in lines if "test_acc" in r)
    assert summary["train_class_counts"] == [114, 81, 58, 41, 30, 21, 15, 11, 7, 5]
    assert (summary["meta_size"], summary["test_size"], summary["iterations"]) == (100, 500, 6)
    assert len(summary["final_per_class_acc"]) == 10
    # many (> 100 images): class 0 only; few (< 20): classes 6-9
    assert summary["final_many_acc"] == summary["final_per_class_acc"][0]
    assert summary["final_few_acc"] == pytest.approx(sum(summary["final_per_class_acc"][6:]) / 4)
    assert result_line(summary).startswith(
        "mwn resnet8 on digits, long tail IF 20: final test acc "
    )


def test_runs_are_deterministic_and_erm_differs(tmp_path):
    a = train(make_cfg(*FAST), tmp_path / "a")
    b = train(make_cfg(*FAST), tmp_path / "b")
    assert (tmp_path / "a/metrics.jsonl").read_text() == (tmp_path / "b/metrics.jsonl").read_text()
    assert a["final_per_class_acc"] == b["final_per_class_acc"]
    erm = [json.loads(s) for s in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    train(make_cfg(*FAST, "method=erm"), tmp_path / "erm")
    lines = [json.loads(s) for s in (tmp_path / "erm/metrics.jsonl").read_text().splitlines()]
    assert "meta_loss" not in lines[0]
    # same data, same init: the first logged losses differ only through the weighting
    assert lines[0]["loss"] != erm[0]["loss"]


def test_cli_runs_the_real_cifar_path_end_to_end(tmp_path):
    write_cifar(tmp_path / "cifar", "cifar10", per_class=110)
    out = tmp_path / "run"
    proc = run_cli(
        "dataset=cifar10",
        f"dataset.root={tmp_path / 'cifar'}",
        "train_iters=2",
        "val_every=1",
        "device=cpu",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        proc.stdout.strip()
        .splitlines()[-1]
        .startswith("mwn resnet32 on cifar10, long tail IF 100: final ")
    )
    # the run folder, named as it starts (the log) and as it ends (above the result line)
    assert proc.stdout.strip().splitlines()[-2] == f"run folder {out}"
    assert f"[INFO] - run folder {out}\n" in (out / "train.log").read_text()
    assert not (out / ".lock").exists()  # a finished run leaves no lock file behind
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "cifar10" and summary["test_size"] == 30
    again = run_cli(str(out), "--no-plots", cwd=tmp_path, module="mwn.report")
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [
        f"{out}: plots not rebuilt (--no-plots)",
        proc.stdout.strip().splitlines()[-1],
    ]
    assert summary["train_class_counts"] == [100, 59, 35, 21, 12, 7, 4, 2, 1, 1]
    assert (out / ".hydra" / "config.yaml").is_file() and (out / "train.log").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["imbalance=0.5"],
            "imbalance=0.5: allowed values are null or real numbers >= 1",
        ),
        (["meta_per_class=500"], "meta_per_class=500: class '0' has only"),
        (["lr=-0.1"], "lr=-0.1: allowed values are finite real numbers > 0"),
        (["batch_size=0"], "batch_size=0: allowed values are integers in [1, 10^9]"),
        (["train_iters=0"], "train_iters=0: allowed values are integers in [1, 10^9]"),
        (["hidden_size=0"], "hidden_size=0: allowed values are integers in [1, 10^9]"),
        (["dataset=svhn"], "dataset=svhn: allowed values are cifar10 | cifar100 | digits"),
        (["device=tpu"], "device=tpu: allowed values are auto | cpu | cuda | mps"),
        (["fp16=maybe"], "fp16=maybe: Value 'maybe' is not a valid bool"),
        (["hiden_size=3"], "hiden_size=3: Key 'hiden_size' not in 'Config'"),
        (["device=cpu", "fp16=true"], "fp16=true: needs a CUDA device, got cpu"),
        (["device=cpu", "cuda_graphs=true"], "cuda_graphs=true: needs a CUDA device"),
        (["bf16=true", "fp16=true"], "bf16=true: allowed values are false with fp16=true"),
        (["dataset=cifar10", "dataset.root=nowhere"], "cifar10 files not found in "),
        (["hydra.run.dir=BLOCKED/run"], "hydra.run.dir=BLOCKED/run: cannot create a folder there"),
        (
            ["method=l2rv"],
            "method=l2rv: allowed values are mwn | erm | focal | class_balanced | l2rw",
        ),
        (
            ["meta_grad=fd"],
            "meta_grad=fd: allowed values are jvp | double_backward | finite_difference",
        ),
        (["noise=gaussian"], "noise=gaussian: allowed values are none | uniform | flip | flip2"),
        (["model.width=0"], "model.width=0: allowed values are integers >= 1"),
        (["model=wrn28_10", "model.depth=27"], "model.depth=27: allowed values are 6n + 4 >= 10"),
        (["seed=99999999999999999999"], "seed=99999999999999999999: "),
        (["data.root=x"], "data.root=x: data.root was renamed; use dataset.root"),
        (["+data.root=x"], "+data.root=x: data.root was renamed; use dataset.root"),
        (["meta_size=200"], "meta_size=200: meta_size was renamed; use meta_per_class"),
        (["+hiden_size=3"], "+hiden_size=3: Key 'hiden_size' not in 'Config'"),
        (["++hiden_size=3"], "++hiden_size=3: Key 'hiden_size' not in 'Config'"),
        (["+experiment=nope"], "experiment=nope: allowed values are long_tail_cifar10 | "),
        (["~lr"], "~lr: a setting cannot be removed (every key is needed); set lr=VALUE"),
    ],
)
def test_cli_errors_are_one_line_and_exit_non_zero(tmp_path, args, message):
    (tmp_path / "BLOCKED").write_text("a file where a folder should go")
    (tmp_path / "kept.txt").write_text("written before")
    args = [a.replace("BLOCKED", str(tmp_path / "BLOCKED")) for a in args]
    message = message.replace("BLOCKED", str(tmp_path / "BLOCKED"))
    if not any(a.startswith("hydra.run.dir") for a in args):
        args.append(f"hydra.run.dir={tmp_path / 'run'}")
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("mwn: error: " + message), proc.stderr
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "kept.txt").read_text() == "written before"


def test_cli_multirun_sweeps_the_grid(tmp_path):
    proc = run_cli(
        "-m",
        "meta_lr=1e-5,1e-4",
        "hidden_size=50,100",
        "train_iters=2",
        "val_every=2",
        "model.width=4",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    jobs = sorted((tmp_path / "sweep").glob("*/summary.json"))
    assert len(jobs) == 4
    seen = set()
    for job in jobs:
        cfg = OmegaConf.load(job.parent / ".hydra" / "config.yaml")
        seen.add((cfg.meta_lr, cfg.hidden_size))
        assert json.loads(job.read_text())["iterations"] == 2
    assert seen == {(1e-5, 50), (1e-5, 100), (1e-4, 50), (1e-4, 100)}


def test_fp16_run_reports_its_loss_scale(tmp_path, monkeypatch):
    """The fp16 wiring end to end (CUDA-only for users; CPU autocast runs the same code)."""
    monkeypatch.setattr(config, "FP16_DEVICES", ("cuda", "cpu"))
    summary = train(make_cfg(*FAST, "device=cpu", "fp16=true"), tmp_path)
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["loss_scale"] == 2.0**16 and lines[-1]["skipped_steps"] == 0
    assert summary["skipped_steps"] == 0 and summary["final_test_acc"] > 0


def test_bf16_runs_on_the_cpu_without_loss_scaling(tmp_path):
    summary = train(make_cfg(*FAST, "device=cpu", "bf16=true"), tmp_path / "bf16")
    train(make_cfg(*FAST, "device=cpu"), tmp_path / "fp32")
    bf16, fp32 = (
        [json.loads(s) for s in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        for d in ("bf16", "fp32")
    )
    assert "loss_scale" not in bf16[-1] and summary["final_test_acc"] > 0
    assert bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=0.05)  # same run, coarser sums
    assert bf16[0]["loss"] != fp32[0]["loss"]  # and bf16 really was on


def test_speed_options_change_speed_not_results(tmp_path):
    base = train(make_cfg(*FAST, "train_iters=3"), tmp_path / "base")
    for option in ("channels_last=true", "meta_grad=double_backward", "deterministic=true"):
        other = train(make_cfg(*FAST, "train_iters=3", option), tmp_path / option)
        a = (tmp_path / "base" / "metrics.jsonl").read_text().splitlines()
        b = (tmp_path / option / "metrics.jsonl").read_text().splitlines()
        for la, lb in zip(map(json.loads, a), map(json.loads, b), strict=True):
            for key in ("loss", "meta_loss", "mean_weight"):
                assert lb[key] == pytest.approx(la[key], rel=1e-4), (option, key)
        assert other["final_test_acc"] == pytest.approx(base["final_test_acc"], abs=0.5)
    assert torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)  # process-wide: leave it as it was


def test_cli_names_a_malformed_dataset_file(tmp_path):
    folder = write_cifar(tmp_path / "cifar", "cifar10", per_class=110)
    (folder / "data_batch_2").write_bytes(b"not a pickle")
    proc = run_cli(
        "dataset=cifar10",
        f"dataset.root={tmp_path / 'cifar'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("mwn: error: ") and "data_batch_2: not a CIFAR python batch" in last


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_device_cuda_without_cuda_is_one_line(tmp_path):
    proc = run_cli("device=cuda", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "mwn: error: device=cuda: CUDA is not available here; allowed values: auto | cpu"
    )


def test_hydra_full_error_shows_the_traceback(tmp_path):
    env_run = subprocess.run(
        [sys.executable, "-m", "mwn.train", "imbalance=0.5", f"hydra.run.dir={tmp_path / 'r'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "1"},
    )
    assert env_run.returncode != 0
    assert "Traceback" in env_run.stderr and "imbalance=0.5" in env_run.stderr


def test_the_default_output_folder_is_checked_only_when_it_is_used(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").write_text("a file where Hydra's run folders would go")
    problem = check_command_line([], CONF_DIR)
    assert problem.startswith("output folder: cannot create a folder there: ")
    assert check_command_line([f"hydra.run.dir={tmp_path / 'elsewhere'}"], CONF_DIR) is None


def test_a_sweep_with_bad_values_names_each_before_any_job_runs(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "-m",
        "hidden_size=abc,50",
        "method=erm,l2rv",
        "seed=0,1",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "mwn: error: hidden_size=abc: Value 'abc' of type 'str' could not be converted to Integer",
        "mwn: error: method=l2rv: allowed values are mwn | erm | focal | class_balanced | l2rw",
    ]
    assert not sweep.exists()


def test_a_bad_value_stops_the_run_before_hydra_writes_its_folder(tmp_path):
    proc = run_cli("imbalance=0.5", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "mwn: error: imbalance=0.5: allowed values are null or real numbers >= 1"
    )
    assert not (tmp_path / "run").exists()  # no .hydra/config.yaml recording the bad value


def test_a_schedule_in_epochs_and_one_in_iterations_are_refused_together(tmp_path):
    """epochs (typed, or from an experiment config) would silently override train_iters; a
    finished run's refusal names epochs, the setting the user gave, not the iterations."""
    both = run_cli("epochs=2", "train_iters=100", "progress=none", cwd=tmp_path)
    assert both.returncode == 2
    assert both.stderr.strip() == (
        "mwn: error: train_iters=100: not read while epochs=2 is set (by the command line or "
        "an experiment config); add epochs=null to give train_iters"
    )
    experiment = run_cli("+experiment=long_tail_cifar10", "lr_milestones=[50]", cwd=tmp_path)
    assert "lr_milestones=[50]: not read while lr_epochs=[80, 90] is set" in experiment.stderr
    done = run_cli("epochs=2", "progress=none", "hydra.run.dir=run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    shorter = run_cli("epochs=1", "progress=none", "hydra.run.dir=run", cwd=tmp_path)
    assert shorter.returncode == 2
    assert "epochs=1: the run in" in shorter.stderr and "allowed values are >= 2" in shorter.stderr
