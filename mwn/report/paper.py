"""Published test accuracies (%) to compare runs with: `python -m mwn.report SWEEP --paper`.

Source: Shu et al., "Meta-Weight-Net: Learning an Explicit Mapping For Sample Weighting",
NeurIPS 2019. Table 1: long-tailed CIFAR-10 / CIFAR-100, ResNet32, imbalance factors
200 / 100 / 50 / 20 / 10 / 1 (clean labels), for ERM, focal loss, class-balanced loss, L2RW and
MW-Net. And the same paper's flip-noise results: balanced CIFAR-10, ResNet32, 0 / 20 / 40 % flip
noise, for the base model (ERM) and MW-Net. The paper reports the test accuracy at the end of
training (compare with a run's `final_test_acc`, not its best).

A test checks these against a second, independent transcription of the paper's tables. Not
used, on purpose: the community version of the original code (CIFAR-10 IF 50 / 100 / 200:
80.43 / 75.92 / 68.89; 87.83 at 40 % uniform noise; a longer schedule) and the Betty paper's
numbers (a since-fixed bug, and the best rather than the final accuracy) are other experiments
than the paper's.

`PUBLISHED` maps `(dataset, setting, method)` to the accuracy:
- dataset: `"cifar10"` or `"cifar100"` (the `dataset.name` of the run);
- setting: `Imbalance(factor)` (long tail, clean labels) or `Noise(kind, rate)` (label noise on
  balanced data; kind as the `noise` option, rate in [0, 1] as `noise_rate`);
- method: the trainer's `method=` value (`erm`, `mwn`, `focal`, `class_balanced`, `l2rw`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Imbalance:
    """Long-tailed training set with clean labels; factor = largest / smallest class."""

    factor: float


@dataclass(frozen=True)
class Noise:
    """Label noise on a balanced training set: kind as `noise=` (uniform | flip | flip2), rate as
    `noise_rate=` (a fraction, 0.4 = 40 %)."""

    kind: str
    rate: float


Setting = Imbalance | Noise

IMBALANCE_FACTORS = (200.0, 100.0, 50.0, 20.0, 10.0, 1.0)  # the columns of Table 1
FLIP_RATES = (0.0, 0.2, 0.4)

# Table 1, one row per method, in the order of IMBALANCE_FACTORS
_TABLE1 = {
    "cifar10": {
        "erm": (65.68, 70.36, 74.81, 82.23, 86.39, 92.89),
        "focal": (65.29, 70.38, 76.71, 82.76, 86.66, 93.03),
        "class_balanced": (68.89, 74.57, 79.27, 84.36, 87.49, 92.89),
        "l2rw": (66.51, 74.16, 78.93, 82.12, 85.19, 89.25),
        "mwn": (68.91, 75.21, 80.06, 84.94, 87.84, 92.66),
    },
    "cifar100": {
        "erm": (34.84, 38.32, 43.85, 51.14, 55.71, 70.50),
        "focal": (35.62, 38.41, 44.32, 51.95, 55.78, 70.52),
        "class_balanced": (36.23, 39.60, 45.32, 52.59, 57.99, 70.50),
        "l2rw": (33.38, 40.23, 44.44, 51.64, 53.73, 64.11),
        "mwn": (37.91, 42.09, 46.74, 54.37, 58.46, 70.37),
    },
}
# flip noise on CIFAR-10, in the order of FLIP_RATES ("base" in the paper is ERM)
_FLIP = {
    "erm": (92.89, 76.83, 70.77),
    "mwn": (92.04, 90.33, 87.54),
}

PUBLISHED: dict[tuple[str, Setting, str], float] = {
    **{
        (dataset, Imbalance(factor), method): acc
        for dataset, rows in _TABLE1.items()
        for method, accs in rows.items()
        for factor, acc in zip(IMBALANCE_FACTORS, accs, strict=True)
    },
    **{
        ("cifar10", Noise("flip", rate), method): acc
        for method, accs in _FLIP.items()
        for rate, acc in zip(FLIP_RATES, accs, strict=True)
    },
}


def setting(imbalance: float, noise: str, noise_rate: float) -> Setting | None:
    """The paper's setting of a run: `Imbalance` for clean labels (noise none), `Noise` for label
    noise on balanced data (imbalance 1); None for label noise on a long tail, which the paper
    did not run. Numbers are rounded (6 decimals) so that 0.2 and 0.2000000001 are one setting."""
    if noise == "none":
        return Imbalance(round(float(imbalance), 6))
    if float(imbalance) != 1.0:
        return None
    return Noise(noise, round(float(noise_rate), 6))


def published(
    dataset: str, imbalance: float, noise: str, noise_rate: float, method: str
) -> float | None:
    """The paper's final test accuracy (%) for a run's dataset, imbalance, noise, noise_rate and
    method (as in its summary.json), or None where the paper has no such number."""
    where = setting(imbalance, noise, noise_rate)
    return None if where is None else PUBLISHED.get((dataset, where, method))
