"""Exactness of the meta-gradient and of one iteration, in float64 against brute force."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_structure

from mwn import meta as meta_mod
from mwn import models
from mwn.meta import (
    StepHP,
    erm_step,
    exact_meta_grad,
    mean_loss,
    meta_grad_double_backward,
    mwn_step,
    per_sample_loss,
    sample_weights,
    scaler_init,
)
from mwn.models import MetaNet, ResNet, extract_state
from mwn.optim import adam_init, adam_step, sgd_init, sgd_step

LR = 0.3
VARIANTS = {
    "sgd": StepHP(momentum=0.0, weight_decay=0.0),
    "sgd+wd": StepHP(momentum=0.0, weight_decay=5e-3),
    "momentum+wd": StepHP(momentum=0.9, weight_decay=5e-3),
    "nesterov+wd": StepHP(momentum=0.9, weight_decay=5e-3, nesterov=True),
    "nesterov+normalized": StepHP(
        momentum=0.9, weight_decay=5e-3, nesterov=True, normalize_weights=True
    ),
}


def setup(seed=0, hidden=7):
    """A small ResNet with BatchNorm, a meta-net, non-trivial state and batches, in float64."""
    torch.manual_seed(seed)
    model = ResNet(5, depth=8, width=4, in_channels=1).double()
    meta_net = MetaNet(hidden).double()
    params, buffers = extract_state(model)
    meta_params, _ = extract_state(meta_net)
    buffers = {
        k: (v + 0.1 * torch.rand_like(v)) if v.is_floating_point() else v
        for k, v in buffers.items()
    }
    state = {
        "params": params,
        "buffers": buffers,
        "momentum": {k: 0.1 * torch.randn_like(v) for k, v in params.items()},  # mid-training
        "meta_params": meta_params,
        "meta_opt": adam_init(meta_params),
    }
    batch = (torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 5, (6,)))
    meta_batch = (torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.randint(0, 5, (5,)))
    return model, meta_net, state, batch, meta_batch


def lookahead_meta_loss(model, meta_net, state, batch, meta_batch, hp, theta):
    """Meta loss at w'(theta), forward only: the function whose gradient we claim."""
    losses, _ = per_sample_loss(model, state["params"], state["buffers"], *batch)
    weights = sample_weights(meta_net, theta, losses, hp.normalize_weights).detach()
    g = torch.func.grad(
        lambda p: (weights * per_sample_loss(model, p, state["buffers"], *batch)[0]).mean()
    )(state["params"])
    ahead, _ = sgd_step(
        state["params"], g, state["momentum"], LR, hp.momentum, hp.weight_decay, hp.nesterov
    )
    return mean_loss(model, ahead, state["buffers"], *meta_batch)


def rel_err(a: dict, b: dict) -> float:
    num = sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5
    return float(num / sum((b[k] ** 2).sum() for k in b) ** 0.5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_meta_gradient_equals_autodiff_through_the_unrolled_step(variant):
    hp = VARIANTS[variant]
    model, meta_net, state, batch, meta_batch = setup()
    ours = exact_meta_grad(model, meta_net, state, batch, meta_batch, LR, hp)
    ref = meta_grad_double_backward(model, meta_net, state, batch, meta_batch, LR, hp)
    ref, ref_meta_loss = ref["meta_grad"], ref["meta_loss"]
    assert rel_err(ours["meta_grad"], ref) < 1e-9
    assert float(ref["net.2.weight"].norm()) > 1e-6  # a non-trivial gradient was compared
    torch.testing.assert_close(ours["meta_loss"], ref_meta_loss, rtol=1e-12, atol=0)


def test_the_batchnorm_jvp_rule_keeps_the_meta_gradient_exact(monkeypatch):
    """The JVP pass's own BatchNorm rule (used on CIFAR-sized activations) on every layer of
    the test model: the meta-gradient still equals autodiff through the unrolled step."""
    calls = []
    rule = models._TrainBatchNorm.jvp
    monkeypatch.setattr(models, "JVP_RULE_MIN_SIZE", 0)
    monkeypatch.setattr(models._TrainBatchNorm, "jvp",
                        staticmethod(lambda *a: calls.append(1) or rule(*a)))  # fmt: skip
    hp = VARIANTS["nesterov+normalized"]
    model, meta_net, state, batch, meta_batch = setup()
    ours = exact_meta_grad(model, meta_net, state, batch, meta_batch, LR, hp)["meta_grad"]
    ref = meta_grad_double_backward(model, meta_net, state, batch, meta_batch, LR, hp)
    assert len(calls) == 7  # our rule, once per BatchNorm layer (in the JVP pass)
    assert rel_err(ours, ref["meta_grad"]) < 1e-9


@pytest.mark.parametrize("variant", ["momentum+wd", "nesterov+normalized"])
def test_meta_gradient_agrees_with_central_finite_differences(variant):
    hp = VARIANTS[variant]
    model, meta_net, state, batch, meta_batch = setup(seed=1)
    grad = exact_meta_grad(model, meta_net, state, batch, meta_batch, LR, hp)["meta_grad"]
    theta = state["meta_params"]
    gen = torch.Generator().manual_seed(0)
    eps = 1e-5
    for _ in range(3):
        d = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in theta.items()}

        def f(s, d=d):
            shifted = {k: theta[k] + s * eps * d[k] for k in theta}
            return lookahead_meta_loss(model, meta_net, state, batch, meta_batch, hp, shifted)

        fd = (f(1.0) - f(-1.0)) / (2 * eps)
        analytic = sum((grad[k] * d[k]).sum() for k in theta)
        assert abs(float(fd - analytic)) <= 1e-6 * abs(float(analytic)) + 1e-10


