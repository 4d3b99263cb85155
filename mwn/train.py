"""The entry point: `python -m mwn.train [overrides]` (Hydra).

`train(cfg, out_dir)` builds the data and the state, runs the loop (one `mwn_step` or `erm_step`
per iteration, validation, logging) and writes `metrics.jsonl` and `summary.json` to out_dir.
Under `torchrun --nproc_per_node=N -m mwn.train`, every rank trains on its shard of each global
batch (mwn.distributed) and rank 0 alone validates and writes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from mwn import checkpoint
from mwn.accel import channels_last, make_step
from mwn.config import ConfigError, check_command_line, check_config, register_schema
from mwn.data import (
    DataError,
    DeviceImages,
    Sampler,
    batch_generator,
    load_dataset,
    make_long_tail,
    split_meta,
)
from mwn.distributed import (
    LOCAL,
    ONE,
    AllReduce,
    Ranks,
    process_group,
    ranks_from_env,
    sync_batch_norm,
)
from mwn.evaluate import (
    SHOT_GROUPS,
    WEIGHT_FN_LOSSES,
    evaluate,
    noise_separation,
    shot_accuracy,
    weighting,
)
from mwn.meta import StepHP, erm_step, mwn_step, scaler_init
from mwn.models import MetaNet, build_classifier, count_params, extract_state
from mwn.monitor import Progress, TensorBoard
from mwn.noise import apply_noise
from mwn.optim import adam_init, sgd_init, step_lr
from mwn.report import plot_run_or_note

log = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
TRAIN, META, TRAIN_AUG, META_AUG = range(4)  # RNG streams
FP16_DEVICES = ("cuda",)  # CPU autocast runs fp16 too, but far slower than fp32


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """The device named (auto: CUDA, else MPS, else CPU); with CUDA the rank's own GPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda: CUDA is not available here; allowed values: auto | cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device=mps: MPS is not available here; allowed values: auto | cpu")
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)


