"""The command line before Hydra starts: one line for a command that would fail (a renamed or
misspelt key, a bad group option or value, a launcher without -m, an output folder that cannot
be made, a torchrun line that cannot work), where Hydra's own messages span several lines.
Hydra's flags are read by Hydra's own parser, so every documented form works."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from mwn.config import ConfigError, check_config, register_schema, schema_keys
from mwn.run.ranks import Ranks

# keys of earlier releases: the command line names the key that replaced each
RENAMED = {
    "data.root": "dataset.root",
    "data.download": "dataset.download",
    "meta_size": "meta_per_class (the meta set is balanced: meta_size / classes per class)",
    "vmap.max_runs": "hydra.launcher.max_runs (with hydra/launcher=vmap)",
}
GROUPS = ("dataset", "model", "device", "logger", "meta_net", "experiment")


def parse_argv(argv: list[str]) -> tuple[argparse.Namespace | None, str | None]:
    """Hydra's own reading of the command line (its flags in every form: --cfg job, -c job,
    --info plugins, ...): (the parsed arguments, None), or (None, its complaint in one line),
    or (None, None) for --version, which Hydra answers itself."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def refuse(message: str):
        raise _ArgvError(message)

    parser.error = refuse  # type: ignore[method-assign]  (argparse would print usage, exit 2)
    if "--version" in argv:
        return None, None
    try:
        return parser.parse_args(argv), None
    except _ArgvError as e:
        return None, _flag_order(argv, parser) or str(e)


def _flag_order(argv: list[str], parser: argparse.ArgumentParser) -> str | None:
    """Hydra's flags (-m, --cfg job, ...) after an override: argparse reads the rest as unknown
    arguments; say which order it takes instead (each flag with its value, if it takes one)."""
    flags, overrides, late = [], [], None
    args = iter(argv)
    for arg in args:
        if not arg.startswith("-"):
            overrides.append(arg)
            continue
        late = late or (arg if overrides else None)
        action = parser._option_string_actions.get(arg)  # (argparse's table of its flags)
        takes_value = action is not None and action.nargs != 0 and "=" not in arg
        flags += [arg, next(args, "")] if takes_value else [arg]
    if late is None:
        return None
    return (
        f"{late} after the override {overrides[0]}: Hydra's flags come before the overrides "
        f"(python -m mwn.train {' '.join(filter(None, flags + overrides))})"
    )


class _ArgvError(Exception):
    pass


def config_dirs(args: argparse.Namespace, conf_dir: Path) -> list[Path] | None:
    """The folders configs are composed from: the shipped ones, then the user's (--config-dir,
    hydra.searchpath=[...] of plain folders or file:// URLs); None when a search path entry is
    not a folder (pkg://: its options are not listed here, Hydra checks them)."""
    dirs = [conf_dir]
    if args.config_dir:
        dirs.append(Path(args.config_dir).absolute())
    for o in args.overrides:
        key, _, value = o.lstrip("+").partition("=")
        if key != "hydra.searchpath":
            continue
        for entry in value.strip("[]").split(","):
            entry = entry.strip().strip("'\"")
            if entry.startswith("pkg://"):
                return None
            if entry:
                dirs.append(Path(entry.removeprefix("file://")).absolute())
    return dirs


INFO_ONLY = ("help", "hydra_help", "shell_completion")  # Hydra prints and exits: nothing to check


def check_command_line(argv: list[str], conf_dir: Path) -> str | None:
    """A one-line message for a command line that would fail, or None. Runs before Hydra, whose
    own messages for unknown options, misspelt keys and wrong types span several lines."""
    args, problem = parse_argv(argv)
    if args is None or any(getattr(args, flag) for flag in INFO_ONLY):
        return problem
    showing = args.cfg is not None or args.info is not None  # prints the config, runs nothing
    dirs = config_dirs(args, conf_dir)
    overrides = list(args.overrides)
    launchers = {p.stem for d in dirs or [] for p in (d / "hydra" / "launcher").glob("*.yaml")}
    for arg in overrides:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        if key in RENAMED:
            return f"{arg}: {key} was renamed; use {RENAMED[key]}"
        if arg.startswith("~") and not key.startswith("hydra"):
            return f"{arg}: a setting cannot be removed (every key is needed); set {key}=VALUE"
        free = key.startswith(("hydra", "model.args."))  # Hydra's own, a model's arguments
        added = arg.startswith("+") and key not in GROUPS and not free
        if added and key not in schema_keys():  # Hydra would add a misspelt key with + or ++
            return f"{arg}: Key '{key}' not in 'Config' (+ and ++ add no new settings)"
        if sep and key == "experiment" and not arg.startswith("+"):
            return f"{arg}: an experiment is added to the defaults; write +experiment={value}"
        if sep and key in GROUPS and dirs is not None:
            allowed = sorted({p.stem for d in dirs for p in (d / key).glob("*.yaml")})
            for v in value.split(","):
                if v not in allowed:
                    return f"{key}={v}: allowed values are {' | '.join(allowed)}"
        if sep and key == "hydra/launcher" and not args.multirun and not showing:
            return (
                f"{arg}: a launcher runs the jobs of a sweep; add -m (python -m mwn.train -m "
                "...), or leave it out for a single run"
            )
        if sep and key == "hydra/launcher" and (problem := _launcher_missing(value, launchers)):
            return f"{key}={value}: {problem}"
        if sep and key == "hydra.launcher.max_runs":
            for v in value.split(","):
                if not v.isdigit() or int(v) < 1:
                    return f"{key}={v}: allowed values are whole numbers >= 1"
        folder = sep and key in ("hydra.run.dir", "hydra.sweep.dir")
        if folder and not showing and (problem := _not_creatable(Path(value))):
            return f"{key}={value}: {problem}"
    chosen = any(a.partition("=")[0] in ("hydra.run.dir", "hydra.sweep.dir") for a in overrides)
    if not chosen and not showing and (problem := _not_creatable(Path("outputs"))):
        return f"output folder: {problem}"  # Hydra's default place
    if dirs is None:
        return None
    settings = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    if not args.multirun:
        full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"  # then train() raises, traced
        check_values = not (full_error or showing)
        return _composition_problem(settings, dirs, check_values=check_values)
    # a sweep: every value of every comma list is composed with the plain overrides (types,
    # names, keys) before the first job starts, each problem reported; values of the right
    # type but out of range become failed jobs' rows
    plain = [o for o in settings if len(_sweep_values(o)) == 1]
    problems = []
    for value in [v for o in settings if len(_sweep_values(o)) > 1 for v in _sweep_values(o)]:
        problem = _composition_problem([*plain, value], dirs)
        if problem and problem not in problems:
            problems.append(problem)
    return "\n".join(problems) or _composition_problem(plain, dirs)


