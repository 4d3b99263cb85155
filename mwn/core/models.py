"""Models, held as stateless modules: the CIFAR ResNet (ResNet32 and its smaller siblings), the
Wide ResNet (WRN-28-10, the MWN paper's model for uniform label noise), the meta-net MLP that
maps a sample's loss to its weight (MW-Net), and its class-aware successor with one output head
per group of classes of similar training counts (CMW-Net). Two registries name them for the
config: CLASSIFIERS (`model.arch`) and META_NETS (`meta_net`).

Parameters and buffers live outside the modules, in dicts that `torch.func.functional_call`
passes in; `extract_state` takes them out once at start-up.

Every meta-net is called as `meta_net(loss, label, constants)`: the detached losses (B,), their
labels (B,) (None for a curve over losses alone) and the run's constants (mwn.core.step), and
may put constants of its own into the state (`constants(counts)`, from the training set's class
counts). A weighting net that also sees a sample's class is one class and one line in META_NETS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mwn.core.batchnorm import BatchNorm2d
from mwn.core.types import Tensors


def normalised(bn: BatchNorm2d, c: torch.Tensor, saved: list | None):
    """bn(c), and with `saved` (a forward for the tangent pass) its batch statistics (mean,
    1 / std) too, from the same kernel; None without."""
    if saved is None:
        return bn(c), None
    y, mean, invstd = bn.with_stats(c)
    return y, (mean, invstd)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm; option-A shortcut (subsample, zero-pad channels)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = BatchNorm2d(out_ch)
        self.stride, self.pad = stride, out_ch - in_ch

    def forward(self, x: torch.Tensor, saved: list | None = None) -> torch.Tensor:
        c1 = self.conv1(x)
        b1, stats1 = normalised(self.bn1, c1, saved)
        r1 = F.relu(b1)
        c2 = self.conv2(r1)
        b2, stats2 = normalised(self.bn2, c2, saved)
        out = F.relu(b2 + self.shortcut(x))
        if saved is not None:  # what the tangent pass needs (mwn.core.tangents)
            saved.append((c1, stats1, r1, c2, stats2, out))
        return out

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """Option A: subsample, and zero channels for the extra width (no parameters)."""
        x = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if not self.pad:
            return x
        half = self.pad // 2
        return F.pad(x, (0, 0, 0, 0, half, self.pad - half))


class ResNet(nn.Module):
    """CIFAR ResNet of He et al. (2016): depth = 6n + 2, stages of n blocks at width w, 2w, 4w."""

    DEPTHS = "6n + 2 >= 8 (8, 14, 20, 32, 44, 56, 110)"  # the depths allowed, as the error says

    @staticmethod
    def depth_ok(depth: int) -> bool:
        return depth >= 8 and (depth - 2) % 6 == 0

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

    def forward(self, x: torch.Tensor, saved: list | None = None) -> torch.Tensor:
        """Logits; with `saved`, the activations the tangent pass reuses are appended to it
        (mwn.core.tangents: the exact meta-gradient's dot products without a second forward)."""
        c = self.conv(x)
        b, stats = normalised(self.bn, c, saved)
        a = F.relu(b)
        if saved is not None:
            saved.append((x, c, stats, a))
        for block in self.blocks:
            a = block(a, saved)
        pooled = a.mean(dim=(2, 3))  # global average pool: (B, C)
        if saved is not None:
            saved.append(pooled)
        return self.fc(pooled)


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
    widths w, 2w, 4w (w = 16k for widen factor k; WRN-28-10: w = 160, 36.5 M parameters)."""

    DEPTHS = "6n + 4 >= 10 (10, 16, 22, 28, 34, 40)"

    @staticmethod
    def depth_ok(depth: int) -> bool:
        return depth >= 10 and (depth - 4) % 6 == 0

    def __init__(self, num_classes: int, depth: int = 28, width: int = 160, in_channels: int = 3):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"model.depth={depth}: a Wide ResNet needs depth = 6n + 4 >= 10")
        n = (depth - 4) // 6
        self.conv = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        blocks, ch = [], 16
        for stage, stride in enumerate((1, 2, 2)):
            out = width * 2**stage
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


META_INITS = ("random", "flat")
FLAT_SCALE = 0.01  # meta_init=flat: the output layer's random weights times this


def hidden_layers(hidden_size: int, num_layers: int, init: str) -> list[nn.Module]:
    """A meta-net's hidden layers on a loss: (Linear, ReLU) x num_layers, 1 -> hidden_size
    -> ... (`init` checked here, for every meta-net)."""
    if init not in META_INITS:
        raise ValueError(f"init={init!r}: allowed values are {' | '.join(META_INITS)}")
    layers: list[nn.Module] = []
    width = 1
    for _ in range(num_layers):
        layers += [nn.Linear(width, hidden_size), nn.ReLU()]
        width = hidden_size
    return layers


def output_layer(width: int, outputs: int, init: str) -> nn.Linear:
    """A meta-net's output layer (before the sigmoid); flat: its weights scaled by FLAT_SCALE,
    its biases zero."""
    layer = nn.Linear(width, outputs)
    if init == "flat":
        with torch.no_grad():
            layer.weight.mul_(FLAT_SCALE)
            layer.bias.zero_()
    return layer


class MetaNet(nn.Module):
    """Loss -> weight: 1 -> hidden_size (x num_layers, ReLU) -> 1, sigmoid. Input is (B,).

    init: random = PyTorch's Linear initialisation everywhere (the original code's), so the
    starting weight function has a random slope over the loss, rising for some seeds and falling
    for others; flat = the same, then the output layer's weights scaled by FLAT_SCALE and its
    bias set to zero, so every sample starts within about 0.001 of weight 0.5 over losses 0-5
    and the meta set decides the slope. Both draw the same random numbers (what is initialised
    after the meta-net does not change). Not exactly constant, on purpose: at a constant start
    the output bias's meta-gradient is zero in exact arithmetic (normalised weights do not change
    when every weight does), so Adam's first step would turn its rounding noise into a full step
    and a run would depend on the thread and process count; near it, that gradient is real and
    outweighs rounding."""

    def __init__(self, hidden_size: int = 100, num_layers: int = 1, init: str = "random") -> None:
        super().__init__()
        layers = hidden_layers(hidden_size, num_layers, init)
        layers.append(output_layer(hidden_size if num_layers else 1, 1, init))
        self.net = nn.Sequential(*layers)

    def forward(
        self,
        loss: torch.Tensor,
        label: torch.Tensor | None = None,
        constants: Tensors | None = None,
    ) -> torch.Tensor:
        """Weights (B,) of losses (B,); the label and the run constants are not read."""
        return torch.sigmoid(self.net(loss.unsqueeze(-1))).squeeze(-1)  # (B,)

    @staticmethod
    def constants(counts: list[int]) -> Tensors:
        """The run constants it puts in the state: none."""
        return {}


def count_groups(counts: list[int], groups: int) -> list[int]:
    """Each class's group (0: the largest training counts, the head; groups - 1: the tail) by
    k-means with `groups` clusters on the class counts, as CMW-Net clusters them. Solved
    exactly: in one dimension the clusters of an optimal k-means are runs of the sorted
    values, so dynamic programming over the sorted distinct counts finds the partition of least
    within-cluster sum of squares (no random start, the same groups every time). Fewer distinct
    counts than groups: one group per distinct count (balanced data: every class in group 0).
    """
    if groups < 1:
        raise ValueError(f"meta_net.groups={groups}: allowed values are integers >= 1")
    values = sorted(set(counts), reverse=True)
    weight = [counts.count(v) for v in values]
    m, k = len(values), min(groups, len(values))
    # prefix sums of weight, weight * value, weight * value^2 for a segment's sum of squares
    pw, p1, p2 = [0.0], [0.0], [0.0]
    for v, c in zip(values, weight):
        pw.append(pw[-1] + c)
        p1.append(p1[-1] + c * v)
        p2.append(p2[-1] + c * v * v)

    def sse(a: int, b: int) -> float:  # values[a:b] as one cluster
        n, s1 = pw[b] - pw[a], p1[b] - p1[a]
        return p2[b] - p2[a] - s1 * s1 / n

    inf = float("inf")
    cost = [[inf] * (m + 1) for _ in range(k + 1)]  # cost[j][b]: values[:b] in j clusters
    cut = [[0] * (m + 1) for _ in range(k + 1)]
    cost[0][0] = 0.0
    for j in range(1, k + 1):
        for b in range(j, m + 1):
            for a in range(j - 1, b):  # the last cluster is values[a:b]
                c = cost[j - 1][a] + sse(a, b)
                if c < cost[j][b]:
                    cost[j][b], cut[j][b] = c, a
    group_of, b = {}, m
    for j in range(k, 0, -1):
        a = cut[j][b]
        group_of.update({v: j - 1 for v in values[a:b]})
        b = a
    return [group_of[c] for c in counts]


class ClassAwareMetaNet(nn.Module):
    """CMW-Net's weighting net (Shu et al., "CMW-Net: Learning a Class-Aware Sample Weighting
    Mapping for Robust Deep Learning", TPAMI 2023): the detached loss through a shared hidden
    layer (1 -> hidden_size, ReLU; x num_layers), then one output (hidden_size -> 1, sigmoid)
    per class group, the groups from k-means on the training counts (`count_groups`); a sample
    takes its class's group's output. The heads are one Linear(hidden_size, groups): row g is
    group g's head. `init` as MetaNet's (flat: every head's weights scaled, biases zero).

    The class-to-group map is a run constant (`meta_groups`, a class-indexed tensor) in the
    state, so runs of one vectorised group may have their own. Called without labels it gives
    every group's curve, (groups, B)."""

    def __init__(
        self, hidden_size: int = 100, num_layers: int = 1, init: str = "random", groups: int = 3
    ) -> None:
        super().__init__()
        if groups < 1:
            raise ValueError(f"meta_net.groups={groups}: allowed values are integers >= 1")
        self.trunk = nn.Sequential(*hidden_layers(hidden_size, num_layers, init))
        self.heads = output_layer(hidden_size if num_layers else 1, groups, init)
        self.groups = groups

    def forward(
        self,
        loss: torch.Tensor,
        label: torch.Tensor | None = None,
        constants: Tensors | None = None,
    ) -> torch.Tensor:
        """Weights (B,) of losses (B,) with their labels; without labels, (groups, B)."""
        out = self.heads(self.trunk(loss.unsqueeze(-1)))  # (B, groups)
        if label is None:
            return torch.sigmoid(out).transpose(0, 1)
        group = constants["meta_groups"][label]  # (B,)
        return torch.sigmoid(out.gather(-1, group.unsqueeze(-1))).squeeze(-1)

    def constants(self, counts: list[int]) -> Tensors:
        """The class-to-group map of these training counts."""
        return {"meta_groups": torch.tensor(count_groups(list(counts), self.groups))}


# model.arch -> the classifier: cls(num_classes, depth=, width=, in_channels=), with DEPTHS (the
# allowed depths, in words) and depth_ok(depth)
CLASSIFIERS: dict[str, type[nn.Module]] = {"resnet": ResNet, "wrn": WideResNet}
# meta_net.name -> the weighting net: cls(hidden_size, num_layers, init[, groups]), called as
# (loss, label, constants), with constants(counts)
META_NETS: dict[str, type[nn.Module]] = {"mlp": MetaNet, "cmw": ClassAwareMetaNet}
GROUPED = {"cmw"}  # the meta-nets that take meta_net.groups


def build_classifier(
    arch: str, num_classes: int, in_channels: int, depth: int, width: int
) -> nn.Module:
    """The registered classifier `arch`; `width` = channels of the first stage."""
    return CLASSIFIERS[arch](num_classes, depth=depth, width=width, in_channels=in_channels)


def build_meta_net(
    name: str, hidden_size: int, num_layers: int, init: str, groups: int = 1
) -> nn.Module:
    """The registered meta-net `name` (`groups`: its class groups, for one that has them)."""
    if name in GROUPED:
        return META_NETS[name](hidden_size, num_layers, init, groups)
    return META_NETS[name](hidden_size, num_layers, init)


def extract_state(module: nn.Module) -> tuple[Tensors, Tensors]:
    """The module's parameters and buffers as plain dicts of detached tensors."""
    params = {k: v.detach().clone() for k, v in module.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in module.named_buffers()}
    return params, buffers


def count_params(params: Tensors) -> int:
    return sum(p.numel() for p in params.values())
