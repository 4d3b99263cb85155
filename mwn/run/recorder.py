"""What a run carries besides its training state, and the loop's side effects: the tally (start,
best and latest validation), resuming from the newest checkpoint, validation, the Recorder
(metrics.jsonl, progress, TensorBoard, checkpoints), the signals that stop a run, and the
summary."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.utils import to_absolute_path

from mwn.config import ConfigError
from mwn.run import checkpoint, folder
from mwn.run.build import Run, initial_state
from mwn.run.evaluate import evaluate, noise_separation, shot_accuracy, weighting
from mwn.run.files import (
    CONFUSION,
    METRICS,
    NOISE,
    NOISE_KEYS,
    PER_CLASS,
    SHOT_GROUPS,
    SUMMARY,
    WEIGHT_FN_LOSSES,
)
from mwn.run.folder import NonFinite
from mwn.run.model import model_name
from mwn.run.monitor import Progress, TensorBoard
from mwn.run.reuse import meta_net_from
from mwn.run.trained import export_model

log = logging.getLogger(__name__)


@dataclass
class Tally:
    """What the loop carries besides the training state (all of it kept in checkpoints)."""

    start: int = 0  # the first iteration to run
    best: dict = field(default_factory=lambda: {"test_acc": -1.0})  # the best validation
    last_eval: dict | None = None  # the latest validation
    elapsed_s: float = 0.0  # wall time of the run before this process
    metrics_bytes: int = 0  # the length of metrics.jsonl at the checkpoint
    metrics_sha256: str | None = None  # and the SHA-256 of those bytes (None: older checkpoints)


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
        done, cfg = ckpt["iteration"], run.cfg
        if cfg.epochs is not None:  # name what the user gave, not the iterations it became
            per_epoch = cfg.train_iters // cfg.epochs
            raise ConfigError(
                f"epochs={cfg.epochs}: the run in {run.out_dir} has done {done} iterations "
                f"({per_epoch} per epoch); allowed values are >= {-(-done // per_epoch)}"
            )
        raise ConfigError(
            f"train_iters={cfg.train_iters}: the run in {run.out_dir} has done "
            f"{done} iterations; allowed values are >= {done}"
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
        ckpt["iteration"],
        ckpt["best"],
        ckpt["last_eval"],
        ckpt["elapsed_s"],
        ckpt["metrics_bytes"],
        ckpt.get("metrics_sha256"),
    )
    return ckpt["state"], tally


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
    """Test scores (accuracy overall, per class, per shot group; balanced accuracy, macro-F1,
    per-class precision and recall, the confusion matrix), the validation set's when there is
    one, and what the meta-net does."""
    cfg, data, model, meta_net = run.cfg, run.data, run.model, run.meta_net
    params, buffers, C, size = (
        state["params"],
        state["buffers"],
        data.num_classes,
        cfg.eval_batch_size,
    )
    out = evaluate(model, params, buffers, data.test, C, size)
    out.update(shot_accuracy(out["per_class_acc"], data.counts))
    if data.val is not None:
        val = evaluate(model, params, buffers, data.val, C, size)
        for k in ("acc", "balanced_acc", "macro_f1"):
            out[f"val_{k}"] = val[f"test_{k}"]
    if run.method.meta_net:  # its weighting function, and the latest batch's weights
        out.update(weighting(model, meta_net, state, batch, run.hp.amp))
        if data.probe is not None:  # how it weighs clean and corrupted samples
            out["batch"]["noisy"] = data.noisy[batch_index].tolist()
            out.update(
                noise_separation(
                    model, meta_net, state, data.probe, data.probe_noisy, cfg.batch_size, run.hp.amp
                )
            )
    return out


def best_key(run: Run) -> str:
    """The score the best iteration is chosen on: validation accuracy when the run has a
    validation set, else test accuracy (the paper's convention)."""
    return "val_acc" if run.data.val is not None else "test_acc"


def validation_line(done: int, tally: Tally) -> str:
    e, best = tally.last_eval, tally.best
    shots = "  ".join(f"{g} {e[g + '_acc']:.2f}" for g in SHOT_GROUPS if e[g + "_acc"] is not None)
    test = f"test acc {e['test_acc']:.2f}"
    balanced = f"balanced {e['test_balanced_acc']:.2f}" if "test_balanced_acc" in e else ""
    if "val_acc" in e:
        head = f"val acc {e['val_acc']:.2f} (best {best.get('val_acc', e['val_acc']):.2f})  {test}"
    else:
        head = f"{test} (best {best['test_acc']:.2f})"
    return "  ".join(part for part in (f"iter {done}", head, balanced, shots) if part)


class StopFlag:
    """Within its block, SIGTERM and SIGINT (Ctrl-C) only set `raised` to the signal's name
    (checked once per iteration): the run checkpoints and stops."""

    raised: str | None = None
    seen: str | None = None  # `raised` as the loop read it for this iteration (`look`)
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def look(self) -> None:
        """Read the flag once for the iteration: every run of a group then sees the same
        answer, also when a signal arrives while the runs are being recorded one by one."""
        self.seen = self.raised

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


def kept_lines(path: Path, tally: Tally):
    """The running SHA-256 of the first `tally.metrics_bytes` bytes of metrics.jsonl, which a
    resume keeps, once they are shown to be the checkpoint's own: their digest when the
    checkpoint recorded one, and in any case whole lines, each a JSON object, ending on a line
    boundary. A checkpoint copied from another run, or an edited or garbled file, is refused."""
    if tally.metrics_bytes == 0:
        return hashlib.sha256()
    with open(path, "rb") as f:
        kept = f.read(tally.metrics_bytes)
    digest = hashlib.sha256(kept)
    why = None
    if tally.metrics_sha256 is not None and digest.hexdigest() != tally.metrics_sha256:
        why = "are not the lines its checkpoint recorded (a checkpoint of another run, or an edit)"
    elif kept and not kept.endswith(b"\n"):
        why = "end inside a line (a checkpoint of another run)"
    else:
        for number, line in enumerate(kept.splitlines(), 1):
            try:
                ok = isinstance(json.loads(line), dict)
            except ValueError:
                ok = False
            if not ok:
                why = f"hold a garbled line {number}"
                break
    if why:
        raise checkpoint.CheckpointError(
            f"{path}: its first {tally.metrics_bytes} bytes, which the resume keeps, {why}; "
            "restore the run's own metrics.jsonl, or start a new run in another folder"
        )
    return digest


_write = os.write  # (a test makes it fail as a full disk does)


class Recorder:
    """The loop's side effects: metrics.jsonl, progress, TensorBoard, checkpoints, and SIGTERM /
    SIGINT (which only set `stop.raised`, checked once per iteration). Rank 0 records; on the
    other ranks (`active` false) it writes nothing but still catches the signals. The runs of a
    vectorised group (mwn.run.group) share one `stop` flag, which the group enters, and show their
    notes with a `label` instead of a progress display of their own. The signals are caught by
    the StopFlag the caller holds (one for a run, one for a whole group)."""

    def __init__(self, run: Run, tally: Tally, stop: StopFlag, label: str = "") -> None:
        self.run, self.active, self.label = run, run.ranks.main, label
        self.digest = hashlib.sha256()  # of metrics.jsonl as written so far
        self.t_start = time.perf_counter()
        self.stop = stop
        start, cfg = tally.start, run.cfg
        mode = cfg.progress if self.active and not label else "none"
        self.progress = Progress(mode, cfg.train_iters, start)
        self.rng: dict | None = None  # the global RNG states to save (None: the current ones)
        # the Hydra files of the run, read once it holds the folder and its resume is accepted
        self.hydra_files = folder.hydra_files(run.out_dir) if self.active else {}
        self.board = None
        if self.active and cfg.logger.name == "tensorboard":
            self.board = TensorBoard(run.out_dir, start)
        path = run.out_dir / METRICS if self.active else Path(os.devnull)
        if self.active:
            size = path.stat().st_size if path.exists() else 0
            if size < tally.metrics_bytes:  # the resume would pad it with NUL bytes
                raise checkpoint.CheckpointError(
                    f"{path}: {size} bytes, but the checkpoint recorded {tally.metrics_bytes}: "
                    "metrics.jsonl was truncated or removed; restore it, resume from an older "
                    "checkpoint it still covers (move the newer ones out of the folder), or start "
                    "a new run"
                )
            self.digest = kept_lines(path, tally)
            for stale in run.out_dir.glob(".checkpoint-*.pt.tmp"):  # a killed write's; the
                stale.unlink(missing_ok=True)  # folder is held, so no write is under way
            if cfg.noise != "none":
                (run.out_dir / NOISE).write_text(json.dumps(run.data.noise) + "\n")
            with open(path, "ab") as f:  # drop lines written after the checkpoint
                f.truncate(tally.metrics_bytes)
        # unbuffered: each line goes to the file whole or not at all (Recorder.log)
        self.metrics = open(path, "ab", buffering=0)  # noqa: SIM115  (closed by __exit__)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc) -> None:
        if self.metrics.closed:  # finished before the block ends (a group's run)
            return
        self.metrics.close()
        self.progress.close()
        if self.board is not None:
            self.board.close()

    def log(self, done: int, record: dict | None) -> None:
        """After iteration `done`: a metrics.jsonl line, if any, and the progress display."""
        if record is not None:
            line = (json.dumps(record) + "\n").encode()
            self._append(line, done)
            self.digest.update(line)
            if self.board is not None:
                self.board.write(record)
        self.progress.update(done, record)

    def _append(self, line: bytes, done: int) -> None:
        """One line onto metrics.jsonl, or none of it: a failed write (a full disk) is cut
        back, so the file stays whole lines and a rerun resumes once there is space."""
        fd, start = self.metrics.fileno(), self.metrics.tell()
        view = memoryview(line)
        try:
            while view:
                view = view[_write(fd, view) :]
        except OSError as e:
            os.ftruncate(fd, start)
            raise checkpoint.CheckpointError(
                f"{self.run.out_dir / METRICS}: cannot append the line of iteration {done} "
                f"({e.strerror or e}); the file is kept whole up to it; free space and rerun "
                "the same command to resume"
            ) from None

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
        folder.write_hydra_files(self.run.out_dir, self.hydra_files)
        self.metrics.flush()  # on disk before the checkpoint that records its length
        os.fsync(self.metrics.fileno())
        payload = {
            "iteration": done,
            "state": state,
            "best": tally.best,
            "last_eval": tally.last_eval,
            "metrics_bytes": self.metrics.tell(),
            "metrics_sha256": self.digest.hexdigest(),
            "config": self.run.settings,
            "elapsed_s": self.elapsed_s(tally),
            "rng": self.rng or checkpoint.rng_states(),
            "world": self.run.ranks.world,
            "hydra_files": self.hydra_files,
        }
        return checkpoint.save(self.run.out_dir, done, payload)


def summarise(run: Run, state: dict, tally: Tally) -> dict:
    """summary.json: the final and best scores and what the run was; per_class.csv and
    confusion.csv (class names) from the last validation."""
    cfg, data, last, best = run.cfg, run.data, tally.last_eval, tally.best
    if last is None:  # a resumed run whose schedule ends where it stopped, before validating
        raise ConfigError(
            f"train_iters={cfg.train_iters}: no validation has run yet; allowed "
            f"values are > {cfg.train_iters}"
        )
    noise_diagnosed = data.probe is not None and run.method.meta_net
    scores = ("test_balanced_acc", "test_macro_f1")
    val_scores = ("val_acc", "val_balanced_acc", "val_macro_f1") if data.val is not None else ()
    summary = {
        "dataset": data.name,
        "method": str(cfg.method),
        "model": model_name(cfg.model),
        "imbalance": cfg.imbalance,
        "imbalance_ratio": max(data.counts) / min(data.counts),
        "train_per_class": cfg.train_per_class,
        "seed": cfg.seed,
        "final_test_acc": last["test_acc"],
        "best_test_acc": best["test_acc"],
        "best_iter": best["iter"],
        "best_on": "val" if data.val is not None else "test",
        **{f"final_{k}": last.get(k) for k in scores + val_scores},
        **{f"best_{k}": best.get(k) for k in scores + val_scores},
        "final_per_class_acc": last["per_class_acc"],
        **{f"final_{k}": last[k] for k in ("many_acc", "medium_acc", "few_acc")},
        **{f"best_{k}": best[k] for k in ("many_acc", "medium_acc", "few_acc")},
        "classes": data.classes,
        "train_class_counts": data.counts,
        "dataset_root": str(Path(to_absolute_path(str(cfg.dataset.root))).resolve()),
        "preprocess": {
            "image_size": cfg.dataset.image_size,
            "shape": list(data.train.x.shape[1:]),
            "mean": data.mean,
            "std": data.std,
        },
        "noise": str(cfg.noise),
        "noise_rate": cfg.noise_rate,
        "corrupted_fraction": data.noise["corrupted_fraction"],
        **({f"final_{k}": last[k] for k in NOISE_KEYS} if noise_diagnosed else {}),
        "weight_fn_losses": WEIGHT_FN_LOSSES,
        "meta_net": str(cfg.meta_net.name) if run.method.meta_net else None,
        "meta_groups": state["meta_groups"].tolist() if "meta_groups" in state else None,
        "meta_net_from": meta_net_from(run.out_dir),
        "meta_start": cfg.meta_start if run.method.meta_net else 0,
        "meta_size": len(data.meta),
        "val_size": len(data.val) if data.val is not None else 0,
        "test_size": len(data.test),
        "iterations": cfg.train_iters,
        "wall_time_s": tally.elapsed_s,
        "device": str(run.device),
        "threads": torch.get_num_threads(),  # float sums (and so results) depend on it
        "processes": run.ranks.world,
        "skipped_steps": int(state["scaler"]["skipped"]) if cfg.fp16 else 0,
    }
    (run.out_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    if "confusion" in last:  # (not in a checkpoint of an earlier release)
        write_class_tables(run.out_dir, data, last)
    export_model(run.out_dir, run.model, state, cfg, data)
    return summary


def write_class_tables(out_dir: Path, data, last: dict) -> None:
    """per_class.csv (each class: its training and test images, precision, recall, F1,
    accuracy) and confusion.csv (rows: true class, columns: predicted; counts)."""
    test_counts = [sum(row) for row in last["confusion"]]
    with open(out_dir / PER_CLASS, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "name", "train_images", "test_images", "precision", "recall", "f1"])
        for c, name in enumerate(data.classes):
            w.writerow(
                [
                    c,
                    name,
                    data.counts[c],
                    test_counts[c],
                    *(f"{last[k][c]:.6f}" for k in ("precision", "recall", "f1")),
                ]
            )
    with open(out_dir / CONFUSION, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *data.classes])
        for name, row in zip(data.classes, last["confusion"]):
            w.writerow([name, *row])
