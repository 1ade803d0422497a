"""Rendering for every command that prints data: ``--format table|json|csv``.

A row or record is a dict or a frozen dataclass (what node.client answers with): a dataclass
renders as its fields in order, under their names (nested dataclasses, mappings and tuples too),
so a field's name is the column's.
"""

from __future__ import annotations

import csv
import dataclasses
import enum
import json
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import typer

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    Row: TypeAlias = Mapping[str, Any] | DataclassInstance


class OutputFormat(enum.StrEnum):
    """How a command prints its data."""

    TABLE = "table"
    JSON = "json"
    CSV = "csv"


FORMAT_OPTION: Any = typer.Option(
    OutputFormat.TABLE, "--format", "-f", help="table for people, json or csv for scripts."
)


def record(row: Row) -> dict[str, Any]:
    """A row as a dict: a dataclass's fields in order, by name, with enums as their values and
    nested dataclasses, mappings and tuples as dicts and lists; a mapping as it is."""
    if isinstance(row, Mapping):
        return dict(row)
    return {f.name: _plain(getattr(row, f.name)) for f in dataclasses.fields(row)}


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value  # a code, as a cell and in JSON, also inside a list or a dict
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return record(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def render(
    rows: Sequence[Row],
    fmt: OutputFormat,
    *,
    columns: Sequence[str] | None = None,
    title: str | None = None,
) -> None:
    """Print ``rows`` (dicts with the same keys, or dataclasses of one kind) in the chosen
    format to standard output."""
    dicts = [record(r) for r in rows]
    cols = list(columns or (dicts[0].keys() if dicts else []))
    if fmt is OutputFormat.JSON:
        sys.stdout.write(json.dumps([dict(r) for r in dicts], indent=2, default=str) + "\n")
        return
    if fmt is OutputFormat.CSV:
        writer = csv.DictWriter(sys.stdout, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        for row in dicts:
            writer.writerow({c: _cell(row.get(c)) for c in cols})
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # Cells are data, never markup: a reason or a name holding "[/bold]" prints as it is.
    table = Table(title=Text(title) if title else None, show_lines=False)
    for col in cols:
        table.add_column(Text(col))
    for row in dicts:
        table.add_row(*(Text(_cell(row.get(c))) for c in cols))
    Console().print(table)


def render_one(one: Row, fmt: OutputFormat, title: str | None = None) -> None:
    """Print one record: a two-column table for people, an object for scripts."""
    fields = record(one)
    if fmt is OutputFormat.JSON:
        sys.stdout.write(json.dumps(fields, indent=2, default=str) + "\n")
        return
    rows = [{"field": k, "value": _cell(v)} for k, v in fields.items()]
    render(rows, fmt, columns=["field", "value"], title=title)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ";".join(str(v) for v in value)
    return str(value)