def train(cfg: DictConfig, out_dir: Path, ranks: Ranks = ONE) -> dict | None:
    """One run. Writes metrics.jsonl and summary.json into out_dir; returns the summary.
    With several ranks (process group initialised): rank 0's out_dir is the run folder, and
    only rank 0 writes into it and returns the summary (the others return None)."""
    check_config(cfg, ranks.world if ranks.torchrun else None)
    device = pick_device(cfg.device.name, ranks.local_rank)
    if cfg.fp16 and device.type not in FP16_DEVICES:
        raise ConfigError(f"fp16=true: needs a CUDA device, got {device.type}; allowed: false")
    if cfg.cuda_graphs and device.type != "cuda":
        raise ConfigError(
            f"cuda_graphs=true: needs a CUDA device, got {device.type}; allowed: false"
        )
    out_dir = run_folder(cfg, out_dir)
    if cfg.resume and not out_dir.is_dir():
        raise ConfigError(f"resume={cfg.resume!r}: no such run folder")
    out_dir = ranks.broadcast(out_dir.absolute())  # rank 0's; it must be on a shared filesystem
    if ranks.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    else:  # the other ranks only train: warnings and errors are all they log
        logging.getLogger("mwn").setLevel(logging.WARNING)
    t_start = time.perf_counter()
    if cfg.deterministic:  # bit-identical reruns on CUDA too, at some cost in speed
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False

    # data: meta split out of the training split, the long tail, then label noise on the
    # training labels only; all on the device
    images = load_dataset(cfg.dataset.name, to_absolute_path(cfg.data.root), cfg.data.download)
    C = images.num_classes
    meta_idx, pool = split_meta(images.train_y, C, meta_per_class(cfg, C), cfg.seed)
    train_idx, counts = make_long_tail(images.train_y, pool, C, cfg.imbalance, cfg.seed)
    train_y, noisy, noise = apply_noise(
        images.train_y[train_idx], train_idx, C, cfg.noise, cfg.noise_rate, cfg.seed
    )
    norm = (list(cfg.dataset.mean), list(cfg.dataset.std), device)
    fmt = {"channels_last": cfg.channels_last}
    train_set = DeviceImages(images.train_x[train_idx], train_y, *norm, **fmt)
    meta_set = DeviceImages(images.train_x[meta_idx], images.train_y[meta_idx], *norm, **fmt)
    test_set = DeviceImages(images.test_x, images.test_y, *norm, **fmt)
    log.info(
        "%s: %d train (per class %s), %d meta, %d test; device %s",
        images.name,
        len(train_set),
        counts,
        len(meta_set),
        len(test_set),
        device,
    )
    diagnose_noise = cfg.noise != "none" and cfg.method == "mwn"
    if cfg.noise != "none":
        if ranks.main:
            (out_dir / "noise.json").write_text(json.dumps(noise) + "\n")
        log.info("noise=%s noise_rate=%g: %d of %d training labels corrupted (noise.json)",
                 cfg.noise, cfg.noise_rate, noise["corrupted"], len(train_set))  # fmt: skip
        # a fixed subset of the training set on which clean and corrupted weights are compared
        g = torch.Generator().manual_seed(cfg.seed + 4)
        probe = torch.randperm(len(train_set), generator=g)[:NOISE_PROBE].sort().values
        probe_set = DeviceImages(images.train_x[train_idx[probe]], train_y[probe], *norm, **fmt)

    # models and explicit state
    torch.manual_seed(cfg.seed)
    m = cfg.model
    model = build_classifier(m.arch, C, images.train_x.shape[1], m.depth, m.width).to(device)
    meta_net = MetaNet(cfg.hidden_size, cfg.num_layers).to(device)
    params, buffers = extract_state(model)
    # the step's classifier: with sync_bn, BatchNorm on the global batch's statistics (its
    # collectives run on every rank, so rank 0's validation uses the plain `model`)
    step_model = model
    if cfg.sync_bn and ranks.torchrun:
        step_model = sync_batch_norm(copy.deepcopy(model))
    if cfg.channels_last:
        params = channels_last(params)
    meta_params, _ = extract_state(meta_net)
    state = {
        "params": params,
        "buffers": buffers,
        "momentum": sgd_init(params),
        "meta_params": meta_params,
        "meta_opt": adam_init(meta_params),
    }
    if cfg.fp16:
        state["scaler"] = scaler_init(device=device)
    hp = StepHP(
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov,
        meta_lr=cfg.meta_lr,
        meta_weight_decay=cfg.meta_weight_decay,
        normalize_weights=cfg.normalize_weights,
        rollback=cfg.rollback,
        fp16=cfg.fp16,
        bf16=cfg.bf16,
        meta_grad=cfg.meta_grad,
    )
    step_fn = mwn_step if cfg.method == "mwn" else erm_step
    reduce = AllReduce(ranks.world, cfg.sync_bn) if ranks.torchrun else LOCAL
    step = make_step(step_fn, step_model, meta_net, hp, cfg.compile, cfg.cuda_graphs, reduce)
    log.info(
        "%s: %s-%d, %d parameters; meta-net %d parameters",
        cfg.method,
        m.arch,
        m.depth,
        count_params(params),
        count_params(meta_params),
    )
    if ranks.torchrun:
        log.info("torchrun, world size %d: each rank takes %d of every %d training and %d of "
                 "every %d meta images; sync_bn=%s", ranks.world, cfg.batch_size // ranks.world,
                 cfg.batch_size, cfg.meta_batch_size // ranks.world, cfg.meta_batch_size,
                 str(cfg.sync_bn).lower())  # fmt: skip

    # resume: the newest checkpoint in the run folder, if any, under the same settings
    settings = OmegaConf.to_container(cfg, resolve=True)
    start, best, last_eval, elapsed, metrics_bytes = 0, {"acc": -1.0}, None, 0.0, 0
    ckpt = checkpoint.load(out_dir, device, cfg.resume_fallback)
    if ckpt is not None:
        checkpoint.check_same_settings(ckpt["config"], settings, ckpt["path"])
        state, start, best = ckpt["state"], ckpt["iteration"], ckpt["best"]
        last_eval, elapsed, metrics_bytes = (
            ckpt["last_eval"],
            ckpt["elapsed_s"],
            ckpt["metrics_bytes"],
        )
        checkpoint.set_rng_states(ckpt["rng"])
        log.info("resuming from %s at iteration %d", ckpt["path"], start)
        if ckpt.get("world", 1) != ranks.world:  # global batches: same data, same arithmetic
            log.info("the checkpoint was written by %d processes, this run has %d",
                     ckpt.get("world", 1), ranks.world)  # fmt: skip
    elif cfg.resume:
        raise checkpoint.CheckpointError(f"resume={cfg.resume!r}: no checkpoint-*.pt in {out_dir}")
    tensorboard = cfg.logger.name == "tensorboard" and ranks.main
    board = TensorBoard(out_dir, start) if tensorboard else None
    metrics_path = out_dir / "metrics.jsonl" if ranks.main else Path(os.devnull)
    if ranks.main:
        with open(metrics_path, "ab") as f:  # drop lines written after the checkpoint
            f.truncate(metrics_bytes)

    train_batches = Sampler(len(train_set), cfg.batch_size, cfg.seed, TRAIN, "batch_size")
    meta_batches = Sampler(len(meta_set), cfg.meta_batch_size, cfg.seed, META, "meta_batch_size")
    aug = (cfg.dataset.crop_padding, cfg.dataset.flip)
    rows, meta_rows = ranks.shard(cfg.batch_size), ranks.shard(cfg.meta_batch_size)
    stop = _SigtermFlag()
    progress = Progress(cfg.progress if ranks.main else "none", cfg.train_iters, start)
    with open(metrics_path, "ab") as metrics_file, stop, _closing(progress, board):

        def save_checkpoint(done: int, state: dict) -> Path:
            path = checkpoint.checkpoint_path(out_dir, done)
            if not ranks.main:  # the state is the same on every rank; rank 0 writes it
                return path
            metrics_file.flush()
            return checkpoint.save(out_dir, done, {
                "iteration": done, "state": state, "best": best, "last_eval": last_eval,
                "metrics_bytes": metrics_file.tell(), "config": settings,
                "elapsed_s": elapsed + time.perf_counter() - t_start,
                "rng": checkpoint.rng_states(), "world": ranks.world})  # fmt: skip

        def validation(state: dict, batch: tuple, batch_index: torch.Tensor) -> dict:
            """Test accuracy (overall, per class, per shot group) and what the meta-net does."""
            out = evaluate(model, state["params"], state["buffers"], test_set, C,
                           cfg.eval_batch_size)  # fmt: skip
            out.update(shot_accuracy(out["per_class_acc"], counts))
            if cfg.method == "mwn":  # its weighting function, and the latest batch's weights
                out.update(weighting(model, meta_net, state, batch, hp.amp))
            if diagnose_noise:  # how it weighs clean and corrupted samples
                out["batch"]["noisy"] = noisy[batch_index].tolist()
                out.update(noise_separation(model, meta_net, state, probe_set, noisy[probe],
                                            cfg.batch_size, hp.amp))  # fmt: skip
            return out

        for it in range(start, cfg.train_iters):
            # learning rate and batches (seeded by iteration: replayable)
            lr = step_lr(cfg.lr, it, cfg.lr_milestones, cfg.lr_gamma)
            # (every rank draws the same global batch and takes its rows)
            gen = batch_generator(cfg.seed, TRAIN_AUG, it, device)
            batch = train_set.batch(train_batches.indices(it), *aug, gen, rows)
            meta_batch = None
            if cfg.method == "mwn":
                gen = batch_generator(cfg.seed, META_AUG, it, device)
                meta_batch = meta_set.batch(meta_batches.indices(it), *aug, gen, meta_rows)
            # one iteration: weights, lookahead, meta-gradient, meta update, classifier update
            lr_arg = torch.tensor(lr, device=device) if cfg.cuda_graphs else lr
            before = state
            state, metrics = step(state, batch, meta_batch, lr_arg)

            # a non-finite loss or meta-gradient stops an fp32 run (fp16 skips such steps); the
            # metrics are global sums, the same on every rank, so every rank stops
            if not cfg.fp16:
                finite = torch.isfinite(torch.stack(list(metrics.values()))).tolist()
                if not all(finite):
                    good = step.static_in[0] if cfg.cuda_graphs else before  # replay overwrote
                    path = save_checkpoint(it, good)
                    bad = ", ".join(k for k, ok in zip(metrics, finite) if not ok)
                    raise NonFinite(f"iteration {it + 1}: non-finite {bad} at lr {lr:g}; "
                                    f"checkpoint of the last good state: {path}")  # fmt: skip

            # validation and logging
            done = it + 1
            validate = done % cfg.val_every == 0 or done == cfg.train_iters
            if ranks.main and (done % cfg.log_every == 0 or validate):
                record = {"iter": done, "lr": lr, **{k: v.item() for k, v in metrics.items()}}
                if cfg.fp16:
                    record.update(
                        loss_scale=state["scaler"]["scale"].item(),
                        skipped_steps=int(state["scaler"]["skipped"]),
                    )
                if validate:
                    last_eval = validation(state, batch, train_batches.indices(it)[rows])
                    record["test_acc"] = last_eval["acc"]
                    record.update({k: v for k, v in last_eval.items() if k != "acc"})
                    if last_eval["acc"] > best["acc"]:
                        best = {
                            k: v for k, v in last_eval.items() if k not in ("weight_fn", "batch")
                        }
                        best["iter"] = done
                    shots = "  ".join(f"{g} {last_eval[g + '_acc']:.2f}" for g in SHOT_GROUPS
                                      if last_eval[g + "_acc"] is not None)  # fmt: skip
                    progress.write(f"iter {done}  test acc {last_eval['acc']:.2f} "
                                   f"(best {best['acc']:.2f})  {shots}")  # fmt: skip
                metrics_file.write((json.dumps(record) + "\n").encode())
                if board is not None:
                    board.write(record)
                progress.update(done, record)
            else:
                progress.update(done, None)

            # checkpoint: periodically, at the end, and when asked to stop (all ranks agree on
            # when: SIGTERM may reach them in different iterations)
            stopping = ranks.any(stop.raised)
            if done % cfg.checkpoint_every == 0 or done == cfg.train_iters or stopping:
                path = save_checkpoint(done, state)
                progress.write(f"checkpoint {path.name}")
                if stopping:
                    raise Preempted(f"stopped by SIGTERM at iteration {done}; checkpoint {path}; "
                                    "rerun the same command to resume")  # fmt: skip

    if not ranks.main:
        return None
    summary = {
        "dataset": images.name,
        "method": cfg.method,
        "imbalance": cfg.imbalance,
        "seed": cfg.seed,
        "final_acc": last_eval["acc"],
        "best_acc": best["acc"],
        "best_iter": best["iter"],
        "final_per_class_acc": last_eval["per_class_acc"],
        **{f"final_{k}": last_eval[k] for k in ("many_acc", "medium_acc", "few_acc")},
        **{f"best_{k}": best[k] for k in ("many_acc", "medium_acc", "few_acc")},
        "train_class_counts": counts,
        "noise": cfg.noise,
        "noise_rate": cfg.noise_rate,
        "corrupted_fraction": noise["corrupted_fraction"],
        **({f"final_{k}": last_eval[k] for k in NOISE_KEYS} if diagnose_noise else {}),
        "weight_fn_losses": WEIGHT_FN_LOSSES,
        "meta_size": len(meta_set),
        "test_size": len(test_set),
        "iterations": cfg.train_iters,
        "wall_time_s": elapsed + time.perf_counter() - t_start,
        "device": str(device),
        "threads": torch.get_num_threads(),  # float sums (and so results) depend on it
        "processes": ranks.world,
        "skipped_steps": int(state["scaler"]["skipped"]) if cfg.fp16 else 0,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


NOISE_KEYS = ("weight_clean", "weight_noisy", "noise_auc")
NOISE_PROBE = 1000  # training samples on which clean and corrupted weights are compared


def run_folder(cfg: DictConfig, out_dir: Path) -> Path:
    """Where the run lives: the folder named by `resume` (a run continued in its own folder),
    else Hydra's output folder."""
    return Path(to_absolute_path(cfg.resume)) if cfg.resume else out_dir


def meta_per_class(cfg: DictConfig, num_classes: int) -> int:
    """meta_size / classes when meta_size is set (it must divide evenly), else meta_per_class."""
    if cfg.meta_size is None:
        return cfg.meta_per_class
    if cfg.meta_size % num_classes:
        raise ConfigError(f"meta_size={cfg.meta_size}: allowed values are null or multiples of "
                          f"the {num_classes} classes (the meta set is balanced)")  # fmt: skip
    return cfg.meta_size // num_classes


@contextlib.contextmanager
def _closing(*things):
    try:
        yield
    finally:
        for thing in things:
            if thing is not None:
                thing.close()


class NonFinite(RuntimeError):
    """A loss or meta-gradient went non-finite in fp32; the last good state was saved."""


class Preempted(RuntimeError):
    """The run was asked to stop (SIGTERM) and saved a checkpoint first."""


class _SigtermFlag:
    """Within its block, SIGTERM only sets `raised` (checked once per iteration)."""

    raised = False

    def __enter__(self):
        self.old = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGTERM, self._on_term)
        return self

    def _on_term(self, signum, frame) -> None:
        self.raised = True

    def __exit__(self, *exc) -> None:
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)


