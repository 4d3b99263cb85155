"""Models, held as stateless modules: the CIFAR ResNet (ResNet32 and its smaller siblings), the
Wide ResNet (WRN-28-10, the MWN paper's model for uniform label noise), and the meta-net MLP
that maps a sample's loss to its weight.

Parameters and buffers live outside the modules, in dicts that `torch.func.functional_call`
passes in; `extract_state` takes them out once at start-up.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

Tensors = dict[str, torch.Tensor]


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that normalises fp16/bf16 inputs in fp32 and returns their dtype, and that can
    normalise with the statistics of the global batch across processes.

    Under autocast, the forward-mode derivative of PyTorch's batch norm gives an fp32 tangent for
    an fp16 output, which the next convolution's JVP rejects; computing in fp32 and casting back
    casts the tangent too. fp32 and fp64 inputs take the plain path.

    Inside `jvp_rule()` (the JVP pass of the exact meta-gradient) training mode runs
    `_TrainBatchNorm`: PyTorch's own kernels forward and backward with a cheaper forward-mode
    rule. Elsewhere, and under torch.compile (which fuses PyTorch's own rule), it is plain
    nn.BatchNorm2d: an autograd.Function costs Python time per call, which only the JVP repays.

    `sum_over_ranks` (set by `mwn.distributed.sync_batch_norm`) is a differentiable sum over the
    processes; with it, training-mode statistics (and so the running ones) are those of the
    global batch, exactly as one process with the whole batch would compute them.
    """

    sum_over_ranks = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            return self._normalise(x.float()).to(x.dtype)
        return self._normalise(x)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats and self.momentum is not None):
            return super().forward(x)
        if self.sum_over_ranks is None:
            compiling, small = torch.compiler.is_compiling(), x.numel() < JVP_RULE_MIN_SIZE
            if compiling or small or not _JVP_RULE.get():
                return super().forward(x)
            self.num_batches_tracked.add_(1)
            return _TrainBatchNorm.apply(x, self.weight, self.bias, self.running_mean,
                                         self.running_var, self.momentum, self.eps)[0]  # fmt: skip
        # one sum over the ranks per pass: count, sum and sum of squares, each taken about the
        # running mean (equal on every rank, a constant here) so that E[d^2] - E[d]^2 does not
        # cancel catastrophically
        shift = self.running_mean.view(1, -1, 1, 1)
        d = x - shift
        count = x.new_tensor([x.numel() / x.shape[1]])
        sums = self.sum_over_ranks(torch.cat([count, d.sum(dim=(0, 2, 3)),
                                              d.square().sum(dim=(0, 2, 3))]))  # fmt: skip
        n, c = sums[0].detach(), x.shape[1]
        mean_d, mean_d2 = sums[1 : 1 + c] / n, sums[1 + c :] / n
        mean = self.running_mean + mean_d
        var = mean_d2 - mean_d.square()  # biased, as BatchNorm normalises with
        centred = x - mean.view(1, -1, 1, 1)
        with torch.no_grad():  # running statistics: PyTorch's rule (unbiased variance)
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
            self.num_batches_tracked.add_(1)
        scale = self.weight * torch.rsqrt(var + self.eps)
        return centred * scale.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


_JVP_RULE = contextvars.ContextVar("batch_norm_jvp_rule", default=False)
# activations below this many elements keep PyTorch's rule: measured on a 2-core CPU, the Python
# cost of an autograd.Function call under torch.func outweighs the saving there (ResNet8 on
# 8x8 digits: 11 % slower JVP); at CIFAR size (409,600 to 1,638,400) ours takes 45-55 % less
JVP_RULE_MIN_SIZE = 2**18


@contextlib.contextmanager
def jvp_rule() -> Iterator[None]:
    """Within the block, training-mode BatchNorm2d on activations of at least JVP_RULE_MIN_SIZE
    elements uses `_TrainBatchNorm` (for a JVP pass). Nothing under torch.compile, which fuses
    PyTorch's own rule."""
    if torch.compiler.is_compiling():
        yield
        return
    token = _JVP_RULE.set(True)
    try:
        yield
    finally:
        _JVP_RULE.reset(token)


