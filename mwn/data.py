"""Data: the readers (bundled digits, Fashion-MNIST, CIFAR-10/100), the seeded meta split and long
tail, and device-resident batches with whole-batch augmentation.

Every image set is held as uint8 (N, C, H, W) with int64 labels; batches are drawn by index,
normalised and augmented on the device. Which samples a batch holds and how they are cropped is a
pure function of (seed, stream, iteration), so a run can be replayed from any iteration.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mwn import seeds
from mwn.seeds import Stream

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class DataError(ValueError):
    """A dataset that is missing, malformed or cannot give what the config asks."""


@dataclass
class ImageSet:
    """Train and test images of one dataset, as read from disk: uint8 (N, C, H, W), labels (N,)."""

    name: str
    num_classes: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


# ---------------------------------------------------------------- readers


def load_dataset(
    name: str,
    root: str | Path,
    download: bool,
    image_size: int | None = None,
    progress: bool = True,
) -> ImageSet:
    """The dataset named by `dataset.name` (its root, download and image_size settings)."""
    if name == "image_folder":
        from mwn.image_folder import load_image_folder

        return load_image_folder(root, image_size, progress=progress)
    if name == "digits":
        return load_digits()
    if name == "fashion_mnist":
        return load_fashion_mnist(Path(root), download)
    if name in ("cifar10", "cifar100"):
        return load_cifar(Path(root), name, download)
    raise ValueError(f"unknown dataset {name!r}")  # the config's schema allows no other name


def load_digits(test_per_class: int = 50) -> ImageSet:
    """UCI optical handwritten digits (1,797 8x8 images, pixels 0..16), shipped with the package.

    No official split exists: a fixed split (independent of the run's seed) holds out
    `test_per_class` images per class for testing.
    """
    table = np.loadtxt(ASSETS / "digits.csv.gz", delimiter=",", dtype=np.int64)
    pixels, labels = table[:, :64], table[:, 64]
    images = np.rint(pixels * (255 / 16)).astype(np.uint8).reshape(-1, 1, 8, 8)
    rng = np.random.default_rng(20190507)  # fixed: the same test set for every run
    test = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        test[rng.permutation(np.flatnonzero(labels == c))[:test_per_class]] = True
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    return ImageSet("digits", 10, x[~test], y[~test], x[test], y[test])


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST format), gzipped or not."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # truncated or not gzip
        raise DataError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise DataError(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {tuple(dims)} but holds {data.size} bytes")
    return data.reshape(dims)


FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _find_fashion_mnist(root: Path) -> list[Path] | None:
    for folder in (
        root / "FashionMNIST" / "raw",
        root / "fashion-mnist",
        root,
        DEBIAN_FASHION_MNIST,
    ):
        found = [
            next((p for p in (folder / f, folder / f"{f}.gz") if p.is_file()), None)
            for f in FASHION_FILES
        ]
        if all(found):
            return found
    return None


def load_fashion_mnist(root: Path, download: bool) -> ImageSet:
    """Fashion-MNIST from `root` (torchvision's layout or the plain files), from Debian's
    `dataset-fashion-mnist` package, or downloaded by torchvision when `dataset.download=true`."""
    files = _find_fashion_mnist(root)
    if files is None and download:
        from torchvision.datasets import FashionMNIST

        _download(lambda: FashionMNIST(str(root), train=True, download=True), "Fashion-MNIST", root)
        files = _find_fashion_mnist(root)
    if files is None:
        raise DataError(
            f"Fashion-MNIST not found: expected {', '.join(FASHION_FILES)} (or .gz) in "
            f"{root / 'FashionMNIST' / 'raw'}, {root} or {DEBIAN_FASHION_MNIST}; set dataset."
            "download=true, dataset.root=<folder>, or install Debian's dataset-fashion-mnist"
        )
    log.info("Fashion-MNIST from %s", files[0].parent)
    tr_x, tr_y, te_x, te_y = (torch.from_numpy(_read_idx(p).astype(np.int64)) for p in files)
    to_images = lambda a: a.to(torch.uint8).unsqueeze(1)  # noqa: E731  (N, 1, 28, 28)
    return ImageSet("fashion_mnist", 10, to_images(tr_x), tr_y, to_images(te_x), te_y)


def load_cifar(root: Path, name: str, download: bool) -> ImageSet:
    """CIFAR-10/100 in the python format, read by a structural reader.

    torchvision's classes insist on the MD5 sums of the official files; this reader checks the
    structure instead, so re-encoded or hand-made files load (with a warning when a sum differs),
    and malformed files fail with an error naming them. Downloads go through torchvision.
    """
    from torchvision.datasets import CIFAR10, CIFAR100

    tv = CIFAR10 if name == "cifar10" else CIFAR100
    folder = root / tv.base_folder
    expected = tv.train_list + tv.test_list
    missing = [f for f, _ in expected if not (folder / f).is_file()]
    if missing and download:
        _download(lambda: tv(str(root), train=True, download=True), name, root)
        missing = [f for f, _ in expected if not (folder / f).is_file()]
    if missing:
        raise DataError(
            f"{name} files not found in {folder}: missing {', '.join(missing)} (the CIFAR python "
            "version, https://www.cs.toronto.edu/~kriz/cifar.html); set dataset.download=true or "
            "dataset.root=<folder holding "
            f"{tv.base_folder}>"
        )
    label_key = b"labels" if name == "cifar10" else b"fine_labels"
    num_classes = 10 if name == "cifar10" else 100

    def read(files: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for fname, md5 in files:
            raw = (folder / fname).read_bytes()
            if hashlib.md5(raw).hexdigest() != md5:
                unofficial.append(fname)
            x, y = _parse_cifar_batch(raw, folder / fname, label_key, num_classes)
            xs.append(x)
            ys.append(y)
        return torch.cat(xs), torch.cat(ys)

    unofficial: list[str] = []
    train_x, train_y = read(tv.train_list)
    test_x, test_y = read(tv.test_list)
    if unofficial:
        warnings.warn(
            f"{folder}: MD5 of {', '.join(unofficial)} differs from the official files; "
            "read by structure",
            stacklevel=2,
        )
    return ImageSet(name, num_classes, train_x, train_y, test_x, test_y)


def _download(fetch, what: str, root: Path) -> None:
    """torchvision's checksum-verified download, with a one-line error when it cannot."""
    try:
        fetch()
    except (OSError, RuntimeError) as e:  # URLError is an OSError; bad checksums a RuntimeError
        raise DataError(
            f"dataset.download=true: downloading {what} into {root} failed ({e}); "
            "download it elsewhere and set dataset.root=<folder>"
        ) from e


def _parse_cifar_batch(raw: bytes, path: Path, label_key: bytes, num_classes: int):
    """(images uint8 (N, 3, 32, 32), labels) of one CIFAR python batch, checked by structure."""
    try:
        entry = pickle.loads(raw, encoding="bytes")  # the CIFAR format is a pickle: trusted input
    except Exception as e:
        raise DataError(f"{path}: not a CIFAR python batch file ({type(e).__name__}: {e})") from e
    if isinstance(entry, dict):  # pickled by Python 3: str keys (torchvision reads those too)
        entry = {k.encode() if isinstance(k, str) else k: v for k, v in entry.items()}
    if not isinstance(entry, dict) or b"data" not in entry or label_key not in entry:
        raise DataError(
            f"{path}: malformed CIFAR batch, needs keys 'data' and {label_key.decode()!r}"
        )
    data, labels = np.asarray(entry[b"data"]), np.asarray(entry[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(
            f"{path}: 'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}"
        )
    if (
        labels.shape != (data.shape[0],)
        or labels.min(initial=0) < 0
        or labels.max(initial=0) >= num_classes
    ):
        raise DataError(f"{path}: labels must be {data.shape[0]} integers in [0, {num_classes})")
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return x, torch.from_numpy(labels.astype(np.int64))


# ---------------------------------------------------------------- meta split and long tail


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


# ---------------------------------------------------------------- batches on the device


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
