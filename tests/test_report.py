"""The experiment workflow: sweep summaries (against the jobs' own summary.json), failed jobs,
seed aggregation, the report command, plots, progress, TensorBoard, launchers."""

import csv
import json
import logging
import math
import re
import statistics
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from mwn.cli import check_command_line
from mwn.config import CONF_DIR
from mwn.core.models import MetaNet
from mwn.core.step import sample_weights
from mwn.report import paper
from mwn.report import sweep as report
from mwn.run import monitor
from mwn.run.evaluate import shot_accuracy
from mwn.run.files import WEIGHT_FN_LOSSES
from mwn.run.launch import train

from conftest import make_cfg, run_cli

TINY = ["train_iters=6", "val_every=3", "log_every=3", "model.width=4", "device=cpu"]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_joblib_sweep_writes_a_summary_that_matches_its_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "meta_lr=1e-5,1e-1",
        "hidden_size=50,100",
        *TINY,
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Joblib.Parallel" in proc.stdout + proc.stderr  # jobs really went through joblib
    rows = read_csv(sweep / "summary.csv")
    assert len(rows) == 4
    seen = set()
    for row in rows:
        job = json.loads((Path(row["folder"]) / "summary.json").read_text())
        assert row["status"] == "done" and row["error"] == ""
        for key in (
            "final_test_acc",
            "best_test_acc",
            "final_many_acc",
            "final_medium_acc",
            "final_few_acc",
            "wall_time_s",
        ):
            assert (float(row[key]) if row[key] else None) == job[key], key
        overrides = dict(o.split("=") for o in row["overrides"].split())
        assert (row["meta_lr"], row["hidden_size"]) == (
            overrides["meta_lr"],
            overrides["hidden_size"],
        )
        seen.add((row["meta_lr"], row["hidden_size"]))
        folder = Path(row["folder"])
        for plot in ("weight_fn.png", "accuracy.png", "per_class.png", "weights_hist.png"):
            assert (folder / plot).stat().st_size > 1000, plot
    assert seen == {("1e-05", "50"), ("1e-05", "100"), ("0.1", "50"), ("0.1", "100")}
    finals = [float(r["final_test_acc"]) for r in rows]
    assert finals == sorted(finals, reverse=True)
    md = (sweep / "summary.md").read_text()
    assert "| job | meta_lr | hidden_size | final | best | many | medium | few |" in md
    assert "Common: `train_iters=6`" in md
    assert md.strip().splitlines()[-1] in proc.stdout  # the table is printed
    assert not (sweep / "summary_seeds.csv").exists()  # no seed sweep, no seed table


def test_a_failed_job_is_a_row_with_its_error_and_the_others_still_run(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "meta_per_class=500,10", *TINY, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"mwn: 1 of 2 jobs failed; see {sweep / 'summary.md'}"
    )
    rows = {r["meta_per_class"]: r for r in read_csv(sweep / "summary.csv")}
    assert rows["10"]["status"] == "done" and float(rows["10"]["final_test_acc"]) >= 0
    assert rows["500"]["status"] == "failed" and rows["500"]["final_test_acc"] == ""
    assert rows["500"]["error"].startswith("meta_per_class=500: class '0' has only")
    assert list(rows) == ["10", "500"]  # failed jobs last
    assert "failed: meta_per_class=500" in (sweep / "summary.md").read_text()
    # rerunning the sweep with a fixed value clears the failure
    (sweep / "0" / "error.json").unlink()
    assert report.read_job(sweep / "0")["status"] == "unfinished"


def fake_job(sweep: Path, num: int, overrides: list[str], **summary) -> None:
    folder = sweep / str(num)
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if summary:
        base = dict.fromkeys(report.ACCURACIES, None)
        (folder / "summary.json").write_text(json.dumps({**base, "wall_time_s": 10.0, **summary}))


