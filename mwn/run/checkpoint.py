"""Checkpoints: the whole training state in one file per save, written atomically.

`checkpoint-<iteration>.pt` is written to a temporary name, flushed, fsynced and renamed, so a
crash leaves either the complete new file or none; the previous checkpoint is deleted only
after that. Loading takes the newest file; a corrupt one is an error naming it, and the one
before it is used only when the user asks (`resume_fallback=true`).

Each checkpoint also keeps the text of the run folder's Hydra files (`.hydra/config.yaml`, ...):
Hydra rewrites them before the run starts, so a resume that is then refused puts them back
(mwn.run.folder).
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils._pytree import tree_map

from mwn.run.files import CHECKPOINT, checkpoint_name


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that belongs to other settings."""


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoint files in folder, newest first."""
    found = [
        (int(m.group(1)), p)
        for p in folder.glob("checkpoint-*.pt")
        if (m := CHECKPOINT.fullmatch(p.name))
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
    return folder / checkpoint_name(iteration)


TRAILER = b"mwn-sha256:"  # after the torch.save bytes: this tag and the SHA-256 of those bytes


def compact(tree):
    """Tensors that view a larger storage (a vectorised group's run: a slice of the stacked
    state) copied out; torch.save would write the whole storage, every run of the group."""

    def own(t):
        if not isinstance(t, torch.Tensor):
            return t
        return t.clone() if t.untyped_storage().nbytes() > t.numel() * t.element_size() else t

    return tree_map(own, tree)


def save(folder: Path, iteration: int, payload: dict, keep: int = 2) -> Path:
    """Write checkpoint-<iteration>.pt atomically, with a SHA-256 of its content at the end
    (torch.load checks none); keep the `keep` newest. On a failed write (a full disk) the
    temporary file is removed and the error names the folder and the size needed."""
    path = checkpoint_path(folder, iteration)
    tmp = folder / f".{path.name}.tmp"
    buffer = io.BytesIO()
    torch.save(compact(payload), buffer)
    raw = buffer.getvalue()
    try:
        with open(tmp, "wb") as f:
            f.write(raw + TRAILER + hashlib.sha256(raw).digest())
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(
            f"{folder}: cannot write {path.name} ({e.strerror or e}); it needs "
            f"{(len(raw) + 64) / 2**20:.1f} MiB free there"
        ) from e
    os.replace(tmp, path)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)
    for old in checkpoints(folder)[keep:]:
        old.unlink()
    return path


ZIP_END = b"PK\x05\x06"  # torch.save's zip archive ends with this record (22 bytes, no comment)


def read(path: Path, device: torch.device | str = "cpu") -> dict:
    """A checkpoint's payload, its checksum verified; a mismatch raises CheckpointError. Fails
    closed: a file without a valid trailer loads (unverified) only when it ends as a complete
    torch.save archive does, a checkpoint written before checksums were added; anything else
    (a damaged trailer, a truncated file) is corrupt."""
    raw = path.read_bytes()
    tail = len(TRAILER) + 32
    if raw[-tail:-32] == TRAILER:
        raw, digest = raw[:-tail], raw[-32:]
        if hashlib.sha256(raw).digest() != digest:
            raise CheckpointError(f"{path}: corrupt checkpoint (its checksum does not match)")
    elif raw[-22:-18] != ZIP_END:
        raise CheckpointError(
            f"{path}: corrupt checkpoint (no checksum trailer, and not an older checkpoint)"
        )
    return torch.load(io.BytesIO(raw), map_location=device, weights_only=True)


def load(folder: Path, device: torch.device, fallback: bool = False) -> dict | None:
    """The newest readable checkpoint in folder (None if there is none)."""
    unreadable = []
    for path in checkpoints(folder):
        try:
            payload = read(path, device)
        except Exception as e:  # truncated, corrupt, or not a checkpoint
            if not fallback:
                why = str(e) if isinstance(e, CheckpointError) else type(e).__name__
                raise CheckpointError(
                    f"{path}: unreadable checkpoint ({why}); set "
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
    "epochs",
    "val_every",
    "log_every",
    "eval_batch_size",
    "checkpoint_every",
    "resume",
    "resume_fallback",
    "dataset.root",
    "dataset.download",
    "dataset.load",
    "dataset.memory_budget_gb",
    "dataset.workers",
    "device.name",
    "compile",
    "cuda_graphs",
    "channels_last",
    "deterministic",
    "progress",
    "logger.name",
}


def flat(settings: dict, prefix: str = "") -> dict:
    """Nested settings as one dict of dotted keys."""
    out = {}
    for k, v in settings.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _upgraded(saved: dict) -> dict:
    """Settings of a checkpoint written before keys were renamed, in today's names."""
    saved = dict(saved)
    for old, new in (("data.root", "dataset.root"), ("data.download", "dataset.download")):
        if old in saved:
            saved[new] = saved.pop(old)
    if saved.get("meta_size", 0) is None:
        saved.pop("meta_size")
    if isinstance(saved.get("meta_net"), str):  # before meta_net became a group: its name
        name = saved.pop("meta_net")
        if any("." in k for k in saved):  # flat
            saved["meta_net.name"] = name
        else:
            saved["meta_net"] = {"name": name}
    return saved


def check_same_settings(saved: dict, current: dict, path: str) -> None:
    """A run resumes only under the settings it was started with (run control aside; settings
    added since the checkpoint was written are not compared)."""
    saved, current = _upgraded(flat(saved)), flat(current)
    diff = [
        k
        for k in sorted(set(saved) | set(current))
        if k not in RUN_CONTROL and k in saved and saved.get(k) != current.get(k)
    ]
    if diff:
        k = diff[0]
        raise CheckpointError(
            f"{path} was written with {k}={saved.get(k)!r}, this run has {k}={current.get(k)!r} "
            f"(and {len(diff) - 1} more differences); resume with the original settings"
        )
