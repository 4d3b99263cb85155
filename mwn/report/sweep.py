"""Reports from what runs wrote to disk: the sweep summary table and each run's plots.

`python -m mwn.report PATH` (re)builds them for a run folder or a sweep folder, so old results
can be compared without re-training; Hydra calls `SweepSummary` when a multirun ends.

A job's row comes from its folder: `.hydra/overrides.yaml` (what the job changed),
`summary.json` (a finished job) or `error.json` (a failed one, written by mwn.train).

With `--paper`, the final test accuracy is set beside the published one (mwn.report.paper) for the
dataset, imbalance or label noise and method that each job's summary.json names.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mwn.report import paper
from mwn.run.files import ERROR, METRICS, OVERRIDES, SUMMARY, current_names

log = logging.getLogger(__name__)


ACCURACIES = (
    "final_test_acc",
    "best_test_acc",
    "final_many_acc",
    "final_medium_acc",
    "final_few_acc",
)
HEADS = {
    "final_test_acc": "final",
    "best_test_acc": "best",
    "final_many_acc": "many",
    "final_medium_acc": "medium",
    "final_few_acc": "few",
    "final_test_balanced_acc": "balanced",
    "final_noise_auc": "noise AUC",
}
# shown when some job has them: balanced accuracy (runs of this release on), noise AUC
# (label-noise runs of MWN)
OPTIONAL = ("final_test_balanced_acc", "final_noise_auc")
# what a job ran, from its summary.json (defaults included): the key of the published accuracy
RUN_KEYS = ("dataset", "model", "imbalance", "train_per_class", "noise", "noise_rate", "method")
PAPER_FIELDS = ("paper_test_acc", "delta_to_paper")  # CSV columns with --paper
PAPER_NOTE = (
    "paper: the published final test accuracy of Shu et al., NeurIPS 2019 (Meta-Weight-Net, "
    "ResNet32: Table 1, and flip noise on CIFAR-10) for the dataset, imbalance or label noise "
    "and method of the runs (their summary.json); Δ = our final minus paper. The paper reports "
    "the accuracy at the end of training, so it is compared with final, not best; "
    "- where it has no such number (or the seeds of a row ran different settings)."
)


def shown(rows: list[dict]) -> tuple[str, ...]:
    """The summary fields of the table: the accuracies, and the optional ones some job has."""
    return ACCURACIES + tuple(k for k in OPTIONAL if any(r.get(k) is not None for r in rows))


def read_job(folder: Path) -> dict:
    """One row: job, overrides {key: value}, status (done | failed | unfinished), error, and the
    accuracies and wall time of summary.json."""
    overrides_file = folder / OVERRIDES
    overrides = list(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
    row: dict = {"job": folder.name, "folder": str(folder), "status": "unfinished", "error": ""}
    row["overrides"] = dict(o.partition("=")[::2] for o in overrides)
    if (folder / ERROR).is_file():
        row.update(status="failed", error=json.loads((folder / ERROR).read_text())["error"])
    elif (folder / SUMMARY).is_file():
        summary = current_names(json.loads((folder / SUMMARY).read_text()))
        row.update(status="done", wall_time_s=summary["wall_time_s"])
        row.update({k: summary.get(k) for k in ACCURACIES + OPTIONAL})
        row["run"] = {k: summary.get(k) for k in RUN_KEYS}
    return row


def published_acc(run: dict | None) -> float | None:
    """The paper's accuracy for a job's or seed group's `run` (RUN_KEYS), or None. Summaries
    written before label noise existed have no noise keys: clean labels."""
    if not run or None in (run.get("dataset"), run.get("imbalance"), run.get("method")):
        return None
    if (run.get("model") or "resnet32") != "resnet32":  # the paper's numbers are ResNet32's
        return None
    if run.get("train_per_class") is not None:  # the paper trained on the whole split
        return None
    noise, rate = run.get("noise") or "none", run.get("noise_rate") or 0.0
    return paper.published(run["dataset"], run["imbalance"], noise, rate, run["method"])


def _delta(final: float | None, published: float | None) -> str | None:
    """Our final minus the published accuracy, 2 decimals with its sign (as the paper's)."""
    return None if final is None or published is None else f"{final - published:+.2f}"


def paper_fields(final: float | None, run: dict | None) -> dict:
    """The CSV columns of --paper: the published accuracy and our final minus it; empty where
    either is missing."""
    published = published_acc(run)
    return {"paper_test_acc": published or "", "delta_to_paper": _delta(final, published) or ""}


def _paper_cells(final: float | None, run: dict | None) -> list[str]:
    """The table's paper and Δ cells: `-` where there is no number."""
    published = published_acc(run)
    return [_value("paper", published), _delta(final, published) or "-"]


def job_folders(sweep: Path) -> list[Path]:
    """The job folders of a sweep folder, in job order."""
    jobs = [p.parent.parent for p in sweep.glob(f"*/{OVERRIDES}")]
    return sorted(
        jobs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name)
    )


