"""The typed schema of the Hydra config, and the checks of values that types cannot express.

The values themselves live in `conf/` (one source of truth); this schema only gives each key a
type, so that a misspelt key or a wrong type fails at start-up.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from mwn.core.meta import META_GRADS
from mwn.core.methods import METHODS
from mwn.core.models import CLASSIFIERS, GROUPED, META_INITS, META_NETS
from mwn.core.step import OPTIMIZERS
from mwn.data.readers import READERS


class ConfigError(ValueError):
    """A setting with a value outside what is allowed; the message names both."""


class Choice(str, Enum):
    """A setting that is one of a set of names: compares equal to its name, prints as it."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


# the registries' names: a method, meta-gradient, model, meta-net or reader added there is a
# setting here
Method = Choice("Method", [(v, v) for v in METHODS])
MetaGrad = Choice("MetaGrad", [(v, v) for v in META_GRADS])
Noise = Choice("Noise", [(v, v) for v in ("none", "uniform", "flip", "flip2")])
MetaInit = Choice("MetaInit", [(v, v) for v in META_INITS])
MetaNetName = Choice("MetaNetName", [(v, v) for v in META_NETS])
Arch = Choice("Arch", [(v, v) for v in CLASSIFIERS])
Device = Choice("Device", [(v, v) for v in ("auto", "cpu", "cuda", "mps")])
Logger = Choice("Logger", [(v, v) for v in ("none", "tensorboard")])
Progress = Choice("Progress", [(v, v) for v in ("auto", "bar", "log", "none")])
Optimizer = Choice("Optimizer", [(v, v) for v in OPTIMIZERS])
DatasetName = Choice("DatasetName", [(v, v) for v in READERS])
DataLoad = Choice("DataLoad", [(v, v) for v in ("auto", "memory", "stream")])


@dataclass
class DatasetConfig:
    name: DatasetName = MISSING  # which data: the dataset group (dataset=NAME) sets it
    root: str = MISSING  # folder of downloaded datasets, relative to the launch directory
    download: bool = MISSING  # let torchvision download CIFAR / Fashion-MNIST when missing
    image_size: Optional[int] = None  # noqa: UP045  image_folder: resize every image to N x N
    mean: Optional[list[float]] = MISSING  # noqa: UP045  per channel, 0..1; null: from the data
    std: Optional[list[float]] = MISSING  # noqa: UP045  per channel; null: from the training split
    crop_padding: int = MISSING  # random crop with this zero padding (pixels); 0 = none
    flip: bool = MISSING  # random horizontal flip
    # image_folder: decoded into memory, or streamed from disk by DataLoader workers
    load: DataLoad = DataLoad.auto  # auto: stream when decoded it exceeds memory_budget_gb
    memory_budget_gb: float = 8.0  # load=auto streams a set that decoded exceeds this (GB)
    workers: int = 2  # decoding processes of the streaming path


@dataclass
class ModelConfig:
    # a built-in classifier (conf/model/resnet32.yaml, ...):
    arch: Optional[Arch] = None  # noqa: UP045  a key of mwn.core.models.CLASSIFIERS
    depth: Optional[int] = None  # noqa: UP045  layers: 6n + 2 (resnet), 6n + 4 (wrn)
    width: Optional[int] = None  # noqa: UP045  channels of the first stage (x2 per later stage)
    # or any nn.Module (conf/model/resnet18.yaml, ...): an importable class or factory, called
    # with `args` and num_classes=<the data's> when it takes that argument; it wins over arch
    _target_: Optional[str] = None  # noqa: UP045  any nn.Module: my_pkg.nets.MyNet
    args: dict[str, Any] = field(default_factory=dict)  # _target_'s arguments: +model.args.K=V


@dataclass
class MetaNetConfig:
    name: MetaNetName = MISSING  # a key of mwn.core.models.META_NETS
    groups: int = 1  # class groups by training count (k-means), one head each: cmw
    init: Optional[str] = None  # noqa: UP045  a finished run's folder: start from its meta-net


@dataclass
class DeviceConfig:
    name: Device = MISSING  # auto: cuda if available, else mps, else cpu


