"""How well rankings of training images find the mislabelled ones, against the known corruptions.

Usage:
    python examples/label_issues.py LABELS.csv [--weights NAME=weights.csv ...] \\
        [--cleanlab predictions-fold-0.csv predictions-fold-1.csv ...]

LABELS.csv lists every training image (`file` relative to the training folder, `given_label`,
`corrupted` 0/1), as examples/noisy_long_tail.py writes it. Each --weights file is what
`python -m mwn.weights RUN_DIR` wrote (least trusted first: by the meta-net's weight, or by
loss for a run without a meta-net). --cleanlab takes `python -m mwn.predict RUN_k
FOLDS/fold-k/test --probs` of cross-validated runs (examples/cv_folds.py): out-of-sample
probabilities for every training image, from which cleanlab (pip install cleanlab) ranks by
self-confidence and flags its label issues (find_label_issues, its default prune_by_noise_rate).

For each ranking: precision at K (K = the true number of corrupted images: the share of
corrupted images among the K least trusted) and the AUC of the ranking as a detector of
corrupted images (1: every corrupted image ranked before every clean one, 0.5: chance). For
cleanlab also the precision and recall of the set it flags.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch

from mwn.data import noise


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def auc(doubt: np.ndarray, corrupted: np.ndarray) -> float:
    """P(a corrupted image is doubted more than a clean one), ties counted half (the
    Mann-Whitney statistic, mwn's own)."""
    return noise.auc(torch.from_numpy(doubt), torch.from_numpy(corrupted))


def scores(doubt: np.ndarray, corrupted: np.ndarray) -> dict:
    """Precision at K = #corrupted and AUC of a doubt score (higher: less trusted)."""
    k = int(corrupted.sum())
    top = np.argsort(-doubt, kind="stable")[:k]
    return {"precision_at_k": float(corrupted[top].mean()), "auc": auc(doubt, corrupted)}


def from_weights(path: Path, files: list[str]) -> np.ndarray:
    """A doubt score per image (in `files` order) from an mwn.weights CSV: its rank."""
    rank = {r["file"].split("/", 1)[1]: int(r["rank"]) for r in read_csv(path)}  # train/...
    missing = [f for f in files if f not in rank]
    if missing:
        raise SystemExit(f"{path}: no row for {missing[0]} (and {len(missing) - 1} more)")
    return -np.array([rank[f] for f in files], dtype=float)  # rank 1: the least trusted


def from_cleanlab(paths: list[Path], files: list[str], labels: np.ndarray, classes: list[str]):
    """(self-confidence doubt, flagged mask) from cross-validated predictions."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    probs = {}
    for path in paths:
        for r in read_csv(path):
            key = "/".join(Path(r["file"]).parts[-2:])  # <label>/<name>, as in LABELS.csv
            probs[key] = [float(r[c]) for c in classes]
    missing = [f for f in files if f not in probs]
    if missing:
        raise SystemExit(f"--cleanlab: no prediction for {missing[0]} ({len(missing)} missing)")
    p = np.array([probs[f] for f in files])
    quality = get_label_quality_scores(labels, p)  # self-confidence
    flagged = find_label_issues(labels, p)
    return -quality, flagged


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("labels", type=Path)
    p.add_argument("--weights", nargs="*", default=[], metavar="NAME=CSV")
    p.add_argument("--cleanlab", nargs="*", type=Path, default=[], metavar="PREDICTIONS")
    args = p.parse_args(argv)
    rows = read_csv(args.labels)
    files = [r["file"] for r in rows]
    corrupted = np.array([r["corrupted"] == "1" for r in rows])
    classes = sorted({r["given_label"] for r in rows})
    labels = np.array([classes.index(r["given_label"]) for r in rows])
    print(f"{len(rows)} training images, {corrupted.sum()} corrupted (K)")
    print("| ranking | precision at K | AUC |")
    print("|---|---|---|")
    for item in args.weights:
        name, _, path = item.partition("=")
        s = scores(from_weights(Path(path), files), corrupted)
        print(f"| {name} | {s['precision_at_k']:.3f} | {s['auc']:.3f} |")
    if args.cleanlab:
        doubt, flagged = from_cleanlab(args.cleanlab, files, labels, classes)
        s = scores(doubt, corrupted)
        print(f"| cleanlab self-confidence | {s['precision_at_k']:.3f} | {s['auc']:.3f} |")
        hit = (flagged & corrupted).sum()
        print(
            f"cleanlab find_label_issues flags {flagged.sum()}: precision "
            f"{hit / max(flagged.sum(), 1):.3f}, recall {hit / corrupted.sum():.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