def test_a_wrong_lookahead_scale_is_caught():
    """The brute-force comparison is sharp enough to see Nesterov's (1 + momentum) factor."""
    model, meta_net, state, batch, meta_batch = setup()
    ours = exact_meta_grad(
        model, meta_net, state, batch, meta_batch, LR, StepHP(momentum=0.9, nesterov=False)
    )
    ref = meta_grad_double_backward(
        model, meta_net, state, batch, meta_batch, LR, StepHP(momentum=0.9, nesterov=True)
    )["meta_grad"]
    assert rel_err(ours["meta_grad"], ref) > 0.1


@pytest.mark.parametrize("rollback", [True, False])
def test_one_iteration_equals_brute_force(rollback):
    hp = StepHP(
        momentum=0.9,
        weight_decay=5e-3,
        nesterov=True,
        meta_lr=1e-2,
        meta_weight_decay=1e-4,
        rollback=rollback,
    )
    model, meta_net, state, batch, meta_batch = setup()
    new, metrics = mwn_step(model, meta_net, state, batch, meta_batch, LR, hp)

    # brute force: meta update from autodiff through the unrolled step, then the real step
    ref = meta_grad_double_backward(model, meta_net, state, batch, meta_batch, LR, hp)
    g_theta, meta_loss = ref["meta_grad"], ref["meta_loss"]
    theta, _ = adam_step(
        state["meta_params"],
        g_theta,
        state["meta_opt"],
        hp.meta_lr,
        weight_decay=hp.meta_weight_decay,
    )
    losses, buffers = per_sample_loss(model, state["params"], state["buffers"], *batch)
    step_theta = theta if rollback else state["meta_params"]
    weights = sample_weights(meta_net, step_theta, losses, False).detach()
    g = torch.func.grad(
        lambda p: (weights * per_sample_loss(model, p, state["buffers"], *batch)[0]).mean()
    )(state["params"])
    params, momentum = sgd_step(
        state["params"], g, state["momentum"], LR, hp.momentum, hp.weight_decay, hp.nesterov
    )

    assert rel_err(new["meta_params"], theta) < 1e-12
    assert rel_err(new["params"], params) < 1e-12
    assert rel_err(new["momentum"], momentum) < 1e-12
    assert new["meta_opt"]["step"] == 1
    torch.testing.assert_close(metrics["meta_loss"], meta_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(metrics["mean_weight"], weights.mean(), rtol=1e-12, atol=0)
    # BatchNorm running stats moved exactly once, by the train batch
    for k in buffers:
        assert torch.equal(new["buffers"][k], buffers[k]), k


@pytest.mark.parametrize("rollback", [True, False])
def test_the_double_backward_variant_is_the_same_iteration(rollback):
    """meta_grad=double_backward (the benchmark's reference) is a real step, equal to ours."""
    hp = StepHP(momentum=0.9, weight_decay=5e-3, meta_lr=1e-2, rollback=rollback)
    model, meta_net, state, batch, meta_batch = setup()
    ours, m1 = mwn_step(model, meta_net, state, batch, meta_batch, LR, hp)
    ref_hp = StepHP(momentum=0.9, weight_decay=5e-3, meta_lr=1e-2, rollback=rollback,
                    meta_grad="double_backward")  # fmt: skip
    ref, m2 = mwn_step(model, meta_net, state, batch, meta_batch, LR, ref_hp)
    for group in ("params", "momentum", "meta_params", "buffers"):
        assert rel_err(ours[group], ref[group]) < 1e-11, group
    torch.testing.assert_close(m1["meta_loss"], m2["meta_loss"], rtol=1e-12, atol=0)


def test_step_never_writes_the_callers_state():
    model, meta_net, state, batch, meta_batch = setup()
    before = {
        k: {n: t.clone() for n, t in state[k].items()}
        for k in ("params", "buffers", "momentum", "meta_params")
    }
    new, _ = mwn_step(model, meta_net, state, batch, meta_batch, LR, StepHP())
    for group, tensors in before.items():
        for name, t in tensors.items():
            assert torch.equal(state[group][name], t), (group, name)
    bn = "bn.num_batches_tracked"
    assert int(new["buffers"][bn]) == int(state["buffers"][bn]) + 1
    assert not torch.equal(new["buffers"]["bn.running_mean"], state["buffers"]["bn.running_mean"])


def test_erm_step_equals_torch_training():
    """The baseline is ordinary training: nn.Module + torch.optim.SGD, BatchNorm stats included."""
    model, meta_net, state, batch, _ = setup()
    state["momentum"] = sgd_init(state["params"])
    hp = StepHP(momentum=0.9, weight_decay=5e-3, nesterov=True)
    with pytest.MonkeyPatch.context() as mp:  # the reference uses PyTorch's own BatchNorm
        mp.setattr(models, "BatchNorm2d", torch.nn.BatchNorm2d)
        ref = ResNet(5, depth=8, width=4, in_channels=1).double()
    assert type(ref.bn) is torch.nn.BatchNorm2d
    ref.load_state_dict({**state["params"], **state["buffers"]})
    opt = torch.optim.SGD(ref.parameters(), lr=LR, momentum=0.9, weight_decay=5e-3, nesterov=True)
    for _ in range(3):
        state, metrics = erm_step(model, None, state, batch, None, LR, hp)
        opt.zero_grad()
        loss = F.cross_entropy(ref(batch[0]), batch[1])
        loss.backward()
        opt.step()
        torch.testing.assert_close(metrics["loss"], loss.detach(), rtol=1e-12, atol=0)
    for k, v in ref.state_dict().items():
        got = state["params"].get(k, state["buffers"].get(k))
        torch.testing.assert_close(got, v, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- fp16 (autocast runs on CPU too)


def fp32_setup():
    torch.manual_seed(0)
    model = ResNet(10, depth=8, width=8, in_channels=1)
    meta_net = MetaNet(100)
    params, buffers = extract_state(model)
    meta_params, _ = extract_state(meta_net)
    state = {"params": params, "buffers": buffers, "momentum": sgd_init(params),
             "meta_params": meta_params, "meta_opt": adam_init(meta_params),
             "scaler": scaler_init()}  # fmt: skip
    batch = (torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,)))
    return model, meta_net, state, batch