def test_seed_sweeps_are_aggregated_as_mean_and_sample_std(tmp_path):
    sweep = tmp_path / "sweep"
    accs = {
        ("10", "0"): 80.0,
        ("10", "1"): 82.0,
        ("10", "2"): 87.0,
        ("100", "0"): 60.0,
        ("100", "1"): 64.0,
    }
    for num, ((imb, seed), acc) in enumerate(accs.items()):
        fake_job(
            sweep,
            num,
            [f"imbalance={imb}", f"seed={seed}", "train_iters=5"],
            final_test_acc=acc,
            best_test_acc=acc + 1,
            final_few_acc=acc - 50,
        )
    fake_job(sweep, 5, ["imbalance=100", "seed=2", "train_iters=5"])  # still running
    assert report.main([str(sweep), "--no-plots"]) == 0
    groups = {g["imbalance"]: g for g in read_csv(sweep / "summary_seeds.csv")}
    assert groups["10"]["seeds"] == "3" and groups["10"]["seed_values"] == "0 1 2"
    assert float(groups["10"]["final_test_acc"]) == pytest.approx(83.0)
    assert float(groups["10"]["final_test_acc_std"]) == pytest.approx(math.sqrt(13.0))  # (9+1+16)/2
    assert float(groups["10"]["best_test_acc"]) == pytest.approx(84.0)
    assert float(groups["100"]["final_test_acc_std"]) == pytest.approx(statistics.stdev([60, 64]))
    assert groups["100"]["seeds"] == "2" and groups["10"]["final_many_acc"] == ""
    md = (sweep / "summary.md").read_text()
    assert "| 10 | 3 | 83.00 ± 3.61 | 84.00 ± 3.61 | - | - | 33.00 ± 3.61 | 10 |" in md
    assert "6 jobs: 5 done, 0 failed, 1 unfinished" in md
    assert [r["job"] for r in read_csv(sweep / "summary.csv")] == ["2", "1", "0", "4", "3", "5"]


def test_report_rebuilds_the_plots_and_the_validation_records_carry_the_long_tail(tmp_path):
    run = tmp_path / "run"
    summary = train(make_cfg(*TINY), run)
    evals = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "test_acc" in r]
    assert [r["iter"] for r in evals] == [3, 6]
    last = evals[-1]
    shots = shot_accuracy(last["per_class_acc"], summary["train_class_counts"])
    assert {k: last[k] for k in shots} == shots and len(last["per_class_acc"]) == 10
    assert last["per_class_acc"] == summary["final_per_class_acc"]
    # the recorded weighting function is the final meta-net's, evaluated on the grid
    state = torch.load(run / "checkpoint-6.pt", weights_only=True)["state"]
    net = MetaNet(100, 1)
    grid = torch.tensor(WEIGHT_FN_LOSSES)
    expected = sample_weights(net, state["meta_params"], grid, None, {}, normalize=False)
    assert torch.allclose(torch.tensor(last["weight_fn"]), expected, atol=2e-6)
    batch = last["batch"]
    assert len(batch["label"]) == len(batch["loss"]) == len(batch["weight"]) == 100
    losses = torch.tensor(batch["loss"])
    w = sample_weights(net, state["meta_params"], losses, None, {}, normalize=False)
    assert torch.allclose(torch.tensor(batch["weight"]), w, atol=2e-6)
    # plots are rebuilt from the files alone
    assert not (run / "weight_fn.png").exists()  # train() itself draws nothing
    assert report.main([str(run)]) == 0
    for plot in ("weight_fn.png", "accuracy.png", "per_class.png", "weights_hist.png"):
        assert (run / plot).stat().st_size > 1000, plot
    erm = tmp_path / "erm"
    train(make_cfg(*TINY, "method=erm"), erm)
    assert report.main([str(erm)]) == 0  # no meta-net: no weighting plots
    assert (erm / "accuracy.png").exists() and not (erm / "weight_fn.png").exists()


def test_report_names_a_folder_it_cannot_read(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        report.main([str(tmp_path)])
    assert e.value.code == 2
    assert "neither a run folder (metrics.jsonl) nor a sweep folder" in capsys.readouterr().err


def test_plots_are_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch, caplog):
    run = tmp_path / "run"
    train(make_cfg(*TINY), run)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.delitem(sys.modules, "mwn.report.plots", raising=False)
    with caplog.at_level(logging.WARNING):
        assert report.plot_run_or_note(run) == []
    assert "plots skipped: matplotlib is not installed (pip install -e '.[plot]')" in caplog.text
    assert not (run / "weight_fn.png").exists()


