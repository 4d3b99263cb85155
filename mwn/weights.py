"""`python -m mwn.weights RUN_DIR`: the meta-net's verdict on every training image, least trusted
first, for reviewing the likely mislabelled ones.

The run is rebuilt from its folder (settings, data exactly as the run drew it, the final
checkpoint or --checkpoint N). For each training image: its index in the training set, its file
(image folders), its given label, its loss under the classifier in training mode (as the meta-net
sees losses; in batches of batch_size, no augmentation), the meta-net's weight V(loss), and the
classifier's eval-mode prediction and probability of the given label; `corrupted` when the run
itself corrupted labels (noise=...). Sorted by weight, lowest first (ties: higher loss first).
A run without a meta-net (method=erm, ...) has no weights: its rows are sorted by loss, highest
first, the small-loss ranking; `--by loss` sorts a meta-net's rows so too.

The weight is a function of the loss alone, so its ranking is only as good as the function's
shape: under label noise the meta-net learns to weigh high losses down, and the least weighted
images are the likely mislabelled; under class imbalance it learns to weigh them up (hard
images, often of the rare classes), and then the least weighted are the easiest. When the
weights rise with the loss over the training images (Spearman's rank correlation > 0), the
command says so.
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
from mwn.data.noise import average_ranks
from mwn.run.checkpoint import CheckpointError
from mwn.run.evaluate import predict
from mwn.run.files import WEIGHTS
from mwn.run.trained import RunError, rebuild

COLUMNS = ["rank", "index", "file", "label", "label_name", "loss", "weight", "predicted",
           "predicted_name", "p_label", "corrupted"]  # fmt: skip


@torch.no_grad()
def verdicts(
    run_dir: Path, iteration: int | None = None, by: str = "weight"
) -> tuple[list[dict], bool]:
    """One row per training image (COLUMNS), sorted least trusted first (by="weight": lowest
    weight first; "loss", and any run without a meta-net: highest loss first), and whether the
    run has a meta-net."""
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
    by_weight = has_meta_net and by == "weight"
    key = (lambda r: (r["weight"], -r["loss"])) if by_weight else (lambda r: (-r["loss"],))
    rows.sort(key=key)
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    return rows, has_meta_net


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation (ties at their average rank)."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def trend_note(rows: list[dict]) -> str | None:
    """A line for a meta-net whose weight rises with the loss, else None."""
    loss = torch.tensor([r["loss"] for r in rows])
    weight = torch.tensor([r["weight"] for r in rows])
    rho = rank_correlation(loss, weight)
    if rho <= 0:
        return None
    return (
        f"note: the meta-net's weight rises with the loss (Spearman {rho:.2f} over the training "
        "images): it weighs hard images up, as it learns to under class imbalance, so the least "
        "weighted are the easiest, not the likely mislabelled; --by loss ranks by loss instead"
    )


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
    p.add_argument(
        "--by",
        choices=("weight", "loss"),
        default="weight",
        help="least trusted first: lowest weight (weight), or highest loss (loss)",
    )
    args = p.parse_args(argv)
    try:
        rows, has_meta_net = verdicts(args.run_dir, args.checkpoint, args.by)
    except (RunError, DataError, ConfigError, CheckpointError) as e:
        print(f"python -m mwn.weights: error: {e}", file=sys.stderr)
        return 2
    out = args.output or args.run_dir / WEIGHTS
    write(rows, out)
    order = "by loss, highest first"
    if not has_meta_net:
        order += " (the run has no meta-net)"
    elif args.by == "weight":
        order = "by the meta-net's weight, lowest first"
    print(f"{len(rows)} training images, {order}: {out}")
    if has_meta_net and (note := trend_note(rows)):
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
