"""Test accuracy: overall, per class, and by shot group (many > 100, medium 20-100, few < 20
training images, the long-tail reporting convention)."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from mwn.data import DeviceImages

Tensors = dict[str, torch.Tensor]


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
        for start in range(0, len(data), batch_size):
            x, y = data.batch(torch.arange(start, min(start + batch_size, len(data))))
            pred = functional_call(model, (params, buffers), (x,), strict=True).argmax(1)
            correct += torch.bincount(y[pred == y], minlength=num_classes)
            total += torch.bincount(y, minlength=num_classes)
    finally:
        model.train()
    per_class = (100.0 * correct / total.clamp(min=1)).tolist()
    return {"acc": 100.0 * correct.sum().item() / total.sum().item(), "per_class_acc": per_class}


def shot_accuracy(per_class_acc: list[float], train_counts: list[int]) -> dict:
    """Mean per-class accuracy of the many-, medium- and few-shot classes (None if a group is
    empty)."""
    groups = {
        "many": lambda n: n > 100,
        "medium": lambda n: 20 <= n <= 100,
        "few": lambda n: n < 20,
    }
    out = {}
    for name, member in groups.items():
        accs = [a for a, n in zip(per_class_acc, train_counts) if member(n)]
        out[f"{name}_acc"] = sum(accs) / len(accs) if accs else None
    return out
