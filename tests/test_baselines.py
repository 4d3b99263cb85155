"""The paper's baselines (focal, class-balanced, L2RW) against references written here with
plain torch in float64; the epoch schedule, meta_interval and the experiment configs."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mwn.core import baselines, models
from mwn.core.baselines import (
    class_balanced_step,
    class_balanced_weights,
    erm_step,
    focal,
    focal_step,
    l2rw_scores,
    l2rw_step,
)
from mwn.core.sums import Sums
from mwn.run import checkpoint
from mwn.run.launch import train

from conftest import FAST, make_cfg, rel_err, step_hp

LR, CLASSES = 0.3, 5


def setup(seed: int = 0):
    """The code under test's float64 ResNet, the same architecture with PyTorch's BatchNorm
    (the reference), a mid-training state and two batches."""
    torch.manual_seed(seed)
    model = models.ResNet(CLASSES, depth=8, width=4, in_channels=1).double()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "BatchNorm2d", nn.BatchNorm2d)
        ref = models.ResNet(CLASSES, depth=8, width=4, in_channels=1).double()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    state = {
        "params": params,
        "buffers": buffers,
        "momentum": {k: 0.1 * torch.randn_like(v) for k, v in params.items()},
    }
    gen = torch.Generator().manual_seed(seed + 100)
    batch = lambda n: (
        torch.randn(n, 1, 8, 8, generator=gen, dtype=torch.float64),
        torch.randint(0, CLASSES, (n,), generator=gen),
    )
    return model, ref, state, batch(8), batch(6)


def textbook_sgd(params, grads, bufs, lr, momentum, wd, nesterov):
    """torch.optim.SGD's rule (dampening 0), written out and differentiable."""
    out = {}
    for k, p in params.items():
        d = grads[k] + wd * p
        buf = momentum * bufs[k] + d
        out[k] = p - lr * (d + momentum * buf if nesterov else buf)
    return out


def ref_l2rw_scores(ref, state, batch, meta_batch, hp):
    """-d L_meta(w'(eps)) / d eps at eps = 0 by autograd: w'(eps) = the textbook step on
    sum_i eps_i L_i(w)."""
    (x, y), (xm, ym) = batch, meta_batch
    params = {k: v.clone().requires_grad_() for k, v in state["params"].items()}
    eps = torch.zeros(len(y), dtype=torch.float64, requires_grad=True)
    buffers = {k: v.clone() for k, v in state["buffers"].items()}
    losses = F.cross_entropy(functional_call(ref, (params, buffers), (x,)), y, reduction="none")
    g = torch.autograd.grad((eps * losses).sum(), list(params.values()), create_graph=True)
    ahead = textbook_sgd(
        params,
        dict(zip(params, g)),
        state["momentum"],
        LR,
        hp.momentum,
        hp.weight_decay,
        hp.nesterov,
    )
    buffers = {k: v.clone() for k, v in state["buffers"].items()}
    meta_loss = F.cross_entropy(functional_call(ref, (ahead, buffers), (xm,)), ym)
    (d_eps,) = torch.autograd.grad(meta_loss, eps)
    return -d_eps, meta_loss.detach()


SGD_VARIANTS = [(0.0, 0.0, False), (0.9, 5e-3, False), (0.9, 5e-3, True)]


@pytest.mark.parametrize("momentum,wd,nesterov", SGD_VARIANTS)
def test_l2rw_scores_equal_autodiff_through_the_perturbed_lookahead(momentum, wd, nesterov):
    hp = step_hp(momentum=momentum, weight_decay=wd, nesterov=nesterov)
    model, ref, state, batch, meta_batch = setup()
    u, meta_loss, _ = l2rw_scores(model, state, batch, meta_batch, LR, hp, Sums())
    u_ref, meta_loss_ref = ref_l2rw_scores(ref, state, batch, meta_batch, hp)
    assert rel_err(u, u_ref) < 1e-10
    assert (u_ref > 0).any() and (u_ref < 0).any()  # both signs: the clipping is exercised
    torch.testing.assert_close(meta_loss, meta_loss_ref, rtol=1e-12, atol=0)
    if nesterov:  # the scale matters: without Nesterov's (1 + momentum) the scores are off
        plain = step_hp(momentum=momentum, weight_decay=wd, nesterov=False)
        u_plain, _, _ = l2rw_scores(model, state, batch, meta_batch, LR, plain, Sums())
        assert rel_err(u_plain, u_ref) > 0.1


