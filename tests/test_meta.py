"""Exactness of the meta-gradient and of whole MWN iterations, in float64, against references
written here with plain torch: torch.nn modules (PyTorch's own BatchNorm2d), autograd with
create_graph=True through a textbook SGD lookahead, torch.optim.SGD and torch.optim.Adam.
Nothing in a reference comes from mwn.meta or mwn.optim, so a bug there cannot cancel out;
the mutation tests at the end show that each comparison sees the bugs it is meant to see."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_map

from mwn.core import batchnorm, models, tangents
from mwn.core.baselines import erm_step
from mwn.core.meta import META_GRADS, mwn_step, train_pass
from mwn.core.models import MetaNet
from mwn.core.sums import Sums

from conftest import rel_err, step_hp

LR = 0.3
HIDDEN = 16
CLASSES = 5
EXACT = 1e-9  # meta-gradients: measured up to 6e-15 (the JVP sums in another order)
STEP_EXACT = 1e-10  # whole iterations (displacements, buffers, Adam state, metrics): 1.4e-14

# the inner step's variants: (momentum, weight decay, nesterov)
VARIANTS = {
    "sgd": dict(momentum=0.0, weight_decay=0.0, nesterov=False),
    "sgd+wd": dict(momentum=0.0, weight_decay=5e-3, nesterov=False),
    "momentum+wd": dict(momentum=0.9, weight_decay=5e-3, nesterov=False),
    "nesterov+wd": dict(momentum=0.9, weight_decay=5e-3, nesterov=True),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def hp_for(variant="nesterov+wd", normalize=True, **changes):
    """The default config's step hyperparameters with an inner-step variant, a meta-net step
    large enough to see (Adam, lr 1e-2, L2 1e-4) and `changes`."""
    fields = dict(
        **VARIANTS[variant],
        normalize_weights=normalize,
        meta_lr=1e-2,
        meta_weight_decay=1e-4,
        rollback=True,
        fp16=False,
        bf16=False,
        meta_grad="jvp",
    )
    return step_hp(**{**fields, **changes})


# ---------------------------------------------------------------- the setting


def classifier(arch: str, torch_batchnorm: bool = False) -> nn.Module:
    """The small float64 classifier; with torch_batchnorm, the same architecture built with
    PyTorch's nn.BatchNorm2d (the reference's), whose load_state_dict takes the same tensors."""
    build = {
        "resnet": lambda: models.ResNet(CLASSES, depth=8, width=4, in_channels=1),
        "wrn": lambda: models.WideResNet(CLASSES, depth=10, width=16, in_channels=1),
    }[arch]
    if not torch_batchnorm:
        return build().double()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "BatchNorm2d", nn.BatchNorm2d)
        model = build().double()
    assert all(type(m) is not batchnorm.BatchNorm2d for m in model.modules())
    assert any(type(m) is nn.BatchNorm2d for m in model.modules())
    return model


class RefMetaNet(nn.Module):
    """The meta-net from torch.nn: Linear-ReLU-Linear-sigmoid of a loss, (B,) -> (B,)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(losses[:, None]))[:, 0]


