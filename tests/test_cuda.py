"""The CUDA paths, run where a GPU is (skipped elsewhere, with the reason): the float64
meta-gradient on CUDA against the CPU's (proven exact in test_meta.py), CUDA graphs of a
vectorised group, fp16 in a group, bf16 and TF32 within stated tolerances, channels-last, and a
short run of each method. scripts/gpu_check.py runs this file first."""

from __future__ import annotations

import json

import pytest
import torch
from test_meta import batches, hp_for, meta_grad_of, setup
from torch.utils._pytree import tree_map

from mwn.core.meta import mwn_step
from mwn.core.methods import METHODS
from mwn.core.models import ClassAwareMetaNet, MetaNet, build_classifier, extract_state
from mwn.core.step import init_state
from mwn.run.accel import channels_last, make_step
from mwn.run.group import group_state, meta_shapes, run_state, vectorised

from conftest import FAST, rel_err, run_cli, step_hp

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")
K = 4  # runs in a vectorised group
# tolerances against fp32 (relative, over the whole state after STEPS iterations)
BF16_TOL, FP16_TOL, TF32_TOL, GRAPH_TOL, NHWC_TOL = 5e-2, 5e-2, 1e-2, 1e-5, 1e-4
STEPS = 3


def to(tree, device=CUDA, dtype=None):
    def move(t):
        t = t.to(device)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    return tree_map(move, tree)


def test_the_float64_meta_gradient_on_cuda_is_the_cpus():
    hp = hp_for("nesterov+wd", True)
    model, meta_net, state = setup(0)
    (batch,), (meta_batch,) = batches(0, 1), batches(50, 1, size=5)
    cpu = meta_grad_of("jvp", model, meta_net, state, batch, meta_batch, hp)
    gpu = meta_grad_of(
        "jvp", model.to(CUDA), meta_net.to(CUDA), to(state), to(batch), to(meta_batch), hp
    )
    assert rel_err(to(gpu.meta_grad, "cpu"), cpu.meta_grad) < 1e-9


def group(meta: str = "mlp", dtype=torch.float32):
    """K fp32 runs on CUDA: model, meta-net, stacked state, and STEPS stacked batches."""
    states, shapes = [], None
    for seed in range(K):
        torch.manual_seed(seed)
        model = build_classifier("resnet", 10, 3, 8, 16)
        net = MetaNet(100) if meta == "mlp" else ClassAwareMetaNet(100, 1, groups=3)
        state = init_state(*extract_state(model), extract_state(net)[0])
        if meta == "cmw":
            state.update(
                net.constants([500, 300, 200, 90, 60, 40, 20, 10, 5, 5][seed:] + [5] * seed)
            )
        states.append(state)
        shapes = meta_shapes(net)
    hps = [
        {"meta_lr": 1e-3, "weight_decay": 5e-4, "meta_weight_decay": 0.0, "focal_gamma": 1.0}
    ] * K
    stacked = to(group_state(states, hps, shapes), dtype=dtype)
    g = torch.Generator().manual_seed(0)
    draw = lambda n: (
        torch.randn(K, n, 3, 32, 32, generator=g),
        torch.randint(0, 10, (K, n), generator=g),
    )
    data = [to((draw(100), draw(100)), dtype=dtype) for _ in range(STEPS)]
    return model.to(CUDA, dtype), net.to(CUDA, dtype), stacked, data, shapes


def run_group(model, net, state, data, hp, cuda_graphs=False, nhwc=False, method="mwn"):
    step = make_step(vectorised(METHODS[method].step), model, net, hp, False, cuda_graphs)
    lr = torch.full((K,), 0.1, device=CUDA, dtype=next(iter(state["params"].values())).dtype)
    if nhwc:
        state = {**state, "params": channels_last(state["params"])}
    for batch, meta_batch in data:
        if nhwc:
            batch = (batch[0].contiguous(memory_format=torch.channels_last), batch[1])
        state, metrics = step(state, batch, meta_batch, lr)
    torch.cuda.synchronize()
    return state, metrics


@pytest.mark.parametrize("meta", ["mlp", "cmw"])
def test_cuda_graphs_of_a_vectorised_group_replay_the_eager_steps(meta):
    model, net, state, data, _ = group(meta)
    hp = step_hp()
    eager, _ = run_group(model, net, state, data, hp)
    graphed, _ = run_group(model, net, state, data, hp, cuda_graphs=True)
    assert rel_err(graphed["params"], eager["params"]) < GRAPH_TOL
    assert rel_err(graphed["meta_params"], eager["meta_params"]) < GRAPH_TOL


@pytest.mark.parametrize("amp, tol", [("fp16", FP16_TOL), ("bf16", BF16_TOL)])
def test_fp16_and_bf16_in_a_group_track_fp32(amp, tol):
    model, net, state, data, _ = group()
    ref, _ = run_group(model, net, state, data, step_hp())
    hp = step_hp(fp16=amp == "fp16", bf16=amp == "bf16")
    if amp == "fp16":
        from mwn.core.sums import scaler_init

        state = {
            **state,
            "scaler": tree_map(lambda t: t.expand(K).clone(), scaler_init(device=CUDA)),
        }
    got, metrics = run_group(model, net, state, data, hp)
    assert all(torch.isfinite(v).all() for v in metrics.values())
    start = state["params"]
    moved = {k: ref["params"][k] - start[k] for k in start}
    assert rel_err({k: got["params"][k] - start[k] for k in start}, moved) < tol * 10
    assert rel_err(got["params"], ref["params"]) < tol


def test_tf32_tracks_fp32():
    model, net, state, data, _ = group()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    ref, _ = run_group(model, net, state, data, step_hp())
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        got, _ = run_group(model, net, state, data, step_hp())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    assert rel_err(got["params"], ref["params"]) < TF32_TOL


def test_channels_last_on_cuda_computes_the_same_steps():
    model, net, state, data, _ = group()
    ref, _ = run_group(model, net, state, data, step_hp())
    got, _ = run_group(model, net, state, data, step_hp(), nhwc=True)
    assert rel_err(got["params"], ref["params"]) < NHWC_TOL


def test_a_single_run_is_one_slice_of_the_group():
    model, net, state, data, shapes = group()
    stacked, _ = run_group(model, net, state, data, step_hp())
    one = run_state(state, 1, shapes)
    for batch, meta_batch in data:
        pick = lambda b: (b[0][1], b[1][1])
        one, _ = mwn_step(
            model, net, one, pick(batch), pick(meta_batch), 0.1, step_hp(meta_lr=1e-3)
        )
    assert rel_err(run_state(stacked, 1, shapes)["params"], one["params"]) < 1e-4


@pytest.mark.parametrize("method", [*METHODS, "mwn-cmw", "mwn-deferred"])
def test_a_short_run_of_each_method_on_cuda(tmp_path, method):
    extra = {
        "mwn-cmw": ["method=mwn", "meta_net=cmw"],
        "mwn-deferred": ["method=mwn", "meta_start=3"],
    }
    args = extra.get(method, [f"method={method}"])
    out = run_cli(*FAST, *args, "device=cuda", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["device"].startswith("cuda") and summary["final_test_acc"] > 0
