"""The seeded meta split and long tail: which training images become the clean, balanced meta set,
and how many of the rest each class keeps (n_c = int(n_max * imbalance^(-c / (C - 1))))."""

from __future__ import annotations

import torch

from mwn import seeds
from mwn.data.images import DataError


def split_meta(labels: torch.Tensor, num_classes: int, per_class: int, seed: int):
    """Take `per_class` images of each class out of the training split, chosen with the seed.
    Returns (meta indices, remaining indices), disjoint, both sorted."""
    g = seeds.generator(seed, "meta_split")
    meta = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        if per_class >= len(idx):
            raise DataError(
                f"meta_per_class={per_class}: class {c} has only {len(idx)} training images; "
                f"allowed values are 0 < meta_per_class < {len(idx)}"
            )
        meta.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    meta_idx = torch.cat(meta).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[meta_idx] = False
    return meta_idx, torch.nonzero(keep).flatten()


def long_tail_counts(n_max: int, num_classes: int, imbalance: float) -> list[int]:
    """n_c = int(n_max * imbalance^(-c / (C - 1))): class 0 keeps n_max, the last n_max / IF."""
    return [int(n_max * imbalance ** (-c / (num_classes - 1))) for c in range(num_classes)]


def make_long_tail(
    labels: torch.Tensor,
    pool: torch.Tensor,
    num_classes: int,
    imbalance: float,
    seed: int,
    per_class_cap: int | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Subsample `pool` (indices into labels) to the long-tail counts; n_max is the smallest
    class count in the pool, or `per_class_cap` when that is smaller (a smaller training set).
    Returns (sorted kept indices, per-class counts)."""
    per_class = [pool[labels[pool] == c] for c in range(num_classes)]
    n_max = min(len(p) for p in per_class)
    if per_class_cap is not None:
        n_max = min(n_max, per_class_cap)
    counts = long_tail_counts(n_max, num_classes, imbalance)
    if counts[-1] < 1:  # n_max * n_max^-1 may round below 1: then n_max itself is too large
        bound = "<=" if long_tail_counts(n_max, num_classes, n_max)[-1] >= 1 else "<"
        raise DataError(
            f"imbalance={imbalance:g}: leaves the last class with no training image "
            f"(n_max={n_max}); allowed values are 1 <= imbalance {bound} {n_max}"
        )
    g = seeds.generator(seed, "long_tail")
    kept = [p[torch.randperm(len(p), generator=g)[:n]] for p, n in zip(per_class, counts)]
    return torch.cat(kept).sort().values, counts