@dataclass
class LoggerConfig:
    name: Logger = MISSING  # metrics.jsonl is always written


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    method: Method = MISSING
    seed: int = MISSING
    imbalance: Optional[float] = MISSING  # noqa: UP045  null: the data's own class counts
    meta_per_class: int = MISSING
    val_per_class: int = MISSING
    train_per_class: Optional[int] = MISSING  # noqa: UP045
    noise: Noise = MISSING
    noise_rate: float = MISSING
    focal_gamma: float = MISSING
    class_balanced_beta: float = MISSING
    train_iters: int = MISSING
    epochs: Optional[int] = MISSING  # noqa: UP045
    lr_epochs: Optional[list[int]] = MISSING  # noqa: UP045
    batch_size: int = MISSING
    meta_batch_size: int = MISSING
    lr: float = MISSING
    lr_milestones: list[int] = MISSING
    lr_gamma: float = MISSING
    optimizer: Optimizer = MISSING
    momentum: float = MISSING
    nesterov: bool = MISSING
    weight_decay: float = MISSING
    adam_betas: list[float] = MISSING
    adam_eps: float = MISSING
    meta_lr: float = MISSING
    meta_weight_decay: float = MISSING
    meta_net: MetaNetConfig = field(default_factory=MetaNetConfig)
    hidden_size: int = MISSING
    num_layers: int = MISSING
    meta_init: MetaInit = MISSING
    normalize_weights: bool = MISSING
    rollback: bool = MISSING
    fp16: bool = MISSING
    bf16: bool = MISSING
    meta_grad: MetaGrad = MISSING
    finite_difference_eps: float = MISSING
    meta_interval: int = MISSING
    meta_start: int = MISSING
    meta_start_epoch: Optional[int] = MISSING  # noqa: UP045
    channels_last: bool = MISSING
    compile: bool = MISSING
    cuda_graphs: bool = MISSING
    deterministic: bool = MISSING
    sync_bn: bool = MISSING
    val_every: int = MISSING
    log_every: int = MISSING
    progress: Progress = MISSING
    eval_batch_size: int = MISSING
    checkpoint_every: int = MISSING
    resume: Optional[str] = MISSING  # noqa: UP045  (OmegaConf needs typing.Optional)
    resume_fallback: bool = MISSING


def _conf_dir() -> Path:
    """The shipped configs: the package `mwn.conf` (conf/ of the repository, which the wheel
    installs as mwn/conf/)."""
    spec = importlib.util.find_spec("mwn.conf")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parent.parent / "conf"  # a checkout that is not installed


CONF_DIR = _conf_dir()


