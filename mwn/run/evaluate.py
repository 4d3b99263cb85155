"""Test and validation scores: accuracy overall, per class, and by shot group (many > 100,
medium 20-100, few < 20 training images, the long-tail reporting convention), balanced accuracy,
macro-F1, per-class precision and recall and the confusion matrix (torchmetrics); and what the
meta-net does: its weighting function on a grid of losses and the weights it gives a batch."""

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
def predict(
    model: nn.Module, params: Tensors, buffers: Tensors, data: DeviceImages, batch_size: int = 1000
) -> torch.Tensor:
    """The classifier's logits (float32) for every image of `data`, in order, in eval mode
    (BatchNorm running statistics)."""
    model.eval()
    try:
        return torch.cat(
            [
                functional_call(model, (params, buffers), (x,), strict=True).float()
                for x, _ in data.in_order(batch_size)
            ]
        )
    finally:
        model.train()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    params: Tensors,
    buffers: Tensors,
    data: DeviceImages,
    num_classes: int,
    batch_size: int = 1000,
) -> dict:
    """Accuracy in % of the classifier in eval mode (BatchNorm running statistics), overall and
    per class, and the scores of `class_scores`."""
    pred = predict(model, params, buffers, data, batch_size).argmax(1)
    y = data.y
    correct = torch.bincount(y[pred == y], minlength=num_classes)
    total = torch.bincount(y, minlength=num_classes)
    per_class = (100.0 * correct / total.clamp(min=1)).tolist()
    acc = 100.0 * correct.sum().item() / total.sum().item()
    return {"test_acc": acc, "per_class_acc": per_class, **class_scores(pred, y, num_classes)}


def class_scores(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> dict:
    """Balanced accuracy (the mean recall of the classes that have samples, in %), macro-F1 (in
    %; the classes with samples or predictions, as scikit-learn's), per-class precision, recall
    and F1 (fractions; 0 where undefined) and the confusion matrix (rows: true class, columns:
    predicted), all from torchmetrics."""
    from torchmetrics.functional.classification import (
        multiclass_confusion_matrix,
        multiclass_f1_score,
        multiclass_precision,
        multiclass_recall,
    )

    C, pred, target = num_classes, pred.cpu(), target.cpu()
    recall = multiclass_recall(pred, target, C, average=None)
    present = torch.bincount(target, minlength=C) > 0
    return {
        "test_balanced_acc": 100.0 * recall[present].mean().item(),
        "test_macro_f1": 100.0 * multiclass_f1_score(pred, target, C, average="macro").item(),
        "precision": multiclass_precision(pred, target, C, average=None).tolist(),
        "recall": recall.tolist(),
        "f1": multiclass_f1_score(pred, target, C, average=None).tolist(),
        "confusion": multiclass_confusion_matrix(pred, target, C).tolist(),
    }


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
    """The meta-net's weight V(L) at WEIGHT_FN_LOSSES (a class-aware meta-net: one curve per
    class group, `weight_fn_by_group`), and for each sample of `batch` its label, its loss under
    the current classifier (training mode; buffers untouched) and V(loss)."""
    x, y = batch
    grid = torch.tensor(WEIGHT_FN_LOSSES, device=y.device)
    curve = sample_weights(meta_net, state["meta_params"], grid, None, run_constants(state), False)
    losses, weights = _losses_and_weights(model, meta_net, state, x, y, amp)
    r = lambda t: [round(v, 6) for v in t.float().tolist()]
    batch_record = {"label": y.tolist(), "loss": r(losses), "weight": r(weights)}
    if curve.dim() == 2:  # (groups, losses)
        return {"weight_fn_by_group": [r(c) for c in curve], "batch": batch_record}
    return {"weight_fn": r(curve), "batch": batch_record}


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
