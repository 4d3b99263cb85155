"""The package's layers, read from the source: each module imports only what its layer stands on.

    mwn.core     one iteration as pure functions     -> core only
    mwn.data     files to device batches             -> core, data, seeds
    mwn.run      one run or a group, and its folder  -> core, data, run, seeds, config
    mwn.report   reading run folders back            -> report, and run.files (the vocabulary)
    mwn.config   the typed schema and checks         -> the registries of core and data
    mwn.cli      argv before Hydra                   -> config, run.ranks
    mwn.api      the library                         -> core, api, config (its defaults)
Every import of an mwn module counts, at any depth (a lazy import inside a function too).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mwn"

# layer (a module or a package, dotted) -> what it may import (prefixes, dotted)
ALLOWED = {
    "mwn.core": ("mwn.core",),
    "mwn.data": ("mwn.core", "mwn.data", "mwn.seeds"),
    "mwn.run": ("mwn.core", "mwn.data", "mwn.run", "mwn.seeds", "mwn.config"),
    "mwn.report": ("mwn.report", "mwn.run.files"),
    "mwn.config": ("mwn.core", "mwn.data"),
    "mwn.cli": ("mwn.config", "mwn.run.ranks"),
    "mwn.seeds": (),
    "mwn.api": ("mwn.core", "mwn.api", "mwn.config"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def mwn_imports(path: Path) -> list[str]:
    """Every mwn module the file imports (`from mwn.x import y` counts as mwn.x.y when y is a
    module, else mwn.x)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.split(".")[0] == "mwn"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "mwn":
                continue
            for a in node.names:
                sub = PACKAGE.parent / (node.module + "." + a.name).replace(".", "/")
                is_module = sub.with_suffix(".py").is_file() or sub.is_dir()
                out.append(f"{node.module}.{a.name}" if is_module else node.module)
    return out


def layer_of(module: str) -> str | None:
    return next((k for k in ALLOWED if module == k or module.startswith(k + ".")), None)


def inside(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if layer_of(module_name(p)))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_each_module_imports_only_what_its_layer_stands_on(path):
    name = module_name(path)
    allowed = ALLOWED[layer_of(name)]
    wrong = [m for m in mwn_imports(path) if not inside(m, allowed)]
    assert not wrong, f"{name} imports {wrong}; its layer may import only {allowed}"


def test_every_layer_has_its_modules_and_the_check_sees_a_violation(tmp_path):
    # the layers exist, so that an empty glob cannot pass the test above
    names = {module_name(p) for p in SOURCES}
    for layer in ("mwn.core.meta", "mwn.data.readers", "mwn.run.loop", "mwn.report.sweep"):
        assert layer in names
    # and the reader finds imports in every form, lazy ones included
    bad = tmp_path / "mod.py"
    bad.write_text(
        "from mwn.run import checkpoint\nimport mwn.report.plots\n"
        "def f():\n    from mwn.config import ConfigError\n"
    )
    found = mwn_imports(bad)
    assert found == ["mwn.run.checkpoint", "mwn.report.plots", "mwn.config"]
    assert [m for m in found if not inside(m, ALLOWED["mwn.core"])] == found


def test_train_is_only_the_entry():
    """mwn/train.py defines no machinery: the Ctrl-C hook of start-up, the Hydra main, the
    group's finishing note and the launcher's registration, nothing else."""
    tree = ast.parse((PACKAGE / "train.py").read_text())
    defined = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert defined == ["_ctrl_c", "main", "finished_job", "register_launcher"]
    assert len((PACKAGE / "train.py").read_text().splitlines()) < 120
