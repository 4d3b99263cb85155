"""BatchNorm for the functional classifier: three rules on top of PyTorch's `nn.BatchNorm2d`.

- Autocast: fp16/bf16 inputs are normalised in fp32 and cast back. (The forward-mode derivative
  of PyTorch's batch norm gives an fp32 tangent for an fp16 output, which the next convolution's
  JVP rejects; computing in fp32 and casting back casts the tangent too.)
- Forward mode: inside `jvp_rule()` (the JVP pass of the exact meta-gradient) training-mode
  batch norm on large activations runs `_TrainBatchNorm`, PyTorch's kernels forward and backward
  with a forward-mode rule of six passes over the activations. Elsewhere, and under
  torch.compile (which fuses PyTorch's own rule), it is plain batch norm: an autograd.Function
  costs Python time per call, which only the JVP repays.
- Synchronised (`SyncBatchNorm2d`, made by `synchronised(model)` under torchrun with
  sync_bn=true): training-mode statistics, and so the running ones, are those of the global
  batch across processes, through a differentiable sum over the ranks.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mwn.core.sums import sum_over_ranks

_JVP_RULE = contextvars.ContextVar("batch_norm_jvp_rule", default=False)
# activations below this many elements keep PyTorch's rule: measured on a 2-core CPU, the Python
# cost of an autograd.Function call under torch.func outweighs the saving there (ResNet8 on
# 8x8 digits: 11 % slower JVP); at CIFAR size (409,600 to 1,638,400) ours takes 45-55 % less
JVP_RULE_MIN_SIZE = 2**18


@contextlib.contextmanager
def jvp_rule() -> Iterator[None]:
    """Within the block, training-mode BatchNorm2d on activations of at least JVP_RULE_MIN_SIZE
    elements uses `_TrainBatchNorm` (for a JVP pass). Nothing under torch.compile."""
    if torch.compiler.is_compiling():
        yield
        return
    token = _JVP_RULE.set(True)
    try:
        yield
    finally:
        _JVP_RULE.reset(token)


class _Rules:
    """The autocast rule and, inside `jvp_rule()`, the forward-mode rule, over a torch BatchNorm
    class (mixed in before it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            return self._normalise(x.float()).to(x.dtype)
        return self._normalise(x)

    def _updates_running_stats(self) -> bool:
        return self.training and self.track_running_stats and self.momentum is not None

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        if not self._updates_running_stats():
            return super().forward(x)
        small = x.numel() < JVP_RULE_MIN_SIZE
        if x.dim() != 4 or torch.compiler.is_compiling() or small or not _JVP_RULE.get():
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        args = (x, self.weight, self.bias, self.running_mean, self.running_var)
        return _TrainBatchNorm.apply(*args, self.momentum, self.eps)[0]

    def with_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training-mode forward of an fp32 input that also returns its batch statistics (mean,
        1 / std per channel) for a tangent pass (mwn.core.tangents): PyTorch's own kernel, the
        one F.batch_norm runs on these inputs, so the output and running statistics are the
        same to the bit."""
        self.num_batches_tracked.add_(1)
        args = (x, self.weight, self.bias, self.running_mean, self.running_var)
        return torch.native_batch_norm(*args, True, self.momentum, self.eps)


class _SyncRules:
    """Training-mode statistics of the global batch: one sum over the ranks per pass (count,
    sum and sum of squares, each taken about the running mean, which is equal on every rank,
    so that E[d^2] - E[d]^2 does not cancel catastrophically). Differentiable in reverse and
    forward mode; running statistics by PyTorch's rule (unbiased variance)."""

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        if not self._updates_running_stats():
            return super()._normalise(x)
        if self.running_mean is None or self.weight is None:
            raise ValueError(
                f"{type(self).__name__}: sync_bn needs running statistics and affine parameters"
            )
        per_channel = lambda t: t.view(1, -1, *[1] * (x.dim() - 2))
        dims = (0, *range(2, x.dim()))
        d = x - per_channel(self.running_mean)
        count = x.new_tensor([x.numel() / x.shape[1]])
        local = [count, d.sum(dim=dims), d.square().sum(dim=dims)]
        sums = sum_over_ranks(torch.cat(local))
        n, c = sums[0].detach(), x.shape[1]
        mean_d, mean_d2 = sums[1 : 1 + c] / n, sums[1 + c :] / n
        mean = self.running_mean + mean_d
        var = mean_d2 - mean_d.square()  # biased, as BatchNorm normalises with
        centred = x - per_channel(mean)
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
            self.num_batches_tracked.add_(1)
        scale = self.weight * torch.rsqrt(var + self.eps)
        return centred * per_channel(scale) + per_channel(self.bias)


class BatchNorm2d(_Rules, nn.BatchNorm2d):
    """nn.BatchNorm2d with the autocast rule and, inside `jvp_rule()`, the forward-mode rule."""


class BatchNorm1d(_Rules, nn.BatchNorm1d):
    """nn.BatchNorm1d with the autocast rule."""


class BatchNorm3d(_Rules, nn.BatchNorm3d):
    """nn.BatchNorm3d with the autocast rule."""


class BatchNorm(_Rules, _BatchNorm):
    """Batch norm over any input of 2 or more dimensions (what nn.SyncBatchNorm becomes)."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")


class SyncBatchNorm2d(_SyncRules, BatchNorm2d):
    """BatchNorm2d with the global batch's statistics under torchrun (`_SyncRules`)."""


class SyncBatchNorm1d(_SyncRules, BatchNorm1d):
    """BatchNorm1d with the global batch's statistics under torchrun."""


class SyncBatchNorm3d(_SyncRules, BatchNorm3d):
    """BatchNorm3d with the global batch's statistics under torchrun."""


class SyncBatchNorm(_SyncRules, BatchNorm):
    """BatchNorm of any dimension with the global batch's statistics under torchrun."""


# torch's batch norm -> ours (same parameters, buffers and attributes: an instance's class can
# be swapped in place), and ours -> its synchronised twin
OURS: dict[type, type] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
    nn.SyncBatchNorm: BatchNorm,
}
SYNCED: dict[type, type] = {
    BatchNorm1d: SyncBatchNorm1d,
    BatchNorm2d: SyncBatchNorm2d,
    BatchNorm3d: SyncBatchNorm3d,
    BatchNorm: SyncBatchNorm,
}


