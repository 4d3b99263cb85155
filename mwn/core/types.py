"""The names the core's signatures share."""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensors = dict[str, torch.Tensor]  # parameters, buffers, gradients, optimiser moments, by name
Batch = tuple[torch.Tensor, torch.Tensor]  # images (B, C, H, W) float, labels (B,) int64
# a method's step: (model, meta_net, state, batch, meta_batch, lr, hp, reduce) -> (state, metrics)
StepFn = Callable[..., tuple[dict, dict]]
