import pytest
import torch

from mwn.core.optim import adam_init, adam_step, sgd_init, sgd_lookahead_scale, sgd_step, step_lr


def _problem():
    torch.manual_seed(0)
    params = {"a": torch.randn(4, 3, dtype=torch.float64), "b": torch.randn(3, dtype=torch.float64)}
    grads = [{k: torch.randn_like(v) for k, v in params.items()} for _ in range(5)]
    return params, grads


@pytest.mark.parametrize(
    "momentum,weight_decay,nesterov", [(0.0, 0.0, False), (0.9, 5e-4, False), (0.9, 1e-2, True)]
)
def test_sgd_matches_torch(momentum, weight_decay, nesterov):
    params, grads = _problem()
    ref = {k: v.clone().requires_grad_() for k, v in params.items()}
    opt = torch.optim.SGD(
        ref.values(), lr=0.3, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
    )
    buf = sgd_init(params)
    for g in grads:
        for k, p in ref.items():
            p.grad = g[k].clone()
        opt.step()
        params, buf = sgd_step(params, g, buf, 0.3, momentum, weight_decay, nesterov)
    for k in params:
        torch.testing.assert_close(params[k], ref[k].detach(), rtol=1e-14, atol=1e-14)


def test_adam_matches_torch():
    params, grads = _problem()
    ref = {k: v.clone().requires_grad_() for k, v in params.items()}
    opt = torch.optim.Adam(ref.values(), lr=1e-2, weight_decay=1e-4)
    state = adam_init(params)
    for g in grads:
        for k, p in ref.items():
            p.grad = g[k].clone()
        opt.step()
        params, state = adam_step(params, g, state, 1e-2, weight_decay=1e-4)
    assert state["step"] == 5
    for k in params:
        torch.testing.assert_close(params[k], ref[k].detach(), rtol=1e-13, atol=1e-14)


def test_step_lr_counts_the_milestones_passed():
    lrs = [step_lr(0.1, i, [5000, 7500, 9000], 0.1) for i in (0, 4999, 5000, 7500, 9999)]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.001, 0.0001], rel=1e-12)


@pytest.mark.parametrize("nesterov", [False, True])
def test_lookahead_scale_is_the_derivative_of_the_sgd_step(nesterov):
    """-d(new params)/d(gradient) of torch.optim.SGD's rule, by autodiff, is the scale the
    meta-gradient identity uses (lr, or lr (1 + momentum) with Nesterov)."""
    params, grads = _problem()
    grads = grads[0]
    buf = {k: torch.randn_like(v) for k, v in params.items()}

    def new_params(g):
        return sgd_step(params, {**grads, "b": g}, buf, 0.3, 0.9, 5e-4, nesterov)[0]["b"]

    jac = torch.func.jacrev(new_params)(grads["b"])
    scale = sgd_lookahead_scale(0.3, 0.9, nesterov)
    torch.testing.assert_close(jac, -scale * torch.eye(3, dtype=torch.float64), rtol=1e-14, atol=0)
