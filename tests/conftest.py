"""Shared helpers and fixtures: configs, the command line, run comparisons, tensor errors, and
tiny datasets in the real on-disk formats, written by the tests."""

import gzip
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR10, CIFAR100

from mwn.compare import differences
from mwn.config import compose_config
from mwn.run import checkpoint

ROOT = Path(__file__).resolve().parent.parent

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N test processes share the cores
    # one intra-op thread each (OpenMP threads of several processes on the same cores spin
    # against each other); the command-line runs a test starts inherit it
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

FAST = ["train_iters=6", "val_every=3", "log_every=2", "model.width=4"]  # a run in seconds


def make_cfg(*overrides: str):
    """The composed config of `python -m mwn.train *overrides`."""
    return compose_config(list(overrides))


def run_cli(*args: str, cwd: Path, module: str = "mwn.train") -> subprocess.CompletedProcess:
    """`python -m mwn.train *args` in a fresh process, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("HYDRA_FULL_ERROR", None)
    command = [sys.executable, "-m", module, *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def final_state(folder: Path) -> dict:
    """The training state of a run folder's newest checkpoint."""
    return checkpoint.read(checkpoint.checkpoints(folder)[0])["state"]


def assert_same_run(a: Path, b: Path) -> None:
    """Bit for bit: metrics.jsonl, summary.json (wall time aside), the newest checkpoint."""
    assert differences(a, b) == []


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| over a tensor or a dict of tensors, in float64."""
    if isinstance(a, dict):
        num = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in b)
        den = sum((b[k].double() ** 2).sum() for k in b)
        return float(num.sqrt() / den.sqrt().clamp(min=1e-30))
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@pytest.fixture(autouse=True)
def _no_deterministic_leak():
    """A test that switches PyTorch's deterministic algorithms on does not leave them on."""
    yield
    torch.use_deterministic_algorithms(False)


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


def step_hp(**changes):
    """The step hyperparameters of the default config, with `changes` (StepHP has no defaults
    of its own: the config is their one source)."""
    from dataclasses import replace

    from mwn.core.step import StepHP

    return replace(StepHP.from_config(make_cfg()), **changes)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny float64 models (`pytestmark`): with two,
    OpenMP's spinning threads made tests/test_meta.py 10x slower (73 s against 7 s) while
    another process shared the two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
