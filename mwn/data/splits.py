"""The seeded splits of a training set: which images become the clean, balanced meta set, which
the validation set, and how many of the rest each class keeps: the long tail
(n_c = int(n_max * imbalance^(-c / (C - 1)))) or the data's own counts."""

from __future__ import annotations

import torch

from mwn import seeds
from mwn.data.images import DataError


def split_per_class(
    labels: torch.Tensor,
    pool: torch.Tensor,
    classes: list[str],
    per_class: int,
    seed: int,
    stream: str,
    what: str,
    reserve: int = 1,
    reserved_for: str = "training",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Take `per_class` images of each class out of `pool` (indices into labels), chosen with
    the seed and `stream`; each class must keep at least `reserve` more images (for what
    `reserved_for` says). Returns (taken indices, remaining indices), disjoint, both sorted.
    `what` names the setting."""
    g = seeds.generator(seed, stream)
    taken = []
    for c, name in enumerate(classes):
        idx = pool[labels[pool] == c]
        if per_class + reserve > len(idx):
            most = len(idx) - reserve
            allowed = f"1 <= {what} <= {most}" if most >= 1 else "none: the class is too small"
            raise DataError(
                f"{what}={per_class}: class {name!r} has only {len(idx)} training images and "
                f"{reserve} must stay for {reserved_for}; allowed values are {allowed}"
            )
        taken.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    taken_idx = torch.cat(taken).sort().values
    keep = torch.zeros(len(labels), dtype=torch.bool)
    keep[pool] = True
    keep[taken_idx] = False
    return taken_idx, torch.nonzero(keep).flatten()


def split_meta(
    labels: torch.Tensor,
    num_classes: int,
    per_class: int,
    seed: int,
    classes: list[str] | None = None,
    val_per_class: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Take `per_class` images of each class out of the training split, chosen with the seed;
    `val_per_class` and one for training stay in each class. Returns (meta indices, remaining
    indices)."""
    names = classes or [str(c) for c in range(num_classes)]
    every = torch.arange(len(labels))
    note = f"val_per_class={val_per_class} and training" if val_per_class else "training"
    return split_per_class(
        labels,
        every,
        names,
        per_class,
        seed,
        "meta_split",
        "meta_per_class",
        1 + val_per_class,
        note,
    )


def long_tail_counts(n_max: int, num_classes: int, imbalance: float) -> list[int]:
    """n_c = int(n_max * imbalance^(-c / (C - 1))): class 0 keeps n_max, the last n_max / IF."""
    return [int(n_max * imbalance ** (-c / (num_classes - 1))) for c in range(num_classes)]


def make_long_tail(
    labels: torch.Tensor,
    pool: torch.Tensor,
    num_classes: int,
    imbalance: float | None,
    seed: int,
    per_class_cap: int | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Subsample `pool` (indices into labels) to the long-tail counts; n_max is the smallest
    class count in the pool, or `per_class_cap` when that is smaller (a smaller training set).
    With imbalance None every class keeps its own count (at most `per_class_cap`).
    Returns (sorted kept indices, per-class counts)."""
    per_class = [pool[labels[pool] == c] for c in range(num_classes)]
    if imbalance is None:
        cap = per_class_cap if per_class_cap is not None else max(len(p) for p in per_class)
        counts = [min(len(p), cap) for p in per_class]
        if all(n == len(p) for p, n in zip(per_class, counts)):
            return pool.sort().values, counts
    else:
        n_max = min(len(p) for p in per_class)
        if per_class_cap is not None:
            n_max = min(n_max, per_class_cap)
        counts = long_tail_counts(n_max, num_classes, imbalance)
        if counts[-1] < 1:  # n_max * n_max^-1 may round below 1: then n_max itself is too large
            bound = "<=" if long_tail_counts(n_max, num_classes, n_max)[-1] >= 1 else "<"
            raise DataError(
                f"imbalance={imbalance:g}: leaves the last class with no training image "
                f"(n_max={n_max}); allowed values are 1 <= imbalance {bound} {n_max}, or null "
                "(the data's own class counts)"
            )
    g = seeds.generator(seed, "long_tail")
    kept = [p[torch.randperm(len(p), generator=g)[:n]] for p, n in zip(per_class, counts)]
    return torch.cat(kept).sort().values, counts
