"""The figures of one run, drawn from its metrics.jsonl and summary.json (matplotlib, the `plot`
extra). Uses matplotlib's object API only: no pyplot, no global backend state.

- weight_fn.png: the learned weighting function, weight against loss, at several points in
  training (the MWN paper's figure; a class-aware meta-net: one panel per class group);
- accuracy.png: test accuracy over training, overall and by shot group;
- per_class.png: final accuracy of each class (by name), beside its number of training images;
- confusion.png: the final test confusion matrix, each row as fractions of its true class;
- weights_hist.png: the meta-net's weights for the latest training batch, by the frequency of the
  sample's class (and by clean / corrupted label where labels were corrupted);
- noise_weights.png (label noise): mean weight of clean and of corrupted samples over training,
  and the AUC of the weight as a clean-sample detector.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from mwn.run.files import CONFUSION, METRICS, SHOT_GROUPS, SUMMARY, WEIGHT_FN_LOSSES, shot_group

DPI = 120
SHOT_LABELS = {"many": "many-shot (> 100)", "medium": "medium (20-100)", "few": "few-shot (< 20)"}


def read_run(folder: Path) -> tuple[list[dict], dict]:
    """The validation records of metrics.jsonl, and summary.json ({} while the run is going)."""
    records = [json.loads(s) for s in (folder / METRICS).read_text().splitlines() if s]
    summary_file = folder / SUMMARY
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return [r for r in records if "test_acc" in r], summary


def plot_run(folder: Path) -> list[Path]:
    """Draw every figure the run's records allow into the run folder; returns their paths."""
    evals, summary = read_run(folder)
    if not evals:
        return []
    counts = summary.get("train_class_counts")
    title = f"{summary.get('dataset', folder.name)} {summary.get('method', '')}".strip()
    out = [_accuracy(folder / "accuracy.png", evals, title)]
    if "per_class_acc" in evals[-1]:
        names = summary.get("classes")
        out.append(_per_class(folder / "per_class.png", evals[-1], counts, names, title))
    if (folder / CONFUSION).is_file():
        out.append(_confusion(folder / "confusion.png", folder / CONFUSION, title))
    losses = summary.get("weight_fn_losses", WEIGHT_FN_LOSSES)
    if "weight_fn" in evals[-1]:
        out.append(_weight_fn(folder / "weight_fn.png", evals, losses, title))
    if "weight_fn_by_group" in evals[-1]:
        groups = summary.get("meta_groups") or []
        path = folder / "weight_fn.png"
        out.append(_weight_fn_by_group(path, evals, losses, groups, counts, title))
    if "batch" in evals[-1]:
        out.append(_weights_hist(folder / "weights_hist.png", evals[-1], counts, title))
    if "noise_auc" in evals[-1]:
        out.append(_noise_weights(folder / "noise_weights.png", evals, title))
    return out


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def _spread(items: list, k: int) -> list:
    """k items evenly spread over the list, first and last included."""
    if len(items) <= k:
        return items
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


def _weight_fn(path: Path, evals: list[dict], losses: list[float], title: str) -> Path:
    fig = Figure(figsize=(5, 3.6))
    ax = fig.add_subplot()
    shown = _spread(evals, 5)
    cmap = matplotlib.colormaps["viridis"]
    for i, r in enumerate(shown):
        color = cmap(i / max(len(shown) - 1, 1))
        ax.plot(losses, r["weight_fn"], color=color, label=f"iter {r['iter']}")
    batch = evals[-1]["batch"]
    ax.scatter(
        batch["loss"],
        batch["weight"],
        s=6,
        color="tab:red",
        alpha=0.5,
        zorder=3,
        label=f"latest batch (iter {evals[-1]['iter']})",
    )
    ax.set(xlabel="training loss", ylabel="weight V(loss)", title=f"{title}: learned weighting")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _weight_fn_by_group(
    path: Path, evals: list[dict], losses: list, groups: list[int], counts, title: str
) -> Path:
    """A class-aware meta-net: one panel per class group (its classes' training counts in the
    title), its curve at several points in training, and the latest batch's samples of that
    group."""
    curves = evals[-1]["weight_fn_by_group"]
    k = len(curves)
    fig = Figure(figsize=(3.2 * k, 3.4))
    axes = fig.subplots(1, k, sharey=True, squeeze=False)[0]
    shown = _spread(evals, 5)
    cmap = matplotlib.colormaps["viridis"]
    batch = evals[-1]["batch"]
    for g, ax in enumerate(axes):
        members = [c for c, gc in enumerate(groups) if gc == g]
        for i, r in enumerate(shown):
            color = cmap(i / max(len(shown) - 1, 1))
            ax.plot(losses, r["weight_fn_by_group"][g], color=color, label=f"iter {r['iter']}")
        mine = [i for i, y in enumerate(batch["label"]) if groups and groups[y] == g]
        ax.scatter(
            [batch["loss"][i] for i in mine],
            [batch["weight"][i] for i in mine],
            s=6,
            color="tab:red",
            alpha=0.5,
            zorder=3,
            label="latest batch",
        )
        if members and counts:
            n = [counts[c] for c in members]
            name = f"group {g}: {len(members)} classes, {min(n)}-{max(n)} images"
        else:
            name = f"group {g}: no class"
        ax.set(xlabel="training loss", title=name)
        ax.title.set_fontsize("small")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("weight V(loss)")
    axes[0].legend(fontsize="x-small")
    fig.suptitle(f"{title}: learned weighting per class group", fontsize="medium")
    return _save(fig, path)


