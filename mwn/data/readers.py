"""The dataset readers, in one registry (READERS: the config's `dataset.name` values are its keys):
the bundled digits, Fashion-MNIST, CIFAR-10/100 and image folders (mwn.data.image_folder).

Every reader takes (root, download, image_size, progress) and returns an ImageSet: uint8
(N, C, H, W) images with int64 labels. A new dataset is one reader function here, one line in
READERS and its conf/dataset/<name>.yaml.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mwn.data.image_folder import load_image_folder
from mwn.data.images import DataError, ImageSet

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]  # the dataset's own names (its README)
CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]  # batches.meta's label_names

# reader(root, download, image_size, progress) -> ImageSet
Reader = Callable[[Path, bool, "int | None", bool], ImageSet]


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
    return ImageSet(
        "fashion_mnist", 10, to_images(tr_x), tr_y, to_images(te_x), te_y, FASHION_CLASSES
    )


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
    classes = (
        CIFAR10_CLASSES if name == "cifar10" else _cifar100_classes(folder / tv.meta["filename"])
    )
    return ImageSet(name, num_classes, train_x, train_y, test_x, test_y, classes)


def _cifar100_classes(path: Path) -> list[str] | None:
    """CIFAR-100's fine class names from its `meta` file (None, the indices as names, when the
    file is missing or holds no 100 names)."""
    try:
        entry = pickle.loads(path.read_bytes(), encoding="bytes")  # the CIFAR format: trusted
        entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in entry["fine_label_names"]]
    except Exception:
        return None
    return names if len(names) == 100 else None


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


READERS: dict[str, Reader] = {
    "digits": lambda root, download, image_size, progress: load_digits(),
    "fashion_mnist": lambda root, download, image_size, progress: load_fashion_mnist(
        root, download
    ),
    "cifar10": lambda root, download, image_size, progress: load_cifar(root, "cifar10", download),
    "cifar100": lambda root, download, image_size, progress: load_cifar(root, "cifar100", download),
    "image_folder": lambda root, download, image_size, progress: load_image_folder(
        root, image_size, progress=progress
    ),
}


def load_dataset(
    name: str,
    root: str | Path,
    download: bool,
    image_size: int | None = None,
    progress: bool = True,
) -> ImageSet:
    """The dataset named by `dataset.name` (its root, download and image_size settings)."""
    return READERS[name](Path(root), download, image_size, progress)