def is_sweep(path: Path) -> bool:
    return bool(job_folders(path)) and not (path / METRICS).exists()


def sweep_rows(sweep: Path) -> tuple[list[dict], dict, list[str]]:
    """Rows sorted by final accuracy (failed and unfinished jobs last), the overrides common to
    all jobs, and the keys that vary between them."""
    rows = [read_job(f) for f in job_folders(sweep)]
    keys = list(dict.fromkeys(k for r in rows for k in r["overrides"]))
    values = {k: {r["overrides"].get(k) for r in rows} for k in keys}
    common = {k: next(iter(v)) for k, v in values.items() if len(v) == 1 and None not in v}
    varying = [k for k in keys if k not in common]
    rows.sort(key=lambda r: (r["status"] != "done", -(r.get("final_test_acc") or 0.0)))
    return rows, common, varying


def seed_groups(rows: list[dict], varying: list[str]) -> list[dict]:
    """Rows that differ only in `seed`, as mean and sample std (n-1) of each accuracy and the wall
    time over their finished jobs; sorted by mean final accuracy. Empty without a seed sweep."""
    if "seed" not in varying:
        return []
    others = [k for k in varying if k != "seed"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] == "done":
            groups.setdefault(tuple(r["overrides"].get(k) for k in others), []).append(r)
    out = []
    for key, members in groups.items():
        g = {"overrides": dict(zip(others, key)), "seeds": len(members)}
        g["seed_values"] = sorted((m["overrides"]["seed"] for m in members), key=_natural)
        runs = [m.get("run") for m in members]
        g["run"] = runs[0] if all(r == runs[0] for r in runs) else None  # None: seeds differ
        for k in (*shown(rows), "wall_time_s"):
            xs = [m[k] for m in members if m.get(k) is not None]
            g[k] = statistics.mean(xs) if xs else None
            g[k + "_std"] = statistics.stdev(xs) if len(xs) > 1 else None
        out.append(g)
    return sorted(out, key=lambda g: -(g["final_test_acc"] or 0.0))


def _natural(text: str) -> tuple:
    return (0, int(text), "") if text.lstrip("-").isdigit() else (1, 0, text)


def _value(key: str, value: float | None, std: float | None = None) -> str:
    """Accuracies (%) with 2 decimals, AUCs (0..1) with 3."""
    if value is None:
        return "-"
    d = 3 if key.endswith("auc") else 2
    return f"{value:.{d}f}" if std is None else f"{value:.{d}f} ± {std:.{d}f}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _with_paper(cells: list, paper_cells: list[str] | None) -> list:
    """Table cells with paper and Δ after the first accuracy (final), when asked."""
    return cells if paper_cells is None else [*cells[:1], *paper_cells, *cells[1:]]