def test_fp16_meta_gradient_stays_within_five_percent_of_fp32():
    model, meta_net, state, batch = fp32_setup()
    ref = exact_meta_grad(model, meta_net, state, batch, batch, LR, StepHP())["meta_grad"]
    half = exact_meta_grad(model, meta_net, state, batch, batch, LR, StepHP(fp16=True),
                           scale=2.0**16)["meta_grad"]  # fmt: skip
    assert rel_err(half, ref) < 5e-2  # measured 1.8 %; a wrong scale factor is off by 1e4


def test_bf16_meta_gradient_and_step_stay_close_to_fp32():
    """bfloat16 keeps fp32's range (no loss scale) but has an 8-bit mantissa: ~0.4 % per op."""
    model, meta_net, state, batch = fp32_setup()
    del state["scaler"]
    ref = exact_meta_grad(model, meta_net, state, batch, batch, LR, StepHP())["meta_grad"]
    bf = exact_meta_grad(model, meta_net, state, batch, batch, LR, StepHP(bf16=True))
    assert rel_err(bf["meta_grad"], ref) < 0.1
    assert bf["losses"].dtype == torch.float32  # the losses (and the weights) stay fp32
    errors = {}
    for step in (mwn_step, erm_step):
        new, _ = step(model, meta_net, state, batch, batch, LR, StepHP(bf16=True))
        ref_new, _ = step(model, meta_net, state, batch, batch, LR, StepHP())
        delta = {k: new["params"][k] - state["params"][k] for k in state["params"]}
        ref_delta = {k: ref_new["params"][k] - state["params"][k] for k in state["params"]}
        errors[step.__name__] = rel_err(delta, ref_delta)
    # the MWN step in bf16 is as close to fp32 as a plain autocast training step (measured
    # 9.5 % and 9.7 % on this tiny 8x8 model), so the meta-gradient path adds no error of its own
    assert errors["mwn_step"] < 1.25 * errors["erm_step"] and errors["erm_step"] < 0.15
    assert all(v.dtype == torch.float32 for v in new["params"].values())  # fp32 master weights
    assert tree_structure(new) == tree_structure(state)


