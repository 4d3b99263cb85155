"""Every command and Python snippet in README.md and docs/ runs, so the documentation cannot go
stale; and what the docs list (settings, run-folder keys, renames, the API) is complete.

A fenced `bash` or `python` block runs unless the line above it marks it
(`<!-- example: MARK -->`): `gpu` (needs CUDA), `download` (needs data from the network),
`cluster` (several machines, SLURM), `install` (installs packages), `ci` (what the CI run
itself runs: the quick start's installs and the test suite). The
`python -m mwn.train` commands of a marked block are still composed and checked as the command
line checks them, every sweep value included. In a block that runs, each command runs in order
in one empty folder, as a user types it, except for these stand-ins:
- data: `dataset.root` points to a tiny copy of that dataset in its real on-disk format
  (written here), `dataset.download=true` becomes false;
- the schedule is cut to four iterations (a schedule in epochs too) of small batches, and a
  built-in model to 4 channels;
- a sweep (`-m`) composes and checks all its values, then runs its first job: as a sweep
  (Hydra's multirun, in a child) when it names a launcher or a report reads it, else alone;
- placeholders: `seed=S` is 0, `method=METHOD` is mwn, `a|b` is a, an `OMP_NUM_THREADS=1`
  prefix is dropped.
Single runs train in this process (`mwn.run.launch.train`), sweeps and torchrun in a child.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from mwn.cli import RENAMED, check_command_line
from mwn.config import CONF_DIR, Config
from mwn.run.files import OLD_NAMES

from conftest import ROOT, make_cfg, write_cifar, write_idx

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKS = {"gpu", "download", "cluster", "install", "ci"}
BLOCK = re.compile(
    r"(?:<!-- example: (?P<mark>[\w ]+) -->\n)?^```(?P<lang>bash|python)\n(?P<body>.*?)^```",
    re.S | re.M,
)
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def blocks() -> list[tuple[str, str, str, str]]:
    """(id, mark, language, body) of every bash and python block of the docs."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for m in BLOCK.finditer(text):
            line = text[: m.start("lang")].count("\n") + 1
            name = f"{page.relative_to(ROOT)}:{line}"
            found.append((name, m.group("mark") or "", m.group("lang"), m.group("body")))
    return found


def commands(body: str) -> list[list[str]]:
    """A bash block's commands as argument lists: continuations joined, comments dropped."""
    out = []
    for line in body.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(words)
    return out


def stand_in(words: list[str]) -> list[str]:
    """The placeholders and a thread-count prefix replaced (see the module docstring)."""
    words = [w for w in words if w != "OMP_NUM_THREADS=1"]
    out = []
    for w in words:
        w = {"seed=S": "seed=0", "method=METHOD": "method=mwn"}.get(w, w)
        key, sep, value = w.partition("=")
        if sep and "|" in value and not key.startswith("hydra"):
            w = f"{key}={value.split('|')[0]}"
        out.append(w)
    return out


BLOCKS = blocks()


def test_the_docs_have_blocks_and_every_mark_is_known():
    assert len(BLOCKS) > 20
    unknown = {(name, mark) for name, mark, _, _ in BLOCKS if mark and mark not in MARKS}
    assert not unknown, f"marks must be one of {sorted(MARKS)}: {unknown}"


@pytest.mark.parametrize(
    "name,body", [(n, b) for n, m, lang, b in BLOCKS if m and lang == "bash"], ids=lambda v: v
)
def test_a_marked_blocks_training_commands_compose(name, body):
    for words in commands(body):
        if "mwn.train" not in words or any("$" in w for w in words):
            continue
        argv = stand_in(words[words.index("mwn.train") + 1 :])
        problem = check_command_line(
            [a for a in argv if not a.startswith("hydra.run.dir=/")], CONF_DIR
        )
        assert problem is None, f"{name}: {' '.join(words)}: {problem}"