def check_ranks(argv: list[str], ranks: Ranks) -> str | None:
    """A one-line message for a torchrun command line that cannot work, or None."""
    if ranks.torchrun and "hydra/launcher=vmap" in argv:
        return (
            "hydra/launcher=vmap under torchrun: torchrun trains one run; run a vectorised "
            "sweep in one process (python -m mwn.train -m ... hydra/launcher=vmap)"
        )
    if ranks.torchrun and any(a in ("-m", "--multirun") for a in argv):
        return (
            "-m/--multirun under torchrun: torchrun trains one run; sweep with one "
            "torchrun per job, or send the sweep's jobs to a cluster (hydra/launcher=slurm)"
        )
    return None


# what the ranks other than 0 give Hydra under torchrun: no run folder, config copy or log file
# of their own (rank 0's run folder is the run's; train() receives it from rank 0)
QUIET_RANK = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"]


def _sweep_values(override: str) -> list[str]:
    """key=a,b,c as [key=a, key=b, key=c]; other sweep syntax (range, choice, glob) and plain
    overrides as they are."""
    key, sep, value = override.partition("=")
    if not sep or "," not in value or any(c in value for c in "([{'\""):
        return [override]
    return [f"{key}={v}" for v in value.split(",")]


def _composition_problem(
    settings: list[str], conf_dirs: list[Path], check_values: bool = False
) -> str | None:
    """Hydra's first complaint about composing these overrides, in one line (None if none);
    with check_values, also check_config's, so that a bad value stops a run before Hydra
    writes anything into its folder. conf_dirs: the shipped configs, then the user's."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    extra = [f"hydra.searchpath=[{','.join(f'file://{d}' for d in conf_dirs[1:])}]"]
    try:
        register_schema()
        with initialize_config_dir(str(conf_dirs[0]), version_base="1.3"):
            cfg = compose("config", overrides=settings + (extra if conf_dirs[1:] else []))
        if check_values:
            check_config(cfg)
    except ConfigError as e:
        return str(e)
    except (HydraException, OmegaConfBaseException) as e:
        first = str(e.__cause__ or e).strip().splitlines()[0]  # e.g. Key 'x' not in 'Config'
        if choices := re.fullmatch(r"Invalid value '.*', expected one of \[(.*)\]", first):
            first = f"allowed values are {choices.group(1).replace(', ', ' | ')}"
        override = next((o for o in settings if o in str(e)), None)
        return f"{override}: {first}" if override else first
    return None


LAUNCHER_PLUGINS = {  # launcher option: (module, package, extra)
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher", "joblib"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher", "slurm"),
    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher", "slurm"),
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher", "slurm"),
}


def _launcher_missing(option: str, own: set[str] = frozenset()) -> str | None:
    """Why a Hydra launcher option cannot be used here (unknown, or its plugin not installed),
    or None; `own`: the launcher configs of the config folders in use."""
    import importlib.util

    if option not in LAUNCHER_PLUGINS:
        known = ("basic", *sorted({"vmap", *own} - set(LAUNCHER_PLUGINS)), *LAUNCHER_PLUGINS)
        if option in known:
            return None
        return f"allowed values are {' | '.join(known)}"
    module, package, extra = LAUNCHER_PLUGINS[option]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if found:
        return None
    return f"needs the {package} package (pip install 'mwn[{extra}]'); allowed without it: basic"


def _not_creatable(path: Path) -> str | None:
    """Why a folder could not be created at path (None if it can)."""
    p = path.absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        return f"cannot create a folder there: {p} is a file"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"cannot create a folder there: {p} is not writable"
    return None
