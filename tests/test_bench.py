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


@pytest.mark.parametrize("rollback", [True, False], ids=["rollback", "no_rollback"])
@pytest.mark.parametrize("meta_grad", ["jvp", "finite_difference"])
def test_the_profiled_iteration_is_the_real_step_bit_for_bit(meta_grad, rollback):
    """The stages the profile times are mwn_step's, in their order: the same new state and
    metrics to the bit, every stage marked once."""
    import torch
    from torch.utils._pytree import tree_flatten

    from mwn.bench_stages import STAGES, staged_iteration
    from mwn.core.meta import mwn_step
    from mwn.core.models import MetaNet, ResNet, extract_state
    from mwn.core.step import init_state

    from conftest import step_hp

    torch.manual_seed(0)
    model, meta_net = ResNet(5, depth=8, width=4, in_channels=1), MetaNet(16, init="flat")
    params, buffers = extract_state(model)
    state = init_state(params, buffers, extract_state(meta_net)[0])
    state["momentum"] = {k: 0.1 * torch.randn_like(v) for k, v in params.items()}
    batch = (torch.randn(12, 1, 8, 8), torch.randint(0, 5, (12,)))
    meta_batch = (torch.randn(6, 1, 8, 8), torch.randint(0, 5, (6,)))
    hp = step_hp(meta_grad=meta_grad, rollback=rollback, meta_lr=1e-2)
    want = mwn_step(model, meta_net, state, batch, meta_batch, 0.1, hp)
    marks = []
    got = staged_iteration(model, meta_net, state, batch, meta_batch, 0.1, hp, marks.append)
    assert marks == list(STAGES)
    (a, spec_a), (b, spec_b) = tree_flatten(got), tree_flatten(want)
    assert spec_a == spec_b and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(
        got[0]["meta_params"]["net.0.weight"], state["meta_params"]["net.0.weight"]
    )


def test_bench_profiles_the_stages_and_sets_jvp_against_finite_differences(tmp_path, capsys):
    from mwn.bench_stages import STAGES

    variants = "erm,mwn,mwn_no_rollback,finite_difference,fd_no_rollback"
    args = [*TINY, "--variants", variants, "--no-memory", "--profile"]
    report = bench.main([*args, "--json", str(tmp_path / "b.json")])
    assert report["step_hp"]["finite_difference"]["meta_grad"] == "finite_difference"
    assert not report["step_hp"]["fd_no_rollback"]["rollback"]
    assert (
        report["mwn_over_finite_difference"]
        == report["ms"]["mwn"] / report["ms"]["finite_difference"]
    )
    profile = report["profile"]
    assert set(profile["settings"]) == {
        "mwn",
        "mwn_no_rollback",
        "finite_difference",
        "fd_no_rollback",
    }
    for rows in profile["settings"].values():
        assert set(rows) == {*STAGES, "total"} and all(len(r) == 4 for r in rows.values())
        assert rows["meta_grad"]["forwards"] == rows["meta_grad"]["ms"] / profile["forward_ms"]
    out = capsys.readouterr().out
    assert "mwn / finite_difference:" in out and "weights_pullback" in out
    with pytest.raises(SystemExit):
        bench.parse_args(["--profile", "--bf16"])
