"""Rendering for every command that prints data: ``--format table|json|csv``."""

from __future__ import annotations

import csv
import enum
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import typer


class OutputFormat(enum.StrEnum):
    """How a command prints its data."""

    TABLE = "table"
    JSON = "json"
    CSV = "csv"


FORMAT_OPTION: Any = typer.Option(
    OutputFormat.TABLE, "--format", "-f", help="table for people, json or csv for scripts."
)


def render(
    rows: Sequence[Mapping[str, Any]],
    fmt: OutputFormat,
    *,
    columns: Sequence[str] | None = None,
    title: str | None = None,
) -> None:
    """Print ``rows`` (dicts with the same keys) in the chosen format to standard output."""
    cols = list(columns or (rows[0].keys() if rows else []))
    if fmt is OutputFormat.JSON:
        sys.stdout.write(json.dumps([dict(r) for r in rows], indent=2, default=str) + "\n")
        return
    if fmt is OutputFormat.CSV:
        writer = csv.DictWriter(sys.stdout, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _cell(row.get(c)) for c in cols})
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # Cells are data, never markup: a reason or a name holding "[/bold]" prints as it is.
    table = Table(title=Text(title) if title else None, show_lines=False)
    for col in cols:
        table.add_column(Text(col))
    for row in rows:
        table.add_row(*(Text(_cell(row.get(c))) for c in cols))
    Console().print(table)


def render_one(record: Mapping[str, Any], fmt: OutputFormat, title: str | None = None) -> None:
    """Print one record: a two-column table for people, an object for scripts."""
    if fmt is OutputFormat.JSON:
        sys.stdout.write(json.dumps(dict(record), indent=2, default=str) + "\n")
        return
    rows = [{"field": k, "value": _cell(v)} for k, v in record.items()]
    render(rows, fmt, columns=["field", "value"], title=title)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ";".join(str(v) for v in value)
    return str(value)