class _TrainBatchNorm(torch.autograd.Function):
    """Training-mode batch norm: PyTorch's kernels forward and backward, and a forward-mode rule
    with six passes over the activations instead of PyTorch's generic formula (about half the
    time of the JVP of F.batch_norm on a CPU). With xc = x - mean, s = 1 / std:
        y_t = g s (x_t - mean(x_t) - xhat m) + g_t xhat + b_t,  m = mean(xhat x_t),  xhat = xc s
    (means over batch and space, per channel). Updates the running statistics in place, as
    F.batch_norm does."""

    @staticmethod
    def forward(x, weight, bias, running_mean, running_var, momentum, eps):
        return torch.native_batch_norm(x, weight, bias, running_mean, running_var, True,
                                       momentum, eps)  # fmt: skip

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
            grad, x, weight, running_mean, running_var, mean, invstd, True, ctx.eps,
            [True, True, True])  # fmt: skip
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
        return y_t.addcmul_(per_channel(a), x_t), None, None


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm; option-A shortcut (subsample, zero-pad channels)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = BatchNorm2d(out_ch)
        self.stride, self.pad = stride, out_ch - in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.pad:  # option A: no parameters, the extra channels are zeros
            half = self.pad // 2
            shortcut = F.pad(shortcut, (0, 0, 0, 0, half, self.pad - half))
        return F.relu(out + shortcut)


class ResNet(nn.Module):
    """CIFAR ResNet of He et al. (2016): depth = 6n + 2, stages of n blocks at width w, 2w, 4w."""

    def __init__(self, num_classes: int, depth: int = 32, width: int = 16, in_channels: int = 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"model.depth={depth}: a CIFAR ResNet needs depth = 6n + 2 >= 8")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn = BatchNorm2d(width)
        blocks, ch = [], width
        for stage, stride in enumerate((1, 2, 2)):
            out = width * 2**stage
            for i in range(n):
                blocks.append(BasicBlock(ch, out, stride if i == 0 else 1))
                ch = out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(ch, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = self.blocks(x)
        return self.fc(x.mean(dim=(2, 3)))  # global average pool: (B, C)


class WideBlock(nn.Module):
    """Pre-activation block of a Wide ResNet: BN-ReLU-conv3x3, BN-ReLU-conv3x3; a 1x1 conv
    shortcut where the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.bn1 = BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn2 = BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return y + (self.shortcut(o) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    """Wide ResNet of Zagoruyko and Komodakis (2016): depth = 6n + 4, stages of n blocks at
    widths 16k, 32k, 64k (k = widen factor); WRN-28-10 has 36.5 M parameters."""

    def __init__(self, num_classes: int, depth: int = 28, widen: int = 10, in_channels: int = 3):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"model.depth={depth}: a Wide ResNet needs depth = 6n + 4 >= 10")
        n = (depth - 4) // 6
        self.conv = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        blocks, ch = [], 16
        for stage, stride in enumerate((1, 2, 2)):
            out = 16 * widen * 2**stage
            for i in range(n):
                blocks.append(WideBlock(ch, out, stride if i == 0 else 1))
                ch = out
        self.blocks = nn.Sequential(*blocks)
        self.bn = BatchNorm2d(ch)
        self.fc = nn.Linear(ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.blocks(self.conv(x))))
        return self.fc(x.mean(dim=(2, 3)))


class MetaNet(nn.Module):
    """Loss -> weight: 1 -> hidden_size (x num_layers, ReLU) -> 1, sigmoid. Input is (B,)."""

    def __init__(self, hidden_size: int = 100, num_layers: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = 1
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_size), nn.ReLU()]
            width = hidden_size
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, loss: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(loss.unsqueeze(-1))).squeeze(-1)  # (B,)


ARCHS = ("resnet", "wrn")


def build_classifier(
    arch: str, num_classes: int, in_channels: int, depth: int, width: int
) -> nn.Module:
    """resnet: CIFAR ResNet, `width` = channels of stage 1; wrn: Wide ResNet, `width` = widen
    factor."""
    if arch == "resnet":
        return ResNet(num_classes, depth=depth, width=width, in_channels=in_channels)
    if arch == "wrn":
        return WideResNet(num_classes, depth=depth, widen=width, in_channels=in_channels)
    raise ValueError(f"model.arch={arch!r}: allowed values are {' | '.join(ARCHS)}")


def extract_state(module: nn.Module) -> tuple[Tensors, Tensors]:
    """The module's parameters and buffers as plain dicts of detached tensors."""
    params = {k: v.detach().clone() for k, v in module.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in module.named_buffers()}
    return params, buffers


def count_params(params: Tensors) -> int:
    return sum(p.numel() for p in params.values())
