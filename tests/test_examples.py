"""The examples run as a user runs them, with tiny settings, so that they cannot go stale."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run_example(name: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_own_loop_trains_a_torchvision_resnet18_on_a_long_tailed_folder(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for name, count in (("cat", 30), ("dog", 16), ("owl", 12)):  # long-tailed
        folder = tmp_path / "data" / "train" / name
        folder.mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
            pil.fromarray(pixels).save(folder / f"{i}.png")
    out = run_example("own_loop.py", str(tmp_path / "data"), "3", cwd=tmp_path)
    assert re.search(r"iter 3  loss \d+\.\d+  meta loss \d+\.\d+", out)
    weights = torch.load(tmp_path / "resnet18_mwn.pt")
    assert weights["fc.weight"].shape == (3, 512)


def test_vmap_seeds_trains_each_run_as_it_would_alone(tmp_path):
    """The example's per-run losses equal runs of the same step, one at a time."""
    import mwn
    from mwn.core.models import ResNet

    out = run_example("vmap_seeds.py", "2", "2", cwd=tmp_path)
    vmapped = [eval(line.split("per run ")[1]) for line in out.splitlines()]
    torch.set_num_threads(1)
    hp = mwn.hyperparams(meta_lr=1e-3)
    for seed in range(2):
        torch.manual_seed(seed)
        model, meta_net = ResNet(10, depth=32, width=16), mwn.MetaNet(100, init="flat")
        state, step = mwn.init_state(model, meta_net, hp), mwn.step_fn(model, meta_net, hp)
        gen = torch.Generator().manual_seed(0)
        for it in range(2):
            x = torch.randn(100, 3, 32, 32, generator=gen)
            y = torch.randint(0, 10, (100,), generator=gen)
            xm = torch.randn(100, 3, 32, 32, generator=gen)
            ym = torch.randint(0, 10, (100,), generator=gen)
            state, metrics = step(state, (x, y), (xm, ym), 0.1)
            assert abs(float(metrics["loss"]) - vmapped[it][seed]) <= 1.5e-3
