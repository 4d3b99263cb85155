"""`python -m mwn.weights RUN_DIR`: the meta-net's verdict on every training image, least trusted
first, for reviewing the likely mislabelled ones.

The run is rebuilt from its folder (settings, data exactly as the run drew it, the final
checkpoint or --checkpoint N). For each training image: its index in the training set, its file
(image folders), its given label, its loss under the classifier in training mode (as the meta-net
sees losses; in batches of batch_size, no augmentation), the meta-net's weight V(loss), and the
classifier's eval-mode prediction and probability of the given label; `corrupted` when the run
itself corrupted labels (noise=...). Sorted by weight, lowest first (ties: higher loss first).
A run without a meta-net (method=erm, ...) has no weights: its rows are sorted by loss, highest
first, the small-loss ranking.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

from mwn.config import ConfigError
from mwn.core.methods import METHODS
from mwn.core.step import per_sample_loss, run_constants, sample_weights
from mwn.data.images import DataError
from mwn.run.checkpoint import CheckpointError
from mwn.run.evaluate import predict
from mwn.run.files import WEIGHTS
from mwn.run.trained import RunError, rebuild

COLUMNS = ["rank", "index", "file", "label", "label_name", "loss", "weight", "predicted",
           "predicted_name", "p_label", "corrupted"]  # fmt: skip


@torch.no_grad()
def verdicts(run_dir: Path, iteration: int | None = None) -> tuple[list[dict], bool]:
    """One row per training image (COLUMNS), sorted least trusted first, and whether the run
    has a meta-net (else the rows are sorted by loss)."""
    run = rebuild(run_dir, iteration)
    cfg, data, state = run.cfg, run.data, run.state
    has_meta_net = METHODS[str(cfg.method)].meta_net
    constants = run_constants(state)
    losses, weights = [], []
    for x, y in data.train.in_order(cfg.batch_size):
        loss, _ = per_sample_loss(run.model, state["params"], state["buffers"], x, y, None)
        losses.append(loss.float())
        if has_meta_net:
            w = sample_weights(run.meta_net, state["meta_params"], loss, y, constants, False)
            weights.append(w.float())
    loss = torch.cat(losses)
    weight = torch.cat(weights) if has_meta_net else None
    probs = predict(run.model, state["params"], state["buffers"], data.train, cfg.eval_batch_size)
    probs = probs.softmax(1)
    y = data.train.y
    pred = probs.argmax(1)
    p_label = probs.gather(1, y.view(-1, 1)).flatten()
    files = data.train_files
    rows = []
    for i in range(len(y)):
        source = int(data.train_index[i])
        rows.append(
            {
                "index": i,
                "file": files[source] if files is not None else "",
                "label": int(y[i]),
                "label_name": data.classes[int(y[i])],
                "loss": float(loss[i]),
                "weight": float(weight[i]) if weight is not None else None,
                "predicted": int(pred[i]),
                "predicted_name": data.classes[int(pred[i])],
                "p_label": float(p_label[i]),
                "corrupted": int(data.noisy[i]) if cfg.noise != "none" else "",
            }
        )
    key = (lambda r: (r["weight"], -r["loss"])) if has_meta_net else (lambda r: -r["loss"])
    rows.sort(key=key)
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    return rows, has_meta_net


def write(rows: list[dict], out: Path) -> None:
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        for r in rows:
            shown = {k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()}
            w.writerow({**shown, "weight": "" if r["weight"] is None else shown["weight"]})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mwn.weights", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path, help="a run's folder")
    p.add_argument("-o", "--output", type=Path, help=f"CSV to write (RUN_DIR/{WEIGHTS})")
    p.add_argument("--checkpoint", type=int, help="the checkpoint of iteration N (the final)")
    args = p.parse_args(argv)
    try:
        rows, has_meta_net = verdicts(args.run_dir, args.checkpoint)
    except (RunError, DataError, ConfigError, CheckpointError) as e:
        print(f"python -m mwn.weights: error: {e}", file=sys.stderr)
        return 2
    out = args.output or args.run_dir / WEIGHTS
    write(rows, out)
    order = (
        "by the meta-net's weight, lowest first"
        if has_meta_net
        else ("by loss, highest first (the run has no meta-net)")
    )
    print(f"{len(rows)} training images, {order}: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
