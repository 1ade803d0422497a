"""File plumbing shared by the CSV and XLSX formats: telling what a file seems to be, writing
an export privately and atomically, and the columns of an export."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from node.htcds.catalogue import FIELD_NAMES, REPORT_COLUMNS, TESSERA_PREFIX
from tessera.errors import InvalidInput


def not_a(path: Path, head: bytes, expected: str) -> InvalidInput:
    """An InvalidInput saying what the file seems to be, judged from its first bytes."""
    if head.startswith(b"PK\x03\x04"):
        seems, hint = (
            "a zip archive (an .xlsx workbook?)",
            "if it is an Excel workbook, rename it to .xlsx",
        )
    elif head.startswith(b"\xd0\xcf\x11\xe0"):
        seems, hint = "an old Excel 97-2003 (.xls) file", "open it in Excel and save it as .xlsx"
    elif head.startswith((b"\xff\xfe", b"\xfe\xff")):
        seems, hint = "UTF-16 'Unicode Text'", "save it from Excel as 'CSV UTF-8 (Comma delimited)'"
    elif head.startswith(b"%PDF"):
        seems, hint = "a PDF document", "export the cases as .xlsx or CSV UTF-8 instead"
    elif not head or b"\x00" not in head:
        seems, hint = "a text file", "if it holds comma-separated values, rename it to .csv"
    else:
        seems, hint = "a binary file of some other kind", "export the cases as .xlsx or CSV UTF-8"
    return InvalidInput(f"{path.name} is not {expected}: it seems to be {seems}", hint=hint)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A private temporary file beside ``path`` that replaces it only when fully written.

    Exports hold survivor data, so the file is created readable by its owner only (0600), and
    a crash never leaves a half-written export under the real name.
    """
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        raise InvalidInput(
            f"cannot write {path}: {exc.strerror}",
            hint="check that the folder exists and is writable",
        ) from None
    try:
        yield temp
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def export_columns(extra_columns: Sequence[str]) -> tuple[str, ...]:
    """An export's columns: every HTCDS field in spreadsheet order, then ``extra_columns``."""
    for name in extra_columns:
        if not name.startswith(TESSERA_PREFIX) or name in REPORT_COLUMNS:
            raise ValueError(
                f"extra column {name!r} must start with {TESSERA_PREFIX!r} and not be one of "
                f"{REPORT_COLUMNS}, so that an import reads it back"
            )
    if len(set(extra_columns)) != len(extra_columns):
        raise ValueError("extra columns must be distinct")
    return (*FIELD_NAMES, *extra_columns)


def ordered(
    record: Mapping[str, str], columns: tuple[str, ...], known: frozenset[str]
) -> list[str]:
    """A record's values in ``columns`` order (``""`` for a missing one)."""
    stray = [key for key in record if key not in known]
    if stray:
        # A programming error, not bad input: silently dropping a field would lose data.
        raise ValueError(f"record has keys outside the export columns: {sorted(stray)}")
    return [record.get(name, "") for name in columns]