def test_l2rw_step_is_the_step_on_the_clipped_normalised_scores():
    hp = step_hp(momentum=0.9, weight_decay=5e-3, nesterov=True)
    model, ref, state, batch, meta_batch = setup(seed=1)
    new, metrics = l2rw_step(model, None, state, batch, meta_batch, LR, hp)
    u_ref, _ = ref_l2rw_scores(ref, state, batch, meta_batch, hp)
    v = u_ref.clamp(min=0) / u_ref.clamp(min=0).sum()
    ref.load_state_dict({**state["params"], **state["buffers"]})
    opt = torch.optim.SGD(ref.parameters(), lr=LR, momentum=0.9, weight_decay=5e-3, nesterov=True)
    for name, p in ref.named_parameters():  # torch.optim's buffer, mid-training
        opt.state[p]["momentum_buffer"] = state["momentum"][name].clone()
    losses = F.cross_entropy(ref(batch[0]), batch[1], reduction="none")
    opt.zero_grad()
    (v * losses).sum().backward()
    opt.step()
    for name, p in ref.named_parameters():
        delta, ref_delta = new["params"][name] - state["params"][name], p - state["params"][name]
        assert rel_err(delta, ref_delta.detach()) < 1e-10, name
        assert rel_err(new["momentum"][name], opt.state[p]["momentum_buffer"]) < 1e-10, name
    assert metrics["kept_fraction"] == (u_ref > 0).double().mean()
    torch.testing.assert_close(metrics["weighted_loss"], (v * losses).sum().detach())


def test_l2rw_with_no_positive_score_takes_only_the_decay_and_momentum_step(monkeypatch):
    """All weights zero (every score negative): the optimiser's step with a zero loss gradient,
    finite, no division by zero."""
    hp = step_hp(momentum=0.9, weight_decay=5e-3, nesterov=False)
    model, _, state, batch, meta_batch = setup()
    real = baselines.l2rw_scores

    def negative(*args):
        u, meta_loss, train_pass = real(*args)
        return -u.abs() - 1, meta_loss, train_pass

    monkeypatch.setattr(baselines, "l2rw_scores", negative)
    new, metrics = l2rw_step(model, None, state, batch, meta_batch, LR, hp)
    zero = {k: torch.zeros_like(v) for k, v in state["params"].items()}
    expected = textbook_sgd(state["params"], zero, state["momentum"], LR, 0.9, 5e-3, False)
    for k in expected:
        torch.testing.assert_close(new["params"][k], expected[k], rtol=1e-12, atol=1e-14)
    assert metrics["kept_fraction"] == 0 and metrics["weighted_loss"] == 0


def test_focal_loss_is_the_textbook_formula_and_gamma_zero_is_erm():
    logits = torch.randn(7, CLASSES, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (7,))
    p = logits.softmax(1)[torch.arange(7), y]
    ce = F.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(focal(ce, 2.0), -((1 - p) ** 2) * p.log(), rtol=1e-12, atol=0)
    model, _, state, batch, _ = setup()
    a, _ = focal_step(model, None, state, batch, None, LR, step_hp(focal_gamma=0.0))
    b, _ = erm_step(model, None, state, batch, None, LR, step_hp(focal_gamma=0.0))
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k


