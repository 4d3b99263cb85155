"""meta_grad=finite_difference: the exact identity's dot products by central differences (the
DARTS / Betty `darts` approximation), against the exact JVP method.

On a smooth classifier (tanh, no kinks) the error is the central difference's truncation,
O(r^2): a tenth of the step, a hundredth of the error, in float64. On a ReLU network the
difference straddles kinks and the error is first order and irregular; what the two methods
share (the lookahead, the meta loss) stays bit for bit the same.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from test_meta import CLASSES, HIDDEN, batches, hp_for, meta_grad_of, setup
from torch import nn
from torch.utils._pytree import tree_map

from mwn.api import MetaReweighter, SettingError
from mwn.config import ConfigError, check_config
from mwn.core.models import MetaNet
from mwn.core.step import init_state

from conftest import FAST, make_cfg, rel_err, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def smooth_setup(seed: int, optimizer: str):
    """A tanh MLP classifier in float64 (no BatchNorm, no kinks), mid-training momentum."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, CLASSES))
    model, meta_net = model.double(), MetaNet(HIDDEN).double()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    meta = {k: v.detach().clone() for k, v in meta_net.named_parameters()}
    state = init_state(params, {}, meta, optimizer=optimizer)
    if optimizer == "sgd":
        state["momentum"] = {k: 0.1 * torch.randn_like(v) for k, v in params.items()}
    return model, meta_net, state


def fd_hp(hp, eps: float):
    return replace(hp, meta_grad="finite_difference", finite_difference_eps=eps)


def single(tree):
    return tree_map(lambda t: t.float() if t.is_floating_point() else t, tree)


CASES = [("sgd", "nesterov+wd"), ("sgd", "sgd"), ("adam", "sgd")]  # optimizer, SGD variant


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("optimizer,variant", CASES)
def test_the_error_is_second_order_in_the_step_on_a_smooth_model(optimizer, variant, seed):
    model, meta_net, state = smooth_setup(seed, optimizer)
    (batch,), (meta_batch,) = batches(seed, 1, size=32), batches(seed + 50, 1, size=5)
    hp = hp_for(variant, optimizer=optimizer, nesterov=variant == "nesterov+wd")
    exact = meta_grad_of("jvp", model, meta_net, state, batch, meta_batch, hp).meta_grad
    err = {
        eps: rel_err(
            meta_grad_of(
                "finite_difference", model, meta_net, state, batch, meta_batch, fd_hp(hp, eps)
            ).meta_grad,
            exact,
        )  # fmt: skip
        for eps in (1e-2, 1e-3)
    }
    assert 1e-9 < err[1e-2] < 1e-3, err  # approximate; measured 1e-6 to 1.7e-4
    assert 0.005 < err[1e-3] / err[1e-2] < 0.02, err  # r / 10 -> error / 100 (measured 0.0100)


@pytest.mark.parametrize("seed", range(3))
def test_in_float32_the_differences_lose_to_the_jvp(seed):
    """In float32 the losses' rounding over 2r adds to the truncation: at the default step
    the error to the float64 exact meta-gradient is bounded, and the JVP's is smaller."""
    model, meta_net, state = smooth_setup(seed, "sgd")
    (batch,), (meta_batch,) = batches(seed, 1, size=32), batches(seed + 50, 1, size=5)
    hp = hp_for("nesterov+wd")
    exact = meta_grad_of("jvp", model, meta_net, state, batch, meta_batch, hp).meta_grad
    args = (model.float(), meta_net.float(), single(state), single(batch), single(meta_batch))
    fd = meta_grad_of("finite_difference", *args, fd_hp(hp, 0.01)).meta_grad
    jvp = meta_grad_of("jvp", *args, hp).meta_grad
    assert rel_err(fd, exact) < 2e-3  # measured 5e-6 to 2.7e-4
    assert rel_err(jvp, exact) < rel_err(fd, exact)  # measured 13x to 400x smaller


@pytest.mark.parametrize("seed", range(3))
def test_on_a_relu_resnet_only_the_dot_products_differ(seed):
    """The lookahead and the meta loss are the JVP method's to the bit; the meta-gradient is off
    by what the kinks inside [w - r g, w + r g] make of the differences (tiny float64 ResNet)."""
    model, meta_net, state = setup(seed)
    (batch,), (meta_batch,) = batches(seed, 1, size=32), batches(seed + 50, 1, size=5)
    hp = hp_for()
    exact = meta_grad_of("jvp", model, meta_net, state, batch, meta_batch, hp)
    fd = meta_grad_of("finite_difference", model, meta_net, state, batch, meta_batch,
                      fd_hp(hp, 0.01))  # fmt: skip
    assert torch.equal(fd.meta_loss, exact.meta_loss)
    for a, b in zip(fd.ahead, exact.ahead):
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert 1e-6 < rel_err(fd.meta_grad, exact.meta_grad) < 0.5  # measured 6e-3 to 0.19


def test_a_zero_direction_gives_zero_dot_products():
    from mwn.core.meta import difference_dots
    from mwn.core.sums import Sums

    model, _, state = smooth_setup(0, "sgd")
    (batch,) = batches(0, 1, size=8)
    zero = {k: torch.zeros_like(v) for k, v in state["params"].items()}
    dots, t = difference_dots(
        model, state["params"], {}, batch, zero, fd_hp(hp_for(), 0.01), Sums()
    )
    assert t == 1.0 and torch.equal(dots, torch.zeros(8, dtype=torch.float64))


def test_a_run_with_finite_differences_and_its_settings(tmp_path):
    proc = run_cli(*FAST, "meta_grad=finite_difference", f"hydra.run.dir={tmp_path / 'run'}",
                   cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["meta_grad_norm"] > 0 for r in rows if "meta_grad_norm" in r)
    bad = run_cli("finite_difference_eps=0", f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "mwn: error: finite_difference_eps=0.0: allowed values are finite real numbers > 0"
    )
    check_config(make_cfg("meta_grad=finite_difference"), torchrun_world=2)  # allowed there
    with pytest.raises(ConfigError, match=r"^meta_grad=double_backward: allowed values are jvp"):
        check_config(make_cfg("meta_grad=double_backward"), torchrun_world=2)


def test_the_library_takes_finite_differences():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, CLASSES))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rw = MetaReweighter(model, opt, meta_grad="finite_difference", finite_difference_eps=0.02)
    assert rw.hyperparameters().finite_difference_eps == 0.02
    (x, y), (xm, ym) = (single(b) for b in batches(0, 1, size=8)[0:1] + batches(1, 1, size=4))
    out = rw.step(x, y, xm, ym)
    assert float(out["meta_grad_norm"]) > 0
    with pytest.raises(SettingError, match=r"^finite_difference_eps=-1: allowed values"):
        MetaReweighter(model, opt, meta_grad="finite_difference", finite_difference_eps=-1)