def _accuracy(path: Path, evals: list[dict], title: str) -> Path:
    fig = Figure(figsize=(5, 3.6))
    ax = fig.add_subplot()
    iters = [r["iter"] for r in evals]
    ax.plot(iters, [r["test_acc"] for r in evals], label="all classes", color="black")
    for g in SHOT_GROUPS:
        ys = [r.get(f"{g}_acc") for r in evals]
        if any(y is not None for y in ys):
            ax.plot(iters, ys, "--", label=SHOT_LABELS[g])
    ax.set(xlabel="iteration", ylabel="test accuracy (%)", title=f"{title}: test accuracy")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _per_class(
    path: Path, last: dict, counts: list[int] | None, names: list[str] | None, title: str
) -> Path:
    acc = last["per_class_acc"]
    fig = Figure(figsize=(max(5, 0.12 * len(acc) + 2), 3.6))
    ax = fig.add_subplot()
    ax.bar(range(len(acc)), acc, color="tab:blue")
    ax.set(
        xlabel="class",
        ylabel="test accuracy (%)",
        ylim=(0, 100),
        title=f"{title}: per class at iteration {last['iter']}",
    )
    if names and len(names) <= 30:  # more would not be legible
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    if counts:
        ax2 = ax.twinx()
        ax2.plot(range(len(counts)), counts, "o-", color="tab:orange", markersize=3)
        ax2.set_yscale("log")
        ax2.set_ylabel("training images", color="tab:orange")
    return _save(fig, path)


def _confusion(path: Path, table: Path, title: str) -> Path:
    """confusion.csv drawn: rows true classes, columns predicted, each row normalised."""
    with open(table, newline="") as f:
        rows = list(csv.reader(f))
    names = rows[0][1:]
    counts = np.array([[int(v) for v in r[1:]] for r in rows[1:]], dtype=float)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    side = max(4.0, 0.3 * len(names) + 2)
    fig = Figure(figsize=(side + 1, side))
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true class")
    ax.set(xlabel="predicted", ylabel="true", title=f"{title}: test confusion")
    if len(names) <= 30:
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
    if len(names) <= 12:
        for i in range(len(names)):
            for j in range(len(names)):
                color = "white" if share[i, j] > 0.5 else "black"
                ax.text(
                    j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7, color=color
                )
    return _save(fig, path)


def _weights_hist(path: Path, last: dict, counts: list[int] | None, title: str) -> Path:
    batch = last["batch"]
    splits = []
    if counts:
        groups = [shot_group(counts[y]) for y in batch["label"]]
        splits.append(
            {
                SHOT_LABELS[g]: [w for w, h in zip(batch["weight"], groups) if h == g]
                for g in SHOT_GROUPS
            }
        )
    else:
        splits.append({"all samples": batch["weight"]})
    if "noisy" in batch:
        pairs = list(zip(batch["weight"], batch["noisy"]))
        splits.append(
            {
                "clean label": [w for w, n in pairs if not n],
                "corrupted label": [w for w, n in pairs if n],
            }
        )
    bins = np.histogram_bin_edges(batch["weight"], bins=20)  # shared, so heights compare
    fig = Figure(figsize=(5 * len(splits), 3.6))
    for i, split in enumerate(splits):
        ax = fig.add_subplot(1, len(splits), i + 1)
        for label, ws in split.items():
            if ws:
                ax.hist(ws, bins=bins, alpha=0.6, label=f"{label}: {len(ws)}")
        ax.set(
            xlabel="weight V(loss)",
            ylabel="samples",
            title=f"{title}: batch weights, iteration {last['iter']}",
        )
        ax.legend(fontsize="small")
    return _save(fig, path)


def _noise_weights(path: Path, evals: list[dict], title: str) -> Path:
    fig = Figure(figsize=(5, 3.6))
    ax = fig.add_subplot()
    iters = [r["iter"] for r in evals]
    ax.plot(iters, [r["weight_clean"] for r in evals], label="clean labels", color="tab:green")
    ax.plot(iters, [r["weight_noisy"] for r in evals], label="corrupted labels", color="tab:red")
    ax.set(xlabel="iteration", ylabel="mean weight V(loss)", title=f"{title}: clean vs corrupted")
    ax2 = ax.twinx()
    ax2.plot(iters, [r["noise_auc"] for r in evals], "--", color="black", label="AUC")
    ax2.set(ylabel="AUC (weight detects clean)", ylim=(0, 1))
    lines = ax.get_legend_handles_labels()
    more = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize="small", loc="lower left")
    ax.grid(alpha=0.3)
    return _save(fig, path)
