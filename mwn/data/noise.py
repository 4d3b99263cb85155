"""Label noise for the training set (meta and test sets stay clean), and how well the meta-net's
weights tell clean from corrupted samples.

Each kind is a transition matrix T (C x C; row = true class, column = observed label); every
training label y is redrawn, independently and seeded, from row T[y]:
- uniform: with probability r the label is redrawn uniformly from all C classes (it may land on
  its own class: the true flip rate is r (C - 1) / C);
- flip: r of each class moves to one fixed other class;
- flip2: r / 2 of each class moves to each of two fixed other classes.
The other classes are drawn once, with the seed, as in the MWN code.
"""

from __future__ import annotations

import torch

from mwn import seeds
from mwn.data.images import DataError


def transition_matrix(kind: str, rate: float, num_classes: int, seed: int) -> torch.Tensor:
    """T (float64, rows sum to 1) for a noise kind and rate."""
    C = num_classes
    if kind == "none":
        return torch.eye(C, dtype=torch.float64)
    if kind == "uniform":
        return (1 - rate) * torch.eye(C, dtype=torch.float64) + rate / C
    others = 1 if kind == "flip" else 2
    if others >= C:
        raise DataError(f"noise={kind}: needs more than {others} classes, the dataset has {C}")
    g = seeds.generator(seed, "noise_classes")
    T = (1 - rate) * torch.eye(C, dtype=torch.float64)
    for c in range(C):
        candidates = torch.tensor([k for k in range(C) if k != c])
        for k in candidates[torch.randperm(C - 1, generator=g)[:others]]:
            T[c, k] += rate / others
    return T


def corrupt_labels(
    labels: torch.Tensor, T: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Redraw each label from its row of T. Returns (observed labels, corrupted mask), where
    corrupted means the observed label differs from the true one."""
    g = seeds.generator(seed, "noise_labels")
    observed = torch.multinomial(T[labels], 1, generator=g).flatten()
    return observed, observed != labels


def realised_matrix(true: torch.Tensor, observed: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts (C x C, int64): row = true class, column = observed label."""
    flat = true * num_classes + observed
    return torch.bincount(flat, minlength=num_classes**2).view(num_classes, num_classes)


def auc(scores: torch.Tensor, positive: torch.Tensor) -> float | None:
    """Area under the ROC curve of `scores` as a detector of `positive` (ties count one half):
    the probability that a random positive scores above a random negative. None if either
    class is empty."""
    pos, neg = int(positive.sum()), int((~positive).sum())
    if pos == 0 or neg == 0:
        return None
    rank_sum = average_ranks(scores)[positive].sum().item()
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)


def average_ranks(scores: torch.Tensor) -> torch.Tensor:
    """1-based ranks of `scores` (float64), tied values sharing the mean of their ranks."""
    unique, inverse = torch.unique(scores.double(), return_inverse=True)  # sorted values
    counts = torch.bincount(inverse).double()
    ends = counts.cumsum(0)
    return ((ends - counts + 1 + ends) / 2)[inverse]


def apply_noise(
    labels: torch.Tensor,
    split_index: torch.Tensor,
    num_classes: int,
    kind: str,
    rate: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Corrupt the training labels `labels` (their positions in the dataset's training split are
    `split_index`). Returns (observed labels, corrupted mask, the record kept in the run folder:
    kind, rate, T, the realised count matrix, and every corrupted sample as
    [training-split index, true label, observed label])."""
    T = transition_matrix(kind, rate, num_classes, seed)
    if kind == "none":
        observed, noisy = labels.clone(), torch.zeros_like(labels, dtype=torch.bool)
    else:
        observed, noisy = corrupt_labels(labels, T, seed)
    record = {
        "noise": kind,
        "noise_rate": rate,
        "corrupted": int(noisy.sum()),
        "corrupted_fraction": noisy.float().mean().item(),
        "transition": T.tolist(),
        "realised": realised_matrix(labels, observed, num_classes).tolist(),
        "corrupted_samples": torch.stack(
            [split_index[noisy], labels[noisy], observed[noisy]], 1
        ).tolist(),
    }
    return observed, noisy, record
