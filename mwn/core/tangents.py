"""Forward-mode passes that reuse the training forward: the exact dot products of the JVP method
without its primal forward.

The JVP of a convolution y = conv(x, W) is y_t = conv(x_t, W) + conv(x, W_t): with the primal
computed alongside, as torch.func.jvp does, three convolutions per layer, a third of them
recomputing what the training forward computed a moment before at the same parameters on the
same batch. A model that saves its activations (ResNet's `forward(x, saved)`, mwn.core.models)
gets its tangent here from those, two convolutions per layer: the same numbers as the JVP
(float64 tests hold them to rounding), at about two forwards of the training batch in place of
three. Any other model, and a step under autocast or synchronised BatchNorm, keeps the JVP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mwn.core.batchnorm import BatchNorm2d
from mwn.core.models import ResNet
from mwn.core.types import Tensors


def saves_activations(model: nn.Module, amp: torch.dtype | None) -> bool:
    """Whether the dot products can come from `logits_tangent`: a model with a tangent here,
    in fp32, with plain (not synchronised) BatchNorm on the batch's statistics."""
    if amp is not None or type(model) not in TANGENTS:
        return False
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return all(type(m) is BatchNorm2d and m._updates_running_stats() for m in norms)


def batch_norm_tangent(bn, c, stats, c_t, params: Tensors, t: Tensors, name: str):
    """Tangent of training-mode BatchNorm at its input c (batch statistics):
        y_t = a (c_t - mean(c_t) - xhat m) + g_t xhat + b_t = (c - mean) k + d + a c_t
    with xhat = (c - mean) s, s = 1 / std, a = g s, m = mean(xhat c_t), k = s (g_t - a m),
    d = b_t - a mean(c_t), means per channel; `stats` (mean, s) are the forward's. PyTorch's
    fused kernels do the passes: the two sums (batch norm's backward with c_t as the gradient:
    sum(c_t xhat) and sum(c_t)), and (c - mean) k + d (batch norm as an affine map, variance 1,
    eps 0)."""
    (mean, invstd), weight, eps = stats, params[f"{name}.weight"], bn.eps
    _, sum_xhat, sum_t = torch.ops.aten.native_batch_norm_backward(
        c_t, c, weight, None, None, mean, invstd, True, eps, [False, True, True]
    )
    n = c.numel() // c.shape[1]
    a = weight * invstd
    k = invstd * (t[f"{name}.weight"] - a * sum_xhat / n)
    d = t[f"{name}.bias"] - a * sum_t / n
    y_t = F.batch_norm(c, mean, torch.ones_like(mean), k, d, False, 0.0, 0.0)
    return torch.addcmul(y_t, a.view(1, -1, 1, 1), c_t)


def conv_tangent(conv: nn.Conv2d, x, x_t, params: Tensors, t: Tensors, name: str):
    """conv(x_t, W) + conv(x, W_t) (no bias: the ResNet's convolutions have none); x_t None
    for the image, whose tangent is zero."""
    out = lambda inp, w: F.conv2d(inp, w, None, conv.stride, conv.padding)
    y_t = out(x, t[f"{name}.weight"])
    return y_t if x_t is None else y_t.add_(out(x_t, params[f"{name}.weight"]))


def relu_tangent(out: torch.Tensor, out_t: torch.Tensor) -> torch.Tensor:
    """out = relu(pre): its tangent where pre > 0 (out > 0 exactly there), else 0; one fused
    kernel (ReLU's own backward)."""
    return torch.ops.aten.threshold_backward(out_t, out, 0)


def resnet_logits_tangent(model, params: Tensors, saved: list, t: Tensors) -> torch.Tensor:
    """d logits along the parameter tangent t, from the activations ResNet.forward saved:
    [(x, c, stats, a) of the stem, (c1, stats1, r1, c2, stats2, out) per block, pooled],
    stats the batch norm's (mean, 1 / std)."""
    (x, c, stats, a), *blocks, pooled = saved
    c_t = conv_tangent(model.conv, x, None, params, t, "conv")
    a_t = relu_tangent(a, batch_norm_tangent(model.bn, c, stats, c_t, params, t, "bn"))
    inp = a
    for i, (block, (c1, stats1, r1, c2, stats2, out)) in enumerate(zip(model.blocks, blocks)):
        name = f"blocks.{i}"
        c1_t = conv_tangent(block.conv1, inp, a_t, params, t, f"{name}.conv1")
        b1_t = batch_norm_tangent(block.bn1, c1, stats1, c1_t, params, t, f"{name}.bn1")
        r1_t = relu_tangent(r1, b1_t)
        c2_t = conv_tangent(block.conv2, r1, r1_t, params, t, f"{name}.conv2")
        b2_t = batch_norm_tangent(block.bn2, c2, stats2, c2_t, params, t, f"{name}.bn2")
        a_t, inp = relu_tangent(out, b2_t + block.shortcut(a_t)), out
    pooled_t = a_t.mean(dim=(2, 3))
    w, w_t, b_t = params["fc.weight"], t["fc.weight"], t["fc.bias"]
    return pooled_t @ w.T + pooled @ w_t.T + b_t


TANGENTS = {ResNet: resnet_logits_tangent}  # model class (exactly) -> its logits' tangent


def loss_tangent(model, params: Tensors, saved: list, y: torch.Tensor, t: Tensors):
    """d L_i along t for every sample, L_i the cross-entropy of the saved logits (last in
    `saved`): (softmax(z_i) - onehot(y_i)) . z_t,i."""
    *activations, logits = saved
    z_t = TANGENTS[type(model)](model, params, activations, t)
    p = torch.softmax(logits, dim=1)
    return (p * z_t).sum(dim=1) - z_t.gather(1, y[:, None])[:, 0]
