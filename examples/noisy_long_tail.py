"""Turn a balanced class-folder image dataset into a long-tailed, partly mislabelled one, laid
out as your own data would be: DST/train/<label>/ with the given (possibly wrong) labels, small
clean DST/meta/<class>/ and DST/val/<class>/ sets, DST/test/<class>/, and DST/labels.csv with
the true label of every training image. Files are copied byte for byte, never re-encoded.

Usage:
    python examples/noisy_long_tail.py SRC DST --imbalance 50 --max-per-class 1000 \\
        --noise 0.3 --meta-per-class 10 [--val-per-class 0] [--test-per-class N] --seed 0

SRC holds train/<class>/<image> and test/<class>/<image>. The classes are the sorted folder
names of SRC/train; class c (0-based) keeps n_c = int(max_per_class * imbalance ** (-c / (C-1)))
training images. For each class, a seeded draw first takes --meta-per-class images for
DST/meta/ and --val-per-class for DST/val/ (both keep their true class), then n_c training
images from the rest, so that the three never share an image. Each training image's label is
then, with probability --noise, redrawn uniformly from all C classes (it may land on its own
class, so about noise * (C-1) / C of them end up wrong). Training files are named
<source class>_<source name> so that names stay unique within a folder. DST/test/<class>/ gets
all source test images, or the first --test-per-class of each class by sorted name. DST must
not exist yet.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
PROG = "noisy_long_tail.py"


@dataclass(frozen=True)
class TrainImage:
    source: Path  # the source file
    name: str  # its file name inside DST/train/<given label>/
    true_label: int
    given_label: int


def fail(message: str) -> SystemExit:
    """A one-line error, as argparse writes them, and exit status 2."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return SystemExit(2)


def number(kind: type, low: float, high: float | None = None, low_open: bool = False):
    """An argparse type: `kind` within [low, high] (or (low, high] when low_open)."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {kind.__name__}: {text!r}") from None
        if value < low or (low_open and value == low) or (high is not None and value > high):
            bound = f"{'(' if low_open else '['}{low}, {'inf)' if high is None else f'{high}]'}"
            raise argparse.ArgumentTypeError(f"{text} is outside {bound}")
        return value

    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Make a long-tailed, noisily labelled class-folder dataset from a balanced "
        "one (files are copied, never re-encoded).",
    )
    parser.add_argument("src", type=Path, help="folder with train/<class>/ and test/<class>/")
    parser.add_argument("dst", type=Path, help="output folder (must not exist)")
    parser.add_argument(
        "--imbalance",
        type=number(float, 1.0),
        default=50.0,
        help="ratio of the largest to the smallest class's training count (>= 1; default 50)",
    )
    parser.add_argument(
        "--max-per-class",
        type=number(int, 1),
        default=1000,
        help="training images of the first (largest) class (default 1000)",
    )
    parser.add_argument(
        "--noise",
        type=number(float, 0.0, 1.0),
        default=0.3,
        help="probability that a training label is redrawn uniformly from all classes "
        "(default 0.3)",
    )
    parser.add_argument(
        "--meta-per-class",
        type=number(int, 0),
        default=10,
        help="clean images per class for DST/meta/ (default 10)",
    )
    parser.add_argument(
        "--val-per-class",
        type=number(int, 0),
        default=0,
        help="clean images per class for DST/val/ (default 0: no val folder)",
    )
    parser.add_argument(
        "--test-per-class",
        type=number(int, 0),
        default=None,
        help="copy only the first N test images of each class by sorted name (default: all)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    return parser.parse_args(argv)


def subfolders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def images(folder: Path) -> list[Path]:
    """The image files of one class folder, sorted by name."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def train_counts(n_max: int, imbalance: float, classes: int) -> list[int]:
    """n_c = int(n_max * imbalance ** (-c / (C - 1))) for c = 0 .. C-1."""
    return [int(n_max * imbalance ** (-c / (classes - 1))) for c in range(classes)]