def test_progress_log_lines_and_bar(tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setattr(monitor, "LOG_PERIOD_S", 0.0)
    with caplog.at_level(logging.INFO, logger="mwn.run.monitor"):
        train(make_cfg(*TINY, "progress=log"), tmp_path / "log")
    lines = [r.getMessage() for r in caplog.records if r.name == "mwn.run.monitor"]
    periodic = [s for s in lines if s.startswith("iter 3/6") or s.startswith("iter 6/6")]
    assert len(periodic) == 2, lines
    assert all(k in periodic[0] for k in ("loss ", "meta loss ", "lr 0.05", " it/s", "ETA "))
    assert any(s.startswith("iter 6  test acc ") for s in lines)  # validation, in every mode
    capsys.readouterr()
    train(make_cfg(*TINY, "progress=bar"), tmp_path / "bar")
    err = capsys.readouterr().err
    assert "train: 100%" in err and "6/6" in err and "it/s" in err
    assert "meta loss" in err and "lr 0.05" in err
    capsys.readouterr()
    train(make_cfg(*TINY, "progress=none"), tmp_path / "none")
    assert "it/s" not in capsys.readouterr().err


def test_tensorboard_gets_the_scalars_of_metrics_jsonl_also_after_a_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, cfg = tmp_path / "run", make_cfg(*TINY, "logger=tensorboard", "checkpoint_every=3")
    train(cfg, run)
    (run / "checkpoint-6.pt").unlink()  # as if killed before the end: resume at iteration 3
    train(cfg, run)
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"histograms": 0})
    events.Reload()
    records = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    for tag, key in (
        ("train/loss", "loss"),
        ("train/meta_loss", "meta_loss"),
        ("test/test_acc", "test_acc"),
        ("train/lr", "lr"),
    ):
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert logged == [(r["iter"], pytest.approx(r[key])) for r in records if key in r], tag
    assert [h.step for h in events.Histograms("train/batch_weight")] == [3, 6]


def test_a_launcher_whose_plugin_is_missing_is_a_one_line_error(monkeypatch):
    from mwn import cli

    missing = ("hydra_plugins.not_installed", "hydra-joblib-launcher", "joblib")
    monkeypatch.setitem(cli.LAUNCHER_PLUGINS, "joblib", missing)
    problem = check_command_line(["-m", "hydra/launcher=joblib", "seed=0,1"], CONF_DIR)
    assert problem == (
        "hydra/launcher=joblib: needs the hydra-joblib-launcher package "
        "(pip install 'mwn[joblib]'); allowed without it: basic"
    )


def test_the_slurm_example_config_composes_onto_submitit():
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 1, 120)
    assert launcher.array_parallelism == 16


def test_a_seed_by_imbalance_sweep_through_submitit_is_summarised(tmp_path):
    """The path a SLURM sweep takes, SLURM aside: Hydra's submitit launcher pickles each job and
    runs it in its own process (submitit's local executor here), then the summary is written;
    the seed table averages over the seeds of each imbalance."""
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "-m",
        "hydra/launcher=submitit_local",
        "imbalance=10,50",
        "seed=0,1",
        *TINY,
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 4  # submitit ran them
    rows = read_csv(sweep / "summary.csv")
    assert sorted((r["imbalance"], r["seed"]) for r in rows) == [
        ("10", "0"),
        ("10", "1"),
        ("50", "0"),
        ("50", "1"),
    ]
    seeds = {r["imbalance"]: r for r in read_csv(sweep / "summary_seeds.csv")}
    for imbalance, group in seeds.items():
        finals = [float(r["final_test_acc"]) for r in rows if r["imbalance"] == imbalance]
        assert float(group["final_test_acc"]) == pytest.approx(statistics.mean(finals))
        assert float(group["final_test_acc_std"]) == pytest.approx(statistics.stdev(finals))


def test_the_noise_auc_column_appears_only_for_noise_sweeps(tmp_path):
    fake_job(tmp_path / "plain", 0, ["seed=0"], final_test_acc=50.0)
    fake_job(tmp_path / "plain", 1, ["seed=1"], final_test_acc=52.0)
    text, _ = report.write_sweep_summary(tmp_path / "plain")
    assert "noise AUC" not in text
    fake_job(tmp_path / "noisy", 0, ["method=mwn"], final_test_acc=80.0, final_noise_auc=0.9123)
    fake_job(tmp_path / "noisy", 1, ["method=erm"], final_test_acc=70.0)
    text, _ = report.write_sweep_summary(tmp_path / "noisy")
    assert "| 0 | mwn | 80.00 | - | - | - | - | 0.912 | 10 | done |" in text
    assert "| 1 | erm | 70.00 | - | - | - | - | - | 10 | done |" in text
    rows = read_csv(tmp_path / "noisy" / "summary.csv")
    assert [r["final_noise_auc"] for r in rows] == ["0.9123", ""]


