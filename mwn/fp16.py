"""Dynamic loss scaling for float16 autocast, as functions of a tensor state (no host sync, so
a step stays capturable in a CUDA graph): torch.amp.GradScaler's rule, branch-free."""

from __future__ import annotations

import torch

Tensors = dict[str, torch.Tensor]
GROWTH_INTERVAL = 2000  # as torch.amp.GradScaler: double the scale after this many good steps


def scaler_init(scale: float = 2.0**16, device: torch.device | str = "cpu") -> dict:
    """The loss-scale state: scale, good steps in a row, skipped steps so far."""
    t = lambda v: torch.tensor(v, dtype=torch.float32, device=device)
    return {"scale": t(scale), "good_steps": t(0.0), "skipped": t(0.0)}


def skip_if_overflow(old: dict, new: dict, *checked: Tensors) -> dict:
    """A step whose `checked` tensors overflowed keeps the old parameters and optimiser states
    (BatchNorm statistics still move, as in PyTorch) and halves the scale; after GROWTH_INTERVAL
    good steps in a row the scale doubles. Keeps the state's key order (a graphed step replays
    on its own outputs)."""
    finite = torch.stack([torch.isfinite(t).all() for d in checked for t in d.values()]).all()
    keep = lambda a, b: torch.where(finite, a, b)

    def pick(a, b):
        return {k: pick(a[k], b[k]) if isinstance(a[k], dict) else keep(a[k], b[k]) for k in a}

    s = old["scaler"]
    good = torch.where(finite, s["good_steps"] + 1, 0.0)
    grow = good >= GROWTH_INTERVAL
    scaler = {
        "scale": s["scale"] * torch.where(finite, torch.where(grow, 2.0, 1.0), 0.5),
        "good_steps": torch.where(grow, 0.0, good),
        "skipped": s["skipped"] + (~finite).float(),
    }
    fixed = {"buffers": new["buffers"], "scaler": scaler}
    return {k: fixed[k] if k in fixed else pick(new[k], old[k]) for k in old}
