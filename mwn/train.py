"""The entry point: `python -m mwn.train [overrides]` (Hydra).

`train(cfg, out_dir)` is four stages: build the run (data, models, the step), resume (a fresh
state or the newest checkpoint), the loop (one step per iteration, validation, logging,
checkpoints) and the summary. Under `torchrun --nproc_per_node=N -m mwn.train`, every rank
trains on its shard of each global batch (mwn.distributed) and rank 0 alone validates and writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf, read_write

from mwn import checkpoint, seeds
from mwn.accel import channels_last, make_step
from mwn.baselines import class_balanced_weights
from mwn.batchnorm import synchronised
from mwn.config import (
    CONF_DIR,
    ConfigError,
    check_command_line,
    check_config,
    pick_device,
    register_schema,
)
from mwn.data import (
    DataError,
    DeviceImages,
    ImageSet,
    Sampler,
    load_dataset,
    make_long_tail,
    split_meta,
)
from mwn.distributed import LOCAL, ONE, AllReduce, Ranks, process_group, ranks_from_env
from mwn.evaluate import (
    SHOT_GROUPS,
    WEIGHT_FN_LOSSES,
    evaluate,
    noise_separation,
    shot_accuracy,
    weighting,
)
from mwn.image_folder import channel_stats
from mwn.meta import StepHP, init_state
from mwn.methods import BETWEEN_META_STEPS, NEEDS_META_BATCH, STEPS
from mwn.models import MetaNet, build_classifier, count_params, extract_state
from mwn.monitor import Progress, TensorBoard
from mwn.noise import apply_noise
from mwn.optim import step_lr
from mwn.report import plot_run_or_note
from mwn.seeds import Stream

log = logging.getLogger(__name__)
NOISE_PROBE = 1000  # training samples on which clean and corrupted weights are compared
NOISE_KEYS = ("weight_clean", "weight_noisy", "noise_auc")


def train(cfg: DictConfig, out_dir: Path, ranks: Ranks = ONE) -> dict | None:
    """One run. Writes metrics.jsonl and summary.json into out_dir; returns the summary.
    With several ranks (process group initialised): rank 0's out_dir is the run folder, and
    only rank 0 writes into it and returns the summary (the others return None)."""
    with contextlib.ExitStack() as held:
        try:  # until the run has its folder, a refusal leaves the folder's Hydra files as kept
            run = build_run(cfg, out_dir, ranks)  # checks, data, models, the step
            if ranks.main:
                held.enter_context(checkpoint.hold(run.out_dir))  # one run per folder
            state, tally = resume(run)  # a fresh state, or the newest checkpoint's
            recorder = Recorder(run, tally)  # metrics.jsonl, progress, TensorBoard, checkpoints
        except Exception:
            if ranks.main:
                checkpoint.restore_hydra_files(run_folder(cfg, out_dir))
            raise
        with recorder:
            state, tally = loop(run, state, tally, recorder)
            tally.elapsed_s = recorder.elapsed_s(tally)
        return summarise(run, state, tally) if ranks.main else None


# ---------------------------------------------------------------- 1. build the run


@dataclass
class Data:
    """The run's image sets on the device, and how they were made."""

    name: str
    num_classes: int
    train: DeviceImages  # long-tailed, with noisy labels where asked
    meta: DeviceImages  # clean, balanced, disjoint from train
    test: DeviceImages
    counts: list[int]  # training images per class
    noisy: torch.Tensor  # (len(train),) bool: the label was corrupted
    noise: dict  # what noise.json holds
    probe: DeviceImages | None = None  # label noise: training samples whose weights are watched
    probe_noisy: torch.Tensor | None = None


@dataclass
class Run:
    """Everything a run is built from; fixed once built."""

    cfg: DictConfig
    out_dir: Path
    ranks: Ranks
    device: torch.device
    data: Data
    model: torch.nn.Module  # the classifier (stateless: its state lives in the state dict)
    meta_net: torch.nn.Module
    hp: StepHP
    # (state, batch, meta_batch, lr) -> (state, metrics), mwn.accel.make_step: the method's
    # step, and with meta_interval > 1 the one between meta updates (step_functions)
    steps: list
    batches: Batches
    settings: dict = field(default_factory=dict)  # the resolved config, kept in checkpoints


