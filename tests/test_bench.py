"""The benchmark times the real step functions and reports consistent numbers."""

import json

import pytest

from mwn import bench


def test_bench_reports_every_variant_against_erm(tmp_path, capsys):
    out = tmp_path / "bench.json"
    report = bench.main(["--depth", "8", "--width", "4", "--shape", "1,8,8", "--batch-size", "16",
                         "--meta-batch-size", "8", "--iters", "2", "--warmup", "1",
                         "--json", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert set(report["ms"]) == {*bench.VARIANTS, "data"}
    assert all(len(report["ms_all"][k]) == 2 for k in report["ms"])
    assert report["ratio_to_erm"]["erm"] == 1.0
    for v in bench.VARIANTS:
        assert report["ratio_to_erm"][v] == pytest.approx(report["ms"][v] / report["ms"]["erm"])
        assert report["extra_peak_memory_mb"][v] > 0
    # memory is counted, not timed: an MWN iteration holds more than a plain step
    assert report["extra_peak_memory_mb"]["mwn"] > report["extra_peak_memory_mb"]["erm"]
    assert "mwn / double_backward" in capsys.readouterr().out


def test_bench_rejects_unknown_variants_and_missing_devices():
    with pytest.raises(SystemExit):
        bench.parse_args(["--variants", "erm,l2rw"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--cuda-graphs"])


def test_bench_runs_bf16_and_drops_the_fp32_only_reference(tmp_path, capsys):
    args = ["--bf16", "--depth", "8", "--width", "4", "--shape", "1,8,8", "--batch-size", "8",
            "--meta-batch-size", "8", "--iters", "1", "--warmup", "1", "--no-memory"]  # fmt: skip
    report = bench.main([*args, "--json", str(tmp_path / "b.json")])
    assert set(report["ms"]) == {"erm", "mwn", "mwn_no_rollback", "data"}
    assert "cpu bf16" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.parse_args(["--bf16", "--fp16"])
