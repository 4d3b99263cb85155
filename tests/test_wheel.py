"""mwn as users install it: a wheel built from this checkout, installed into a fresh virtual
environment, runs the default command and a vectorised sweep from a folder outside the
repository (the configs and the launcher travel in the wheel); and the editable install the
README gives runs the same sweep from outside the repository. No network: the fresh
environment sees this one's dependencies (torch, Hydra, ...) through a .pth file, and the
wheel is installed without dependencies."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import ROOT

TINY = ["train_iters=4", "val_every=2", "log_every=2", "model.width=4"]


def _run(python: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    return subprocess.run(
        [python, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> str:
    """A fresh venv holding only the wheel of mwn; its dependencies come from this venv."""
    tmp = tmp_path_factory.mktemp("wheel")
    build = _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(tmp / "dist"),
        str(ROOT),
        cwd=tmp,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (tmp / "dist").glob("mwn-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp / "venv")], check=True)
    python = str(tmp / "venv" / "bin" / "python")
    install = _run(
        sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", str(wheel), cwd=tmp
    )
    assert install.returncode == 0, install.stdout + install.stderr
    purelib = _run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp)
    here = [sysconfig.get_path("purelib"), *site.getsitepackages()]
    (Path(purelib.stdout.strip()) / "deps.pth").write_text("\n".join(dict.fromkeys(here)) + "\n")
    return python


def test_the_wheel_carries_the_configs_and_the_launcher(wheel_env, tmp_path):
    r = _run(
        wheel_env,
        "-c",
        "import mwn, hydra_plugins.mwn_launcher as l; from mwn.config import CONF_DIR; "
        "print(mwn.__file__); print(l.__file__); print(CONF_DIR); "
        "print(sorted(p.name for p in (CONF_DIR / 'dataset').glob('*.yaml')))",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    mwn_file, launcher_file, conf_dir, datasets = r.stdout.splitlines()
    venv = str(Path(wheel_env).parent.parent)
    assert mwn_file.startswith(venv) and launcher_file.startswith(venv)
    assert conf_dir.startswith(venv) and conf_dir.endswith("mwn/conf")
    assert "digits.yaml" in datasets and "cifar10.yaml" in datasets


def test_the_wheel_runs_the_default_command_and_a_vmap_sweep_outside_the_repo(wheel_env, tmp_path):
    one = _run(wheel_env, "-m", "mwn.train", *TINY, cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    assert (
        one.stdout.strip()
        .splitlines()[-1]
        .startswith("mwn resnet8 on digits, long tail IF 20: final test acc")
    )
    assert len(list((tmp_path / "outputs").glob("*/*/summary.json"))) == 1
    _vmap_sweep(wheel_env, tmp_path)


def test_the_editable_install_runs_a_vmap_sweep_outside_the_repo(tmp_path):
    _vmap_sweep(sys.executable, tmp_path)


def _vmap_sweep(python: str, cwd: Path) -> None:
    """`python -m mwn.train -m seed=0,1 ... hydra/launcher=vmap` in cwd: one group of two runs,
    each job's summary and the sweep's table."""
    sweep = cwd / "sweep"
    r = _run(
        python,
        "-m",
        "mwn.train",
        "-m",
        "seed=0,1",
        *TINY,
        "hydra/launcher=vmap",
        f"hydra.sweep.dir={sweep}",
        cwd=cwd,
    )
    assert r.returncode == 0, r.stderr
    assert "vectorised group 1 of 1: 2 runs" in r.stderr + r.stdout
    assert (sweep / "0" / "summary.json").is_file() and (sweep / "1" / "summary.json").is_file()
    assert "2 jobs: 2 done" in (sweep / "summary.md").read_text()
