"""`python -m mwn.compare RUN_A RUN_B`: do two run folders hold the same run, bit for bit?

Compared: every line of metrics.jsonl, summary.json (wall time and the data's absolute path
aside), noise.json, and the newest checkpoint of each (every tensor of the training state with
torch.equal, the best and latest validation, the iteration, the RNG states). Names of earlier
releases are read as today's (`acc`, `final_acc`, `best_acc` -> `test_acc`, `final_test_acc`,
`best_test_acc`), so a run written before a rename compares with one written after it. Exits 0
when the runs are the same, 1 with the differences listed when not.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mwn.run import checkpoint
from mwn.run.files import METRICS, NOISE, SUMMARY, current_names

# summary.json fields that say where and how fast, not what: the clock, and the data folder
# (the same data read from another place is the same run)
NOT_COMPARED = {"wall_time_s", "dataset_root"}


def _records(path: Path) -> list:
    """The JSON records of a .jsonl file, or the one record of a .json file."""
    lines = path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(current_names(json.loads(line)))
        except ValueError:
            raise BadFile(f"{path}: line {number} is not JSON (a garbled or cut file)") from None
    return records


class BadFile(ValueError):
    """A run folder's file that cannot be read; the message names it and the line."""


def _tensors_differ(a, b, where: str) -> list[str]:
    """Where two nested dicts of tensors differ (keys, dtype, shape or any value)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if list(a) != list(b):
            return [f"{where}: keys {sorted(set(a) ^ set(b))} differ"]
        return [d for k in a for d in _tensors_differ(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [f"{where}: tensors differ"]
    if a == b:
        return []
    shown = f"{a!r} != {b!r}"
    return [f"{where}: {shown if len(shown) < 200 else 'values differ'}"]


def differences(a: Path, b: Path) -> list[str]:
    """What differs between two run folders (empty: the same run)."""
    out = []
    for name in (METRICS, NOISE, SUMMARY):
        pa, pb = a / name, b / name
        if pa.is_file() != pb.is_file():
            out.append(f"{name}: in one folder only")
        elif pa.is_file():
            ra, rb = _records(pa), _records(pb)
            if len(ra) != len(rb):
                out.append(f"{name}: {len(ra)} against {len(rb)} lines")
            for i, (x, y) in enumerate(zip(ra, rb)):
                x = {k: v for k, v in x.items() if k not in NOT_COMPARED}
                y = {k: v for k, v in y.items() if k not in NOT_COMPARED}
                if x != y:
                    keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
                    out.append(f"{name} line {i + 1}: {', '.join(keys)} differ")
    ca, cb = checkpoint.checkpoints(a), checkpoint.checkpoints(b)
    if [p.name for p in ca] != [p.name for p in cb]:
        out.append(f"checkpoints: {[p.name for p in ca]} against {[p.name for p in cb]}")
    if ca and cb:
        sa, sb = (checkpoint.read(p[0]) for p in (ca, cb))
        for key in ("iteration", "state", "rng", "world"):
            out += _tensors_differ(sa.get(key), sb.get(key), f"{ca[0].name} {key}")
        for key in ("best", "last_eval", "metrics_bytes"):
            if current_names(sa.get(key)) != current_names(sb.get(key)):
                out.append(f"{ca[0].name} {key}: differs")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mwn.compare", description=__doc__.split("\n")[0])
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    args = p.parse_args(argv)
    for folder in (args.run_a, args.run_b):
        if not (folder / METRICS).is_file():
            p.error(f"{folder}: not a run folder (no metrics.jsonl)")
    try:
        diff = differences(args.run_a, args.run_b)
    except BadFile as e:
        p.error(str(e))
    for line in diff:
        print(line)
    print(f"{args.run_a} and {args.run_b}: {'different' if diff else 'the same run'}")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