def synchronised(model: nn.Module) -> nn.Module:
    """A copy of `model` whose batch norm layers are synchronised (same parameters and
    buffers); the model given is left as it is."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if type(module) in SYNCED:
            module.__class__ = SYNCED[type(module)]
    return model


class _TrainBatchNorm(torch.autograd.Function):
    """Training-mode batch norm: PyTorch's kernels forward and backward, and a forward-mode rule
    with six passes over the activations instead of PyTorch's generic formula (about half the
    time of the JVP of F.batch_norm on a CPU). With xc = x - mean, s = 1 / std:
        y_t = g s (x_t - mean(x_t) - xhat m) + g_t xhat + b_t,  m = mean(xhat x_t),  xhat = xc s
    (means over batch and space, per channel). Updates the running statistics in place, as
    F.batch_norm does."""

    generate_vmap_rule = True  # vmappable (vectorised groups, mwn.run.group): its body is torch ops

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, momentum, eps):
        return torch.native_batch_norm(
            x, weight, bias, running_mean, running_var, True, momentum, eps
        )

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, _, running_mean, running_var, _, eps = inputs
        _, mean, invstd = output
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, invstd)
        ctx.save_for_backward(x, weight, running_mean, running_var, mean, invstd)
        ctx.save_for_forward(x, weight, mean, invstd)

    @staticmethod
    def backward(ctx, grad, _mean, _invstd):
        x, weight, running_mean, running_var, mean, invstd = ctx.saved_tensors
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            grad, x, weight, running_mean, running_var, mean, invstd, True, ctx.eps, [True] * 3
        )
        return gx, gw, gb, None, None, None, None

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t, *_):
        x, weight, mean, invstd = ctx.saved_tensors
        per_channel = lambda t: t.view(1, -1, 1, 1)
        dims = (0, 2, 3)
        xc = x - per_channel(mean)
        mean_t = x_t.mean(dims)
        m = (xc * x_t).mean(dims) * invstd
        a = weight * invstd
        k = -a * m if weight_t is None else weight_t - a * m
        d = -a * mean_t if bias_t is None else bias_t - a * mean_t
        y_t = torch.addcmul(per_channel(d), per_channel(k * invstd), xc)
        return torch.addcmul(y_t, per_channel(a), x_t), None, None  # (addcmul_ has no vmap rule)
