"""``--config FILE.toml``: defaults for command options, layered under the command line.

Top-level keys apply to every command that has that option; a ``[command]`` table
applies to one command and wins over the top level; flags on the command line win
over both. Keys are option names with ``-`` or ``_`` (``seq-len`` = ``seq_len``)::

    seed = 0
    [convert]
    blocks = 4
    mode = "exact"
    [export]
    opset = 18

The values become the (typer-vendored) click ``default_map``, so they are parsed and validated exactly
like flags. An unknown table or key is an error (exit 2) rather than silently ignored,
because a typo in a config file would otherwise change nothing without telling anyone.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# options that make no sense as a default: where the output goes, and global switches
_NOT_CONFIGURABLE = {"config", "help", "version", "output", "force"}


def read(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as exc:
        raise typer.BadParameter(f"no such file {str(path)!r}", param_hint="--config") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise typer.BadParameter(f"cannot read {str(path)!r}: {exc}", param_hint="--config") from exc


def _options(command: Any) -> set[str]:
    return {p.name for p in command.params if p.name and p.name not in _NOT_CONFIGURABLE}


def _normalise(table: dict[str, Any]) -> dict[str, Any]:
    return {key.replace("-", "_"): value for key, value in table.items()}


def default_map(path: Path, group: Any, ctx: typer.Context) -> dict[str, dict[str, Any]]:
    """``{command: {option: default}}`` for every subcommand of ``group``, validated."""
    data = read(path)
    commands = {name: group.get_command(ctx, name) for name in group.list_commands(ctx)}
    top = _normalise({k: v for k, v in data.items() if not isinstance(v, dict)})
    known_anywhere = set().union(*(_options(c) for c in commands.values() if c is not None))
    for key in top:
        if key not in known_anywhere:
            raise typer.BadParameter(f"{path}: unknown option {key!r}", param_hint="--config")
    result: dict[str, dict[str, Any]] = {}
    for name, command in commands.items():
        if command is None:
            continue
        options = _options(command)
        section = data.get(name, {})
        section = _normalise(section if isinstance(section, dict) else {})
        unknown = sorted(set(section) - options)
        if unknown:
            raise typer.BadParameter(
                f"{path}: [{name}] has no option {unknown[0]!r}; valid: {', '.join(sorted(options))}",
                param_hint="--config",
            )
        result[name] = {**{k: v for k, v in top.items() if k in options}, **section}
    for name in data:
        if isinstance(data[name], dict) and name not in commands:
            raise typer.BadParameter(
                f"{path}: unknown table [{name}]; commands: {', '.join(commands)}", param_hint="--config"
            )
    return result
