"""A run's data: read the dataset, take the meta set (and a validation set) out of its training
split unless the dataset brings its own, apply the long tail or keep the data's own class counts,
then label noise on the training labels only; all on the device."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import torch
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

from mwn import seeds
from mwn.data.batches import DeviceImages
from mwn.data.images import DataError, ImageSet, channel_stats
from mwn.data.noise import apply_noise
from mwn.data.readers import load_dataset
from mwn.data.splits import make_long_tail, split_meta, split_per_class
from mwn.data.streaming import (
    FileImages,
    StreamedImages,
    decoded_bytes,
    file_channel_stats,
    stream_image_folder,
)

log = logging.getLogger(__name__)
NOISE_PROBE = 1000  # training samples on which clean and corrupted weights are compared


@dataclass
class Data:
    """The run's image sets on the device, and how they were made."""

    name: str
    num_classes: int
    train: (
        DeviceImages | StreamedImages
    )  # long-tailed (or as the data is), with noisy labels where asked
    meta: DeviceImages  # clean, disjoint from train: drawn per class, or the folder's meta/
    test: DeviceImages | StreamedImages
    counts: list[int]  # training images per class
    noisy: torch.Tensor  # (len(train),) bool: the label was corrupted
    noise: dict  # what noise.json holds
    probe: DeviceImages | None = None  # label noise: training samples whose weights are watched
    probe_noisy: torch.Tensor | None = None
    val: DeviceImages | StreamedImages | None = (
        None  # the validation set: the folder's val/ or val_per_class
    )
    classes: list[str] | None = None  # class names, in index order
    train_index: torch.Tensor | None = None  # each training image's index in the dataset's
    # training split (its files: train_files[i])
    train_files: list[str] | None = None  # the dataset's training files, when it has files
    mean: list[float] | None = None  # the normalisation the sets use (pixel scale 0..1)
    std: list[float] | None = None


def build_data(cfg: DictConfig, device: torch.device) -> Data:
    """The meta set (and validation set) out of the training split unless the dataset brings
    them, then the long tail (or the data's own counts), then label noise on the training
    labels only; all on the device."""
    images, mean, std = read_images(cfg)
    C = images.num_classes
    meta_idx, val_idx, pool = _split(images, cfg)
    train_idx, counts = make_long_tail(
        images.train_y, pool, C, cfg.imbalance, cfg.seed, cfg.train_per_class
    )
    train_y, noisy, noise = apply_noise(
        images.train_y[train_idx], train_idx, C, str(cfg.noise), cfg.noise_rate, cfg.seed
    )

    def on_device(x, y: torch.Tensor, resident: bool = False) -> DeviceImages | StreamedImages:
        """The set on the device, or streamed from disk (a small set: loaded, `resident`)."""
        if isinstance(x, FileImages):
            if not resident:
                workers = cfg.dataset.workers
                return StreamedImages(x, y, mean, std, device, channels_last=cl, workers=workers)
            x = x.load()
        return DeviceImages(x, y, mean, std, device, channels_last=cl)

    cl = cfg.channels_last

    train_set = on_device(images.train_x[train_idx], train_y)
    if images.meta is not None:
        meta_set = on_device(images.meta.x, images.meta.y, resident=True)
    else:
        meta_set = on_device(images.train_x[meta_idx], images.train_y[meta_idx], resident=True)
    val_set = None
    if images.val is not None:
        val_set = on_device(images.val.x, images.val.y)
    elif val_idx is not None:
        val_set = on_device(images.train_x[val_idx], images.train_y[val_idx])
    test_set = on_device(images.test_x, images.test_y)
    data = Data(images.name, C, train_set, meta_set, test_set, counts, noisy, noise)
    data.val, data.classes, data.train_index = val_set, images.classes, train_idx
    data.train_files, data.mean, data.std = images.train_files, mean, std
    val_note = f", {len(val_set)} val" if val_set is not None else ""
    log.info(
        f"{data.name}: {len(train_set)} train (per class {counts}), {len(meta_set)} meta"
        f"{val_note}, {len(test_set)} test; device {device}"
    )
    if images.meta is not None:
        log.info(
            f"meta set: the folder's meta/ ({len(meta_set)} images, never trained on); "
            "meta_per_class is not read"
        )
    if cfg.noise != "none":
        log.info(
            f"noise={cfg.noise} noise_rate={cfg.noise_rate:g}: {noise['corrupted']} of "
            f"{len(train_set)} training labels corrupted (noise.json)"
        )
        # a fixed subset of the training set on which clean and noisy weights are compared
        g = seeds.generator(cfg.seed, "noise_probe")
        probe = torch.randperm(len(train_set), generator=g)[:NOISE_PROBE].sort().values
        data.probe = on_device(images.train_x[train_idx[probe]], train_y[probe], resident=True)
        data.probe_noisy = noisy[probe]
    return data


def _split(
    images: ImageSet, cfg: DictConfig
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """(meta indices or None when the dataset brings a meta set, validation indices or None,
    the indices left for training), disjoint, into the dataset's training split."""
    labels, classes, seed, n_val = images.train_y, images.classes, cfg.seed, cfg.val_per_class
    if images.val is not None and n_val:
        raise DataError(
            f"val_per_class={n_val}: the dataset has its own val/ folder; allowed values are 0 "
            "with a val/ folder (or move the folder away to draw one)"
        )
    meta_idx = val_idx = None
    if images.meta is None:
        meta_idx, pool = split_meta(
            labels, images.num_classes, cfg.meta_per_class, seed, classes, n_val
        )
    else:
        pool = torch.arange(len(labels))
    if n_val:
        val_idx, pool = split_per_class(
            labels, pool, classes, n_val, seed, "val_split", "val_per_class"
        )
    return meta_idx, val_idx, pool


def read_images(cfg: DictConfig) -> tuple[ImageSet, list[float], list[float]]:
    """The dataset as read from disk (an image folder's images left on disk when it streams),
    and its normalisation mean and std (computed from the whole training split when the config
    gives none)."""
    d, tty = cfg.dataset, sys.stderr.isatty()
    bar = cfg.progress == "bar" or (cfg.progress == "auto" and tty)
    root = to_absolute_path(d.root)
    if d.name == "image_folder" and _streams(d, root):
        images = stream_image_folder(root, d.image_size)
    else:
        images = load_dataset(str(d.name), root, d.download, d.image_size, bar)
    if d.mean is not None:
        return images, list(d.mean), list(d.std)
    if isinstance(images.train_x, FileImages):
        mean, std = file_channel_stats(images.train_x, d.workers)
    else:
        mean, std = channel_stats(images.train_x)
    rounded = lambda v: [round(x, 4) for x in v]
    log.info(
        f"dataset.mean={rounded(mean)} dataset.std={rounded(std)}: computed from the training split"
    )
    return images, mean, std


def _streams(d: DictConfig, root: str) -> bool:
    """Whether an image folder streams from disk; says which path the run takes and why."""
    if d.load == "memory":
        log.info("data in memory (dataset.load=memory)")
        return False
    if d.load == "stream":
        log.info(
            f"data streamed from disk, decoded by dataset.workers={d.workers} (dataset.load=stream)"
        )
        return True
    size = decoded_bytes(root, d.image_size) / 1e9
    stream = size > d.memory_budget_gb
    log.info(
        f"data {'streamed from disk' if stream else 'in memory'}: decoded it takes {size:.3g} GB, "
        f"{'over' if stream else 'within'} dataset.memory_budget_gb={d.memory_budget_gb:g} "
        "(dataset.load=auto)"
    )
    return stream