def register_schema() -> None:
    ConfigStore.instance().store(name="mwn_schema", node=Config)


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The composed config of `python -m mwn.train [overrides]`, without running Hydra's app
    (for the benchmark, tests and notebooks)."""
    from hydra import compose, initialize_config_dir

    register_schema()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides or []))


MAX_INT = 10**9  # iterations, batch sizes, sizes: larger is a typo, not a plan

POSITIVE_INTS = (
    "train_iters",
    "batch_size",
    "meta_batch_size",
    "meta_per_class",
    "hidden_size",
    "num_layers",
    "val_every",
    "log_every",
    "eval_batch_size",
    "checkpoint_every",
    "meta_interval",
    "meta_net.groups",
)


def schema_keys(node: type = Config, prefix: str = "") -> set[str]:
    """Every setting of the schema as a dotted key (dataset, dataset.root, ...)."""
    keys, types = set(), typing.get_type_hints(node)
    for f in dataclasses.fields(node):
        keys.add(prefix + f.name)
        if isinstance(types[f.name], type) and dataclasses.is_dataclass(types[f.name]):
            keys |= schema_keys(types[f.name], f"{prefix}{f.name}.")
    return keys


# a schedule in epochs sets these (mwn.run.build.resolve_schedule): given too, they would be lost
SET_BY_EPOCHS = {
    "train_iters": "epochs",
    "lr_milestones": "lr_epochs",
    "meta_start": "meta_start_epoch",
}


def check_schedule_overrides(cfg: DictConfig, overrides: list[str]) -> None:
    """Refuse a setting typed on the command line that an epoch schedule would override (the
    epochs may come from the command line or from an experiment config)."""
    typed = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    for key, by in SET_BY_EPOCHS.items():
        if key in typed and cfg[by] is not None:
            value = OmegaConf.to_container(cfg, resolve=True)[key]
            raise ConfigError(
                f"{key}={value}: not read while {by}={OmegaConf.to_container(cfg)[by]} is set "
                f"(by the command line or an experiment config); add {by}=null to give {key}"
            )


def check_config(cfg: DictConfig, torchrun_world: int | None = None) -> None:
    """Raise ConfigError naming the first setting whose value is not allowed (under torchrun
    with that many processes, when given). Names in a set are checked by the schema's enums;
    this checks what types cannot say."""

    def need(ok: bool, key: str, allowed: str) -> None:
        if not ok:  # the value as it is written on the command line
            value = OmegaConf.select(cfg, key)
            shown = str(value).lower() if isinstance(value, bool) else value
            raise ConfigError(f"{key}={shown}: allowed values are {allowed}")

    if OmegaConf.is_missing(cfg.dataset, "root"):
        raise ConfigError(
            "dataset.root: required with dataset=image_folder (a folder holding "
            "train/<class>/ and test/<class>/ images)"
        )
    need(not (cfg.fp16 and cfg.bf16), "bf16", "false with fp16=true (one precision at a time)")
    for amp in ("fp16", "bf16"):
        need(
            not (cfg[amp] and cfg.meta_grad == "double_backward"),
            "meta_grad",
            f"jvp with {amp}=true",
        )
    need(0 <= cfg.seed < 2**32, "seed", "integers in [0, 2^32)")
    need(
        cfg.imbalance is None or cfg.imbalance >= 1,
        "imbalance",
        "null or real numbers >= 1",
    )
    need(0 <= cfg.val_per_class <= MAX_INT, "val_per_class", "integers in [0, 10^9]")
    need(0 <= cfg.noise_rate <= 1, "noise_rate", "real numbers in [0, 1]")
    need(
        cfg.noise != "none" or cfg.noise_rate == 0,
        "noise_rate",
        "0 with noise=none (choose noise=uniform | flip | flip2)",
    )
    for key in POSITIVE_INTS:
        need(1 <= OmegaConf.select(cfg, key) <= MAX_INT, key, "integers in [1, 10^9]")
    finite = lambda v: v == v and abs(v) != float("inf")  # not NaN, not +-inf
    need(finite(cfg.lr) and cfg.lr > 0, "lr", "finite real numbers > 0")
    need(
        finite(cfg.meta_lr) and cfg.meta_lr >= 0,
        "meta_lr",
        "finite real numbers >= 0 (0: the meta-net stays fixed)",
    )
    need(
        finite(cfg.finite_difference_eps) and cfg.finite_difference_eps > 0,
        "finite_difference_eps",
        "finite real numbers > 0",
    )
    _check_meta(cfg, need)
    for key in ("weight_decay", "meta_weight_decay", "momentum", "focal_gamma"):
        v = OmegaConf.select(cfg, key)
        need(finite(v) and v >= 0, key, "finite real numbers >= 0")
    for key in ("dataset.mean", "dataset.std"):
        v = OmegaConf.select(cfg, key)
        positive = key == "dataset.std"
        need(
            v is None or all(finite(x) and (x > 0 if positive else True) for x in v),
            key,
            "null or lists of finite real numbers" + (" > 0" if positive else ""),
        )
    need(0 < cfg.lr_gamma <= 1, "lr_gamma", "real numbers in (0, 1]")
    need(cfg.epochs is None or cfg.epochs >= 1, "epochs", "null or integers >= 1")
    need(
        cfg.train_per_class is None or cfg.train_per_class >= 1,
        "train_per_class",
        "null or integers >= 1",
    )
    need(
        cfg.lr_epochs is None or all(e >= 1 for e in cfg.lr_epochs),
        "lr_epochs",
        "null or lists of epochs >= 1",
    )
    need(0 <= cfg.class_balanced_beta < 1, "class_balanced_beta", "real numbers in [0, 1)")
    between = [name for name, m in METHODS.items() if m.between is not None]
    need(
        cfg.meta_interval == 1 or METHODS[str(cfg.method)].between is not None,
        "meta_interval",
        f"1 unless method={' | '.join(between)}",
    )
    need(all(m >= 1 for m in cfg.lr_milestones), "lr_milestones", "lists of iterations >= 1")
    need(not cfg.nesterov or cfg.momentum > 0, "nesterov", "false when momentum is 0")
    need(
        not cfg.nesterov or cfg.optimizer == "sgd",
        "nesterov",
        f"false with optimizer={cfg.optimizer} (Nesterov momentum is SGD's)",
    )
    betas = list(cfg.adam_betas)
    need(
        len(betas) == 2 and all(0 <= b < 1 for b in betas),
        "adam_betas",
        "two real numbers in [0, 1)",
    )
    need(0 < cfg.adam_eps < float("inf"), "adam_eps", "real numbers > 0")
    need(cfg.dataset.crop_padding >= 0, "dataset.crop_padding", "integers >= 0")
    need(
        cfg.dataset.load != "stream" or cfg.dataset.name == "image_folder",
        "dataset.load",
        "auto | memory (only dataset=image_folder streams from disk)",
    )
    budget = cfg.dataset.memory_budget_gb
    need(finite(budget) and budget > 0, "dataset.memory_budget_gb", "finite real numbers > 0")
    need(0 <= cfg.dataset.workers <= 256, "dataset.workers", "integers in [0, 256]")
    size = cfg.dataset.image_size
    need(size is None or size >= 1, "dataset.image_size", "null or integers >= 1")
    need(
        (cfg.dataset.mean is None) == (cfg.dataset.std is None),
        "dataset.std",
        "null exactly when dataset.mean is null",
    )
    _check_model(cfg.model, need)
    if torchrun_world:
        _check_torchrun(cfg, torchrun_world, need)


def _check_meta(cfg: DictConfig, need) -> None:
    """The meta-net and when it learns: settings a method without a meta-net does not read are
    refused rather than ignored."""
    learns = [name for name, m in METHODS.items() if m.meta_net]
    with_net = METHODS[str(cfg.method)].meta_net
    need(0 <= cfg.meta_start <= MAX_INT, "meta_start", "integers in [0, 10^9]")
    need(
        cfg.meta_start_epoch is None or 0 <= cfg.meta_start_epoch <= MAX_INT,
        "meta_start_epoch",
        "null or integers in [0, 10^9]",
    )
    for key, default in (("meta_start", 0), ("meta_start_epoch", None), ("meta_net.init", None)):
        shown = "null" if default is None else default
        need(
            with_net or OmegaConf.select(cfg, key) == default,
            key,
            f"{shown} unless method={' | '.join(learns)} (method={cfg.method} learns no meta-net)",
        )
    need(
        cfg.meta_net.groups == 1 or str(cfg.meta_net.name) in GROUPED,
        "meta_net.groups",
        f"1 with meta_net.name={cfg.meta_net.name} (class groups: meta_net={' | '.join(GROUPED)})",
    )
    init = cfg.meta_net.init
    need(
        init is None or (isinstance(init, str) and init.strip() != ""),
        "meta_net.init",
        "null or a finished run's folder",
    )


def _check_model(model: DictConfig, need) -> None:
    """A built-in classifier's depth and width, or a `_target_` that names an importable path."""
    target = model._target_
    if target is not None:
        need(
            isinstance(target, str) and "." in target and " " not in target,
            "model._target_",
            "an importable dotted path (my_pkg.nets.MyNet, torchvision.models.resnet18)",
        )
        return
    need(model.arch is not None, "model.arch", f"{' | '.join(CLASSIFIERS)} (or set model._target_)")
    arch = CLASSIFIERS[str(model.arch)]
    need(
        model.depth is not None and arch.depth_ok(model.depth),
        "model.depth",
        f"{arch.DEPTHS} for model.arch={model.arch}",
    )
    need(model.width is not None and model.width >= 1, "model.width", "integers >= 1")


