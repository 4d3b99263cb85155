"""scripts/gpu_check.py, the one script of every GPU measurement, run in its CPU mode (--tiny)
so that it cannot rot while no GPU is at hand."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_the_gpu_check_script_runs_its_steps_on_the_cpu(tmp_path):
    """scripts/gpu_check.py --tiny: every step (tests, bench, the Table 1 sweep) at toy sizes."""
    script = ROOT / "scripts" / "gpu_check.py"
    out = subprocess.run(
        [sys.executable, str(script), "--tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["tests"]["returncode"] == 0 and report["table1"]["returncode"] == 0
    assert sorted((r["method"], r["seed"]) for r in report["table1"]["runs"]) == [
        (m, s) for m in ("erm", "mwn") for s in (0, 1, 2)
    ]
    assert set(report["bench"]) == {"fp32", "bf16"}
    assert all(r["returncode"] == 0 for r in report["bench"].values())
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| fp32 | mwn | 2 |" in table and "| erm | 3 |" in table