def batches(seed: int, count: int, size: int = 6) -> list:
    gen = torch.Generator().manual_seed(1000 + seed)
    x = lambda: torch.randn(size, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = lambda: torch.randint(0, CLASSES, (size,), generator=gen)
    return [(x(), y()) for _ in range(count)]


def setup(seed: int = 0, arch: str = "resnet", hidden: int = HIDDEN):
    """The code under test's model and meta-net, and a mid-training state: running statistics
    away from their initial values, non-zero momentum buffers, a fresh Adam state."""
    torch.manual_seed(seed)
    model = classifier(arch)
    meta_net = MetaNet(hidden).double()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    for k, v in buffers.items():
        buffers[k] = v + 0.2 * torch.rand_like(v) if v.is_floating_point() else v + 3
    meta_params = {k: v.detach().clone() for k, v in meta_net.named_parameters()}
    state = {
        "params": params,
        "buffers": buffers,
        "momentum": {k: 0.1 * torch.randn_like(v) for k, v in params.items()},
        "meta_params": meta_params,
        "meta_opt": {
            "step": torch.zeros((), dtype=torch.float64),
            "exp_avg": {k: torch.zeros_like(v) for k, v in meta_params.items()},
            "exp_avg_sq": {k: torch.zeros_like(v) for k, v in meta_params.items()},
        },
    }
    return model, meta_net, state


def clone(tree):
    if isinstance(tree, dict):
        return {k: clone(v) for k, v in tree.items()}
    return tree.clone()


def detached(tensors: dict) -> dict:
    return {k: v.detach() for k, v in tensors.items()}


# ---------------------------------------------------------------- the reference, plain torch


def textbook_sgd(params, grads, bufs, lr, hp, mutation=None):
    """torch.optim.SGD's rule written out (dampening 0), differentiable:
    d = g + wd p; buf = m buf + d; p' = p - lr (d + m buf if nesterov else buf).
    Mutations: "nesterov_factor" keeps the values but lets only d's direct term carry the
    gradient (as if a = lr for Nesterov); "wd_outside_momentum" adds wd p after the buffer."""
    m, wd = hp.momentum, hp.weight_decay
    new_params, new_bufs = {}, {}
    for k, p in params.items():
        g = grads[k]
        if mutation == "wd_outside_momentum":
            buf = m * bufs[k] + g
            step = (g + m * buf if hp.nesterov else buf) + wd * p
        else:
            d = g + wd * p
            buf = m * bufs[k] + (d.detach() if mutation == "nesterov_factor" else d)
            step = d + m * buf if hp.nesterov else buf
        new_params[k], new_bufs[k] = p - lr * step, buf
    return new_params, new_bufs


def ref_weights(meta, theta, losses, normalize, mutation=None):
    """V(L_i; theta) of the detached losses; normalised: w * n / sum(w), the sum differentiated
    (mutation "detached_sum": not)."""
    w = functional_call(meta, theta, (losses.detach(),))
    if not normalize:
        return w
    total = w.sum()
    return w * (w.numel() / (total.detach() if mutation == "detached_sum" else total))


def ref_lookahead(ref, meta, state, batch, meta_batch, lr, hp, theta=None, mutation=None):
    """Meta loss at w'(theta), w' = one textbook SGD step on mean(V_i L_i(w)), BatchNorm in
    training mode on copies of the buffers (the meta batch's statistics, running ones untouched).
    Returns (meta_loss, theta with grad, lookahead params, lookahead momentum, weights)."""
    (x, y), (xm, ym) = batch, meta_batch
    params = {k: v.detach().clone().requires_grad_() for k, v in state["params"].items()}
    theta = state["meta_params"] if theta is None else theta
    theta = {k: v.detach().clone().requires_grad_() for k, v in theta.items()}
    logits = functional_call(ref, (params, clone(state["buffers"])), (x,))
    losses = F.cross_entropy(logits, y, reduction="none")
    w = ref_weights(meta, theta, losses, hp.normalize_weights, mutation)
    g = torch.autograd.grad((w * losses).mean(), list(params.values()), create_graph=True)
    ahead, bufs = textbook_sgd(params, dict(zip(params, g)), state["momentum"], lr, hp, mutation)
    meta_logits = functional_call(ref, (ahead, clone(state["buffers"])), (xm,))
    return F.cross_entropy(meta_logits, ym), theta, ahead, bufs, w


def ref_meta_grad(ref, meta, state, batch, meta_batch, lr, hp, mutation=None):
    """d meta loss / d theta by autograd through the unrolled textbook step (double backward)."""
    meta_loss, theta, ahead, bufs, w = ref_lookahead(
        ref, meta, state, batch, meta_batch, lr, hp, mutation=mutation
    )
    g = torch.autograd.grad(meta_loss, list(theta.values()))
    out = dict(zip(theta, g))
    return out, meta_loss.detach(), (detached(ahead), detached(bufs)), w.detach()


def adam_without_second_bias_correction(opt: torch.optim.Adam) -> None:
    """A wrong Adam (mutation "adam_no_bias_correction2"): v is used as if unbiased."""
    group = opt.param_groups[0]
    (b1, b2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
    with torch.no_grad():
        for p in group["params"]:
            s = opt.state[p]
            if not s:
                s.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p))
                s["exp_avg_sq"] = torch.zeros_like(p)
            s["step"] += 1
            g = p.grad + wd * p
            s["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
            s["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
            m_hat = s["exp_avg"] / (1 - b1 ** float(s["step"]))
            p.sub_(lr * m_hat / (s["exp_avg_sq"].sqrt() + eps))


class Reference:
    """Whole MWN iterations with torch.nn and torch.optim. Per iteration: the meta-gradient by
    autograd through the textbook lookahead (ref_meta_grad), torch.optim.Adam on the meta-net,
    then one training-mode forward of the nn.Module at w (moving the running statistics once)
    and torch.optim.SGD on mean(V_i L_i) with the updated meta-net (roll back) or the old one."""

    def __init__(self, arch, hidden, state, hp, mutation=None):
        self.hp, self.mutation = hp, mutation
        self.model = classifier(arch, torch_batchnorm=True)
        self.model.load_state_dict({**state["params"], **state["buffers"]})
        self.meta = RefMetaNet(hidden).double()
        self.meta.load_state_dict(state["meta_params"])
        self.sgd = torch.optim.SGD(
            self.model.parameters(),
            lr=LR,
            momentum=hp.momentum,
            weight_decay=hp.weight_decay,
            nesterov=hp.nesterov,
        )
        if hp.momentum:
            for k, p in self.model.named_parameters():  # mid-training: non-zero buffers
                self.sgd.state[p]["momentum_buffer"] = state["momentum"][k].clone()
        self._momentum = clone(state["momentum"])  # for the hand-written mutated SGD
        self.adam = torch.optim.Adam(
            self.meta.parameters(), lr=hp.meta_lr, weight_decay=hp.meta_weight_decay
        )

    def state(self) -> dict:
        params = dict(self.model.named_parameters())
        if self.mutation == "wd_outside_momentum":
            momentum = clone(self._momentum)
        elif self.hp.momentum:
            momentum = {k: self.sgd.state[p]["momentum_buffer"].clone() for k, p in params.items()}
        else:
            momentum = {k: torch.zeros_like(p) for k, p in params.items()}  # SGD keeps none
        meta = dict(self.meta.named_parameters())
        adam = [self.adam.state[p] for p in meta.values()]
        return {
            "params": {k: p.detach().clone() for k, p in params.items()},
            "buffers": {k: b.clone() for k, b in self.model.named_buffers()},
            "momentum": momentum,
            "meta_params": {k: p.detach().clone() for k, p in meta.items()},
            "meta_opt": {
                "step": adam[0]["step"].clone() if adam[0] else torch.tensor(0.0),
                "exp_avg": {k: s["exp_avg"].clone() for k, s in zip(meta, adam) if s},
                "exp_avg_sq": {k: s["exp_avg_sq"].clone() for k, s in zip(meta, adam) if s},
            },
        }

    def step(self, batch, meta_batch, lr) -> dict:
        hp, mutation = self.hp, self.mutation
        meta_grad, meta_loss, _, w_old = ref_meta_grad(
            self.model, self.meta, self.state(), batch, meta_batch, lr, hp, mutation
        )
        for k, p in self.meta.named_parameters():
            p.grad = meta_grad[k].clone()
        if mutation == "adam_no_bias_correction2":
            adam_without_second_bias_correction(self.adam)
        else:
            self.adam.step()
        x, y = batch
        losses = F.cross_entropy(self.model(x), y, reduction="none")  # running stats move once
        with torch.no_grad():
            if hp.rollback:
                theta = dict(self.meta.named_parameters())
                w = ref_weights(self.meta, theta, losses, hp.normalize_weights)
            else:
                w = w_old
        self.sgd.zero_grad()
        (w * losses).mean().backward()
        if mutation == "wd_outside_momentum":
            params = dict(self.model.named_parameters())
            grads = {k: p.grad for k, p in params.items()}
            with torch.no_grad():
                new, self._momentum = textbook_sgd(params, grads, self._momentum, lr, hp, mutation)
                for k, p in params.items():
                    p.copy_(new[k])
        else:
            self.sgd.param_groups[0]["lr"] = lr
            self.sgd.step()
        norm = torch.stack([g.square().sum() for g in meta_grad.values()]).sum().sqrt()
        return {
            "loss": losses.mean().detach(),
            "weighted_loss": (w * losses).mean().detach(),
            "meta_loss": meta_loss,
            "mean_weight": w.mean(),
            "meta_grad_norm": norm,
        }


def step_errors(new: dict, ref: dict, start: dict) -> dict:
    """Relative errors of everything an iteration changes: parameters, meta-net parameters and
    running statistics as displacements from the start (so that the tolerance applies to the
    steps, not to the much larger values), momentum buffers and Adam's moments as they are.
    Integers (num_batches_tracked, Adam's step count) count as 0 equal, 1 different."""
    moved = lambda a, group: {k: a[k] - start[group][k] for k in a if a[k].is_floating_point()}
    out = {}
    for group in ("params", "meta_params", "buffers"):
        out[group] = rel_err(moved(new[group], group), moved(ref[group], group))
    out["momentum"] = rel_err(new["momentum"], ref["momentum"])
    for moment in ("exp_avg", "exp_avg_sq"):
        out[moment] = rel_err(new["meta_opt"][moment], ref["meta_opt"][moment])
    counts = [(new["meta_opt"]["step"], ref["meta_opt"]["step"])]
    counts += [
        (v, ref["buffers"][k]) for k, v in new["buffers"].items() if not v.is_floating_point()
    ]
    out["counts"] = float(any(float(a) != float(b) for a, b in counts))
    return out


def run_both(hp, steps=4, seed=0, mutation=None, arch="resnet"):
    """`steps` iterations of mwn_step and of the Reference from the same state and batches
    (the learning rate drops on the way); the relative errors, worst over the steps."""
    model, meta_net, state = setup(seed, arch)
    start = clone(state)
    ref = Reference(arch, HIDDEN, state, hp, mutation)
    train, meta = batches(seed, steps), batches(seed + 50, steps, size=5)
    worst: dict = {}
    for i in range(steps):
        lr = LR if i < 2 else LR / 3
        state, metrics = mwn_step(model, meta_net, state, train[i], meta[i], lr, hp)
        ref_metrics = ref.step(train[i], meta[i], lr)
        errs = step_errors(state, ref.state(), start)
        for name, value in ref_metrics.items():
            errs[name] = rel_err(metrics[name], value)
        for k, v in errs.items():
            worst[k] = max(worst.get(k, 0.0), v)
    return worst, state, start


# ---------------------------------------------------------------- the meta-gradient


def meta_grad_of(method, model, meta_net, state, batch, meta_batch, hp):
    """The code under test: a META_GRADS method after train_pass, fp32 in one process."""
    train = train_pass(model, meta_net, state, batch, hp, Sums().reduce)
    return META_GRADS[method](model, meta_net, state, batch, meta_batch, LR, hp, train, Sums())


def compare_meta_grad(hp, method="jvp", arch="resnet", seed=0, mutation=None):
    model, meta_net, state = setup(seed, arch)
    (batch,), (meta_batch,) = batches(seed, 1), batches(seed + 50, 1, size=5)
    ours = meta_grad_of(method, model, meta_net, state, batch, meta_batch, hp)
    ref = classifier(arch, torch_batchnorm=True)
    ref.load_state_dict({**state["params"], **state["buffers"]})
    g, meta_loss, ahead, _ = ref_meta_grad(
        ref, RefMetaNet(HIDDEN).double(), state, batch, meta_batch, LR, hp, mutation
    )
    return ours, g, meta_loss, ahead


def full_jvp(monkeypatch) -> None:
    """The JVP method through torch.func.jvp (primal and tangent), not the tangent pass on the
    training forward's activations (mwn.core.tangents) that the ResNet otherwise gets."""
    monkeypatch.setattr(tangents, "TANGENTS", {})


@pytest.mark.parametrize("method", ["jvp", "jvp_full", "double_backward"])
@pytest.mark.parametrize("normalize", [True, False], ids=["normalised", "plain"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_meta_gradient_equals_autograd_through_the_textbook_lookahead(
    variant, normalize, method, monkeypatch
):
    if method == "jvp_full":
        full_jvp(monkeypatch)
        method = "jvp"
    hp = hp_for(variant, normalize, meta_grad=method)
    ours, ref, ref_meta_loss, (ahead, ahead_momentum) = compare_meta_grad(hp, method)
    assert rel_err(ours.meta_grad, ref) < EXACT
    assert float(ref["net.2.weight"].norm()) > 1e-4  # a non-trivial gradient was compared
    torch.testing.assert_close(ours.meta_loss, ref_meta_loss, rtol=1e-12, atol=0)
    # the lookahead a method hands on (the step without roll back) is the textbook step
    assert rel_err(ours.ahead[0], ahead) < 1e-13
    assert rel_err(ours.ahead[1], ahead_momentum) < 1e-13


def test_the_batchnorm_jvp_rule_keeps_the_meta_gradient_exact(monkeypatch):
    """The JVP pass's own BatchNorm rule (used on CIFAR-sized activations) on every layer."""
    calls = []
    rule = batchnorm._TrainBatchNorm.jvp
    full_jvp(monkeypatch)
    monkeypatch.setattr(batchnorm, "JVP_RULE_MIN_SIZE", 0)
    monkeypatch.setattr(
        batchnorm._TrainBatchNorm, "jvp", staticmethod(lambda *a: calls.append(1) or rule(*a))
    )
    for normalize in (True, False):
        hp = hp_for("nesterov+wd", normalize)
        ours, ref, ref_meta_loss, _ = compare_meta_grad(hp)
        assert rel_err(ours.meta_grad, ref) < EXACT
        torch.testing.assert_close(ours.meta_loss, ref_meta_loss, rtol=1e-12, atol=0)
    assert calls  # the rule was used


@pytest.mark.parametrize("jvp_rule", [False, True], ids=["torch_rule", "own_rule"])
def test_meta_gradient_is_exact_for_the_wide_resnet_too(jvp_rule, monkeypatch):
    """Pre-activation blocks and 1x1 shortcuts (WRN) through the same JVP path."""
    if jvp_rule:
        monkeypatch.setattr(batchnorm, "JVP_RULE_MIN_SIZE", 0)
    hp = hp_for("nesterov+wd", True)
    ours, ref, ref_meta_loss, _ = compare_meta_grad(hp, arch="wrn")
    assert rel_err(ours.meta_grad, ref) < EXACT
    assert float(ref["net.2.weight"].norm()) > 1e-4
    torch.testing.assert_close(ours.meta_loss, ref_meta_loss, rtol=1e-12, atol=0)


def meta_net_preactivations(theta, losses):
    """The hidden ReLU's inputs W1 L_i + b1 for every training loss, (B, hidden)."""
    return losses[:, None] * theta["net.0.weight"][:, 0] + theta["net.0.bias"]


@pytest.mark.parametrize("seed", range(5))
def test_meta_gradient_agrees_with_central_finite_differences(seed):
    """Directional derivatives of the reference's meta loss at w'(theta + s eps d), eps chosen
    so that no hidden ReLU of the meta-net changes sign between theta - eps d and theta + eps d
    for any training loss (the pre-activations are linear in theta: the ends decide)."""
    hp = hp_for("nesterov+wd", normalize=seed % 2 == 0)
    model, meta_net, state = setup(seed)
    (batch,), (meta_batch,) = batches(seed, 1), batches(seed + 50, 1, size=5)
    grad = meta_grad_of("jvp", model, meta_net, state, batch, meta_batch, hp).meta_grad
    ref, ref_meta = classifier("resnet", torch_batchnorm=True), RefMetaNet(HIDDEN).double()
    ref.load_state_dict({**state["params"], **state["buffers"]})
    with torch.no_grad():
        losses = F.cross_entropy(ref(batch[0]), batch[1], reduction="none")
    theta = state["meta_params"]
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):
        d = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in theta.items()}
        shifted = lambda s, eps, d=d: {k: theta[k] + s * eps * d[k] for k in theta}
        eps = 1e-5
        while True:
            lo = meta_net_preactivations(shifted(-1, eps), losses)
            hi = meta_net_preactivations(shifted(1, eps), losses)
            if bool((lo.sign() * hi.sign() > 0).all()):
                break
            eps /= 2
        assert eps > 1e-8

        def meta_loss(s, eps=eps, shifted=shifted):
            theta_s = shifted(s, eps)
            out = ref_lookahead(ref, ref_meta, state, batch, meta_batch, LR, hp, theta_s)
            return float(out[0].detach())

        fd = (meta_loss(1) - meta_loss(-1)) / (2 * eps)
        analytic = float(sum((grad[k] * d[k]).sum() for k in theta))
        assert abs(analytic) > 1e-4
        assert abs(fd - analytic) <= 1e-6 * abs(analytic) + 1e-9  # measured 2e-10 to 8e-8 rel


def float32_meta_grad_at_a_flat_start(seed: int) -> tuple[dict, dict]:
    """The meta-gradient at meta_init=flat with normalised weights, in float32 as runs compute
    it and in float64, for one setting."""
    model, _, state = setup(seed)
    torch.manual_seed(seed)
    meta_net = MetaNet(HIDDEN, init="flat").double()
    state["meta_params"] = {k: v.detach().clone() for k, v in meta_net.named_parameters()}
    (batch,), (meta_batch,) = batches(seed, 1, size=32), batches(seed + 50, 1, size=5)
    hp = hp_for()
    exact = meta_grad_of("jvp", model, meta_net, state, batch, meta_batch, hp).meta_grad
    single = lambda tree: tree_map(lambda t: t.float() if t.is_floating_point() else t, tree)
    args = (model.float(), meta_net.float(), single(state), single(batch), single(meta_batch), hp)
    return meta_grad_of("jvp", *args).meta_grad, exact


@pytest.mark.parametrize("seed", range(3))
def test_a_flat_start_has_a_meta_gradient_that_rounding_does_not_decide(seed):
    """Adam's first step is about lr x sign(gradient) whatever the gradient's size, so a meta-net
    parameter whose gradient is rounding noise moves by a full step in a direction the thread
    count decides. At an exactly constant start the output bias is one (its gradient is zero in
    exact arithmetic with normalised weights); meta_init=flat starts near constant instead."""
    ours, exact = float32_meta_grad_at_a_flat_start(seed)
    errors = {k: rel_err(ours[k], exact[k]) for k in exact}
    assert max(errors.values()) < 1e-2, errors  # measured up to 1e-3 (the output bias)


def test_an_exactly_constant_start_would_leave_the_output_bias_to_rounding(monkeypatch):
    """The previous test's reason: with the output layer at zero, float32 gets the output
    bias's gradient wrong by orders of magnitude (measured 1e8 relative)."""
    monkeypatch.setattr(models, "FLAT_SCALE", 0.0)
    ours, exact = float32_meta_grad_at_a_flat_start(0)
    assert float(exact["net.2.bias"].abs()) < 1e-15 < 1e-12 < float(ours["net.2.bias"].abs())


# ---------------------------------------------------------------- whole iterations


@pytest.mark.parametrize("rollback", [True, False], ids=["rollback", "no_rollback"])
@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
@pytest.mark.parametrize("normalize", [True, False], ids=["normalised", "plain"])
def test_iterations_equal_torch_optim_training(normalize, nesterov, rollback):
    """Four mwn_step iterations (new batches, a learning rate that drops) against the
    Reference: parameters, momentum buffers, running statistics, meta-net, Adam state and
    metrics. Without roll back the classifier's step is the lookahead itself, so this also
    checks the lookahead against torch.optim.SGD."""
    variant = "nesterov+wd" if nesterov else "momentum+wd"
    hp = hp_for(variant, normalize, rollback=rollback)
    errs, state, start = run_both(hp)
    assert errs["counts"] == 0 and max(errs.values()) < STEP_EXACT, errs
    assert float(state["meta_opt"]["step"]) == 4
    tracked = "bn.num_batches_tracked"
    assert int(state["buffers"][tracked]) == int(start["buffers"][tracked]) + 4


def test_double_backward_method_iterations_equal_torch_optim_training():
    """meta_grad=double_backward (the benchmark's reference) is a real step too."""
    hp = hp_for("nesterov+wd", True, meta_grad="double_backward")
    errs, _, _ = run_both(hp)
    assert errs["counts"] == 0 and max(errs.values()) < STEP_EXACT, errs


def all_tensors(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from all_tensors(v, f"{prefix}{k}/")
    else:
        yield prefix, tree


@pytest.mark.parametrize("own_rule", [False, True], ids=["torch_rule", "own_rule"])
@pytest.mark.parametrize("step", [mwn_step, erm_step])
def test_a_step_never_writes_the_callers_state(step, own_rule, monkeypatch):
    """The caller's tensors (Adam state included) are unchanged after a step, the new ones
    carry no autograd graph, and the running statistics moved exactly once: those of one
    training-mode forward of PyTorch's BatchNorm on the training batch."""
    if own_rule:  # the JVP pass's BatchNorm updates running statistics in place
        monkeypatch.setattr(batchnorm, "JVP_RULE_MIN_SIZE", 0)
    model, meta_net, state = setup()
    before = clone(state)
    (batch,), (meta_batch,) = batches(0, 1), batches(50, 1, size=5)
    new, _ = step(model, meta_net, state, batch, meta_batch, LR, hp_for())
    after = dict(all_tensors(state))
    for name, t in all_tensors(before):
        assert torch.equal(after[name], t), name
    for name, t in all_tensors(new):
        assert not t.requires_grad, name
    ref = classifier("resnet", torch_batchnorm=True)
    ref.load_state_dict({**before["params"], **before["buffers"]})
    ref(batch[0])
    for k, v in ref.named_buffers():
        torch.testing.assert_close(new["buffers"][k], v, rtol=1e-14, atol=0)
        assert not torch.equal(v, before["buffers"][k]), k  # ...and they did move


def test_erm_step_equals_torch_training():
    """The baseline is ordinary training: nn.Module + torch.optim.SGD, BatchNorm stats included."""
    model, meta_net, state = setup()
    hp = hp_for("nesterov+wd")
    ref = classifier("resnet", torch_batchnorm=True)
    ref.load_state_dict({**state["params"], **state["buffers"]})
    opt = torch.optim.SGD(ref.parameters(), lr=LR, momentum=0.9, weight_decay=5e-3, nesterov=True)
    for k, p in ref.named_parameters():
        opt.state[p]["momentum_buffer"] = state["momentum"][k].clone()
    start = clone(state)
    for i, (x, y) in enumerate(batches(0, 3)):
        lr = LR if i < 2 else LR / 3
        state, metrics = erm_step(model, None, state, (x, y), None, lr, hp)
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad()
        loss = F.cross_entropy(ref(x), y)
        loss.backward()
        opt.step()
        torch.testing.assert_close(metrics["loss"], loss.detach(), rtol=1e-12, atol=0)
    params = {k: p.detach() for k, p in ref.named_parameters()}
    moved = lambda d: {k: d[k] - start["params"][k] for k in d}
    assert rel_err(moved(state["params"]), moved(params)) < STEP_EXACT
    momentum = {k: opt.state[p]["momentum_buffer"] for k, p in ref.named_parameters()}
    assert rel_err(state["momentum"], momentum) < STEP_EXACT
    for k, v in ref.named_buffers():
        torch.testing.assert_close(state["buffers"][k], v, rtol=1e-12, atol=0)


# ---------------------------------------------------------------- the references are sharp


@pytest.mark.parametrize(
    "mutation, normalize, threshold",
    [("nesterov_factor", False, 0.3), ("detached_sum", True, 1e-2)],  # measured 0.90, 0.99
)
def test_the_meta_gradient_comparison_sees_a_wrong_meta_gradient(mutation, normalize, threshold):
    """The bugs that once passed: the same comparison against a reference with Nesterov's
    (1 + momentum) factor dropped (the meta-gradient shrinks by 1 / 1.9) or with the
    normalisation's sum detached fails by far more than its tolerance."""
    hp = hp_for("nesterov+wd", normalize)
    ours, wrong, _, _ = compare_meta_grad(hp, mutation=mutation)
    assert rel_err(ours.meta_grad, wrong) > threshold


@pytest.mark.parametrize(
    "mutation, variant, field, threshold",
    [
        ("wd_outside_momentum", "momentum+wd", "momentum", 1e-3),  # measured 5.2e-2
        ("wd_outside_momentum", "momentum+wd", "params", 1e-3),  # 1.1e-2
        ("adam_no_bias_correction2", "nesterov+wd", "meta_params", 0.5),  # 0.97
        ("detached_sum", "nesterov+wd", "meta_params", 1e-2),  # 0.95
        ("nesterov_factor", "nesterov+wd", "meta_grad_norm", 0.3),  # 0.90
    ],
)
def test_the_iteration_comparison_sees_a_wrong_step(mutation, variant, field, threshold):
    """Each wrong variant, written into the Reference, makes the whole-iteration comparison
    fail, in the field it should: weight decay outside the momentum buffer (the same first
    step for heavy-ball momentum, different buffers, then different steps), Adam without its
    second bias correction, a detached normalisation sum, a dropped Nesterov factor."""
    errs, _, _ = run_both(hp_for(variant, True), mutation=mutation)
    assert errs[field] > threshold, errs