def markdown(
    sweep: Path, rows: list[dict], common: dict, varying: list[str], with_paper: bool = False
) -> str:
    """summary.md; with_paper: paper and Δ columns beside final, in the seed table of a seed
    sweep, else in the job table."""
    done = sum(r["status"] == "done" for r in rows)
    lines = [
        f"# Sweep {sweep}",
        "",
        f"{len(rows)} jobs: {done} done, {sum(r['status'] == 'failed' for r in rows)} failed, "
        f"{sum(r['status'] == 'unfinished' for r in rows)} unfinished. Test accuracy (%), "
        "sorted by final accuracy; many/medium/few: final accuracy of the classes with "
        "> 100, 20-100, < 20 training images.",
        "",
    ]
    fields = shown(rows)
    if "final_noise_auc" in fields:
        lines[-2] += (
            " noise AUC: how well the final meta-net's weight tells clean from corrupted "
            "training labels (0.5: not at all, 1: perfectly)."
        )
    groups = seed_groups(rows, varying)
    if with_paper:
        lines += [PAPER_NOTE, ""]
    if common:
        lines += ["Common: " + " ".join(f"`{k}={v}`" for k, v in common.items()), ""]
    jobs_paper = with_paper and not groups
    accs_head = [HEADS[k] for k in fields]
    head = ["job", *varying, *_with_paper(accs_head, ["paper", "Δ"] if jobs_paper else None)]
    head += ["time (s)", "status"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        status = r["status"] if r["status"] != "failed" else f"failed: {r['error']}"
        time_s = f"{r['wall_time_s']:.0f}" if r.get("wall_time_s") is not None else "-"
        accs = [_value(k, r.get(k)) for k in fields]
        paper_cells = _paper_cells(r.get("final_test_acc"), r.get("run")) if jobs_paper else None
        cells = [
            r["job"],
            *(r["overrides"].get(k, "") for k in varying),
            *_with_paper(accs, paper_cells),
            time_s,
            status,
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    if groups:
        others = [k for k in varying if k != "seed"]
        paper_head = ["paper", "Δ"] if with_paper else None
        head = [*others, "seeds", *_with_paper(accs_head, paper_head), "time (s)"]
        lines += [
            "",
            "## Across seeds (mean ± sample std over the finished seeds)",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        for g in groups:
            accs = [_value(k, g[k], g[k + "_std"]) for k in fields]
            paper_cells = _paper_cells(g["final_test_acc"], g["run"]) if with_paper else None
            cells = [
                *(g["overrides"][k] for k in others),
                g["seeds"],
                *_with_paper(accs, paper_cells),
                f"{g['wall_time_s']:.0f}",
            ]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_sweep_summary(sweep: Path, with_paper: bool = False) -> tuple[str, list[dict]]:
    """Write summary.csv, summary.md (and summary_seeds.csv for a seed sweep) into the sweep
    folder; returns the markdown and the rows. with_paper: the published accuracy and our final
    minus it (PAPER_FIELDS) after final_test_acc in both CSVs, and in summary.md (`markdown`)."""
    rows, common, varying = sweep_rows(sweep)
    metrics = shown(rows)
    accs = _with_paper(list(metrics), list(PAPER_FIELDS) if with_paper else None)
    fields = ["job", *varying, "status", *accs, "wall_time_s", "overrides", "error", "folder"]
    with open(sweep / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            overrides = " ".join(f"{k}={v}" for k, v in r["overrides"].items())
            paper_cols = paper_fields(r.get("final_test_acc"), r.get("run")) if with_paper else {}
            w.writerow(
                {
                    **r,
                    **{k: r["overrides"].get(k, "") for k in varying},
                    "overrides": overrides,
                    **paper_cols,
                }
            )
    groups = seed_groups(rows, varying)
    if groups:
        others = [k for k in varying if k != "seed"]
        stats = [s for k in (*metrics, "wall_time_s") for s in (k, k + "_std")]
        columns = stats[:2] + (list(PAPER_FIELDS) if with_paper else []) + stats[2:]
        with open(sweep / "summary_seeds.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[*others, "seeds", "seed_values", *columns])
            w.writeheader()
            for g in groups:
                w.writerow(
                    {
                        **g["overrides"],
                        **{k: g[k] for k in ("seeds", *stats)},
                        "seed_values": " ".join(g["seed_values"]),
                        **(paper_fields(g["final_test_acc"], g["run"]) if with_paper else {}),
                    }
                )
    text = markdown(sweep, rows, common, varying, with_paper)
    (sweep / "summary.md").write_text(text)
    return text, rows


def plot_run_or_note(folder: Path) -> list[Path]:
    """The run's plots, or a logged note (and none) when matplotlib is not installed or a figure
    fails."""
    try:
        from mwn.report.plots import plot_run
    except ImportError:
        log.warning("plots skipped: matplotlib is not installed (pip install -e '.[plot]')")
        return []
    try:
        return plot_run(folder)
    except Exception as e:  # a figure must never cost a finished run its result
        log.warning("plots skipped: %s: %s", type(e).__name__, e)
        return []


class SweepSummary(Callback):
    """Hydra callback: when a multirun ends, write and print the sweep's summary; exit 1 (after
    writing it) if any job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        text, rows = write_sweep_summary(sweep)
        print(text, flush=True)
        failed = [r for r in rows if r["status"] == "failed"]
        if failed:
            print(
                f"mwn: {len(failed)} of {len(rows)} jobs failed; see {sweep / 'summary.md'}",
                file=sys.stderr,
            )
            sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mwn.report",
        description="Rebuild the plots of a run folder, or the plots of every job and the "
        "summary table (summary.csv, summary.md) of a sweep folder.",
    )
    parser.add_argument("path", type=Path, help="a run folder or a sweep folder")
    parser.add_argument("--no-plots", action="store_true", help="only the summary table")
    parser.add_argument(
        "--paper",
        action="store_true",
        help="a sweep's tables also show the published final test accuracy (MWN paper, "
        "ResNet32) for each row's dataset, imbalance or noise and method, and our final minus it",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = args.path
    if not path.is_dir():
        parser.error(f"{path}: no such folder")
    if is_sweep(path):
        runs = job_folders(path)
    elif (path / METRICS).is_file():
        runs = [path]
    else:
        parser.error(
            f"{path}: neither a run folder (metrics.jsonl) nor a sweep folder "
            "(job folders with .hydra/overrides.yaml)"
        )
    if args.paper and runs == [path]:
        parser.error(f"--paper compares a sweep's table; {path} is a run folder")
    if args.no_plots:
        print(f"{path}: plots not rebuilt (--no-plots)")
    else:
        for run in runs:
            if (run / METRICS).is_file():
                for p in plot_run_or_note(run):
                    print(p)
    if runs == [path]:  # a run folder: its result, or that it has none yet
        from mwn.run.files import result_line

        if (path / SUMMARY).is_file():
            print(result_line(current_names(json.loads((path / SUMMARY).read_text()))))
        else:
            print(f"{path}: no {SUMMARY} yet (the run has not finished)")
    else:
        text, _ = write_sweep_summary(path, with_paper=args.paper)
        print(text)
        print(path / "summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
