"""The benchmark times the trainer's own step, with the trainer's hyperparameters."""

import json
from dataclasses import asdict, replace

import pytest

from mwn import bench
from mwn.core.step import StepHP

from conftest import make_cfg

TINY = "--depth 8 --width 4 --shape 1,8,8 --batch-size 16 --meta-batch-size 8 --iters 2 --warmup 1"
TINY = TINY.split()


def test_bench_times_the_step_the_default_config_trains(tmp_path, capsys):
    out = tmp_path / "bench.json"
    report = bench.main([*TINY, "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    default = StepHP.from_config(make_cfg())
    assert report["step_hp"]["mwn"] == asdict(default)  # normalize_weights=true, as the trainer
    assert report["step_hp"]["erm"] == asdict(default)
    assert report["step_hp"]["mwn_no_rollback"] == asdict(replace(default, rollback=False))
    assert report["step_hp"]["double_backward"]["meta_grad"] == "double_backward"
    assert set(report["ms"]) == {*bench.VARIANTS, "data"}
    assert all(len(report["ms_all"][k]) == 2 for k in report["ms"])
    # memory is counted, not timed: an MWN iteration holds more than a plain step
    assert report["extra_peak_memory_mb"]["mwn"] > report["extra_peak_memory_mb"]["erm"] > 0
    assert "mwn / double_backward" in capsys.readouterr().out


def test_bench_overrides_reach_the_step(tmp_path):
    args = [*TINY, "--variants", "mwn", "--no-memory", "--json", str(tmp_path / "b.json")]
    report = bench.main([*args, "nesterov=true", "normalize_weights=false"])
    assert (
        report["step_hp"]["mwn"]["nesterov"] and not report["step_hp"]["mwn"]["normalize_weights"]
    )


def test_bench_rejects_unknown_variants_and_missing_devices():
    with pytest.raises(SystemExit):
        bench.parse_args(["--variants", "erm,l2rv"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--cuda-graphs"])


def test_bench_runs_bf16_and_drops_the_fp32_only_reference(tmp_path, capsys):
    args = ["--bf16", *TINY[:8], "--iters", "1", "--warmup", "1", "--no-memory"]
    report = bench.main([*args, "--json", str(tmp_path / "b.json")])
    assert set(report["ms"]) == {*bench.VARIANTS, "data"} - {"double_backward"}
    assert report["step_hp"]["mwn"]["bf16"]
    assert "cpu bf16" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.parse_args(["--bf16", "--fp16"])


def test_bench_times_vectorised_groups_per_run(tmp_path, capsys):
    args = [*TINY, "--variants", "erm,mwn", "--runs", "1,3", "--json", str(tmp_path / "b.json")]
    report = bench.main(args)
    assert set(report["groups"]) == {"erm x1", "mwn x1", "erm x3", "mwn x3"}
    group = report["groups"]["mwn x3"]
    assert group["variant"] == "mwn" and group["runs"] == 3
    assert group["ms_per_run"] == pytest.approx(report["ms"]["mwn x3"] / 3)
    assert group["speedup_per_run"] == pytest.approx(
        3 * report["ms"]["mwn"] / report["ms"]["mwn x3"]
    )
    # memory is counted: three runs' activations at once hold more than two runs' worth
    assert report["extra_peak_memory_mb"]["mwn x3"] > 2 * report["extra_peak_memory_mb"]["mwn"]
    assert "mwn x3" in capsys.readouterr().out
    for bad in ("0", "two"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--runs", bad])
