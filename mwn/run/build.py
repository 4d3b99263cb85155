"""Building a run from its composed config: the checks, the folder, the data, the classifier and
meta-net from their registries, the method's steps, the batches of every iteration, and the
training state at iteration 0."""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, read_write

from mwn import seeds
from mwn.config import check_config, pick_device
from mwn.core.batchnorm import synchronised
from mwn.core.methods import METHODS, Method, Schedule, build_steps
from mwn.core.models import build_meta_net, count_params, extract_state
from mwn.core.step import StepHP, init_state
from mwn.core.sums import LOCAL, AllReduce
from mwn.data.batches import Sampler
from mwn.data.build import Data, build_data
from mwn.data.streaming import StreamedImages
from mwn.run import reuse
from mwn.run.accel import channels_last, make_step
from mwn.run.folder import check_resumable, run_folder
from mwn.run.model import build_model, model_name
from mwn.run.ranks import Ranks
from mwn.seeds import Stream

log = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything a run is built from; fixed once built."""

    cfg: DictConfig  # the composed config, its schedule resolved to iterations
    out_dir: Path
    ranks: Ranks
    device: torch.device
    data: Data
    method: Method
    model: torch.nn.Module  # the classifier (stateless: its state lives in the state dict)
    meta_net: torch.nn.Module
    hp: StepHP
    schedule: Schedule  # which step runs at which iteration
    # {role: (state, batch, meta_batch, lr) -> (state, metrics)}, mwn.run.accel.make_step: the
    # steps the schedule takes (mwn.core.methods.Schedule.roles)
    steps: dict
    batches: Batches
    settings: dict = field(default_factory=dict)  # the resolved config, kept in checkpoints


def build_run(cfg: DictConfig, out_dir: Path, ranks: Ranks) -> Run:
    """Check the settings, make the run folder (rank 0), and build data, models and the step."""
    check_config(cfg, ranks.world if ranks.torchrun else None)
    device = pick_device(cfg, ranks.local_rank)
    out_dir = run_folder(cfg, out_dir)
    check_resumable(cfg, out_dir)
    out_dir = ranks.broadcast(out_dir.absolute())  # rank 0's; it must be on a shared filesystem
    if ranks.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        log.info("run folder %s", out_dir)
    else:  # the other ranks only train: warnings and errors are all they log
        logging.getLogger("mwn").setLevel(logging.WARNING)
    if cfg.deterministic:  # bit-identical reruns on CUDA too, at some cost in speed
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    data = build_data(cfg, device)
    cfg = resolve_schedule(cfg, len(data.train) // cfg.batch_size)
    seeds.seed_globals(cfg.seed)  # the initial weights (mwn.seeds)
    method = METHODS[str(cfg.method)]
    model = build_model(cfg.model, data.num_classes, tuple(data.train.x.shape[1:])).to(device)
    meta_net = new_meta_net(cfg).to(device)
    hp = StepHP.from_config(cfg)
    # with sync_bn, the step's BatchNorm normalises with the global batch's statistics (its
    # collectives run on every rank, so rank 0's validation uses the plain model)
    step_model = synchronised(model) if cfg.sync_bn and ranks.torchrun else model
    reduce = AllReduce(ranks.world, cfg.sync_bn) if ranks.torchrun else LOCAL
    schedule = Schedule.of(cfg)
    steps = build_steps(
        method,
        schedule,
        cfg.train_iters,
        lambda fn: make_step(fn, step_model, meta_net, hp, cfg.compile, cfg.cuda_graphs, reduce),
    )
    log.info(
        "%s: %s, %d parameters; meta-net %d parameters",
        cfg.method,
        model_name(cfg.model),
        count_params(dict(model.named_parameters())),
        count_params(dict(meta_net.named_parameters())),
    )
    if ranks.torchrun:
        log.info(
            "torchrun, world size %d: each rank takes %d of every %d training and %d of "
            "every %d meta images; sync_bn=%s",
            ranks.world,
            cfg.batch_size // ranks.world,
            cfg.batch_size,
            cfg.meta_batch_size // ranks.world,
            cfg.meta_batch_size,
            str(cfg.sync_bn).lower(),
        )
    return Run(
        cfg=cfg,
        out_dir=out_dir,
        ranks=ranks,
        device=device,
        data=data,
        method=method,
        model=model,
        meta_net=meta_net,
        hp=hp,
        schedule=schedule,
        steps=steps,
        batches=Batches(cfg, data, method, schedule, ranks, device),
        settings=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
    )


def new_meta_net(cfg: DictConfig, hidden_size: int | None = None) -> torch.nn.Module:
    """The config's meta-net (at another hidden size when given: a vectorised group's)."""
    hidden = cfg.hidden_size if hidden_size is None else hidden_size
    name, groups = str(cfg.meta_net.name), cfg.meta_net.groups
    return build_meta_net(name, hidden, cfg.num_layers, str(cfg.meta_init), groups)


def resolve_schedule(cfg: DictConfig, per_epoch: int) -> DictConfig:
    """The config with epochs / lr_epochs / meta_start_epoch, when set, as train_iters /
    lr_milestones / meta_start (iterations); a copy, the config given stays as it is."""
    if cfg.epochs is None and cfg.lr_epochs is None and cfg.meta_start_epoch is None:
        return cfg
    cfg = copy.deepcopy(cfg)
    with read_write(cfg):
        if cfg.epochs is not None:
            cfg.train_iters = cfg.epochs * per_epoch
        if cfg.lr_epochs is not None:
            cfg.lr_milestones = [e * per_epoch for e in cfg.lr_epochs]
        if cfg.meta_start_epoch is not None:
            cfg.meta_start = cfg.meta_start_epoch * per_epoch
    start = f", meta_start={cfg.meta_start}" if cfg.meta_start_epoch is not None else ""
    log.info(
        f"{per_epoch} iterations per epoch: train_iters={cfg.train_iters}, "
        f"lr_milestones={list(cfg.lr_milestones)}{start}"
    )
    return cfg


class Batches:
    """The batches of iteration `it`: every rank draws the same global batch (order and
    augmentation seeded by iteration, so replayable) and takes its rows."""

    def __init__(
        self,
        cfg: DictConfig,
        data: Data,
        method: Method,
        schedule: Schedule,
        ranks: Ranks,
        device: torch.device,
    ) -> None:
        self.cfg, self.data, self.device = cfg, data, device
        self.meta_batches, self.schedule = method.meta_batch, schedule
        self.train = Sampler(
            len(data.train), cfg.batch_size, cfg.seed, Stream.TRAIN_BATCHES, "batch_size"
        )
        self.meta = Sampler(
            len(data.meta), cfg.meta_batch_size, cfg.seed, Stream.META_BATCHES, "meta_batch_size"
        )
        self.aug = (cfg.dataset.crop_padding, cfg.dataset.flip)
        self.rows, self.meta_rows = ranks.shard(cfg.batch_size), ranks.shard(cfg.meta_batch_size)

    def plan(self, start: int, end: int) -> None:
        """A training set streamed from disk decodes the batches of iterations start..end-1
        ahead, in its workers (the order is a pure function of the iteration)."""
        if isinstance(self.data.train, StreamedImages):
            self.data.train.plan(self.train.indices, start, end, rows=self.rows)

    def __call__(self, it: int) -> tuple[tuple, tuple | None, torch.Tensor]:
        """(this rank's training batch, its meta batch or None when the method reads none or
        this iteration makes no meta update, the training batch's indices)."""
        seed, idx = self.cfg.seed, self.train.indices(it)
        gen = seeds.step_generator(seed, Stream.TRAIN_AUG, it, self.device)
        batch = self.data.train.batch(idx, *self.aug, gen, self.rows)
        meta_batch = None
        if self.meta_batches and self.schedule.role(it) == "meta":
            gen = seeds.step_generator(seed, Stream.META_AUG, it, self.device)
            meta_batch = self.data.meta.batch(self.meta.indices(it), *self.aug, gen, self.meta_rows)
        return batch, meta_batch, idx[self.rows]


def initial_state(run: Run) -> dict:
    """The training state at iteration 0: parameters, buffers, optimiser states, and the run
    constants the method and the meta-net put there."""
    params, buffers = extract_state(run.model)
    if run.cfg.channels_last:
        params = channels_last(params)
    meta_params = extract_state(run.meta_net)[0]
    if run.method.meta_net and run.cfg.meta_net.init is not None:  # a learned weighting reused
        meta_params, source = reuse.source_meta_net(
            run.cfg.meta_net.init, run.meta_net, run.settings
        )
        if run.ranks.main:
            reuse.record(run.out_dir, source)
        log.info(
            "meta-net from %s (%s, iteration %d)",
            source["run"],
            source["checkpoint"],
            source["iteration"],
        )
    state = init_state(params, buffers, meta_params, run.cfg.fp16, str(run.cfg.optimizer))
    constants = {
        **run.method.constants(run.data.counts, run.hp),
        **run.meta_net.constants(run.data.counts),
    }
    return {**state, **{k: v.to(run.device) for k, v in constants.items()}}
