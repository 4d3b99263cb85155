"""Image folders streamed from disk, for sets that do not fit in memory.

`FileImages` stands in for a uint8 (N, C, H, W) tensor of an image folder's files: it has a
shape, is indexed by index tensors (a new FileImages of those files), and decodes images only
when asked, as mwn.data.image_folder decodes them (the same resizing, and its channel rule: one
channel when every image of the dataset is greyscale, else three with greys replicated).
`probe_files` finds the channel count and size from the files' headers, without decoding pixels.

`StreamedImages` has DeviceImages' interface: its batches are exactly DeviceImages' for the same
pixels, indices and generator (the crops and flips are drawn on the device with the same calls,
in the same order). Decoding runs in DataLoader worker processes, read ahead: `plan` tells it
which batches come next (Sampler.indices, a pure function of the iteration), and `batch` takes
the planned one when its indices match, or decodes the indices it is given (only slower).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from mwn.data.batches import random_crop
from mwn.data.image_folder import GREY_MODES, OPTIONAL_SPLITS, _decode, list_image_folder
from mwn.data.images import STATS_CHUNK, DataError, ImageSet, Split

log = logging.getLogger(__name__)

Index = torch.Tensor | Sequence[int] | slice | range


def probe_files(files: Sequence[Path], image_size: int | None) -> tuple[int, tuple[int, int]]:
    """(channels, (H, W)) of a set of image files, from their headers: 1 channel if every file
    is greyscale, else 3; (image_size, image_size) when set, else the files' one size. Pass every
    split's files at once: the channel rule and the size hold for the whole dataset."""
    if not files:
        raise DataError("no image files to read")
    grey, first = True, None
    for path in files:
        try:
            with Image.open(path) as img:
                mode, (w, h) = img.mode, img.size
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            reason = " ".join(f"{type(e).__name__}: {e}".split())
            raise DataError(f"{path}: not a readable PNG or JPEG image ({reason})") from e
        grey = grey and (mode in GREY_MODES or mode.startswith("I;16"))
        if image_size is not None:
            continue
        if first is None:
            first = (path, (h, w))
        elif (h, w) != first[1]:
            (h0, w0) = first[1]
            raise DataError(
                f"{first[0]} is {w0}x{h0} but {path} is {w}x{h}: images differ in size; "
                "set dataset.image_size=N to resize every image to N x N"
            )
    hw = (image_size, image_size) if image_size is not None else first[1]
    return (1 if grey else 3), hw


class FileImages:
    """Image files standing in for a uint8 (N, C, H, W) tensor: indexing selects files, `load`
    decodes them. Picklable (it is sent to DataLoader workers)."""

    def __init__(
        self, files: Sequence[Path], image_size: int | None, channels: int, hw: tuple[int, int]
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels={channels}: allowed 1 or 3")
        self.files = [Path(f) for f in files]
        self.image_size, self.channels, self.hw = image_size, channels, tuple(hw)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), self.channels, *self.hw))

    def __getitem__(self, idx: Index) -> FileImages:
        """The files at idx (an index tensor, a bool mask, a list or a slice), in that order."""
        files = [self.files[i] for i in _positions(idx, len(self))]
        return FileImages(files, self.image_size, self.channels, self.hw)

    def decode(self, i: int) -> torch.Tensor:
        """Image i as uint8 (C, H, W)."""
        a = self._checked_decode(i)
        a = a.transpose(2, 0, 1) if a.ndim == 3 else np.repeat(a[None], self.channels, axis=0)
        return torch.from_numpy(np.ascontiguousarray(a))

    def load(self, idx: Index | None = None) -> torch.Tensor:
        """The images at idx (every image when None) decoded, as uint8 (len(idx), C, H, W)."""
        positions = range(len(self)) if idx is None else _positions(idx, len(self))
        out = np.empty((len(positions), self.channels, *self.hw), dtype=np.uint8)
        for j, i in enumerate(positions):
            a = self._checked_decode(i)
            out[j] = a.transpose(2, 0, 1) if a.ndim == 3 else a  # a grey image: to each channel
        return torch.from_numpy(out)

    def _checked_decode(self, i: int) -> np.ndarray:
        """Image i as _decode gives it, (H, W) or (H, W, 3), checked against the set's shape."""
        path = self.files[i]
        a = _decode(path, self.image_size)
        if a.shape[:2] != self.hw:
            (h0, w0), (h, w) = self.hw, a.shape[:2]
            raise DataError(
                f"{path} is {w}x{h} but the set's images are {w0}x{h0}: images differ in size; "
                "set dataset.image_size=N to resize every image to N x N"
            )
        if a.ndim == 3 and self.channels == 1:
            raise DataError(f"{path}: a colour image in a set of greyscale images")
        return a


