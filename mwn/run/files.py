"""The run folder's vocabulary: its file names, the keys of what they hold that readers depend
on, and the one table of names renamed since earlier releases. Everything that writes a run
folder (mwn.run) and everything that reads one back (mwn.report, mwn.compare) names them here.
"""

from __future__ import annotations

import re

METRICS = "metrics.jsonl"  # one JSON object per logged iteration
SUMMARY = "summary.json"  # final and best accuracies, what the run was
NOISE = "noise.json"  # label noise: transition matrix, realised counts, corrupted samples
PER_CLASS = "per_class.csv"  # each class: training and test images, precision, recall, F1
CONFUSION = "confusion.csv"  # the final test confusion matrix, rows true, columns predicted
WEIGHTS = "weights.csv"  # python -m mwn.weights: every training image, least trusted first
MODEL = "model.safetensors"  # the final classifier's parameters and buffers
ERROR = "error.json"  # a failed sweep job: its row in the sweep summary
LOCK = ".lock"  # held by the process training in the folder (names its PID)
HYDRA_DIR = ".hydra"  # Hydra's copy of the composed config and the overrides
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")  # in HYDRA_DIR
OVERRIDES = f"{HYDRA_DIR}/overrides.yaml"  # what the job changed: a sweep table's columns
CHECKPOINT = re.compile(r"checkpoint-(\d+)\.pt")


def checkpoint_name(iteration: int) -> str:
    return f"checkpoint-{iteration}.pt"


# summary.json and metrics.jsonl keys of earlier releases, read as today's (run folders written
# before a rename); the only rename table
OLD_NAMES = {"acc": "test_acc", "final_acc": "final_test_acc", "best_acc": "best_test_acc"}


def current_names(value):
    """A JSON-like value with the keys of earlier releases renamed, at any depth."""
    if isinstance(value, dict):
        return {OLD_NAMES.get(k, k): current_names(v) for k, v in value.items()}
    if isinstance(value, list):
        return [current_names(v) for v in value]
    return value


# per-class accuracy by shot group: the long-tail reporting convention
SHOT_GROUPS = ("many", "medium", "few")


def shot_group(train_count: int) -> str:
    """many (> 100 training images), medium (20-100) or few (< 20)."""
    return "many" if train_count > 100 else "medium" if train_count >= 20 else "few"


WEIGHT_FN_LOSSES = [i / 5 for i in range(51)]  # 0, 0.2, ..., 10: where the weighting is drawn
NOISE_KEYS = ("weight_clean", "weight_noisy", "noise_auc")  # label noise: how weights separate


def setting_name(summary: dict) -> str:
    """What the run trained on, in words: the dataset, its long tail (or its own counts) and its
    label noise, e.g. `digits, long tail IF 20` or `cifar10, uniform noise 0.4`."""
    parts = [str(summary.get("dataset", "data"))]
    if summary.get("imbalance") is None and "imbalance_ratio" in summary:
        parts.append(f"the data's own counts (IF {summary['imbalance_ratio']:.4g})")
    elif summary.get("imbalance", 1) > 1:
        parts.append(f"long tail IF {summary['imbalance']:g}")
    if summary.get("noise", "none") != "none":
        parts.append(f"{summary['noise']} noise {summary['noise_rate']:g}")
    elif len(parts) == 1:
        parts.append("balanced")
    return ", ".join(parts)


def result_line(summary: dict) -> str:
    """The run's one line: what it trained (method, model, setting), the final test accuracy,
    the best one (saying what "best" was chosen on) and, when known, the final balanced one."""
    if summary.get("best_on") == "val":
        best = f"test acc at the best val acc (iter {summary['best_iter']})"
    else:
        best = f"highest test acc (iter {summary['best_iter']})"
    line = (
        f"{summary.get('method', 'mwn')} {summary.get('model', '')} on {setting_name(summary)}: "
        f"final test acc {summary['final_test_acc']:.2f} | best {summary['best_test_acc']:.2f}, "
        f"{best}"
    )
    if summary.get("final_test_balanced_acc") is not None:
        line += f" | final balanced acc {summary['final_test_balanced_acc']:.2f}"
    return line
