"""A finished run, used: its classifier exported as model.safetensors, loaded back as an
nn.Module in eval mode (`load_model`), its preprocessing applied to new image files, and the
run rebuilt from its folder (settings, data, final state) for what is computed after training
(`python -m mwn.predict`, `python -m mwn.weights`).

model.safetensors holds the classifier's state_dict (parameters and buffers, float as trained)
and, as metadata, what rebuilds and feeds it: the model settings, the class names and the
preprocessing (image size, channels, mean and std). Runs written before it existed are read
from their final checkpoint instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mwn.config import compose_config
from mwn.data.batches import DeviceImages
from mwn.data.image_folder import SUFFIXES, decode_image
from mwn.data.images import DataError
from mwn.run import checkpoint
from mwn.run.files import MODEL, SUMMARY
from mwn.run.model import build_model

FORMAT = "mwn-classifier 1"


class RunError(ValueError):
    """A run folder that cannot give what is asked (not a run, not finished, no such file)."""


@dataclass
class Preprocess:
    """How the run fed images to its classifier: decoded as its dataset's images were (PIL,
    resized to image_size when set), `channels` channels, normalised by mean and std."""

    channels: int
    height: int
    width: int
    mean: list[float]
    std: list[float]
    image_size: int | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


# ---------------------------------------------------------------- writing


def export_model(out_dir: Path, model: nn.Module, state: dict, cfg: DictConfig, data) -> Path:
    """model.safetensors: the classifier with the state's parameters and buffers, and the
    metadata that rebuilds and feeds it."""
    from safetensors.torch import save_file

    with torch.no_grad():
        for name, t in {**state["params"], **state["buffers"]}.items():
            _target(model, name).copy_(t)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    c, h, w = tuple(data.train.x.shape[1:])
    pre = Preprocess(c, h, w, list(data.mean), list(data.std), cfg.dataset.image_size)
    metadata = {
        "format": FORMAT,
        "model": json.dumps(OmegaConf.to_container(cfg.model, resolve=True)),
        "classes": json.dumps(list(data.classes)),
        "preprocess": json.dumps(pre.__dict__),
    }
    path = out_dir / MODEL
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def _target(model: nn.Module, name: str) -> torch.Tensor:
    module, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(module) if module else model, leaf)


# ---------------------------------------------------------------- reading


@dataclass
class Trained:
    """A finished run's classifier (eval mode, on the CPU), its class names and preprocessing."""

    model: nn.Module
    classes: list[str]
    preprocess: Preprocess


def load_model(run_dir: str | Path) -> nn.Module:
    """The classifier of a finished run, in eval mode, on the CPU: from model.safetensors, or
    for runs written before it, from the final checkpoint. `load_trained` gives its class names
    and preprocessing too."""
    return load_trained(run_dir).model


def load_trained(run_dir: str | Path) -> Trained:
    """A finished run's classifier, class names and preprocessing (see `load_model`)."""
    run_dir = Path(run_dir).expanduser()
    path = run_dir / MODEL
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (not a dict)
        if meta.get("format") != FORMAT:
            raise RunError(f"{path}: not an mwn classifier (format {meta.get('format')!r})")
        model_cfg = OmegaConf.create(json.loads(meta["model"]))
        classes = json.loads(meta["classes"])
        pre = Preprocess(**json.loads(meta["preprocess"]))
        model = build_model(model_cfg, len(classes), pre.shape)
        model.load_state_dict(tensors, strict=True)
    else:
        run = rebuild(run_dir, with_data=True)
        classes, pre = run.data.classes, run.preprocess
        model = run.model
        with torch.no_grad():
            for name, t in {**run.state["params"], **run.state["buffers"]}.items():
                _target(model, name).copy_(t.cpu())
    return Trained(model.eval(), list(classes), pre)


@dataclass
class Rebuilt:
    """A run rebuilt from its folder: the settings, and the data, models and state on demand."""

    cfg: DictConfig
    state: dict  # of the chosen checkpoint
    iteration: int
    model: nn.Module
    meta_net: nn.Module
    data: object = None  # mwn.data.build.Data, with_data
    preprocess: Preprocess | None = None


