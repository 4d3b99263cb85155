"""Test accuracy: overall, per class, and by shot group (many > 100, medium 20-100, few < 20
training images, the long-tail reporting convention); and what the meta-net does: its weighting
function on a grid of losses and the weights it gives a batch."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from mwn.core.step import per_sample_loss, run_constants, sample_weights
from mwn.core.types import Tensors
from mwn.data.batches import DeviceImages
from mwn.data.noise import auc
from mwn.run.files import SHOT_GROUPS, WEIGHT_FN_LOSSES, shot_group


@torch.no_grad()
def evaluate(
    model: nn.Module,
    params: Tensors,
    buffers: Tensors,
    data: DeviceImages,
    num_classes: int,
    batch_size: int = 1000,
) -> dict:
    """Accuracy in % of the classifier in eval mode (BatchNorm running statistics)."""
    correct = torch.zeros(num_classes, dtype=torch.long, device=data.device)
    total = torch.zeros(num_classes, dtype=torch.long, device=data.device)
    model.eval()
    try:
        for x, y in data.in_order(batch_size):
            pred = functional_call(model, (params, buffers), (x,), strict=True).argmax(1)
            correct += torch.bincount(y[pred == y], minlength=num_classes)
            total += torch.bincount(y, minlength=num_classes)
    finally:
        model.train()
    per_class = (100.0 * correct / total.clamp(min=1)).tolist()
    acc = 100.0 * correct.sum().item() / total.sum().item()
    return {"test_acc": acc, "per_class_acc": per_class}


def shot_accuracy(per_class_acc: list[float], train_counts: list[int]) -> dict:
    """Mean per-class accuracy of the many-, medium- and few-shot classes (None if a group is
    empty)."""
    out = {}
    for name in SHOT_GROUPS:
        accs = [a for a, n in zip(per_class_acc, train_counts) if shot_group(n) == name]
        out[f"{name}_acc"] = sum(accs) / len(accs) if accs else None
    return out


def _losses_and_weights(model, meta_net, state, x, y, amp):
    """Per-sample losses under the current classifier (training mode, buffers untouched) and
    the meta-net's raw weights V(loss) for them."""
    losses, _ = per_sample_loss(model, state["params"], state["buffers"], x, y, amp)
    w = sample_weights(meta_net, state["meta_params"], losses, y, run_constants(state), False)
    return losses, w


@torch.no_grad()
def weighting(
    model: nn.Module,
    meta_net: nn.Module,
    state: dict,
    batch: tuple[torch.Tensor, torch.Tensor],
    amp: torch.dtype | None = None,
) -> dict:
    """The meta-net's weight V(L) at WEIGHT_FN_LOSSES, and for each sample of `batch` its label,
    its loss under the current classifier (training mode; buffers untouched) and V(loss)."""
    x, y = batch
    grid = torch.tensor(WEIGHT_FN_LOSSES, device=y.device)
    curve = sample_weights(meta_net, state["meta_params"], grid, None, run_constants(state), False)
    losses, weights = _losses_and_weights(model, meta_net, state, x, y, amp)
    r = lambda t: [round(v, 6) for v in t.float().tolist()]
    return {
        "weight_fn": r(curve),
        "batch": {"label": y.tolist(), "loss": r(losses), "weight": r(weights)},
    }


@torch.no_grad()
def noise_separation(
    model: nn.Module,
    meta_net: nn.Module,
    state: dict,
    data: DeviceImages,
    noisy: torch.Tensor,
    batch_size: int,
    amp: torch.dtype | None = None,
) -> dict:
    """How the meta-net weighs clean and corrupted samples of `data` (a fixed subset of the
    training set, no augmentation; losses in training mode, in batches, buffers untouched):
    mean weight of each, and the AUC of the weight as a detector of clean samples."""
    weights = [
        _losses_and_weights(model, meta_net, state, x, y, amp)[1]
        for x, y in data.in_order(batch_size)
    ]
    w = torch.cat(weights).float().cpu()
    noisy = noisy.cpu()
    mean = lambda t: t.mean().item() if t.numel() else None
    return {
        "weight_clean": mean(w[~noisy]),
        "weight_noisy": mean(w[noisy]),
        "noise_auc": auc(w, ~noisy),
    }