# --- the tiny data, in each dataset's own format -------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    from PIL import Image

    base = tmp_path_factory.mktemp("docs-data")
    roots = {}
    roots["cifar10"] = base / "cifar10"
    write_cifar(roots["cifar10"], "cifar10", per_class=250)
    roots["cifar100"] = base / "cifar100"
    write_cifar(roots["cifar100"], "cifar100", per_class=120, test_per_class=1)
    raw = base / "fashion" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 120)
    write_idx(raw / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (1200, 28, 28)))
    write_idx(raw / "train-labels-idx1-ubyte.gz", labels)
    write_idx(raw / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (30, 28, 28)))
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.repeat(np.arange(10), 3))
    roots["fashion_mnist"] = base / "fashion"
    roots["image_folder"] = base / "folder"
    for split, n in (("train", 120), ("test", 4)):
        for c, name in enumerate(("cat", "dog", "owl")):
            folder = roots["image_folder"] / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = (60 * c + rng.integers(0, 80, (32, 32, 3))).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return roots


def tiny(settings: list[str], data: dict[str, Path]) -> list[str]:
    """The command's settings with its data and schedule replaced by tiny ones."""
    settings = [s.replace("dataset.download=true", "dataset.download=false") for s in settings]
    plain = [s for s in settings if not s.startswith(("hydra", "-"))]
    cfg = make_cfg(*[_first(s) for s in plain])
    root = data.get(str(cfg.dataset.name))
    out = [s for s in settings if not s.startswith("dataset.root=")]
    if root is not None:
        out.append(f"dataset.root={root}")
    if cfg.epochs is not None:  # a schedule in epochs: the same in a few iterations
        out += ["epochs=null", "lr_epochs=null"]
    if cfg.meta_start_epoch is not None:
        out += ["meta_start_epoch=null", "meta_start=2"]
    elif cfg.meta_start > 0:
        out += ["meta_start=2"]
    out += ["train_iters=4", "lr_milestones=[2]", "val_every=2", "log_every=2"]
    out += ["batch_size=16", "meta_batch_size=16"]
    out += ["eval_batch_size=100", "progress=none"]
    if cfg.model._target_ is None:
        out.append("model.width=4")
    return out


def _first(setting: str) -> str:
    key, sep, value = setting.partition("=")
    if sep and "," in value and not value.startswith("["):
        return f"{key}={value.split(',')[0]}"
    return setting