def test_a_failing_figure_is_a_note_not_a_failed_run(tmp_path, monkeypatch, caplog):
    from mwn.report import plots

    run = tmp_path / "run"
    train(make_cfg(*TINY), run)
    monkeypatch.setattr(plots, "plot_run", lambda folder: 1 / 0)
    with caplog.at_level(logging.WARNING):
        assert report.plot_run_or_note(run) == []
    assert "plots skipped: ZeroDivisionError: division by zero" in caplog.text


def test_the_published_numbers_are_looked_up_by_dataset_setting_and_method():
    assert paper.published("cifar10", 100, "none", 0.0, "erm") == 70.36
    assert paper.published("cifar10", 100.0, "none", 0.0, "mwn") == 75.21
    assert paper.published("cifar100", 200, "none", 0.0, "l2rw") == 33.38
    assert paper.published("cifar100", 1, "none", 0.0, "class_balanced") == 70.50
    assert paper.published("cifar10", 10, "none", 0.0, "focal") == 86.66
    assert paper.published("cifar10", 1, "flip", 0.4, "mwn") == 87.54
    assert paper.published("cifar10", 1.0, "flip", 0.2, "erm") == 76.83
    assert paper.published("cifar10", 1, "flip", 0.0, "mwn") == 92.04  # not Table 1's 92.66
    assert paper.PUBLISHED[("cifar10", paper.Noise("flip", 0.2), "mwn")] == 90.33
    assert paper.PUBLISHED[("cifar100", paper.Imbalance(50.0), "mwn")] == 46.74
    for missing in (
        ("cifar10", 30, "none", 0.0, "mwn"),  # an imbalance factor the paper did not run
        ("cifar100", 1, "flip", 0.4, "mwn"),  # flip noise: CIFAR-10 only
        ("cifar10", 100, "flip", 0.4, "mwn"),  # noise on a long tail
        ("cifar10", 1, "uniform", 0.4, "mwn"),  # uniform noise: not transcribed
        ("cifar10", 1, "flip", 0.4, "focal"),
        ("digits", 100, "none", 0.0, "mwn"),
        ("cifar10", 100, "none", 0.0, "fine_tune"),
    ):
        assert paper.published(*missing) is None, missing
    assert len(paper.PUBLISHED) == 2 * 5 * 6 + 2 * 3


# The paper's numbers as printed (Shu et al., NeurIPS 2019: Table 1, long-tailed CIFAR with
# ResNet32, and its flip-noise results on CIFAR-10), typed in again independently of
# mwn/report/paper.py, with the community code's numbers (not the paper's) among them.
PAPER_TEXT = """
## Published accuracy (test %, ResNet32)
Long-tailed CIFAR-10, IF 200 / 100 / 50 / 20 / 10 / 1:
- ERM 65.68 / 70.36 / 74.81 / 82.23 / 86.39 / 92.89
- MW-Net 68.91 / 75.21 / 80.06 / 84.94 / 87.84 / 92.66
Long-tailed CIFAR-100, same order:
- ERM 34.84 / 38.32 / 43.85 / 51.14 / 55.71 / 70.50
- MW-Net 37.91 / 42.09 / 46.74 / 54.37 / 58.46 / 70.37
Other rows of the same table, CIFAR-10 IF 200 / 100 / 50 / 20 / 10 / 1:
- Focal loss 65.29 / 70.38 / 76.71 / 82.76 / 86.66 / 93.03
- Class-balanced 68.89 / 74.57 / 79.27 / 84.36 / 87.49 / 92.89
- L2RW 66.51 / 74.16 / 78.93 / 82.12 / 85.19 / 89.25
CIFAR-100, same order:
- Focal loss 35.62 / 38.41 / 44.32 / 51.95 / 55.78 / 70.52
- Class-balanced 36.23 / 39.60 / 45.32 / 52.59 / 57.99 / 70.50
- L2RW 33.38 / 40.23 / 44.44 / 51.64 / 53.73 / 64.11
The community version of the original code reports CIFAR-10 ResNet32 IF 50 / 100 / 200:
- 80.43 / 75.92 / 68.89, and 87.83 at 40 % uniform noise.
Flip noise, CIFAR-10 0 / 20 / 40 %: MW-Net 92.04 / 90.33 / 87.54, base 92.89 / 76.83 / 70.77.
"""