def build_run(cfg: DictConfig, out_dir: Path, ranks: Ranks) -> Run:
    """Check the settings, make the run folder (rank 0), and build data, models and the step."""
    check_config(cfg, ranks.world if ranks.torchrun else None)
    device = pick_device(cfg, ranks.local_rank)
    out_dir = run_folder(cfg, out_dir)
    if cfg.resume and not out_dir.is_dir():
        raise ConfigError(f"resume={cfg.resume!r}: no such run folder")
    if cfg.resume and not os.access(out_dir, os.W_OK | os.X_OK):  # (root passes any folder)
        raise ConfigError(f"resume={cfg.resume!r}: the run folder is not writable here")
    out_dir = ranks.broadcast(out_dir.absolute())  # rank 0's; it must be on a shared filesystem
    if ranks.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    else:  # the other ranks only train: warnings and errors are all they log
        logging.getLogger("mwn").setLevel(logging.WARNING)
    if cfg.deterministic:  # bit-identical reruns on CUDA too, at some cost in speed
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    data = build_data(cfg, device)
    resolve_schedule(cfg, len(data.train) // cfg.batch_size)
    seeds.seed_globals(cfg.seed)  # the initial weights (mwn.seeds)
    m = cfg.model
    model = build_classifier(
        str(m.arch), data.num_classes, data.train.x.shape[1], m.depth, m.width
    ).to(device)
    meta_net = MetaNet(cfg.hidden_size, cfg.num_layers, str(cfg.meta_init)).to(device)
    hp = StepHP.from_config(cfg)
    # with sync_bn, the step's BatchNorm normalises with the global batch's statistics (its
    # collectives run on every rank, so rank 0's validation uses the plain model)
    step_model = synchronised(model) if cfg.sync_bn and ranks.torchrun else model
    reduce = AllReduce(ranks.world, cfg.sync_bn) if ranks.torchrun else LOCAL
    steps = [
        make_step(fn, step_model, meta_net, hp, cfg.compile, cfg.cuda_graphs, reduce)
        for fn in step_functions(cfg)
    ]
    log.info(
        "%s: %s-%d, %d parameters; meta-net %d parameters",
        cfg.method,
        m.arch,
        m.depth,
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
    settings = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    batches = Batches(cfg, data, ranks, device)
    return Run(
        cfg,
        out_dir,
        ranks,
        device,
        data,
        model,
        meta_net,
        hp,
        steps,
        batches,
        settings,
    )


def step_functions(cfg: DictConfig) -> list:
    """The method's step; with meta_interval > 1 also the one between meta updates."""
    fns = [STEPS[str(cfg.method)]]
    if cfg.meta_interval > 1:
        fns.append(BETWEEN_META_STEPS[str(cfg.method)])
    return fns


def step_at(steps: list, it: int, meta_interval: int):
    """The step of iteration `it` among step_functions' steps: the method's (with its meta
    update) every meta_interval-th iteration, the one between meta updates otherwise."""
    return steps[0] if it % meta_interval == 0 else steps[1]


def resolve_schedule(cfg: DictConfig, per_epoch: int) -> None:
    """epochs / lr_epochs, when set, become train_iters / lr_milestones (iterations)."""
    if cfg.epochs is None and cfg.lr_epochs is None:
        return
    with read_write(cfg):
        if cfg.epochs is not None:
            cfg.train_iters = cfg.epochs * per_epoch
        if cfg.lr_epochs is not None:
            cfg.lr_milestones = [e * per_epoch for e in cfg.lr_epochs]
    log.info(
        f"{per_epoch} iterations per epoch: train_iters={cfg.train_iters}, "
        f"lr_milestones={list(cfg.lr_milestones)}"
    )


def build_data(cfg: DictConfig, device: torch.device) -> Data:
    """The meta set out of the training split, then the long tail, then label noise on the
    training labels only; all on the device."""
    images, mean, std = read_images(cfg)
    C = images.num_classes
    meta_idx, pool = split_meta(images.train_y, C, cfg.meta_per_class, cfg.seed)
    train_idx, counts = make_long_tail(
        images.train_y, pool, C, cfg.imbalance, cfg.seed, cfg.train_per_class
    )
    train_y, noisy, noise = apply_noise(
        images.train_y[train_idx], train_idx, C, str(cfg.noise), cfg.noise_rate, cfg.seed
    )

    def on_device(x: torch.Tensor, y: torch.Tensor) -> DeviceImages:
        return DeviceImages(x, y, mean, std, device, channels_last=cfg.channels_last)

    train_set = on_device(images.train_x[train_idx], train_y)
    meta_set = on_device(images.train_x[meta_idx], images.train_y[meta_idx])
    test_set = on_device(images.test_x, images.test_y)
    data = Data(images.name, C, train_set, meta_set, test_set, counts, noisy, noise)
    log.info(
        f"{data.name}: {len(train_set)} train (per class {counts}), {len(meta_set)} meta, "
        f"{len(test_set)} test; device {device}"
    )
    if cfg.noise != "none":
        log.info(
            f"noise={cfg.noise} noise_rate={cfg.noise_rate:g}: {noise['corrupted']} of "
            f"{len(train_set)} training labels corrupted (noise.json)"
        )
        # a fixed subset of the training set on which clean and noisy weights are compared
        g = seeds.generator(cfg.seed, "noise_probe")
        probe = torch.randperm(len(train_set), generator=g)[:NOISE_PROBE].sort().values
        data.probe = on_device(images.train_x[train_idx[probe]], train_y[probe])
        data.probe_noisy = noisy[probe]
    return data


def read_images(cfg: DictConfig) -> tuple[ImageSet, list[float], list[float]]:
    """The dataset as read from disk, and its normalisation mean and std (computed from the
    whole training split when the config gives none)."""
    d, tty = cfg.dataset, sys.stderr.isatty()
    bar = cfg.progress == "bar" or (cfg.progress == "auto" and tty)
    images = load_dataset(str(d.name), to_absolute_path(d.root), d.download, d.image_size, bar)
    if d.mean is not None:
        return images, list(d.mean), list(d.std)
    mean, std = channel_stats(images.train_x)
    rounded = lambda v: [round(x, 4) for x in v]
    log.info(
        f"dataset.mean={rounded(mean)} dataset.std={rounded(std)}: computed from the training split"
    )
    return images, mean, std


class Batches:
    """The batches of iteration `it`: every rank draws the same global batch (order and
    augmentation seeded by iteration, so replayable) and takes its rows."""

    def __init__(self, cfg: DictConfig, data: Data, ranks: Ranks, device: torch.device) -> None:
        self.cfg, self.data, self.device = cfg, data, device
        self.train = Sampler(
            len(data.train), cfg.batch_size, cfg.seed, Stream.TRAIN_BATCHES, "batch_size"
        )
        self.meta = Sampler(
            len(data.meta), cfg.meta_batch_size, cfg.seed, Stream.META_BATCHES, "meta_batch_size"
        )
        self.aug = (cfg.dataset.crop_padding, cfg.dataset.flip)
        self.rows, self.meta_rows = ranks.shard(cfg.batch_size), ranks.shard(cfg.meta_batch_size)

    def __call__(self, it: int) -> tuple[tuple, tuple | None, torch.Tensor]:
        """(this rank's training batch, its meta batch or None for ERM, the training batch's
        indices into the training set)."""
        seed, idx = self.cfg.seed, self.train.indices(it)
        gen = seeds.step_generator(seed, Stream.TRAIN_AUG, it, self.device)
        batch = self.data.train.batch(idx, *self.aug, gen, self.rows)
        meta_batch = None
        if self.cfg.method in NEEDS_META_BATCH and it % self.cfg.meta_interval == 0:
            gen = seeds.step_generator(seed, Stream.META_AUG, it, self.device)
            meta_batch = self.data.meta.batch(self.meta.indices(it), *self.aug, gen, self.meta_rows)
        return batch, meta_batch, idx[self.rows]


def initial_state(run: Run) -> dict:
    """The training state at iteration 0: parameters, buffers and optimiser states."""
    params, buffers = extract_state(run.model)
    if run.cfg.channels_last:
        params = channels_last(params)
    state = init_state(params, buffers, extract_state(run.meta_net)[0], run.cfg.fp16)
    if run.cfg.method == "class_balanced":  # a constant of the run
        weights = class_balanced_weights(run.data.counts, run.cfg.class_balanced_beta)
        state["class_weights"] = weights.to(run.device)
    return state


# ---------------------------------------------------------------- 2. resume


@dataclass
class Tally:
    """What the loop carries besides the training state (all of it kept in checkpoints)."""

    start: int = 0  # the first iteration to run
    best: dict = field(default_factory=lambda: {"test_acc": -1.0})  # the best validation
    last_eval: dict | None = None  # the latest validation
    elapsed_s: float = 0.0  # wall time of the run before this process
    metrics_bytes: int = 0  # the length of metrics.jsonl at the checkpoint


def resume(run: Run) -> tuple[dict, Tally]:
    """The newest checkpoint in the run folder, if any, under the same settings; else a fresh
    state."""
    ckpt = checkpoint.load(run.out_dir, run.device, run.cfg.resume_fallback)
    if ckpt is None:
        if run.cfg.resume:
            raise checkpoint.CheckpointError(
                f"resume={run.cfg.resume!r}: no checkpoint-*.pt in {run.out_dir}"
            )
        return initial_state(run), Tally()
    checkpoint.check_same_settings(ckpt["config"], run.settings, ckpt["path"])
    if ckpt["iteration"] > run.cfg.train_iters:
        raise ConfigError(
            f"train_iters={run.cfg.train_iters}: the run in {run.out_dir} has done "
            f"{ckpt['iteration']} iterations; allowed values are >= {ckpt['iteration']}"
        )
    checkpoint.set_rng_states(ckpt["rng"])
    log.info("resuming from %s at iteration %d", ckpt["path"], ckpt["iteration"])
    if ckpt.get("world", 1) != run.ranks.world:  # global batches: same data, same arithmetic
        log.info(
            "the checkpoint was written by %d processes, this run has %d",
            ckpt.get("world", 1),
            run.ranks.world,
        )
    tally = Tally(
        ckpt["iteration"], ckpt["best"], ckpt["last_eval"], ckpt["elapsed_s"], ckpt["metrics_bytes"]
    )
    return ckpt["state"], tally


# ---------------------------------------------------------------- 3. the loop


def loop(run: Run, state: dict, tally: Tally, recorder: Recorder) -> tuple[dict, Tally]:
    """Iterations tally.start .. train_iters; returns the final state and tally."""
    cfg = run.cfg
    for it in range(tally.start, cfg.train_iters):
        # learning rate and batches (seeded by iteration: replayable)
        lr = step_lr(cfg.lr, it, cfg.lr_milestones, cfg.lr_gamma)
        batch, meta_batch, batch_index = run.batches(it)

        # one iteration: weights, lookahead, meta-gradient, meta update, classifier update
        step = step_at(run.steps, it, cfg.meta_interval)
        state, metrics = step(state, batch, meta_batch, lr)

        # what follows: the finiteness check, validation and logging, checkpoints
        bad = [] if cfg.fp16 else non_finite(metrics)  # fp16 skips such steps itself
        states = (lambda s=state: s, lambda s=step: s.last_state)  # after, before the step
        after_step(run, it, lr, *states, metrics, bad, batch, batch_index, tally, recorder)
    return state, tally


def after_step(
    run: Run,
    it: int,
    lr: float,
    state: Callable[[], dict],
    last_state: Callable[[], dict],
    metrics: dict,
    bad: list[str],
    batch: tuple,
    batch_index: torch.Tensor,
    tally: Tally,
    recorder: Recorder,
) -> None:
    """What follows the step of iteration `it` (a single run's, or one run's share of a
    vectorised group's, mwn.group): stop on the non-finite metrics `bad`, validate and log,
    checkpoint. Raises NonFinite, or Preempted after the checkpoint when asked to stop. The
    states after and before the step come as functions, called only when needed (a group's
    run slices its own out of the stacked state)."""
    cfg = run.cfg
    # a non-finite loss or meta-gradient stops an fp32 run (the metrics are global sums, the
    # same on every rank, so every rank stops)
    if bad:
        saved = recorder.last_finite_checkpoint(it, last_state(), tally)
        raise NonFinite(f"iteration {it + 1}: non-finite {', '.join(bad)} at lr {lr:g}; {saved}")

    # validation and logging (rank 0)
    done = it + 1
    validate = done % cfg.val_every == 0 or done == cfg.train_iters
    record = None
    if recorder.active and (validate or done % cfg.log_every == 0):
        record = {"iter": done, "lr": lr, **{k: v.item() for k, v in metrics.items()}}
        if cfg.fp16:
            record.update(
                loss_scale=state()["scaler"]["scale"].item(),
                skipped_steps=int(state()["scaler"]["skipped"]),
            )
        if validate:
            tally.last_eval = validation(run, state(), batch, batch_index)
            record.update(tally.last_eval)
            if tally.last_eval["test_acc"] > tally.best["test_acc"]:
                drop = ("weight_fn", "batch")
                tally.best = {k: v for k, v in tally.last_eval.items() if k not in drop}
                tally.best["iter"] = done
            recorder.note(validation_line(done, tally))
    recorder.log(done, record)

    # checkpoint: periodically, at the end, and when asked to stop (all ranks agree on
    # when: SIGTERM may reach them in different iterations)
    stopping = run.ranks.any(recorder.stop.raised is not None)
    if done % cfg.checkpoint_every == 0 or done == cfg.train_iters or stopping:
        path = recorder.checkpoint(done, state(), tally)
        recorder.note(f"checkpoint {path.name}")
        if stopping:
            raise Preempted(
                f"stopped by {recorder.stop.raised or 'SIGTERM'} at iteration {done}; "
                f"checkpoint {path}; "
                "rerun the same command to resume"
            )


def non_finite(metrics: dict) -> list[str]:
    """The names of the metrics that are not finite (one host sync for all)."""
    finite = torch.isfinite(torch.stack(list(metrics.values()))).tolist()
    return [k for k, ok in zip(metrics, finite) if not ok]


def non_finite_state(state: dict) -> list[str]:
    """The state's float tensors with a non-finite value, as group/name (one host sync)."""
    leaves = list(_float_leaves(state))
    finite = torch.stack([v.isfinite().all() for _, v in leaves]).tolist() if leaves else []
    return [name for (name, _), ok in zip(leaves, finite) if not ok]


def _float_leaves(tree: dict, prefix: str = ""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _float_leaves(v, f"{prefix}{k}/")
        elif isinstance(v, torch.Tensor) and v.is_floating_point():
            yield prefix + k, v


def validation(run: Run, state: dict, batch: tuple, batch_index: torch.Tensor) -> dict:
    """Test accuracy (overall, per class, per shot group) and what the meta-net does."""
    cfg, data, model, meta_net = run.cfg, run.data, run.model, run.meta_net
    out = evaluate(
        model, state["params"], state["buffers"], data.test, data.num_classes, cfg.eval_batch_size
    )
    out.update(shot_accuracy(out["per_class_acc"], data.counts))
    if cfg.method == "mwn":  # its weighting function, and the latest batch's weights
        out.update(weighting(model, meta_net, state, batch, run.hp.amp))
        if data.probe is not None:  # how it weighs clean and corrupted samples
            out["batch"]["noisy"] = data.noisy[batch_index].tolist()
            out.update(
                noise_separation(
                    model, meta_net, state, data.probe, data.probe_noisy, cfg.batch_size, run.hp.amp
                )
            )
    return out


def validation_line(done: int, tally: Tally) -> str:
    e = tally.last_eval
    shots = "  ".join(f"{g} {e[g + '_acc']:.2f}" for g in SHOT_GROUPS if e[g + "_acc"] is not None)
    return f"iter {done}  test acc {e['test_acc']:.2f} (best {tally.best['test_acc']:.2f})  {shots}"


class Recorder:
    """The loop's side effects: metrics.jsonl, progress, TensorBoard, checkpoints, and SIGTERM /
    SIGINT (which only set `stop.raised`, checked once per iteration). Rank 0 records; on the
    other ranks (`active` false) it writes nothing but still catches the signals. The runs of a
    vectorised group (mwn.group) share one `stop` flag, which the group enters, and show their
    notes with a `label` instead of a progress display of their own."""

    def __init__(
        self, run: Run, tally: Tally, stop: StopFlag | None = None, label: str = ""
    ) -> None:
        self.run, self.active, self.label = run, run.ranks.main, label
        self.t_start = time.perf_counter()
        self.stop, self.own_stop = stop or StopFlag(), stop is None
        start, cfg = tally.start, run.cfg
        mode = cfg.progress if self.active and not label else "none"
        self.progress = Progress(mode, cfg.train_iters, start)
        self.rng: dict | None = None  # the global RNG states to save (None: the current ones)
        # the Hydra files of the run, read once it holds the folder and its resume is accepted
        self.hydra_files = checkpoint.hydra_files(run.out_dir) if self.active else {}
        self.board = None
        if self.active and cfg.logger.name == "tensorboard":
            self.board = TensorBoard(run.out_dir, start)
        path = run.out_dir / "metrics.jsonl" if self.active else Path(os.devnull)
        if self.active:
            size = path.stat().st_size if path.exists() else 0
            if size < tally.metrics_bytes:  # the resume would pad it with NUL bytes
                raise checkpoint.CheckpointError(
                    f"{path}: {size} bytes, but the checkpoint recorded {tally.metrics_bytes}: "
                    "metrics.jsonl was truncated or removed; restore it, or start a new run"
                )
            if cfg.noise != "none":
                (run.out_dir / "noise.json").write_text(json.dumps(run.data.noise) + "\n")
            with open(path, "ab") as f:  # drop lines written after the checkpoint
                f.truncate(tally.metrics_bytes)
        self.metrics = open(path, "ab")  # noqa: SIM115  (closed by __exit__)

    def __enter__(self) -> Recorder:
        if self.own_stop:
            self.stop.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.metrics.closed:  # a group's run finished before its group
            return
        if self.own_stop:
            self.stop.__exit__()
        self.metrics.close()
        self.progress.close()
        if self.board is not None:
            self.board.close()

    def log(self, done: int, record: dict | None) -> None:
        """After iteration `done`: a metrics.jsonl line, if any, and the progress display."""
        if record is not None:
            self.metrics.write((json.dumps(record) + "\n").encode())
            if self.board is not None:
                self.board.write(record)
        self.progress.update(done, record)

    def note(self, message: str) -> None:
        self.progress.write(f"{self.label}: {message}" if self.label else message)

    def elapsed_s(self, tally: Tally) -> float:
        return tally.elapsed_s + time.perf_counter() - self.t_start

    def last_finite_checkpoint(self, done: int, state: dict, tally: Tally) -> str:
        """Where the last finite state is: `state` saved, if it is finite, else the newest
        checkpoint (every checkpoint holds a finite state)."""
        if not non_finite_state(state):
            return f"checkpoint of the last good state: {self.checkpoint(done, state, tally)}"
        newest = checkpoint.checkpoints(self.run.out_dir)
        return f"the last finite checkpoint: {newest[0] if newest else 'none yet'}"

    def checkpoint(self, done: int, state: dict, tally: Tally) -> Path:
        """Save the state after `done` iterations (rank 0; the state is the same on every
        rank). A state with a non-finite tensor (parameters, BatchNorm statistics, optimiser
        states) is never saved: the run stops, its newest checkpoint kept."""
        if bad := non_finite_state(state):
            newest = checkpoint.checkpoints(self.run.out_dir)
            raise NonFinite(
                f"iteration {done}: non-finite {', '.join(bad[:3])} in the training state; the "
                f"last finite checkpoint: {newest[0] if newest else 'none yet'}"
            )
        if not self.active:
            return checkpoint.checkpoint_path(self.run.out_dir, done)
        # a refused attempt at this folder while the run trains (another process, stopped by
        # the lock) found no checkpoint to restore from, or an older one: this run's files
        checkpoint.write_hydra_files(self.run.out_dir, self.hydra_files)
        self.metrics.flush()
        payload = {
            "iteration": done,
            "state": state,
            "best": tally.best,
            "last_eval": tally.last_eval,
            "metrics_bytes": self.metrics.tell(),
            "config": self.run.settings,
            "elapsed_s": self.elapsed_s(tally),
            "rng": self.rng or checkpoint.rng_states(),
            "world": self.run.ranks.world,
            "hydra_files": self.hydra_files,
        }
        return checkpoint.save(self.run.out_dir, done, payload)


# ---------------------------------------------------------------- 4. the summary


def summarise(run: Run, state: dict, tally: Tally) -> dict:
    """summary.json: the final and best test accuracies and what the run was."""
    cfg, data, last, best = run.cfg, run.data, tally.last_eval, tally.best
    if last is None:  # a resumed run whose schedule ends where it stopped, before validating
        raise ConfigError(
            f"train_iters={cfg.train_iters}: no validation has run yet; allowed "
            f"values are > {cfg.train_iters}"
        )
    noise_diagnosed = data.probe is not None and cfg.method == "mwn"
    summary = {
        "dataset": data.name,
        "method": str(cfg.method),
        "model": f"{cfg.model.arch}{cfg.model.depth}",
        "imbalance": cfg.imbalance,
        "train_per_class": cfg.train_per_class,
        "seed": cfg.seed,
        "final_test_acc": last["test_acc"],
        "best_test_acc": best["test_acc"],
        "best_iter": best["iter"],
        "final_per_class_acc": last["per_class_acc"],
        **{f"final_{k}": last[k] for k in ("many_acc", "medium_acc", "few_acc")},
        **{f"best_{k}": best[k] for k in ("many_acc", "medium_acc", "few_acc")},
        "train_class_counts": data.counts,
        "noise": str(cfg.noise),
        "noise_rate": cfg.noise_rate,
        "corrupted_fraction": data.noise["corrupted_fraction"],
        **({f"final_{k}": last[k] for k in NOISE_KEYS} if noise_diagnosed else {}),
        "weight_fn_losses": WEIGHT_FN_LOSSES,
        "meta_size": len(data.meta),
        "test_size": len(data.test),
        "iterations": cfg.train_iters,
        "wall_time_s": tally.elapsed_s,
        "device": str(run.device),
        "threads": torch.get_num_threads(),  # float sums (and so results) depend on it
        "processes": run.ranks.world,
        "skipped_steps": int(state["scaler"]["skipped"]) if cfg.fp16 else 0,
    }
    (run.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run_folder(cfg: DictConfig, out_dir: Path) -> Path:
    """Where the run lives: the folder named by `resume` (a run continued in its own folder),
    else Hydra's output folder."""
    return Path(to_absolute_path(cfg.resume)) if cfg.resume else out_dir


class NonFinite(RuntimeError):
    """A loss or meta-gradient went non-finite in fp32; the last good state was saved."""


class Preempted(RuntimeError):
    """The run was asked to stop (SIGTERM, SIGINT) and saved a checkpoint first."""


class StopFlag:
    """Within its block, SIGTERM and SIGINT (Ctrl-C) only set `raised` to the signal's name
    (checked once per iteration): the run checkpoints and stops."""

    raised: str | None = None
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self):
        self.old = {}
        if threading.current_thread() is threading.main_thread():
            self.old = {sig: signal.signal(sig, self._on_signal) for sig in self.SIGNALS}
        return self

    def _on_signal(self, signum, frame) -> None:
        self.raised = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, old in self.old.items():
            signal.signal(sig, old)


def result_line(summary: dict) -> str:
    return (
        f"IF {summary['imbalance']:g} || Best Acc.: {summary['best_test_acc']:.2f} || "
        f"Final Acc.: {summary['final_test_acc']:.2f}"
    )


register_schema()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    ranks = ranks_from_env()  # torchrun's processes, or one
    error_file = out_dir / "error.json"  # a failed sweep job's row in the sweep summary
    if ranks.main:
        error_file.unlink(missing_ok=True)
    try:
        with process_group(ranks):
            summary = train(cfg, out_dir, ranks)
    except Preempted as e:  # stop: a run or a whole sweep, resumable
        print(f"mwn: {e}", file=sys.stderr)
        sys.exit(130 if "SIGINT" in str(e) else 143)  # 128 + the signal, as if ended by it
    except Exception as e:
        known = isinstance(e, KNOWN_ERRORS)
        if sweep:  # the job fails, the sweep goes on; the summary shows the error
            fail_job(out_dir, e)
            return None
        if not known or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise  # a bug's traceback; or the user asked for it all
        print(f"mwn: error: {e}", file=sys.stderr)
        sys.exit(3 if isinstance(e, NonFinite) else 2)
    if summary is None:  # a rank other than 0
        return None
    plot_run_or_note(run_folder(cfg, out_dir))
    print(result_line(summary), flush=True)
    return summary["final_test_acc"]


# the errors of bad settings, data or checkpoints, and divergence: one line, no traceback
KNOWN_ERRORS = (ConfigError, DataError, checkpoint.CheckpointError, NonFinite)


def fail_job(out_dir: Path, e: Exception) -> None:
    """A sweep job failed: log it and write its error.json (its row in the sweep summary)."""
    known = isinstance(e, KNOWN_ERRORS)
    message = str(e) if known else f"{type(e).__name__}: {e}"
    log.error("mwn: error: %s", message, exc_info=None if known else e)
    (out_dir / "error.json").write_text(json.dumps({"error": message}) + "\n")


# what the ranks other than 0 give Hydra under torchrun: no run folder, config copy or log file
# of their own (rank 0's run folder is the run's; train() receives it from rank 0)
QUIET_RANK = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]


def check_ranks(argv: list[str], ranks: Ranks) -> str | None:
    """A one-line message for a torchrun command line that cannot work, or None."""
    if ranks.torchrun and "hydra/launcher=vmap" in argv:
        return (
            "hydra/launcher=vmap under torchrun: torchrun trains one run; run a vectorised "
            "sweep in one process (python -m mwn.train -m ... hydra/launcher=vmap)"
        )
    if ranks.torchrun and any(a in ("-m", "--multirun") for a in argv):
        return (
            "-m/--multirun under torchrun: torchrun trains one run; sweep with one "
            "torchrun per job, or send the sweep's jobs to a cluster (hydra/launcher=slurm)"
        )
    return None


if __name__ == "__main__":
    argv, ranks = sys.argv[1:], ranks_from_env()
    if problem := check_command_line(argv, CONF_DIR) or check_ranks(argv, ranks):
        for line in problem.splitlines():  # a sweep: one line per bad value
            print(f"mwn: error: {line}", file=sys.stderr)
        sys.exit(2)
    if not ranks.main:
        sys.argv += QUIET_RANK
    # run the task from the importable module, not __main__: parallel launchers (joblib,
    # submitit) pickle it, and a function of __main__ would be pickled by value, globals and all
    from mwn.train import main as importable_main

    importable_main()