def result_line(summary: dict) -> str:
    return (
        f"IF {summary['imbalance']:g} || Best Acc.: {summary['best_acc']:.2f} || "
        f"Final Acc.: {summary['final_acc']:.2f}"
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
        sys.exit(143)  # 128 + SIGTERM, as a process ended by it
    except Exception as e:
        known = isinstance(e, (ConfigError, DataError, checkpoint.CheckpointError, NonFinite))
        if sweep:  # the job fails, the sweep goes on; the summary shows the error
            message = str(e) if known else f"{type(e).__name__}: {e}"
            log.error("mwn: error: %s", message, exc_info=not known)
            error_file.write_text(json.dumps({"error": message}) + "\n")
            return None
        if not known or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise  # a bug's traceback; or the user asked for it all
        print(f"mwn: error: {e}", file=sys.stderr)
        sys.exit(3 if isinstance(e, NonFinite) else 2)
    if summary is None:  # a rank other than 0
        return None
    plot_run_or_note(run_folder(cfg, out_dir))
    print(result_line(summary), flush=True)
    return summary["final_acc"]


# what the ranks other than 0 give Hydra under torchrun: no run folder, config copy or log file
# of their own (rank 0's run folder is the run's; train() receives it from rank 0)
QUIET_RANK = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]


def check_ranks(argv: list[str], ranks: Ranks) -> str | None:
    """A one-line message for a torchrun command line that cannot work, or None."""
    if ranks.torchrun and any(a in ("-m", "--multirun") for a in argv):
        return (
            "-m/--multirun under torchrun: torchrun trains one run; sweep with one "
            "torchrun per job, or send the sweep's jobs to a cluster (hydra/launcher=slurm)"
        )
    return None


if __name__ == "__main__":
    argv, ranks = sys.argv[1:], ranks_from_env()
    if problem := check_command_line(argv, CONF_DIR) or check_ranks(argv, ranks):
        print(f"mwn: error: {problem}", file=sys.stderr)
        sys.exit(2)
    if not ranks.main:
        sys.argv += QUIET_RANK
    # run the task from the importable module, not __main__: parallel launchers (joblib,
    # submitit) pickle it, and a function of __main__ would be pickled by value, globals and all
    from mwn.train import main as importable_main

    importable_main()