def _check_torchrun(cfg: DictConfig, world: int, need) -> None:
    """Global batches split evenly over the processes; the reference is one-process."""
    procs = f"torchrun's {world} process{'es' if world > 1 else ''}"
    for key in ("batch_size", "meta_batch_size"):
        need(cfg[key] % world == 0, key, f"multiples of the number of {procs}")
    need(cfg.meta_grad != "double_backward", "meta_grad", f"jvp | finite_difference under {procs}")
    for key in ("compile", "cuda_graphs"):
        need(not cfg[key], key, f"false under {procs} (not supported yet)")


FP16_DEVICES = ("cuda",)  # CPU autocast runs fp16 too, but far slower than fp32


def pick_device(cfg: DictConfig, local_rank: int = 0) -> torch.device:
    """The device named (auto: CUDA, else MPS, else CPU; with CUDA the rank's own GPU), and
    whether the options that need CUDA can run on it."""
    name = cfg.device.name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if _mps() else "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda: CUDA is not available here; allowed values: auto | cpu")
    elif name == "mps" and not _mps():
        raise ConfigError("device=mps: MPS is not available here; allowed values: auto | cpu")
    device = torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    for key, devices in (("fp16", FP16_DEVICES), ("cuda_graphs", ("cuda",))):
        if cfg[key] and device.type not in devices:
            raise ConfigError(f"{key}=true: needs a CUDA device, got {device.type}; allowed: false")
    return device


def _mps() -> bool:
    return torch.backends.mps.is_available()
