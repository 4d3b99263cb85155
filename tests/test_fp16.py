"""float16 and bfloat16 autocast (it runs on CPU too): the meta-gradient and the steps stay
close to fp32 runs of the same code, and the dynamic loss scale skips, halves and grows as
torch.amp.GradScaler does. Precision tests, so the fp32 run of the code is the reference here;
exactness is tests/test_meta.py's business."""

from dataclasses import replace

import pytest
import torch
from torch.utils._pytree import tree_structure

from mwn.core import sums as fp16
from mwn.core.baselines import erm_step
from mwn.core.meta import jvp_meta_grad, mwn_step, train_pass
from mwn.core.models import MetaNet, ResNet, extract_state
from mwn.core.step import init_state
from mwn.core.sums import LOCAL, Sums, scaler_init

from conftest import rel_err, step_hp

LR = 0.3
# the settings these tolerances were measured with (momentum, no normalisation)
FP32 = step_hp(
    momentum=0.9,
    weight_decay=5e-4,
    nesterov=False,
    meta_lr=1e-5,
    meta_weight_decay=0.0,
    normalize_weights=False,
    rollback=True,
    fp16=False,
    bf16=False,
    meta_grad="jvp",
)
FP16 = replace(FP32, fp16=True)
BF16 = replace(FP32, bf16=True)


def fp32_setup():
    torch.manual_seed(0)
    model = ResNet(10, depth=8, width=8, in_channels=1)
    meta_net = MetaNet(100)
    state = init_state(*extract_state(model), extract_state(meta_net)[0], fp16=True)
    batch = (torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,)))
    return model, meta_net, state, batch


def meta_grad(model, meta_net, state, batch, hp, sums=None):
    """The jvp method's result and the training pass it was given (the meta batch = batch)."""
    train = train_pass(model, meta_net, state, batch, hp, LOCAL)
    sums = sums or Sums()
    return jvp_meta_grad(model, meta_net, state, batch, batch, LR, hp, train, sums), train


def test_fp16_meta_gradient_stays_within_five_percent_of_fp32():
    model, meta_net, state, batch = fp32_setup()
    ref = meta_grad(model, meta_net, state, batch, FP32)[0].meta_grad
    # fp16 is recognised by a tensor loss scale, as mwn_step passes the scaler's
    half = meta_grad(model, meta_net, state, batch, FP16, Sums(torch.tensor(2.0**16)))[0]
    assert rel_err(half.meta_grad, ref) < 5e-2  # measured 1.8 %; a wrong scale factor is off by 1e4


def test_bf16_meta_gradient_and_step_stay_close_to_fp32():
    """bfloat16 keeps fp32's range (no loss scale) but has an 8-bit mantissa: ~0.4 % per op."""
    model, meta_net, state, batch = fp32_setup()
    del state["scaler"]
    ref = meta_grad(model, meta_net, state, batch, FP32)[0].meta_grad
    bf, train = meta_grad(model, meta_net, state, batch, BF16)
    assert rel_err(bf.meta_grad, ref) < 0.1
    assert train.losses.dtype == torch.float32  # the losses (and the weights) stay fp32
    assert train.weights.dtype == torch.float32
    errors = {}
    for step in (mwn_step, erm_step):
        new, _ = step(model, meta_net, state, batch, batch, LR, BF16)
        ref_new, _ = step(model, meta_net, state, batch, batch, LR, FP32)
        delta = {k: new["params"][k] - state["params"][k] for k in state["params"]}
        ref_delta = {k: ref_new["params"][k] - state["params"][k] for k in state["params"]}
        errors[step.__name__] = rel_err(delta, ref_delta)
        assert all(v.dtype == torch.float32 for v in new["params"].values())  # fp32 master weights
        assert tree_structure(new) == tree_structure(state)
    # the MWN step in bf16 is as close to fp32 as a plain autocast training step (measured
    # 9.5 % and 9.7 % on this tiny 8x8 model), so the meta-gradient path adds no error of its own
    assert errors["mwn_step"] < 1.25 * errors["erm_step"] and errors["erm_step"] < 0.15


def scaler_values(state):
    return {k: float(v) for k, v in state["scaler"].items()}


@pytest.mark.parametrize("step", [mwn_step, erm_step])
def test_fp16_step_tracks_fp32_and_skips_on_overflow(step, monkeypatch):
    model, meta_net, state, batch = fp32_setup()
    ref, _ = step(model, meta_net, state, batch, batch, LR, FP32)
    new, _ = step(model, meta_net, state, batch, batch, LR, FP16)
    delta = {k: new["params"][k] - state["params"][k] for k in state["params"]}
    ref_delta = {k: ref["params"][k] - state["params"][k] for k in state["params"]}
    # CPU fp16 arithmetic is coarse: plain torch.autocast autograd is 9.8 % off fp32 on this model
    assert rel_err(delta, ref_delta) < 0.1
    assert scaler_values(new) == {"scale": 2.0**16, "good_steps": 1, "skipped": 0}
    # the same structure in and out: a CUDA graph replays a step on its own outputs
    assert tree_structure(new) == tree_structure(state)

    state["scaler"] = scaler_init(2.0**100)  # overflows fp16: the step is skipped
    skipped, _ = step(model, meta_net, state, batch, batch, LR, FP16)
    for group in ("params", "momentum", "meta_params"):
        for k, v in state[group].items():
            assert torch.equal(skipped[group][k], v), (group, k)
    assert float(skipped["meta_opt"]["step"]) == 0
    assert scaler_values(skipped) == {"scale": 2.0**99, "good_steps": 0, "skipped": 1}
    assert int(skipped["buffers"]["bn.num_batches_tracked"]) == 1  # BatchNorm stats still moved

    monkeypatch.setattr(fp16, "GROWTH_INTERVAL", 2)
    state["scaler"] = {
        k: torch.tensor(v) for k, v in (("scale", 4.0), ("good_steps", 1.0), ("skipped", 3.0))
    }
    grown, _ = step(model, meta_net, state, batch, batch, LR, FP16)
    assert scaler_values(grown) == {"scale": 8.0, "good_steps": 0, "skipped": 3}
