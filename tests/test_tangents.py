"""The tangent pass on the training forward's saved activations (mwn.core.tangents) is the JVP:
the same per-sample dot products as torch.func.jvp of the loss vector, in float64, for every
shape of the CIFAR ResNet's blocks; and it is taken exactly where it applies."""

from __future__ import annotations

import pytest
import torch
from torch.func import jvp, vjp
from torch.utils._pytree import tree_flatten

from mwn.core import tangents
from mwn.core.batchnorm import synchronised
from mwn.core.meta import mwn_step, train_pass
from mwn.core.models import MetaNet, ResNet, WideResNet, extract_state
from mwn.core.step import init_state, per_sample_loss
from mwn.core.sums import LOCAL

from conftest import rel_err, step_hp


def forward_and_tangent(model, x, y, seed: int = 0):
    torch.manual_seed(seed)
    params, buffers = extract_state(model)

    def forward(p):
        saved = []
        losses, new_buffers = per_sample_loss(model, p, buffers, x, y, None, saved)
        return losses, (new_buffers, saved)

    losses, _, (_, saved) = vjp(forward, params, has_aux=True)
    t = {k: torch.randn_like(v) for k, v in params.items()}
    ours = tangents.loss_tangent(model, params, saved, y, t)
    _, want = jvp(lambda p: per_sample_loss(model, p, buffers, x, y)[0], (params,), (t,))
    plain, _ = per_sample_loss(model, params, buffers, x, y)
    return ours, want, losses, plain


@pytest.mark.parametrize("depth,width", [(8, 4), (14, 3), (20, 2)])
def test_the_tangent_pass_is_the_jvp_in_float64(depth, width):
    """Stride-2 stages with option-A shortcuts (odd widths: uneven zero padding), BatchNorm on
    batch statistics, ReLU masks, the pooled linear layer and the cross-entropy."""
    torch.manual_seed(depth)
    model = ResNet(7, depth, width, in_channels=2).double()
    x, y = torch.randn(9, 2, 12, 12, dtype=torch.float64), torch.randint(0, 7, (9,))
    ours, want, losses, plain = forward_and_tangent(model, x, y)
    assert rel_err(ours, want) < 1e-12  # measured 1e-15
    assert float(want.abs().max()) > 1e-3
    assert torch.equal(losses, plain)  # saving activations leaves the forward as it was


def test_saving_activations_leaves_the_float32_forward_bit_for_bit():
    """Losses, running statistics and batch counts of the saving forward (PyTorch's batch norm
    kernel called directly) and the plain one are the same to the bit."""
    torch.manual_seed(0)
    model = ResNet(5, 14, 4, in_channels=3)
    params, buffers = extract_state(model)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 5, (16,))
    saved = []
    got = per_sample_loss(model, params, buffers, x, y, None, saved)
    want = per_sample_loss(model, params, buffers, x, y)
    assert torch.equal(got[0], want[0])
    assert all(torch.equal(got[1][k], want[1][k]) for k in want[1])
    assert not torch.equal(want[1]["bn.running_mean"], buffers["bn.running_mean"])
    assert len(saved) == 1 + 6 + 1 + 1  # stem, 6 blocks, pooled, logits


def test_the_comparison_sees_a_wrong_rule(monkeypatch):
    """BatchNorm's tangent without the batch statistics' own derivative (the eval-mode rule) is
    far off: the test above can fail."""
    monkeypatch.setattr(
        tangents,
        "batch_norm_tangent",
        lambda bn, c, stats, c_t, params, t, name: (
            c_t
            * (params[f"{name}.weight"] / (c.var((0, 2, 3), correction=0) + bn.eps).sqrt()).view(
                1, -1, 1, 1
            )
            + t[f"{name}.bias"].view(1, -1, 1, 1)
        ),
    )
    model = ResNet(5, 8, 4, in_channels=1).double()
    x, y = torch.randn(8, 1, 8, 8, dtype=torch.float64), torch.randint(0, 5, (8,))
    ours, want, _, _ = forward_and_tangent(model, x, y)
    assert rel_err(ours, want) > 1e-2


def test_it_applies_to_the_fp32_resnet_with_its_own_batchnorm_only():
    resnet = ResNet(5, 8, 4, in_channels=1)
    assert tangents.saves_activations(resnet, None)
    assert not tangents.saves_activations(resnet, torch.bfloat16)  # autocast: the JVP
    assert not tangents.saves_activations(synchronised(resnet), None)  # global statistics
    assert not tangents.saves_activations(WideResNet(5, 10, 4, in_channels=1), None)
    torchvision = pytest.importorskip("torchvision")
    assert not tangents.saves_activations(torchvision.models.resnet18(num_classes=5), None)
    no_stats = ResNet(5, 8, 4, in_channels=1)
    no_stats.bn.momentum = None  # a cumulative average: not the rule the pass assumes
    assert not tangents.saves_activations(no_stats, None)
    meta_net = MetaNet(8)
    state = init_state(*extract_state(resnet), extract_state(meta_net)[0])
    batch = (torch.randn(4, 1, 8, 8), torch.randint(0, 5, (4,)))
    for meta_grad, kept in (("jvp", True), ("finite_difference", False)):
        hp = step_hp(meta_grad=meta_grad)
        train = train_pass(resnet, meta_net, state, batch, hp, LOCAL)
        assert (train.saved is not None) == kept


def test_iterations_through_the_tangent_pass_equal_the_full_jvp_in_float64(monkeypatch):
    torch.manual_seed(0)
    model, meta_net = ResNet(5, 14, 4, in_channels=1).double(), MetaNet(16).double()
    params, buffers = extract_state(model)
    state = init_state(params, buffers, extract_state(meta_net)[0])
    hp = step_hp(meta_lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    draw = lambda n: (
        torch.randn(n, 1, 8, 8, generator=gen, dtype=torch.float64),
        torch.randint(0, 5, (n,), generator=gen),
    )
    batches = [(draw(10), draw(6)) for _ in range(3)]

    def run():
        s = state
        for batch, meta_batch in batches:
            s, _ = mwn_step(model, meta_net, s, batch, meta_batch, 0.1, hp)
        return s

    fast = run()
    monkeypatch.setattr(tangents, "TANGENTS", {})
    full = run()
    (a, _), (b, _) = tree_flatten(fast), tree_flatten(full)
    assert max(rel_err(u, v) for u, v in zip(a, b) if u.is_floating_point()) < 1e-10
    moved = fast["meta_params"]["net.0.weight"] - state["meta_params"]["net.0.weight"]
    assert float(moved.abs().max()) > 1e-4
