"""The benchmark times the trainer's own step, with the trainer's hyperparameters."""

import json
from dataclasses import asdict, replace

import pytest

from mwn import bench
from mwn.meta import StepHP

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
