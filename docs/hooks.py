"""MkDocs hook: the Configuration page's table of every setting, generated at build time from
the typed schema (mwn/config.py: names, types, allowed values), the default run's composed
config (defaults) and the comments beside each key (conf/config.yaml for the top-level keys,
the schema's for the keys of a group), so that the page cannot drift from the code."""

from __future__ import annotations

import dataclasses
import enum
import re
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARK = "<!-- settings table -->"
GROUPS = {"dataset", "model", "device", "logger", "meta_net"}


def yaml_comments(path: Path) -> dict[str, str]:
    """key -> its comment (continuation lines joined) for the top-level keys of a config file."""
    comments: dict[str, str] = {}
    key = None
    for line in path.read_text().splitlines():
        if line.startswith("hydra:"):
            break
        if m := re.match(r"(\w+):[^#]*#\s?(.*)", line):
            key = m.group(1)
            comments[key] = m.group(2).strip()
        elif (m := re.match(r" {16,}#\s?(.*)", line)) and key:
            comments[key] += " " + m.group(1).strip()
        else:
            key = None
    return comments


def schema_comments(source: str, cls: str) -> dict[str, str]:
    """field -> the comment beside it in a schema dataclass's source."""
    body = source.split(f"class {cls}:", 1)[1].split("\n\n\n", 1)[0]
    out = {}
    for m in re.finditer(r"^    (\w+): [^#\n]*#[ \t]?(?:noqa: UP045[ \t]*)?(.*)$", body, re.M):
        out[m.group(1)] = m.group(2).strip()
    return out


def type_name(tp) -> str:
    """A schema type as the page shows it: int, float, bool, a | b | c (a choice), list[int]."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return f"{type_name(inner[0])} or null"
    if origin is list:
        return f"list[{type_name(args[0])}]"
    if origin is dict:
        return "mapping"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " \\| ".join(f"`{m.value}`" for m in tp)
    return getattr(tp, "__name__", str(tp))


def shown(value) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value == "???":
        return "required"
    return f"`{value}`"


def settings() -> list[tuple[str, str, str, str]]:
    """(setting, type, default, description) for every key of the schema, in its order."""
    sys.path.insert(0, str(ROOT))
    from omegaconf import OmegaConf

    from mwn import config

    cfg = config.compose_config(["dataset=cifar10"])  # conf/config.yaml's values
    top = yaml_comments(ROOT / "conf" / "config.yaml")
    source = Path(config.__file__).read_text()
    rows = []
    for f in dataclasses.fields(config.Config):
        hints = typing.get_type_hints(config.Config, vars(config))
        if f.name in GROUPS:
            sub_cls = hints[f.name]
            sub_hints = typing.get_type_hints(sub_cls, vars(config))
            notes = schema_comments(source, sub_cls.__name__)
            for g in dataclasses.fields(sub_cls):
                value = OmegaConf.select(cfg, f"{f.name}.{g.name}", default=None)
                if isinstance(value, (list, dict)) or OmegaConf.is_config(value):
                    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
                default = shown(value) if not isinstance(value, dict) else "`{}`"
                rows.append(
                    (
                        f"{f.name}.{g.name}",
                        type_name(sub_hints[g.name]),
                        default,
                        notes.get(g.name, ""),
                    )
                )
            continue
        value = cfg[f.name]
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value)
        rows.append((f.name, type_name(hints[f.name]), shown(value), top.get(f.name, "")))
    return rows


def settings_table() -> str:
    lines = ["| setting | type | default | what it does |", "|---|---|---|---|"]
    for name, tp, default, what in settings():
        what = what.replace("|", "\\|")
        lines.append(f"| `{name}` | {tp} | {default} | {what} |")
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARK in markdown:
        return markdown.replace(MARK, settings_table())
    return markdown