def test_class_balanced_weights_by_hand():
    w = class_balanced_weights([100, 10], beta=0.9)
    raw = [(1 - 0.9) / (1 - 0.9**100), (1 - 0.9) / (1 - 0.9**10)]
    expected = [2 * r / sum(raw) for r in raw]
    assert w.tolist() == pytest.approx(expected, rel=1e-6) and sum(w.tolist()) == pytest.approx(2)
    assert class_balanced_weights([5, 5, 5], 0.999).tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_class_balanced_step_equals_weighted_cross_entropy_with_torch_optim():
    model, ref, state, batch, _ = setup()
    state["momentum"] = {k: torch.zeros_like(v) for k, v in state["params"].items()}
    weights = torch.tensor([3.0, 1.0, 0.5, 0.25, 0.25], dtype=torch.float64)
    hp = step_hp(momentum=0.9, weight_decay=5e-3, nesterov=True)
    new, _ = class_balanced_step(
        model, None, {**state, "class_weights": weights}, batch, None, LR, hp
    )
    ref.load_state_dict({**state["params"], **state["buffers"]})
    opt = torch.optim.SGD(ref.parameters(), lr=LR, momentum=0.9, weight_decay=5e-3, nesterov=True)
    x, y = batch
    (weights[y] * F.cross_entropy(ref(x), y, reduction="none")).mean().backward()
    opt.step()
    for name, p in ref.named_parameters():
        delta = new["params"][name] - state["params"][name]
        assert rel_err(delta, (p - state["params"][name]).detach()) < 1e-10, name


# ---------------------------------------------------------------- schedule and meta_interval


def test_epochs_and_lr_epochs_become_iterations_of_the_long_tailed_set(tmp_path):
    summary = train(make_cfg(*FAST, "epochs=2", "lr_epochs=[1]", "method=erm"), tmp_path)
    per_epoch = sum(summary["train_class_counts"]) // 100  # digits at IF 20: 383 // 100 = 3
    assert summary["iterations"] == 2 * per_epoch == 6
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["iter"]: r["lr"] for r in lines}
    assert lrs[2] == 0.05 and lrs[4] == pytest.approx(0.005)  # x0.1 from iteration 3 on


def test_meta_interval_updates_the_meta_net_every_kth_iteration(tmp_path):
    cfg = make_cfg(*FAST, "train_iters=5", "log_every=1", "meta_interval=2")
    train(cfg, tmp_path)
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert ["meta_loss" in r for r in lines] == [True, False, True, False, True]
    ckpt = checkpoint.read(next(tmp_path.glob("checkpoint-*.pt")))
    assert int(ckpt["state"]["meta_opt"]["step"]) == 3  # iterations 1, 3, 5
    with pytest.raises(Exception, match="meta_interval=2: allowed values are 1 unless method=mwn"):
        train(make_cfg(*FAST, "meta_interval=2", "method=erm"), tmp_path / "erm")


@pytest.mark.parametrize("method", ["focal", "class_balanced", "l2rw"])
def test_each_baseline_trains_end_to_end(tmp_path, method):
    summary = train(make_cfg(*FAST, f"method={method}"), tmp_path)
    assert summary["method"] == method and 0 <= summary["final_test_acc"] <= 100
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in lines)
    assert ("meta_loss" in lines[0]) == (method == "l2rw")


def test_experiment_configs_compose_the_papers_protocols():
    lt = make_cfg("+experiment=long_tail_cifar10", "imbalance=50")
    assert (lt.dataset.name, lt.model.depth, lt.imbalance, lt.epochs) == ("cifar10", 32, 50, 100)
    assert list(lt.lr_epochs) == [80, 90] and lt.nesterov and lt.meta_lr == 1e-5
    assert lt.meta_init == "random"  # the original code's init (the default is flat)
    assert make_cfg("+experiment=long_tail_cifar100").dataset.name == "cifar100"
    noise = make_cfg("+experiment=noise_uniform_cifar10")
    assert (noise.model.arch, noise.noise, noise.noise_rate, noise.meta_per_class) == (
        "wrn",
        "uniform",
        0.4,
        100,
    )
    assert noise.meta_init == make_cfg().meta_init == "flat"  # a random start can invert it
    flip = make_cfg("+experiment=noise_flip_cifar10", "noise_rate=0.2")
    assert (flip.model.arch, flip.noise, flip.noise_rate) == ("resnet", "flip", 0.2)
