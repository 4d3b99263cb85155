"""Label noise: the realised corruption against its definition, clean meta and test sets,
determinism, the clean/noisy diagnostics, and the errors."""

import json

import pytest
import torch

from mwn.config import ConfigError, check_config
from mwn.data import build as data_build
from mwn.data.images import DataError
from mwn.data.noise import apply_noise, auc, corrupt_labels, realised_matrix, transition_matrix
from mwn.data.readers import load_digits
from mwn.data.splits import make_long_tail, split_meta
from mwn.run.launch import train

from conftest import make_cfg

TINY = ["train_iters=6", "val_every=3", "log_every=3", "model.width=4", "device=cpu"]
C, PER_CLASS, RATE = 10, 20_000, 0.4


@pytest.mark.parametrize("kind", ["uniform", "flip", "flip2"])
def test_the_realised_corruption_matches_the_definition(kind):
    labels = torch.arange(C).repeat_interleave(PER_CLASS)
    T = transition_matrix(kind, RATE, C, seed=0)
    observed, noisy = corrupt_labels(labels, T, seed=0)
    realised = realised_matrix(labels, observed, C).double() / PER_CLASS
    # each entry is a binomial fraction: within 5 standard errors of its probability
    tolerance = 5 * (T * (1 - T) / PER_CLASS).sqrt() + 1e-12
    assert ((realised - T).abs() <= tolerance).all(), (realised - T).abs().max()
    assert torch.equal(noisy, observed != labels)
    off = T - torch.diag(torch.diag(T))
    if kind == "uniform":  # redrawn from all C classes: off-diagonal r / C, flip rate r (C-1)/C
        assert torch.allclose(off[off > 0], torch.full((C * (C - 1),), RATE / C, dtype=T.dtype))
        assert abs(noisy.double().mean().item() - RATE * (C - 1) / C) < 0.005
    else:  # r of each class to one other class, or r/2 to each of two
        others = 1 if kind == "flip" else 2
        assert ((off > 0).sum(1) == others).all() and torch.all(torch.diag(T) == 1 - RATE)
        assert torch.allclose(off[off > 0], torch.full((C * others,), RATE / others).double())
        assert abs(noisy.double().mean().item() - RATE) < 0.005
    assert torch.allclose(T.sum(1), torch.ones(C, dtype=T.dtype))


def test_noise_is_seeded():
    labels = torch.arange(C).repeat_interleave(100)
    runs = [
        apply_noise(labels, torch.arange(len(labels)), C, "flip2", 0.3, seed) for seed in (0, 0, 1)
    ]
    assert runs[0][2] == runs[1][2] and torch.equal(runs[0][0], runs[1][0])
    assert not torch.equal(runs[0][0], runs[2][0])
    assert runs[0][2]["transition"] != runs[2][2]["transition"]  # the flip targets too


def test_auc_is_the_pairwise_probability_with_ties_as_half():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (300,), generator=g).float()  # many ties
    positive = torch.rand(300, generator=g) < 0.3
    pos, neg = scores[positive], scores[~positive]
    brute = (pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()
    assert auc(scores, positive) == pytest.approx(brute.mean().item(), abs=1e-12)
    assert auc(scores, torch.zeros(300, dtype=torch.bool)) is None


def test_meta_and_test_labels_stay_clean_and_the_run_records_the_noise(tmp_path, monkeypatch):
    made = []

    class Recording(data_build.DeviceImages):
        def __init__(self, x, y, *args, **kwargs):
            made.append(y.clone())
            super().__init__(x, y, *args, **kwargs)

    monkeypatch.setattr(data_build, "DeviceImages", Recording)
    cfg = make_cfg(*TINY, "imbalance=10", "noise=uniform", "noise_rate=0.4", "meta_per_class=20")
    summary = train(cfg, tmp_path)
    images = load_digits()
    meta_idx, pool = split_meta(images.train_y, C, 20, cfg.seed)
    train_idx, counts = make_long_tail(images.train_y, pool, C, 10, cfg.seed)
    train_y, meta_y, test_y = made[:3]
    assert torch.equal(meta_y, images.train_y[meta_idx])  # clean
    assert torch.equal(test_y, images.test_y)  # clean
    record = json.loads((tmp_path / "noise.json").read_text())
    flipped = torch.tensor(record["corrupted_samples"])
    expected = images.train_y[train_idx].clone()
    position = {int(i): k for k, i in enumerate(train_idx)}
    for index, true, observed in flipped.tolist():
        assert images.train_y[index] == true and true != observed
        expected[position[index]] = observed
    assert torch.equal(train_y, expected)  # exactly the recorded samples were changed
    assert not set(flipped[:, 0].tolist()) & set(meta_idx.tolist())
    assert (
        record["corrupted"]
        == len(flipped)
        == sum(map(sum, record["realised"])) - sum(record["realised"][c][c] for c in range(C))
    )
    assert summary["train_class_counts"] == counts  # the long tail is of the true classes
    assert summary["meta_size"] == 200 and summary["noise"] == "uniform"
    assert summary["corrupted_fraction"] == pytest.approx(len(flipped) / sum(counts))
    for key in ("final_weight_clean", "final_weight_noisy", "final_noise_auc"):
        assert summary[key] is not None
    last = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert 0.0 <= last["noise_auc"] <= 1.0 and last["noise_auc"] == summary["final_noise_auc"]
    assert len(last["batch"]["noisy"]) == 100 and any(last["batch"]["noisy"])


def test_erm_under_noise_records_the_noise_but_no_weights(tmp_path):
    summary = train(make_cfg(*TINY, "method=erm", "noise=flip", "noise_rate=0.2"), tmp_path)
    assert (tmp_path / "noise.json").is_file() and "final_noise_auc" not in summary
    assert summary["corrupted_fraction"] > 0


@pytest.mark.parametrize(
    "overrides,error,message",
    [
        (["noise_rate=0.4"], ConfigError, "noise_rate=0.4: allowed values are 0 with noise=none"),
        (
            ["noise=uniform", "noise_rate=1.5"],
            ConfigError,
            "noise_rate=1.5: allowed values are real numbers in [0, 1]",
        ),
    ],
)
def test_bad_noise_settings_name_the_setting(tmp_path, overrides, error, message):
    with pytest.raises(error) as e:
        cfg = make_cfg(*TINY, *overrides)
        check_config(cfg)
        train(cfg, tmp_path)
    assert str(e.value).startswith(message)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_flip2_needs_three_classes():
    with pytest.raises(DataError, match="noise=flip2: needs more than 2 classes"):
        transition_matrix("flip2", 0.2, 2, seed=0)


def test_the_wrn28_10_option_composes_and_its_architecture_trains(tmp_path):
    cfg = make_cfg("dataset=cifar10", "model=wrn28_10")
    assert (cfg.model.arch, cfg.model.depth, cfg.model.width) == ("wrn", 28, 160)
    # the same architecture, shrunk (WRN-10-1) so that a CPU test can train it end to end
    small = make_cfg(
        *TINY,
        "model=wrn28_10",
        "model.depth=10",
        "model.width=16",
        "noise=uniform",
        "noise_rate=0.4",
    )
    summary = train(small, tmp_path)
    assert summary["final_test_acc"] > 0 and summary["final_noise_auc"] is not None
