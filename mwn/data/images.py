"""An image set as read from disk, the error of data that cannot give what a run asks, and the
per-channel statistics that normalise it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

STATS_CHUNK = 1 << 22  # pixels (elements) channel_stats converts to float64 at a time: 32 MB


class DataError(ValueError):
    """A dataset that is missing, malformed or cannot give what the config asks."""


@dataclass
class Split:
    """A further split a dataset brings with it (an image folder's meta/ or val/): uint8
    (N, C, H, W) images, labels (N,), and each image's file (relative to the dataset's root)."""

    x: torch.Tensor
    y: torch.Tensor
    files: list[str] | None = None


@dataclass
class ImageSet:
    """Train and test images of one dataset, as read from disk: uint8 (N, C, H, W), labels (N,);
    the class names (index order), each image's file where the images are files, and the trusted
    meta set and validation set when the dataset brings them."""

    name: str
    num_classes: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str] | None = None  # None: the class indices as names
    train_files: list[str] | None = None  # relative to the dataset's root
    test_files: list[str] | None = None
    meta: Split | None = None  # a meta/ folder: the whole meta set, never trained on
    val: Split | None = None  # a val/ folder: the validation set

    def __post_init__(self) -> None:
        if self.classes is None:
            self.classes = [str(c) for c in range(self.num_classes)]


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) of uint8 images (N, C, H, W) on the 0..1 pixel scale, over every
    pixel of every image; std is the population one (divides by the count, not count - 1).

    Sums of x and x^2 in float64, a few million pixels at a time (no float copy of the set);
    they are exact integers below 2^53, so the result is exact to float64 rounding."""
    if x.dtype != torch.uint8 or x.dim() != 4 or x.numel() == 0:
        raise ValueError(
            f"channel_stats needs non-empty uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}"
        )
    c = x.shape[1]
    step = max(1, STATS_CHUNK // x[0].numel())  # images per chunk
    total = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    for start in range(0, len(x), step):
        part = x[start : start + step].to(torch.float64)
        total += part.sum((0, 2, 3))
        squares += part.square_().sum((0, 2, 3))
    count = x.numel() // c
    mean = total / count
    std = (squares / count - mean * mean).clamp(min=0).sqrt()
    return (mean / 255).tolist(), (std / 255).tolist()
