"""Shared fixtures: tiny datasets in the real on-disk formats, written by the tests."""

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
from torchvision.datasets import CIFAR10, CIFAR100


def write_cifar(root: Path, name: str = "cifar10", per_class: int = 110, test_per_class: int = 3):
    """CIFAR python-format files (pickled dicts) with `per_class` training images per class.
    Pixels encode (image index, position) so tests can check the layout."""
    tv = CIFAR10 if name == "cifar10" else CIFAR100
    classes = 10 if name == "cifar10" else 100
    key = b"labels" if name == "cifar10" else b"fine_labels"
    folder = root / tv.base_folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def batch(labels):
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        return {b"data": data, key: [int(c) for c in labels], b"batch_label": b"tiny"}

    train_labels = rng.permutation(np.repeat(np.arange(classes), per_class))
    chunks = np.array_split(train_labels, len(tv.train_list))
    for (fname, _), labels in zip(tv.train_list, chunks):
        (folder / fname).write_bytes(pickle.dumps(batch(labels)))
    test_labels = np.repeat(np.arange(classes), test_per_class)
    (folder / tv.test_list[0][0]).write_bytes(pickle.dumps(batch(test_labels)))
    return folder


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_cifar10(tmp_path):
    write_cifar(tmp_path, "cifar10")
    return tmp_path
