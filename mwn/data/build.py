"""A run's data: read the dataset, take the meta set out of its training split, apply the long
tail, then label noise on the training labels only; all on the device."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import torch
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

from mwn import seeds
from mwn.data.batches import DeviceImages
from mwn.data.images import ImageSet, channel_stats
from mwn.data.noise import apply_noise
from mwn.data.readers import load_dataset
from mwn.data.splits import make_long_tail, split_meta

log = logging.getLogger(__name__)
NOISE_PROBE = 1000  # training samples on which clean and corrupted weights are compared


@dataclass
class Data:
    """The run's image sets on the device, and how they were made."""

    name: str
    num_classes: int
    train: DeviceImages  # long-tailed, with noisy labels where asked
    meta: DeviceImages  # clean, balanced, disjoint from train
    test: DeviceImages
    counts: list[int]  # training images per class
    noisy: torch.Tensor  # (len(train),) bool: the label was corrupted
    noise: dict  # what noise.json holds
    probe: DeviceImages | None = None  # label noise: training samples whose weights are watched
    probe_noisy: torch.Tensor | None = None


def build_data(cfg: DictConfig, device: torch.device) -> Data:
    """The meta set out of the training split, then the long tail, then label noise on the
    training labels only; all on the device."""
    images, mean, std = read_images(cfg)
    C = images.num_classes
    meta_idx, pool = split_meta(images.train_y, C, cfg.meta_per_class, cfg.seed)
    train_idx, counts = make_long_tail(
        images.train_y, pool, C, cfg.imbalance, cfg.seed, cfg.train_per_class
    )
    train_y, noisy, noise = apply_noise(
        images.train_y[train_idx], train_idx, C, str(cfg.noise), cfg.noise_rate, cfg.seed
    )

    def on_device(x: torch.Tensor, y: torch.Tensor) -> DeviceImages:
        return DeviceImages(x, y, mean, std, device, channels_last=cfg.channels_last)

    train_set = on_device(images.train_x[train_idx], train_y)
    meta_set = on_device(images.train_x[meta_idx], images.train_y[meta_idx])
    test_set = on_device(images.test_x, images.test_y)
    data = Data(images.name, C, train_set, meta_set, test_set, counts, noisy, noise)
    log.info(
        f"{data.name}: {len(train_set)} train (per class {counts}), {len(meta_set)} meta, "
        f"{len(test_set)} test; device {device}"
    )
    if cfg.noise != "none":
        log.info(
            f"noise={cfg.noise} noise_rate={cfg.noise_rate:g}: {noise['corrupted']} of "
            f"{len(train_set)} training labels corrupted (noise.json)"
        )
        # a fixed subset of the training set on which clean and noisy weights are compared
        g = seeds.generator(cfg.seed, "noise_probe")
        probe = torch.randperm(len(train_set), generator=g)[:NOISE_PROBE].sort().values
        data.probe = on_device(images.train_x[train_idx[probe]], train_y[probe])
        data.probe_noisy = noisy[probe]
    return data


def read_images(cfg: DictConfig) -> tuple[ImageSet, list[float], list[float]]:
    """The dataset as read from disk, and its normalisation mean and std (computed from the
    whole training split when the config gives none)."""
    d, tty = cfg.dataset, sys.stderr.isatty()
    bar = cfg.progress == "bar" or (cfg.progress == "auto" and tty)
    images = load_dataset(str(d.name), to_absolute_path(d.root), d.download, d.image_size, bar)
    if d.mean is not None:
        return images, list(d.mean), list(d.std)
    mean, std = channel_stats(images.train_x)
    rounded = lambda v: [round(x, 4) for x in v]
    log.info(
        f"dataset.mean={rounded(mean)} dataset.std={rounded(std)}: computed from the training split"
    )
    return images, mean, std
