"""Cross-validation folds of an image folder's training set, for out-of-sample predicted
probabilities on every training image (what cleanlab's find_label_issues wants).

Usage:
    python examples/cv_folds.py ROOT DST --folds 4 --seed 0

ROOT holds train/<label>/<image> (and meta/, test/). Within each class folder the images are
shuffled with the seed and dealt to the folds in turn, so every fold holds about 1/K of each
class. DST/fold-k/ is an image folder of symbolic links: train/ holds every training image not
in fold k, test/ the images of fold k, and meta/ links ROOT/meta when there is one. Train one
run per fold (python -m mwn.train dataset=image_folder dataset.root=DST/fold-k ...), then
python -m mwn.predict RUN_k DST/fold-k/test --probs gives each held-out image's probabilities.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

SUFFIXES = (".png", ".jpg", ".jpeg")


def folds(root: Path, k: int, seed: int) -> list[list[Path]]:
    """The training files (relative to root/train) of each fold, stratified by class folder."""
    out: list[list[Path]] = [[] for _ in range(k)]
    rng = random.Random(seed)
    for folder in sorted(p for p in (root / "train").iterdir() if p.is_dir()):
        files = sorted(
            f.relative_to(root / "train")
            for f in folder.rglob("*")
            if f.suffix.lower() in SUFFIXES and not f.name.startswith(".")
        )
        rng.shuffle(files)
        for i, f in enumerate(files):
            out[i % k].append(f)
    return out


def link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src.resolve(), dst)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not (args.root / "train").is_dir():
        p.error(f"{args.root}: no train/ folder in it")
    if args.folds < 2:
        p.error(f"--folds={args.folds}: allowed values are integers >= 2")
    if args.dst.exists():
        p.error(f"{args.dst}: exists already; choose a new folder")
    parts = folds(args.root, args.folds, args.seed)
    for k, held in enumerate(parts):
        fold = args.dst / f"fold-{k}"
        for j, files in enumerate(parts):
            for f in files:
                link(args.root / "train" / f, fold / ("test" if j == k else "train") / f)
        if (args.root / "meta").is_dir():
            os.symlink((args.root / "meta").resolve(), fold / "meta")
        print(f"{fold}: {sum(map(len, parts)) - len(held)} train, {len(held)} held out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