def run_settings(run_dir: Path, ckpt: dict) -> DictConfig:
    """The run's settings as a config: today's defaults, overridden by the checkpoint's (so a
    setting added since it was written has its default), with the dataset root that
    summary.json recorded when it holds one."""
    saved = checkpoint._upgraded(ckpt["config"])
    cfg = OmegaConf.merge(compose_config(), saved)
    summary = run_dir / SUMMARY
    if summary.is_file():
        root = json.loads(summary.read_text()).get("dataset_root")
        if root:
            cfg.dataset.root = root
    return cfg


def rebuild(run_dir: Path, iteration: int | None = None, with_data: bool = True) -> Rebuilt:
    """The run in `run_dir` at its final checkpoint (or at `iteration`): settings, models, state
    and, with_data, the data exactly as the run built it (same seed, same splits)."""
    from mwn import seeds
    from mwn.data.build import build_data
    from mwn.run.build import new_meta_net

    run_dir = Path(run_dir).expanduser()
    found = checkpoint.checkpoints(run_dir) if run_dir.is_dir() else []
    if not found:
        raise RunError(f"{run_dir}: no checkpoint-*.pt in it (not a run folder, or not started)")
    if iteration is None:
        path = found[0]
    else:
        path = checkpoint.checkpoint_path(run_dir, iteration)
        if not path.is_file():
            have = ", ".join(p.name for p in found)
            raise RunError(f"--checkpoint {iteration}: {path.name} is not in {run_dir} ({have})")
    ckpt = checkpoint.read(path)
    cfg = run_settings(run_dir, ckpt)
    if iteration is None and ckpt["iteration"] < cfg.train_iters:
        raise RunError(
            f"{run_dir}: the run has done {ckpt['iteration']} of {cfg.train_iters} iterations; "
            "finish it (rerun its command) or name a checkpoint with --checkpoint N"
        )
    data = build_data(cfg, torch.device("cpu")) if with_data else None
    seeds.seed_globals(cfg.seed)
    shape = tuple(data.train.x.shape[1:]) if data is not None else None
    num_classes = data.num_classes if data is not None else None
    model = build_model(cfg.model, num_classes, shape)
    meta_net = new_meta_net(cfg)
    pre = None
    if data is not None:
        pre = Preprocess(*shape, list(data.mean), list(data.std), cfg.dataset.image_size)
    return Rebuilt(cfg, ckpt["state"], ckpt["iteration"], model, meta_net, data, pre)


# ---------------------------------------------------------------- new images


def image_files(paths: list[str | Path]) -> list[Path]:
    """The PNG and JPEG files named, and those under the folders named (recursively, sorted,
    hidden names skipped); a missing path or a named file of another kind is an error."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and f.suffix.lower() in SUFFIXES
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not found:
                raise DataError(f"{p}: no PNG or JPEG images in it")
            out += found
        elif p.is_file():
            if p.suffix.lower() not in SUFFIXES:
                raise DataError(f"{p}: not a PNG or JPEG name (.png .jpg .jpeg)")
            out.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return out


def load_images(files: list[Path], pre: Preprocess) -> torch.Tensor:
    """uint8 (N, C, H, W) of the files, decoded as the run's dataset images were: PIL, resized
    to image_size when the run set one; grey images repeated to 3 channels for an RGB run,
    colour images converted to grey (PIL's L) for a greyscale run. An image of another size
    than the run's, where the run resized nothing, is an error naming it."""
    out = np.empty((len(files), *pre.shape), dtype=np.uint8)
    for i, path in enumerate(files):
        a = decode_image(path, pre.image_size, grey=pre.channels == 1)
        if a.shape[:2] != (pre.height, pre.width):
            raise DataError(
                f"{path} is {a.shape[1]}x{a.shape[0]}, the run's images are "
                f"{pre.width}x{pre.height} (its dataset.image_size is not set); resize it first"
            )
        out[i] = a.transpose(2, 0, 1) if a.ndim == 3 else (a if pre.channels == 1 else a[None])
    return torch.from_numpy(out)


def as_batches(x: torch.Tensor, pre: Preprocess, device: torch.device) -> DeviceImages:
    """The images normalised as the run's own sets are (mwn.data.batches.DeviceImages)."""
    y = torch.zeros(len(x), dtype=torch.long)
    return DeviceImages(x, y, pre.mean, pre.std, device)