def scaler_values(state):
    return {k: float(v) for k, v in state["scaler"].items()}


@pytest.mark.parametrize("step", [mwn_step, erm_step])
def test_fp16_step_tracks_fp32_and_skips_on_overflow(step, monkeypatch):
    model, meta_net, state, batch = fp32_setup()
    ref, _ = step(model, meta_net, state, batch, batch, LR, StepHP())
    new, _ = step(model, meta_net, state, batch, batch, LR, StepHP(fp16=True))
    delta = {k: new["params"][k] - state["params"][k] for k in state["params"]}
    ref_delta = {k: ref["params"][k] - state["params"][k] for k in state["params"]}
    # CPU fp16 arithmetic is coarse: plain torch.autocast autograd is 9.8 % off fp32 on this model
    assert rel_err(delta, ref_delta) < 0.1
    assert scaler_values(new) == {"scale": 2.0**16, "good_steps": 1, "skipped": 0}
    # the same structure in and out: a CUDA graph replays a step on its own outputs
    assert tree_structure(new) == tree_structure(state)

    state["scaler"] = scaler_init(2.0**100)  # overflows fp16: the step is skipped
    skipped, _ = step(model, meta_net, state, batch, batch, LR, StepHP(fp16=True))
    for group in ("params", "momentum", "meta_params"):
        for k, v in state[group].items():
            assert torch.equal(skipped[group][k], v), (group, k)
    assert float(skipped["meta_opt"]["step"]) == 0
    assert scaler_values(skipped) == {"scale": 2.0**99, "good_steps": 0, "skipped": 1}
    assert int(skipped["buffers"]["bn.num_batches_tracked"]) == 1  # BatchNorm stats still moved

    monkeypatch.setattr(meta_mod, "GROWTH_INTERVAL", 2)
    state["scaler"] = {k: torch.tensor(v) for k, v in (("scale", 4.0), ("good_steps", 1.0),
                                                        ("skipped", 3.0))}  # fmt: skip
    grown, _ = step(model, meta_net, state, batch, batch, LR, StepHP(fp16=True))
    assert scaler_values(grown) == {"scale": 8.0, "good_steps": 0, "skipped": 3}


def test_meta_gradient_is_exact_for_the_wide_resnet_too():
    """Pre-activation blocks and 1x1 shortcuts (WRN) through the same JVP path."""
    torch.manual_seed(3)
    model = models.WideResNet(5, depth=10, widen=1, in_channels=1).double()
    _, meta_net, state, batch, meta_batch = setup()
    params, buffers = extract_state(model)
    state = {**state, "params": params, "buffers": buffers, "momentum": sgd_init(params)}
    hp = VARIANTS["nesterov+normalized"]
    ours = exact_meta_grad(model, meta_net, state, batch, meta_batch, LR, hp)["meta_grad"]
    ref = meta_grad_double_backward(model, meta_net, state, batch, meta_batch, LR, hp)
    assert rel_err(ours, ref["meta_grad"]) < 1e-9
    assert float(ref["meta_grad"]["net.2.weight"].norm()) > 1e-8
