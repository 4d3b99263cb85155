"""Every random stream of a run, named in one table.

A run draws from its seed in two ways:
- once, at start-up (which images form the meta set, the long tail, the label noise, the noise
  probe): a `torch.Generator` seeded with `seed + ONCE[name]`;
- every iteration (batch order, augmentation): a generator for (seed, stream, iteration) from
  NumPy's SeedSequence, so that any iteration can be replayed without saved RNG state.
The classifier's and meta-net's initial weights come from the global torch generator (which
`nn.Module` constructors use), seeded by `seed_globals`; so are Python's and NumPy's global
generators, which nothing in a run draws from but a checkpoint keeps.

The offsets are those of the first release; changing one changes every run's data.
"""

from __future__ import annotations

import random
from enum import IntEnum

import numpy as np
import torch

ONCE = {
    "meta_split": 0,  # which training images become the meta set (mwn.data.splits.split_meta)
    "long_tail": 1,  # which images each class keeps (mwn.data.splits.make_long_tail)
    "noise_classes": 2,  # the other classes of flip / flip2 noise (mwn.data.noise)
    "noise_labels": 3,  # which labels are corrupted, and to what (mwn.data.noise)
    "noise_probe": 4,  # the training samples on which clean and noisy weights are compared
    "val_split": 5,  # which training images become the validation set (val_per_class)
}


class Stream(IntEnum):
    """The per-iteration streams."""

    TRAIN_BATCHES = 0  # order of the training set, a permutation per epoch
    META_BATCHES = 1  # order of the meta set
    TRAIN_AUG = 2  # crops and flips of a training batch
    META_AUG = 3  # crops and flips of a meta batch


def generator(seed: int, name: str) -> torch.Generator:
    """The CPU generator of a start-up draw named in ONCE."""
    return torch.Generator().manual_seed(seed + ONCE[name])


def step_generator(
    seed: int, stream: Stream, step: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    """The generator of one (seed, stream, step), on the device."""
    key = np.random.SeedSequence([seed, int(stream), step]).generate_state(2, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(key) >> 1)


def seed_globals(seed: int) -> None:
    """Seed the global generators of torch (the initial weights), Python and NumPy."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
