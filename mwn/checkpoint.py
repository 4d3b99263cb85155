"""Checkpoints: the whole training state in one file per save, written atomically.

`checkpoint-<iteration>.pt` is written to a temporary name, flushed, fsynced and renamed, so a
crash leaves either the complete new file or none; the previous checkpoint is deleted only
after that. Loading takes the newest file; a corrupt one is an error naming it, and the one
before it is used only when the user asks (`resume_fallback=true`).
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

PATTERN = re.compile(r"checkpoint-(\d+)\.pt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that belongs to other settings."""


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoint files in folder, newest first."""
    found = [
        (int(m.group(1)), p)
        for p in folder.glob("checkpoint-*.pt")
        if (m := PATTERN.fullmatch(p.name))
    ]
    return [p for _, p in sorted(found, reverse=True)]


def rng_states() -> dict:
    """Every global RNG's state (the loop itself draws from none: batches are seeded by
    iteration), kept so that code added later stays replayable."""
    np_state = np.random.get_state(legacy=False)
    states = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": np_state["state"]["pos"],
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    n = states["numpy"]
    key = n["key"].numpy().astype(np.uint32)
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
            "state": {"key": key, "pos": n["pos"]},
        }
    )
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def checkpoint_path(folder: Path, iteration: int) -> Path:
    return folder / f"checkpoint-{iteration}.pt"


def save(folder: Path, iteration: int, payload: dict, keep: int = 2) -> Path:
    """Write checkpoint-<iteration>.pt atomically; keep the `keep` newest."""
    path = checkpoint_path(folder, iteration)
    tmp = folder / f".{path.name}.tmp"
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)
    for old in checkpoints(folder)[keep:]:
        old.unlink()
    return path


def load(folder: Path, device: torch.device, fallback: bool = False) -> dict | None:
    """The newest readable checkpoint in folder (None if there is none)."""
    unreadable = []
    for path in checkpoints(folder):
        try:
            payload = torch.load(path, map_location=device, weights_only=True)
        except Exception as e:  # truncated, corrupt, or not a checkpoint
            if not fallback:
                raise CheckpointError(
                    f"{path}: unreadable checkpoint ({type(e).__name__}); set "
                    "resume_fallback=true to resume from the previous one, or move it away"
                ) from e
            unreadable.append(path.name)
            continue
        payload["path"] = str(path)
        return payload
    if unreadable:  # never start over silently when checkpoints were there
        raise CheckpointError(f"{folder}: no readable checkpoint ({', '.join(unreadable)})")
    return None


# what may change between a run and its resumption: length, reporting, checkpointing, where the
# data lives, and how (not what) the iteration computes
RUN_CONTROL = {
    "train_iters",
    "val_every",
    "log_every",
    "eval_batch_size",
    "checkpoint_every",
    "resume",
    "resume_fallback",
    "data",
    "device",
    "compile",
    "cuda_graphs",
    "channels_last",
    "deterministic",
}


def check_same_settings(saved: dict, current: dict, path: str) -> None:
    """A run resumes only under the settings it was started with (run control aside)."""
    diff = [
        k
        for k in sorted(set(saved) | set(current))
        if k not in RUN_CONTROL and saved.get(k) != current.get(k)
    ]
    if diff:
        k = diff[0]
        raise CheckpointError(
            f"{path} was written with {k}={saved.get(k)!r}, this run has {k}={current.get(k)!r} "
            f"(and {len(diff) - 1} more differences); resume with the original settings"
        )
