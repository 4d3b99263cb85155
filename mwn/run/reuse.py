"""A learned weighting reused (`meta_net.init=RUN_DIR`): a finished run's final meta-net is the
starting meta-net of a new run (with a fresh Adam state); with `meta_lr=0` it stays fixed, and
each step costs about what an ERM step does. Where it came from is written into the new run's
folder (meta_net_from.json) and its summary.json."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from hydra.utils import to_absolute_path
from torch import nn

from mwn.config import ConfigError
from mwn.core.methods import METHODS
from mwn.core.types import Tensors
from mwn.run import checkpoint

FROM = "meta_net_from.json"


def _shape_of(settings: dict) -> str:
    net = settings["meta_net"]  # a dict: checkpoint._upgraded names an older one's string
    name, groups = net.get("name"), net.get("groups", 1)
    hidden, layers = settings.get("hidden_size"), settings.get("num_layers")
    return f"meta_net={name} hidden_size={hidden} num_layers={layers} meta_net.groups={groups}"


def source_meta_net(run_dir: str, meta_net: nn.Module, settings: dict) -> tuple[Tensors, dict]:
    """The final meta-net parameters of the finished run in `run_dir` (relative to the launch
    directory), checked to fit `meta_net` (this run's, built from `settings`), and a record of
    where they came from. Each refusal is one line naming the setting."""
    key = f"meta_net.init={run_dir}"
    path = Path(to_absolute_path(str(run_dir))).expanduser().resolve()
    found = checkpoint.checkpoints(path) if path.is_dir() else []
    if not found:
        raise ConfigError(
            f"{key}: no checkpoint-*.pt there (allowed: null or a finished run's folder)"
        )
    ckpt = checkpoint.read(found[0])
    saved = checkpoint._upgraded(ckpt["config"])
    done, total = ckpt["iteration"], saved.get("train_iters")
    if total is not None and done < total:
        raise ConfigError(
            f"{key}: that run has done {done} of {total} iterations; finish it first (rerun its "
            "command) so that its final meta-net is the one reused"
        )
    theirs = ckpt["state"].get("meta_params")
    method = METHODS.get(str(saved.get("method")))
    if theirs is None or method is None or not method.meta_net:
        raise ConfigError(
            f"{key}: method={saved.get('method')} learns no meta-net (take an mwn run)"
        )
    mine = dict(meta_net.named_parameters())
    if {k: tuple(v.shape) for k, v in theirs.items()} != {
        k: tuple(v.shape) for k, v in mine.items()
    }:
        raise ConfigError(
            f"{key}: its meta-net ({_shape_of(saved)}) is not this run's "
            f"({_shape_of(settings)}); set the same meta-net settings"
        )
    params = {k: theirs[k].to(mine[k]) for k in mine}
    source = {
        "run": str(path),
        "checkpoint": found[0].name,
        "iteration": done,
        "sha256": hashlib.sha256(found[0].read_bytes()).hexdigest(),
        "method": saved.get("method"),
        "dataset": (saved.get("dataset") or {}).get("name"),
        "seed": saved.get("seed"),
    }
    return params, source


def record(out_dir: Path, source: dict) -> None:
    """meta_net_from.json in the run folder: read back by the summary, on a resume too."""
    (out_dir / FROM).write_text(json.dumps(source, indent=2) + "\n")


def meta_net_from(out_dir: Path) -> dict | None:
    """Where the run's starting meta-net came from (None: a fresh one)."""
    path = out_dir / FROM
    return json.loads(path.read_text()) if path.is_file() else None
