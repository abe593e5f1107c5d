"""Everything the CLI prints: JSON on stdout, tables on stdout, progress and notes on stderr.

The split is what makes ``--json`` scriptable: stdout carries exactly one JSON document
(or the human table), while progress, notes and errors go to stderr, so
``attnres convert ... --json | jq`` works with progress still visible.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table


def stderr() -> Console:
    """A console on the current ``sys.stderr`` (created per use so test runners can swap streams)."""
    return Console(stderr=True, highlight=False)


def stdout() -> Console:
    return Console(highlight=False)


def note(message: str) -> None:
    stderr().print(f"[dim]{escape(message)}[/dim]", soft_wrap=True)


def warn(message: str) -> None:
    """Something the user must act on or accept knowingly (not a failure): never dimmed."""
    stderr().print(f"[bold yellow]warning:[/bold yellow] {escape(message)}", soft_wrap=True)


@contextmanager
def step(label: str) -> Iterator[Callable[[str], None]]:
    """Show a spinner for a long step on a terminal; log its completion and duration to stderr.

    Yields ``update(detail)``, which shows a sub-step (e.g. the exporter's "translate")
    in the spinner; off a terminal sub-steps are not logged, to keep logs short.
    """
    console = stderr()
    start = time.perf_counter()
    status = console.status(f"{escape(label)}...") if console.is_terminal else None

    def update(detail: str) -> None:
        if status is not None:
            status.update(f"{escape(label)}: {escape(detail)}...")

    with status if status is not None else nullcontext():  # on failure the error message says it all
        yield update
    console.print(f"[green]✓[/green] {escape(label)} [dim]({time.perf_counter() - start:.1f}s)[/dim]")


def jsonable(value: Any) -> Any:
    """Plain JSON values: paths as strings, non-finite floats as null (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item):  # 0-d tensors and numpy scalars
        return jsonable(value.item())
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def emit_json(payload: dict[str, Any]) -> None:
    """One JSON document on stdout, its ``report_format`` first (docs/cli.md, "JSON reports")."""
    from attnres_rewrite.api import REPORT_FORMAT

    payload = {"report_format": REPORT_FORMAT, **payload}
    sys.stdout.write(json.dumps(jsonable(payload), indent=2) + "\n")
    sys.stdout.flush()


def fmt(value: Any) -> str:
    """Human formatting for table cells: small floats in scientific notation."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if value == 0 or 1e-3 <= abs(value) < 1e4 else f"{value:.2e}"
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value)
    return str(value)


def table(title: str | None, columns: list[str], rows: list[list[Any]], *, header: bool = True) -> None:
    """A table on stdout; the title is a line of its own so long paths never wrap inside it."""
    console = stdout()
    if title:
        console.print(f"[bold]{escape(title)}[/bold]", soft_wrap=True)
    t = Table(show_header=header, box=box.SIMPLE_HEAD if header else None, pad_edge=False, show_edge=False)
    for column in columns:
        t.add_column(column, overflow="fold")
    for row in rows:
        t.add_row(*(escape(fmt(v)) for v in row))
    console.print(t)


def summary(title: str, pairs: list[tuple[str, Any]]) -> None:
    """Key/value lines for single results (convert, export, verify)."""
    table(title, ["", ""], [[k, v] for k, v in pairs], header=False)
