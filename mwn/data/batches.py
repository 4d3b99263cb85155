"""Batches on the device: index batches seeded by (seed, stream, iteration), and image sets held
on the device as uint8 whose batches come out normalised and augmented (crops and flips for the
whole batch at once). Which samples a batch holds and how they are cropped is a pure function of
(seed, stream, iteration), so a run can be replayed from any iteration.
"""

from __future__ import annotations

import torch

from mwn import seeds
from mwn.data.images import DataError
from mwn.seeds import Stream


class Sampler:
    """Index batches of a set of size n: a fresh seeded permutation each epoch, last partial
    batch dropped. Batch k depends only on (seed, stream, k)."""

    def __init__(self, n: int, batch_size: int, seed: int, stream: Stream, what: str) -> None:
        if batch_size > n:
            raise DataError(f"{what}={batch_size}: only {n} images to draw from; allowed 1..{n}")
        self.n, self.batch_size, self.seed, self.stream = n, batch_size, seed, stream
        self.per_epoch = n // batch_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def indices(self, k: int) -> torch.Tensor:
        epoch, pos = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            g = seeds.step_generator(self.seed, self.stream, epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm[pos * self.batch_size : (pos + 1) * self.batch_size]


class DeviceImages:
    """A labelled image set held on the device as uint8; batches come out normalised (and, when
    asked, randomly cropped from a zero-padded image and flipped, like torchvision's RandomCrop
    and RandomHorizontalFlip)."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        mean,
        std,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
    ) -> None:
        self.x, self.y = x.to(device), y.to(device)
        c = x.shape[1]
        if len(mean) != c or len(std) != c:
            raise DataError(f"dataset.mean/std need {c} values (one per channel)")
        self.mean = torch.tensor(mean, device=device, dtype=dtype).view(1, c, 1, 1) * 255
        self.std = torch.tensor(std, device=device, dtype=dtype).view(1, c, 1, 1) * 255
        self.device, self.dtype = device, dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self) -> int:
        return len(self.y)

    def in_order(self, batch_size: int):
        """The whole set in order, in batches, without augmentation (evaluation passes)."""
        for start in range(0, len(self), batch_size):
            yield self.batch(torch.arange(start, min(start + batch_size, len(self))))

    def batch(
        self,
        idx: torch.Tensor,
        crop_padding: int = 0,
        flip: bool = False,
        gen: torch.Generator | None = None,
        rows: slice = slice(None),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The images at idx, augmented, normalised; only `rows` of them (a rank's shard of a
        global batch: the random crops and flips are drawn for all of idx, so a shard is exactly
        its part of the one-process batch)."""
        idx = idx.to(self.device)
        x = self.x[idx]
        if crop_padding:
            x = random_crop(x, crop_padding, gen)
        if flip:
            mirror = torch.rand(len(x), generator=gen, device=self.device) < 0.5
            x = torch.where(mirror.view(-1, 1, 1, 1), x.flip(3), x)
        x = (x[rows].to(self.dtype) - self.mean) / self.std
        return x.contiguous(memory_format=self.memory_format), self.y[idx[rows]]


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator | None) -> torch.Tensor:
    """Per-image random crop of the original size from the image zero-padded by `padding`."""
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    off = torch.randint(0, 2 * padding + 1, (2, b), generator=gen, device=x.device)
    rows = (off[0].view(b, 1) + torch.arange(h, device=x.device)).view(b, 1, h, 1)
    cols = (off[1].view(b, 1) + torch.arange(w, device=x.device)).view(b, 1, 1, w)
    bi = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    ci = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[bi, ci, rows, cols]