def reference_numbers(text: str) -> dict:
    """The published accuracies of a "Published accuracy" section (as PAPER_TEXT), as
    PUBLISHED."""
    methods = {
        "ERM": "erm",
        "MW-Net": "mwn",
        "Focal loss": "focal",
        "Class-balanced": "class_balanced",
        "L2RW": "l2rw",
    }
    section = text.split("## Published accuracy", 1)[1].split("\n## ", 1)[0]
    found, dataset = {}, None
    for line in section.splitlines():
        if line.startswith("The community version"):
            dataset = None  # the community and Betty numbers are not the paper's
        elif line.rstrip().endswith(":") and re.search(r"CIFAR-10\b", line):
            dataset = "cifar10"
        elif line.rstrip().endswith(":") and re.search(r"CIFAR-100\b", line):
            dataset = "cifar100"
        elif dataset and line.startswith("- "):
            name = re.match(r"- (.+?) (\d+\.\d\d) /", line).group(1)
            accs = [float(x) for x in re.findall(r"\d+\.\d\d", line)]
            assert len(accs) == 6, line
            for factor, acc in zip(paper.IMBALANCE_FACTORS, accs):
                found[(dataset, paper.Imbalance(factor), methods[name])] = acc
    flip = re.search(r"Flip noise, CIFAR-10 0 / 20 / 40 %: MW-Net (.+?), base (.+?)\.\s", section)
    assert flip, "no flip-noise line in the expected form"
    for method, accs in zip(("mwn", "erm"), flip.groups()):
        for rate, acc in zip(paper.FLIP_RATES, accs.split(" / ")):
            found[("cifar10", paper.Noise("flip", rate), method)] = float(acc)
    return found


def test_the_published_numbers_are_the_papers():
    assert reference_numbers(PAPER_TEXT) == paper.PUBLISHED


def test_paper_columns_set_the_mean_final_accuracy_beside_the_published_one(tmp_path):
    sweep = tmp_path / "sweep"
    run = dict(dataset="cifar10", imbalance=100, noise="none", noise_rate=0.0)
    jobs = [  # (overrides, summary)
        (["method=mwn", "seed=0", "imbalance=100"], dict(run, method="mwn", final_test_acc=74.0)),
        (["method=mwn", "seed=1", "imbalance=100"], dict(run, method="mwn", final_test_acc=77.0)),
        (["method=erm", "seed=0", "imbalance=100"], dict(run, method="erm", final_test_acc=71.0)),
        (["method=erm", "seed=1", "imbalance=100"], dict(run, method="erm", final_test_acc=68.0)),
        # imbalance 30: no published number
        (["method=mwn", "seed=0", "imbalance=30"], dict(run, method="mwn", imbalance=30)),
        (["method=mwn", "seed=1", "imbalance=30"], dict(run, method="mwn", imbalance=30)),
    ]
    for num, (overrides, summary) in enumerate(jobs):
        summary.setdefault("final_test_acc", 60.0)
        fake_job(sweep, num, overrides, best_test_acc=90.0, **summary)
    assert report.main([str(sweep), "--no-plots", "--paper"]) == 0
    md = (sweep / "summary.md").read_text()
    # mwn: mean 75.50 - 75.21; erm: mean 69.50 - 70.36; the dataset (cifar10) and the noise
    # (none) are no override: they come from summary.json
    assert "| method | imbalance | seeds | final | paper | Δ | best |" in md
    assert "| mwn | 100 | 2 | 75.50 ± 2.12 | 75.21 | +0.29 | 90.00 ± 0.00 |" in md
    assert "| erm | 100 | 2 | 69.50 ± 2.12 | 70.36 | -0.86 | 90.00 ± 0.00 |" in md
    assert "| mwn | 30 | 2 | 60.00 ± 0.00 | - | - | 90.00 ± 0.00 |" in md
    assert "compared with final, not best" in md
    assert "| job | method | seed | imbalance | final | best |" in md  # jobs: no paper column
    groups = {(g["method"], g["imbalance"]): g for g in read_csv(sweep / "summary_seeds.csv")}
    assert list(groups[("mwn", "100")])[4:8] == [
        "final_test_acc",
        "final_test_acc_std",
        "paper_test_acc",
        "delta_to_paper",
    ]
    assert float(groups[("mwn", "100")]["paper_test_acc"]) == 75.21
    assert groups[("mwn", "100")]["delta_to_paper"] == "+0.29"
    assert groups[("erm", "100")]["delta_to_paper"] == "-0.86"
    assert groups[("mwn", "30")]["paper_test_acc"] == groups[("mwn", "30")]["delta_to_paper"] == ""
    jobs_csv = {r["job"]: r for r in read_csv(sweep / "summary.csv")}
    assert (jobs_csv["1"]["paper_test_acc"], jobs_csv["1"]["delta_to_paper"]) == ("75.21", "+1.79")
    assert jobs_csv["4"]["paper_test_acc"] == ""


