"""BatchNorm (mwn.batchnorm): PyTorch's numbers in every mode of differentiation, with and
without the JVP pass's forward-mode rule, and under autocast."""

import contextlib

import pytest
import torch
from torch.func import functional_call, jvp, vjp

from mwn.core import batchnorm
from mwn.core.batchnorm import BatchNorm2d, jvp_rule


@pytest.mark.parametrize("rule", ["plain", "jvp_rule"])
def test_batchnorm_matches_pytorch_in_every_mode_of_differentiation(rule, rule_calls):
    """Forward, running statistics, VJP, JVP and double backward equal nn.BatchNorm2d's (fp64),
    also with the forward-mode rule of the JVP pass."""
    with jvp_rule() if rule == "jvp_rule" else contextlib.nullcontext():
        _batchnorm_matches_pytorch()
    assert bool(rule_calls) == (rule == "jvp_rule")  # our rule runs inside jvp_rule() only


@pytest.fixture(autouse=True)
def rule_calls(monkeypatch) -> list:
    """Every size takes the JVP pass's rule; the list counts its uses."""
    calls, rule = [], batchnorm._TrainBatchNorm.jvp
    monkeypatch.setattr(batchnorm, "JVP_RULE_MIN_SIZE", 0)
    monkeypatch.setattr(
        batchnorm._TrainBatchNorm, "jvp", staticmethod(lambda *a: calls.append(1) or rule(*a))
    )
    return calls


def _batchnorm_matches_pytorch():
    torch.manual_seed(0)
    ours, ref = BatchNorm2d(4).double(), torch.nn.BatchNorm2d(4).double()
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.linspace(0.5, 2.0, 4))
            m.bias.copy_(torch.linspace(-1.0, 1.0, 4))
    x = torch.randn(8, 4, 5, 5, dtype=torch.float64) * 3 + 1
    for _ in range(2):
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-13, atol=1e-13)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), rtol=1e-13, atol=0)

    def call(module):
        buffers = {k: v.detach() for k, v in module.named_buffers()}
        fresh = lambda: {k: v.clone() for k, v in buffers.items()}  # BN writes into its buffers
        return lambda x, p: functional_call(module, (p, fresh()), (x,), strict=True)

    p = {k: v.detach() for k, v in ours.named_parameters()}
    tangents = (torch.randn_like(x), {k: torch.randn_like(v) for k, v in p.items()})
    _, j_ours = jvp(call(ours), (x, p), tangents)
    _, j_ref = jvp(call(ref), (x, p), tangents)
    torch.testing.assert_close(j_ours, j_ref, rtol=1e-12, atol=1e-12)
    u = torch.randn_like(x)
    g_ours = vjp(call(ours), x, p)[1](u)
    g_ref = vjp(call(ref), x, p)[1](u)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)
    # double backward (what meta_grad=double_backward differentiates through)
    xs = x.clone().requires_grad_()
    dbl = []
    for module in (ours, ref):
        y = module(xs)
        (g,) = torch.autograd.grad((y * u).sum(), xs, create_graph=True)
        dbl.append(torch.autograd.grad((g**2).sum(), module.weight)[0])
    torch.testing.assert_close(dbl[0], dbl[1], rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_training_batchnorm_is_pytorchs_bit_for_bit_in_float32(memory_format):
    """The JVP pass's BatchNorm (`_TrainBatchNorm`) runs PyTorch's own kernels forward and
    backward: output, running statistics and gradients bit for bit; only the forward-mode rule
    is ours."""
    torch.manual_seed(1)
    ours, ref = BatchNorm2d(6), torch.nn.BatchNorm2d(6)
    ref.load_state_dict(ours.state_dict())
    x = (torch.randn(10, 6, 7, 7) * 2 + 0.5).contiguous(memory_format=memory_format)
    u = torch.randn(10, 6, 7, 7)
    outs = []
    for module in (ours, ref):
        xs = x.clone().requires_grad_()
        with jvp_rule():
            y = module(xs)
        grads = torch.autograd.grad((y * u).sum(), (xs, module.weight, module.bias))
        outs.append((y, *grads, *(b.clone() for b in module.buffers())))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


def test_batchnorm_forward_mode_with_tangents_on_some_inputs_only(rule_calls):
    """JVP along the input alone and along the parameters alone (None tangents inside)."""
    torch.manual_seed(2)
    ours, ref = BatchNorm2d(3).double(), torch.nn.BatchNorm2d(3).double()
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64) - 2
    p = {k: v.detach() + 0.3 for k, v in ours.named_parameters()}
    b = {k: v.detach() for k, v in ours.named_buffers()}
    f = lambda m: lambda x, p: functional_call(m, (p, {k: v.clone() for k, v in b.items()}), (x,))
    x_t = torch.randn_like(x)
    t = {k: torch.randn_like(v) for k, v in p.items()}
    _, ref_x = jvp(lambda x: f(ref)(x, p), (x,), (x_t,))  # PyTorch's rule
    _, ref_p = jvp(lambda p: f(ref)(x, p), (p,), (t,))
    with jvp_rule():
        _, a = jvp(lambda x: f(ours)(x, p), (x,), (x_t,))  # weight, bias: no tangents
        torch.testing.assert_close(a, ref_x, rtol=1e-12, atol=1e-12)
        _, a = jvp(lambda p: f(ours)(x, p), (p,), (t,))  # input: no tangent
        torch.testing.assert_close(a, ref_p, rtol=1e-12, atol=1e-12)
    assert len(rule_calls) == 2
