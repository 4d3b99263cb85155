"""CMW-Net's class-aware meta-net (meta_net=cmw): its class groups are exact k-means on the
class counts, its meta-gradient is autograd through the unrolled step of an independent
torch.nn reference (float64), and with one group and equal heads it trains exactly as the MLP."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from test_meta import (
    CLASSES,
    EXACT,
    HIDDEN,
    LR,
    batches,
    classifier,
    clone,
    hp_for,
    meta_grad_of,
    setup,
    textbook_sgd,
)
from torch import nn
from torch.func import functional_call

from mwn.core.meta import mwn_step
from mwn.core.models import ClassAwareMetaNet, MetaNet, count_groups
from mwn.core.optim import adam_init

from conftest import FAST, make_cfg, rel_err, run_cli

# the paper's long-tailed CIFAR-10 at imbalance factor 100 (n_c = 5000 * 0.01^(c/9))
CIFAR10_IF100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


# ---------------------------------------------------------------- the groups


def brute_force_groups(counts: list[int], k: int) -> list[int]:
    """k-means by trying every assignment of the distinct counts to k clusters: the least
    within-cluster sum of squares, clusters renumbered by their largest count (0: the head)."""
    values = sorted(set(counts), reverse=True)
    best, best_cost = None, float("inf")
    for labels in itertools.product(range(k), repeat=len(values)):
        if len(set(labels)) < min(k, len(values)):
            continue
        cost = 0.0
        for c in set(labels):
            members = [v * counts.count(v) for v, lab in zip(values, labels) if lab == c]
            n = sum(counts.count(v) for v, lab in zip(values, labels) if lab == c)
            mean = sum(members) / n
            cost += sum(
                counts.count(v) * (v - mean) ** 2 for v, lab in zip(values, labels) if lab == c
            )
        if cost < best_cost - 1e-9:
            best, best_cost = labels, cost
    order = {}
    for lab in best:  # values are descending: first seen = largest counts
        order.setdefault(lab, len(order))
    group_of = {v: order[lab] for v, lab in zip(values, best)}
    return [group_of[c] for c in counts]


def test_groups_by_hand():
    # {100, 90}, {12, 10}, {1}: sums of squares 50 + 2 + 0 = 52; the next best split,
    # {100, 90}, {12}, {10, 1}, costs 50 + 0 + 40.5
    assert count_groups([100, 12, 1, 90, 10], 3) == [0, 1, 2, 0, 1]
    assert count_groups([100, 12, 1, 90, 10], 1) == [0] * 5
    assert count_groups([7, 7, 7], 3) == [0, 0, 0]  # balanced: one group
    assert count_groups([5, 9, 5], 3) == [1, 0, 1]  # two distinct counts: two groups
    with pytest.raises(ValueError, match="meta_net.groups=0"):
        count_groups([1, 2], 0)


@pytest.mark.parametrize(
    "counts",
    [CIFAR10_IF100, [4990, 2991, 1793, 1075, 644, 386, 231, 138, 83, 49], [9, 9, 3, 2, 2, 40, 41]],
)
def test_groups_are_the_k_means_optimum(counts):
    assert count_groups(counts, 3) == brute_force_groups(counts, 3)


def test_cifar10_at_imbalance_100_has_one_head_class_two_medium_and_seven_tail():
    assert count_groups(CIFAR10_IF100, 3) == [0, 1, 1, 2, 2, 2, 2, 2, 2, 2]


# ---------------------------------------------------------------- the meta-gradient

COUNTS = [50, 40, 10, 8, 1]  # groups {0, 1}, {2, 3}, {4}
LABELS = torch.tensor([0, 1, 2, 3, 4, 4])  # every group in the training batch


class RefCMW(nn.Module):
    """CMW-Net's net from torch.nn, one Linear(hidden, 1) per head, looped per sample."""

    def __init__(self, hidden: int, groups: int, group_of: list[int]) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(1, hidden), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(groups))
        self.group_of = group_of

    def forward(self, losses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.trunk(losses[:, None])
        return torch.stack(
            [
                torch.sigmoid(self.heads[self.group_of[int(y)]](h[i]))[0]
                for i, y in enumerate(labels)
            ]
        )


def as_ref(theta: dict, groups: int) -> dict:
    """ClassAwareMetaNet's parameters in RefCMW's names (head g: row g of heads)."""
    out = {k: v for k, v in theta.items() if k.startswith("trunk")}
    for g in range(groups):
        out[f"heads.{g}.weight"] = theta["heads.weight"][g : g + 1]
        out[f"heads.{g}.bias"] = theta["heads.bias"][g : g + 1]
    return out


def cmw_setup(seed: int = 0, init: str = "random"):
    model, _, state = setup(seed)
    torch.manual_seed(100 + seed)
    meta_net = ClassAwareMetaNet(HIDDEN, 1, init, groups=3).double()
    theta = {k: v.detach().clone() for k, v in meta_net.named_parameters()}
    state = {**state, "meta_params": theta, "meta_opt": adam_init(theta)}
    return model, meta_net, {**state, **meta_net.constants(COUNTS)}


def ref_cmw_meta_grad(state, batch, meta_batch, hp):
    """Autograd through the unrolled textbook SGD step with the reference net."""
    (x, y), (xm, ym) = batch, meta_batch
    ref = classifier("resnet", torch_batchnorm=True)
    ref_meta = RefCMW(HIDDEN, 3, count_groups(COUNTS, 3)).double()
    params = {k: v.detach().clone().requires_grad_() for k, v in state["params"].items()}
    theta = {k: v.detach().clone().requires_grad_() for k, v in state["meta_params"].items()}
    losses = F.cross_entropy(
        functional_call(ref, (params, clone(state["buffers"])), (x,)), y, reduction="none"
    )
    w = functional_call(ref_meta, as_ref(theta, 3), (losses.detach(), y))
    if hp.normalize_weights:
        w = w * (w.numel() / w.sum())
    g = torch.autograd.grad((w * losses).mean(), list(params.values()), create_graph=True)
    ahead, _ = textbook_sgd(params, dict(zip(params, g)), state["momentum"], LR, hp)
    meta_logits = functional_call(ref, (ahead, clone(state["buffers"])), (xm,))
    meta_loss = F.cross_entropy(meta_logits, ym)
    return dict(zip(theta, torch.autograd.grad(meta_loss, list(theta.values())))), meta_loss


@pytest.mark.parametrize("method", ["jvp", "double_backward"])
@pytest.mark.parametrize("normalize", [True, False], ids=["normalised", "plain"])
def test_cmw_meta_gradient_equals_autograd_through_the_textbook_lookahead(method, normalize):
    hp = hp_for("nesterov+wd", normalize, meta_grad=method)
    model, meta_net, state = cmw_setup()
    (batch,), (meta_batch,) = batches(0, 1), batches(50, 1, size=5)
    batch = (batch[0], LABELS)
    ours = meta_grad_of(method, model, meta_net, state, batch, meta_batch, hp)
    ref, ref_meta_loss = ref_cmw_meta_grad(state, batch, meta_batch, hp)
    assert rel_err(ours.meta_grad, ref) < EXACT
    torch.testing.assert_close(ours.meta_loss, ref_meta_loss.detach(), rtol=1e-12, atol=0)
    # every head got a gradient of its own (each group had samples in the batch)
    for g in range(3):
        assert float(ref["heads.weight"][g].norm()) > 1e-6


def test_a_cmw_net_with_equal_heads_and_one_group_trains_as_the_mlp():
    """Balanced counts: one group. The heads start as the MLP's output layer; four whole
    iterations (meta update, roll back) give the MLP's run to float64 rounding, and the unused
    heads never move."""
    hp = hp_for("nesterov+wd", True, meta_weight_decay=0.0)
    model, _, start = setup(0)
    torch.manual_seed(1)
    mlp = MetaNet(HIDDEN).double()
    w1, b1, w2, b2 = (p.detach().clone() for p in mlp.parameters())
    theta = {
        "trunk.0.weight": w1,
        "trunk.0.bias": b1,
        "heads.weight": w2.repeat(3, 1),
        "heads.bias": b2.repeat(3),
    }
    cmw = ClassAwareMetaNet(HIDDEN, 1, groups=3).double()
    constants = cmw.constants([9] * CLASSES)
    assert constants["meta_groups"].tolist() == [0] * CLASSES
    mlp_theta = dict(
        zip(("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"), (w1, b1, w2, b2))
    )
    a = {**start, "meta_params": mlp_theta, "meta_opt": adam_init(mlp_theta)}
    b = {**start, "meta_params": theta, "meta_opt": adam_init(theta), **constants}
    for (batch,), (meta_batch,) in zip(
        (batches(s, 1) for s in range(4)), (batches(50 + s, 1, 5) for s in range(4))
    ):
        a, ma = mwn_step(model, mlp, a, batch, meta_batch, LR, hp)
        b, mb = mwn_step(model, cmw, b, batch, meta_batch, LR, hp)
        for k in ma:
            assert rel_err(mb[k], ma[k]) < 1e-12, k
    for part in ("params", "buffers", "momentum"):
        assert rel_err(b[part], a[part]) < 1e-12, part
    got, want = b["meta_params"], a["meta_params"]
    assert rel_err(got["trunk.0.weight"], want["net.0.weight"]) < 1e-12
    assert rel_err(got["heads.weight"][0], want["net.2.weight"][0]) < 1e-12
    assert rel_err(want["net.2.weight"], w2) > 1e-6  # the meta-net did learn
    assert torch.equal(got["heads.weight"][1:], w2.repeat(2, 1))  # no sample, no change
    assert torch.equal(got["heads.bias"][1:], b2.repeat(2))


def test_without_labels_it_gives_every_groups_curve():
    torch.manual_seed(0)
    net = ClassAwareMetaNet(8, 1, groups=3).double()
    theta = {k: v.detach() for k, v in net.named_parameters()}
    losses = torch.linspace(0, 5, 11, dtype=torch.float64)
    constants = net.constants([30, 20, 2])
    curves = functional_call(net, theta, (losses, None, constants))
    assert curves.shape == (3, 11)
    for c in range(3):  # class c's weights are its group's curve
        labels = torch.full((11,), c)
        w = functional_call(net, theta, (losses, labels, constants))
        assert torch.equal(w, curves[constants["meta_groups"][c]])
    assert not torch.allclose(curves[0], curves[1])  # the heads differ


@pytest.mark.parametrize("seed", range(3))
def test_flat_init_starts_every_head_near_one_half_and_not_exactly_flat(seed):
    torch.manual_seed(seed)
    net = ClassAwareMetaNet(100, 1, "flat", groups=3)
    curves = net(torch.linspace(0, 5, 51)).detach()
    assert (curves - 0.5).abs().max() < 1e-2
    assert (curves[:, -1] - curves[:, 0]).abs().min() > 1e-5  # a slope the meta set corrects


# ---------------------------------------------------------------- the command line


def test_meta_net_settings_are_checked_in_one_line(tmp_path):
    from mwn.config import ConfigError, check_config

    with pytest.raises(ConfigError, match=r"^meta_net.groups=3: allowed values are 1 with"):
        check_config(make_cfg("meta_net.groups=3"))
    with pytest.raises(ConfigError, match=r"^meta_net.groups=0: allowed values are integers"):
        check_config(make_cfg("meta_net=cmw", "meta_net.groups=0"))
    out = run_cli(*FAST, "meta_net=nope", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr == "mwn: error: meta_net=nope: allowed values are cmw | mlp\n"


@pytest.mark.parametrize(
    "extra",
    [[], ["rollback=false", "meta_interval=2"], ["meta_grad=double_backward"], ["bf16=true"]],
    ids=["default", "no-rollback-interval-2", "double-backward", "bf16"],
)
def test_a_cmw_run_records_its_groups_and_one_curve_per_group(tmp_path, extra):
    run = tmp_path / "run"
    out = run_cli(*FAST, "meta_net=cmw", *extra, f"hydra.run.dir={run}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    counts = summary["train_class_counts"]
    assert summary["meta_net"] == "cmw"
    assert summary["meta_groups"] == count_groups(counts, 3)
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    curves = last["weight_fn_by_group"]
    assert len(curves) == 3 and all(len(c) == len(summary["weight_fn_losses"]) for c in curves)
    assert "weight_fn" not in last
    assert (run / "weight_fn.png").is_file()