def copy_into(files: Sequence[Path], folder: Path, names: Sequence[str] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, source in enumerate(files):
        shutil.copyfile(source, folder / (source.name if names is None else names[i]))


def build(args: argparse.Namespace, out: Path, classes: list[str]) -> list[TrainImage]:
    """Draws the splits and the noisy labels and writes everything under `out`."""
    src, num = args.src, len(classes)
    counts = train_counts(args.max_per_class, args.imbalance, num)
    rng = np.random.default_rng(args.seed)
    train: list[tuple[Path, int]] = []
    for c, name in enumerate(classes):
        files = images(src / "train" / name)
        meta, val, need = args.meta_per_class, args.val_per_class, counts[c]
        if len(files) < need + meta + val:
            raise fail(
                f"class {name!r} has {len(files)} training images, fewer than the "
                f"{need} + {meta} + {val} (train + meta + val) it needs"
            )
        order = rng.permutation(len(files))
        picks = [order[:meta], order[meta : meta + val], order[meta + val : meta + val + need]]
        meta_files, val_files, train_files = ([files[i] for i in sorted(p)] for p in picks)
        if meta:
            copy_into(meta_files, out / "meta" / name)
        if val:
            copy_into(val_files, out / "val" / name)
        train.extend((f, c) for f in train_files)

    true = np.array([c for _, c in train], dtype=np.int64)
    redraw = rng.random(len(train)) < args.noise
    given = np.where(redraw, rng.integers(0, num, len(train)), true)
    result = [
        TrainImage(path, f"{classes[c]}_{path.name}", c, int(g))
        for (path, c), g in zip(train, given)
    ]
    seen: set[tuple[int, str]] = set()
    for item in result:
        key = (item.given_label, item.name)
        if key in seen:
            raise fail(f"two training images would both be train/{classes[key[0]]}/{key[1]}")
        seen.add(key)
        copy_into([item.source], out / "train" / classes[item.given_label], [item.name])

    for name in classes:
        files = images(src / "test" / name)
        copy_into(files[: args.test_per_class], out / "test" / name)

    with open(out / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["file", "true_label", "given_label", "corrupted"])
        for item in sorted(result, key=lambda t: (classes[t.given_label], t.name)):
            writer.writerow(
                [
                    f"{classes[item.given_label]}/{item.name}",
                    classes[item.true_label],
                    classes[item.given_label],
                    int(item.true_label != item.given_label),
                ]
            )
    return result


def summary(args: argparse.Namespace, classes: list[str], train: list[TrainImage]) -> str:
    true = Counter(t.true_label for t in train)
    given = Counter(t.given_label for t in train)
    wrong = sum(t.true_label != t.given_label for t in train)
    test = sum(len(images(args.src / "test" / c)[: args.test_per_class]) for c in classes)
    per_class = ", ".join(f"{c} {true[i]} ({given[i]})" for i, c in enumerate(classes))
    return (
        f"Wrote {args.dst}: {len(classes)} classes, {len(train)} training images, by true class "
        f"(and by given label, as in the train folders): {per_class}. Corrupted labels: {wrong} "
        f"of {len(train)} ({wrong / max(len(train), 1):.4f}; noise {args.noise} gives about "
        f"{args.noise * (len(classes) - 1) / len(classes):.4f}). Clean meta images: "
        f"{args.meta_per_class * len(classes)}, val images: {args.val_per_class * len(classes)}, "
        f"test images: {test}. Seed {args.seed}; true labels in {args.dst / 'labels.csv'}."
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    src, dst = args.src, args.dst
    if not (src / "train").is_dir() or not (src / "test").is_dir():
        raise fail(f"{src} must hold train/<class>/ and test/<class>/ folders")
    if dst.exists() or dst.is_symlink():
        raise fail(f"{dst} already exists; give a new output folder")
    if dst.resolve().is_relative_to(src.resolve()):
        raise fail(f"the output folder {dst} must not lie inside the source folder {src}")
    classes = subfolders(src / "train")
    if len(classes) < 2:
        raise fail(f"{src / 'train'} needs at least 2 class folders, found {len(classes)}")
    if subfolders(src / "test") != classes:
        raise fail(f"{src / 'test'} must have the same class folders as {src / 'train'}")
    counts = train_counts(args.max_per_class, args.imbalance, len(classes))
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if empty:
        raise fail(
            f"class {empty[0]!r} would get no training images; "
            "lower --imbalance or raise --max-per-class"
        )

    dst.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    umask = os.umask(0)
    os.umask(umask)
    work.chmod(0o777 & ~umask)  # mkdtemp's folder is private; DST gets the usual permissions
    try:  # built aside and renamed at the end: DST is either complete or absent
        train = build(args, work, classes)
        os.rename(work, dst)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    print(summary(args, classes, train))
    return 0


if __name__ == "__main__":
    sys.exit(main())