def file_channel_stats(
    images: FileImages, workers: int, batch_size: int = 256
) -> tuple[list[float], list[float]]:
    """channel_stats(images.load()), exactly (the same float64 sums, exact integers), with the
    images decoded in `workers` DataLoader processes, batch_size images at a time."""
    c = images.channels
    total = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    for sums in _loader(_Sums(images, batch_size), workers, pin=False):
        t, s = _checked(sums)
        total += t
        squares += s
    count = len(images) * images.hw[0] * images.hw[1]
    mean = total / count
    std = (squares / count - mean * mean).clamp(min=0).sqrt()
    return (mean / 255).tolist(), (std / 255).tolist()


class StreamedImages:
    """A labelled set of image files, decoded in DataLoader workers; its batches are those of
    DeviceImages holding the same pixels (normalised, randomly cropped and flipped on the
    device). Close it (or use it as a context manager) to stop its workers."""

    def __init__(
        self,
        images: FileImages,
        y: torch.Tensor,
        mean,
        std,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        workers: int = 2,
        prefetch: int = 4,
        multiprocessing_context: str | None = None,
    ) -> None:
        if len(y) != len(images):
            raise DataError(f"{len(images)} images but {len(y)} labels")
        c = images.channels
        if len(mean) != c or len(std) != c:
            raise DataError(f"dataset.mean/std need {c} values (one per channel)")
        self.device = torch.device(device)
        self.x, self.y = images, y.to(self.device)  # x: the build code reads x.shape
        self.mean = torch.tensor(mean, device=self.device, dtype=dtype).view(1, c, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device, dtype=dtype).view(1, c, 1, 1) * 255
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.workers, self.prefetch, self.context = workers, prefetch, multiprocessing_context
        self.hits = self.misses = 0  # batches taken from the plan, decoded on demand
        self._iter: Iterator | None = None
        self._next: tuple | None = None  # the next planned (k, idx, pixels), taken off _iter
        self._rows = slice(None)
        self._warned = False

    @property
    def images(self) -> FileImages:
        return self.x

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return len(self.y)

    def plan(
        self,
        index_fn: Callable[[int], torch.Tensor],
        start: int,
        end: int,
        rows: slice = slice(None),
    ) -> None:
        """Decode the batches index_fn(start), ..., index_fn(end - 1) ahead of use (their
        `rows`, the ones `batch` will be asked for); replaces any earlier plan. index_fn must
        be deterministic and picklable (Sampler.indices is)."""
        self.close()
        self._rows = rows
        dataset = _Planned(self.x, index_fn, start, end, rows)
        self._iter = iter(self._make_loader(dataset))

    def in_order(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The whole set in order, in batches, without augmentation (evaluation passes)."""
        it = iter(self._make_loader(_Ranges(self.x, batch_size)))
        try:
            for start, part in it:
                part = _checked(part)
                idx = torch.arange(start, start + len(part))
                yield self._finish(part, idx, 0, False, None, slice(None))
        finally:
            _shutdown(it)

    def batch(
        self,
        idx: torch.Tensor,
        crop_padding: int = 0,
        flip: bool = False,
        gen: torch.Generator | None = None,
        rows: slice = slice(None),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DeviceImages.batch: the images at idx, augmented, normalised; only `rows` of them
        (the crops and flips are drawn for all of idx; only the rows are decoded)."""
        return self._finish(self._pixels(idx, rows), idx, crop_padding, flip, gen, rows)

    def close(self) -> None:
        """Stop the planned batches' workers."""
        it, self._iter, self._next = self._iter, None, None
        _shutdown(it)

    def __enter__(self) -> StreamedImages:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit the workers go with it
            self.close()

    def _pixels(self, idx: torch.Tensor, rows: slice) -> torch.Tensor:
        """uint8 images at idx[rows]: the planned batch when it is this one, else decoded now."""
        idx = idx.to("cpu", torch.int64)
        if self._next is None and self._iter is not None:
            self._next = next(self._iter, None)
            if self._next is None:  # the plan is used up
                self.close()
        if self._next is not None:
            _, planned, part = self._next
            if rows == self._rows and torch.equal(planned, idx):
                self._next = None
                self.hits += 1
                return _checked(part)
            if not self._warned:
                log.warning("a batch differs from the planned one: decoding it now (slower)")
                self._warned = True
        self.misses += 1
        return self.x.load(idx[rows])

    def _finish(
        self,
        part: torch.Tensor,
        idx: torch.Tensor,
        crop_padding: int,
        flip: bool,
        gen: torch.Generator | None,
        rows: slice,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DeviceImages.batch's arithmetic on the decoded rows of idx, on the device."""
        idx = idx.to(self.device)
        part = part.to(self.device, non_blocking=True)
        if len(part) == len(idx):
            x = part
        else:  # only rows were decoded: the others are zeros, cropped and flipped unseen
            x = torch.zeros((len(idx), *self.image_shape), dtype=torch.uint8, device=self.device)
            x[rows] = part
        if crop_padding:
            x = random_crop(x, crop_padding, gen)
        if flip:
            mirror = torch.rand(len(x), generator=gen, device=self.device) < 0.5
            x = torch.where(mirror.view(-1, 1, 1, 1), x.flip(3), x)
        x = (x[rows].to(self.dtype) - self.mean) / self.std
        return x.contiguous(memory_format=self.memory_format), self.y[idx[rows]]

    def _make_loader(self, dataset: Dataset) -> DataLoader:
        pin = self.device.type == "cuda"
        return _loader(dataset, self.workers, pin, self.prefetch, self.context)


# ---------------------------------------------------------------- DataLoader datasets


class _Planned(Dataset):
    """Item j: (k, index_fn(k), the decoded rows of it) for iteration k = start + j."""

    def __init__(self, images: FileImages, index_fn, start: int, end: int, rows: slice) -> None:
        self.images, self.index_fn, self.rows = images, index_fn, rows
        self.start, self.end = start, end

    def __len__(self) -> int:
        return max(0, self.end - self.start)

    def __getitem__(self, j: int) -> tuple:
        k = self.start + j
        idx = self.index_fn(k).to("cpu", torch.int64)
        return k, idx, _guarded(self.images.load, idx[self.rows])


class _Ranges(Dataset):
    """Item j: (start, images start..start + batch_size - 1 decoded)."""

    def __init__(self, images: FileImages, batch_size: int) -> None:
        self.images, self.batch_size = images, batch_size

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def __getitem__(self, j: int) -> tuple:
        start = j * self.batch_size
        stop = min(start + self.batch_size, len(self.images))
        return start, _guarded(self.images.load, range(start, stop))


class _Sums(_Ranges):
    """Item j: per-channel float64 sums of pixels and squares over _Ranges' batch j."""

    def __getitem__(self, j: int):
        _, x = super().__getitem__(j)
        if isinstance(x, DataError):
            return x
        c = x.shape[1]
        step = max(1, STATS_CHUNK // x[0].numel())  # channel_stats' chunks
        total = torch.zeros(c, dtype=torch.float64)
        squares = torch.zeros(c, dtype=torch.float64)
        for s in range(0, len(x), step):
            part = x[s : s + step].to(torch.float64)
            total += part.sum((0, 2, 3))
            squares += part.square_().sum((0, 2, 3))
        return total, squares


def _loader(
    dataset: Dataset,
    workers: int,
    pin: bool,
    prefetch: int = 2,
    context: str | None = None,
) -> DataLoader:
    """Items one by one (no collation), in order; its own generator for the workers' seeds, so
    that the global torch generator (initial weights, checkpoints) is not drawn from."""
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin,
        prefetch_factor=max(1, -(-prefetch // workers)) if workers else None,
        multiprocessing_context=context if workers else None,
        generator=torch.Generator().manual_seed(0),
    )


def _guarded(fn, *args):
    """fn(*args), or the DataError it raised: sent back from a worker as a value, re-raised
    by _checked as the one-line error it is (a worker's raise comes back as a traceback)."""
    try:
        return fn(*args)
    except DataError as e:
        return e


def _checked(item):
    if isinstance(item, DataError):
        raise item
    return item


def _shutdown(it: Iterator | None) -> None:
    stop = getattr(it, "_shutdown_workers", None)  # a multi-process DataLoader iterator's
    if stop is not None:
        stop()


def _positions(idx: Index, n: int) -> list[int]:
    """idx (index tensor, bool mask, list, range or slice) into n items, as a list of positions."""
    if isinstance(idx, slice):
        return list(range(n)[idx])
    t = torch.as_tensor(idx)
    if t.dtype == torch.bool:
        t = t.nonzero().flatten()
    if t.dim() != 1 or (t.numel() and t.is_floating_point()):
        raise TypeError(f"an index needs a 1-D integer index, got {t.dtype} {tuple(t.shape)}")
    return t.tolist()


def stream_image_folder(root: str | Path, image_size: int | None = None) -> ImageSet:
    """An image folder as load_image_folder reads it (the same classes, splits, order and
    layout rules), with each split's images left on disk (FileImages), nothing decoded."""
    root = Path(root).expanduser()
    classes, splits = list_image_folder(root)
    files = [f for split in splits.values() for f in split.files]
    channels, hw = probe_files(files, image_size)

    def of(name: str) -> tuple[FileImages, torch.Tensor, list[str]]:
        split = splits[name]
        images = FileImages(split.files, image_size, channels, hw)
        labels = torch.tensor(split.labels, dtype=torch.int64)
        return images, labels, [p.relative_to(root).as_posix() for p in split.files]

    (train_x, train_y, train_files), (test_x, test_y, test_files) = of("train"), of("test")
    extra = {n: Split(*of(n)) if n in splits else None for n in OPTIONAL_SPLITS}
    return ImageSet(
        root.resolve().name,
        len(classes),
        train_x,
        train_y,
        test_x,
        test_y,
        classes=classes,
        train_files=train_files,
        test_files=test_files,
        **extra,
    )


def decoded_bytes(root: str | Path, image_size: int | None = None) -> int:
    """The size of an image folder decoded into memory as uint8 (every split), from the
    files' headers."""
    root = Path(root).expanduser()
    _, splits = list_image_folder(root)
    files = [f for split in splits.values() for f in split.files]
    channels, (h, w) = probe_files(files, image_size)
    return len(files) * channels * h * w