def in_a_child(module_and_args: list[str], cwd: Path, what: str) -> None:
    """`python -m MODULE ARGS` in a fresh process; it must succeed."""
    proc = subprocess.run(
        [sys.executable, "-m", *module_and_args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{what}\n{proc.stderr[-3000:]}"


def run_command(
    words: list[str], cwd: Path, data: dict[str, Path], name: str, report_follows: bool
) -> None:
    if words[:3] == ["python", "-m", "mwn.train"]:
        argv = words[3:]
        assert check_command_line(argv, CONF_DIR) is None, check_command_line(argv, CONF_DIR)
        launcher = any(a.startswith("hydra/launcher=") for a in argv)
        if "-m" in argv and (launcher or report_follows):  # its first job, as a sweep
            args = [_first(a) for a in tiny([a for a in argv if a != "-m"], data)]
            args += ["hydra.sweep.dir=outputs/multirun/DATE/TIME"]  # a new one each time
            shutil.rmtree(cwd / "outputs" / "multirun", ignore_errors=True)
            return in_a_child(["mwn.train", "-m", *args], cwd, f"{name}: {' '.join(words)}")
        from mwn.run.launch import train

        argv = [_first(a) for a in argv if a != "-m"]  # a sweep on its own: its first job
        folder = next((a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")), None)
        settings = [a for a in tiny(argv, data) if not a.startswith("hydra")]
        out = cwd / (folder or f"outputs/run-{len(list(cwd.glob('outputs/run-*')))}")
        summary = train(make_cfg(*settings), out)
        assert summary["iterations"] > 0 and (out / "summary.json").is_file()
    elif words[:2] == ["python", "-m"]:  # the other entry points: in this process
        module = {"mwn.report": "mwn.report.sweep"}.get(words[2], words[2])
        main = __import__(module, fromlist=["main"]).main
        assert main(words[3:]) == 0, f"{name}: {' '.join(words)}"
    elif words[0] == "torchrun":
        args = tiny(words[words.index("mwn.train") + 1 :], data) + ["hydra.run.dir=tr"]
        head = words[: words.index("-m")]
        module = ["torch.distributed.run", *head[1:], "-m", "mwn.train", *args]
        in_a_child(module, cwd, f"{name}: {' '.join(words)}")
    else:
        pytest.fail(f"{name}: `{' '.join(words)}`: no way to run it here; mark the block")


def prepare(cwd: Path, data: dict[str, Path]) -> None:
    """What the docs' commands take as given: a user's module, images to predict."""
    (cwd / "my_pkg").mkdir()
    (cwd / "my_pkg" / "__init__.py").write_text("")
    (cwd / "my_pkg" / "nets.py").write_text(
        "import torch.nn as nn\n\n\n"
        "class MyNet(nn.Sequential):\n"
        "    def __init__(self, num_classes=10, width=8):\n"
        "        super().__init__(nn.Conv2d(3, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
        "                         nn.Flatten(), nn.Linear(width, num_classes))\n"
    )
    test = data["image_folder"] / "test"
    (cwd / "new_images").symlink_to(test / "cat")
    (cwd / "photo.jpg").write_bytes((test / "dog" / "0.png").read_bytes())
    (cwd / "my_set").symlink_to(data["image_folder"])


@pytest.mark.parametrize(
    "name,lang,body", [(n, lang, b) for n, m, lang, b in BLOCKS if not m], ids=lambda v: v[:40]
)
def test_a_block_runs(name, lang, body, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    prepare(tmp_path, data)
    if lang == "python":
        proc = subprocess.run(
            [sys.executable, "-c", body], cwd=tmp_path, env=ENV, capture_output=True, text=True
        )
        assert proc.returncode == 0, f"{name}\n{proc.stderr[-3000:]}"
        return
    todo = commands(body)
    for i, words in enumerate(todo):
        report_follows = any(w[:3] == ["python", "-m", "mwn.report"] for w in todo[i + 1 :])
        run_command(stand_in(words), tmp_path, data, name, report_follows)


# --- what the docs list is complete ---------------------------------------------------------


def test_the_settings_table_covers_the_schema_and_each_setting_says_what_it_does():
    sys.path.insert(0, str(ROOT / "docs"))
    import hooks

    rows = hooks.settings()
    names = [r[0] for r in rows]
    groups = {f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.type)}
    groups |= hooks.GROUPS
    top = [f.name for f in dataclasses.fields(Config) if f.name not in groups]
    assert set(top) <= set(names)
    assert "dataset.root" in names and "meta_net.init" in names
    assert [r[0] for r in rows if not r[3]] == [], "a setting without a comment"
    assert "<!-- settings table -->" in (ROOT / "docs" / "configuration.md").read_text()


def test_the_run_folder_page_names_every_key_a_run_writes(tmp_path):
    """A label-noise run with a validation set writes the most keys; each is documented."""
    from mwn.run.launch import train

    cfg = make_cfg("train_iters=4", "val_every=2", "log_every=2", "model.width=4", "imbalance=1")
    cfg = OmegaConf.merge(cfg, {"noise": "uniform", "noise_rate": 0.4, "val_per_class": 5})
    train(cfg, tmp_path)
    keys = set(json.loads((tmp_path / "summary.json").read_text()))
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        keys |= set(json.loads(line))
    page = (ROOT / "docs" / "running.md").read_text()
    missing = sorted(k for k in keys if f"`{k}`" not in page)
    assert not missing, f"docs/running.md does not name {missing}"


def test_the_changelog_lists_every_rename():
    text = (ROOT / "CHANGELOG.md").read_text()
    for old, new in {**RENAMED, **OLD_NAMES}.items():
        assert f"| `{old}` | `{new.split(' ')[0]}`" in text, old


def test_the_api_page_documents_every_public_name_and_each_has_a_docstring():
    import mwn

    page = (ROOT / "docs" / "api.md").read_text()
    documented = re.findall(r"^::: ([\w.]+)", page, re.M)
    for name in mwn.__all__:
        assert any(d.rsplit(".", 1)[-1] == name for d in documented), f"{name} not in docs/api.md"
    for target in documented:
        module, _, attr = target.rpartition(".")
        obj = getattr(__import__(module, fromlist=[attr]), attr)
        if callable(obj):
            assert (obj.__doc__ or "").strip(), f"{target} has no docstring"


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert 150 <= len(lines) <= 250