def test_paper_columns_of_a_sweep_without_seeds_and_of_mixed_seeds(tmp_path):
    sweep = tmp_path / "flip"
    run = dict(dataset="cifar10", imbalance=1.0, noise="flip", noise_rate=0.4)
    fake_job(sweep, 0, ["method=mwn"], **run, method="mwn", final_test_acc=88.0)
    fake_job(sweep, 1, ["method=erm"], **run, method="erm", final_test_acc=70.0)
    fake_job(sweep, 2, ["method=erm", "dataset=cifar100"])  # unfinished
    text, _ = report.write_sweep_summary(sweep, with_paper=True)
    assert "| job | method | dataset | final | paper | Δ | best |" in text
    assert "| 0 | mwn |  | 88.00 | 87.54 | +0.46 | - |" in text
    assert "| 1 | erm |  | 70.00 | 70.77 | -0.77 | - |" in text
    assert "| 2 | erm | cifar100 | - | - | - | - |" in text
    # seeds of one row that ran different settings (here: defaults that changed) get no number
    mixed = tmp_path / "mixed"
    clean = dict(dataset="cifar10", noise="none", noise_rate=0.0, method="mwn")
    fake_job(mixed, 0, ["seed=0"], **clean, imbalance=100, final_test_acc=75.0)
    fake_job(mixed, 1, ["seed=1"], **clean, imbalance=50, final_test_acc=80.0)
    text, _ = report.write_sweep_summary(mixed, with_paper=True)
    assert "| 2 | 77.50 ± 3.54 | - | - |" in text


def test_without_paper_the_summary_has_no_paper_columns(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    run = dict(dataset="cifar10", imbalance=100, noise="none", noise_rate=0.0, method="mwn")
    for seed in (0, 1):
        fake_job(sweep, seed, [f"seed={seed}"], **run, final_test_acc=75.0)
    assert report.main([str(sweep), "--no-plots"]) == 0
    md = (sweep / "summary.md").read_text()
    assert "| paper | Δ |" not in md and "Δ" not in md and "Meta-Weight-Net" not in md
    for name in ("summary.csv", "summary_seeds.csv"):
        assert not set(report.PAPER_FIELDS) & set(read_csv(sweep / name)[0]), name
    with pytest.raises(SystemExit):  # a run folder has no table to compare
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "metrics.jsonl").write_text("")
        report.main([str(tmp_path / "run"), "--paper"])
    assert "--paper compares a sweep's table" in capsys.readouterr().err


def test_the_paper_is_compared_only_with_resnet32_runs():
    run = {"dataset": "cifar10", "imbalance": 100.0, "noise": "none", "method": "mwn"}
    assert report.published_acc({**run, "model": "resnet32"}) == 75.21
    assert report.published_acc(run) == 75.21  # summaries written before the model was recorded
    assert report.published_acc({**run, "model": "resnet8"}) is None
    assert report.published_acc({**run, "train_per_class": 500}) is None  # a smaller training set
    assert report.published_acc({**run, "train_per_class": None}) == 75.21
