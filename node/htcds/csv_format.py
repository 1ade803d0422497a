"""HTCDS files as CSV: reading (UTF-8, with ',' ';' or tab between cells) and writing.

Named ``csv_format`` so as not to shadow the standard library's :mod:`csv`. Values a
spreadsheet would run as a formula are neutralised on export (:func:`csv_cell`) and read back
unchanged (:func:`csv_value`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final

from node.htcds.files import atomic_file, export_columns, not_a, ordered
from tessera.errors import InvalidInput


def csv_rows(path: Path, head: bytes) -> Iterator[Sequence[str]]:
    """The rows of a CSV file as lists of cell texts; ``head`` is the file's first bytes."""
    if head.startswith((b"PK\x03\x04", b"\xd0\xcf\x11\xe0", b"\xff\xfe", b"\xfe\xff", b"%PDF")):
        raise not_a(path, head, "a CSV file")
    data = path.read_bytes()
    try:
        # Decoded whole (the size is bounded) so a bad byte is reported with its line number.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InvalidInput(
            f"{path.name} is not UTF-8 text (first bad byte on line {line}); it was probably "
            "saved in a legacy encoding such as Windows-1252",
            hint="in Excel use File > Save As > 'CSV UTF-8 (Comma delimited)'; in LibreOffice "
            "pick character set 'Unicode (UTF-8)'; or import the .xlsx workbook instead",
        ) from None
    if "\x00" in text:
        raise not_a(path, head, "a CSV file")
    # Excel in many European locales saves "CSV" with ';' between cells. Field names contain
    # neither ',' nor ';' nor tabs, so the header line tells which separator the file uses.
    first_line = text[: text.find("\n")]
    delimiter = ","
    if "," not in first_line:
        delimiter = ";" if ";" in first_line else "\t" if "\t" in first_line else ","
    return _guard_csv(path, text, delimiter)


# A spreadsheet treats a cell starting with one of these as a formula (OWASP "CSV injection").
_FORMULA_STARTS: Final = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: str) -> str:
    """A value as written to a CSV Tessera exports: a leading formula character is neutralised
    with a single quote (OWASP), and so is a leading quote before one, so that
    :func:`csv_value` reads every value back unchanged."""
    if value.startswith(_FORMULA_STARTS) or (
        value.startswith("'") and value[1:].startswith((*_FORMULA_STARTS, "'"))
    ):
        return "'" + value
    return value


def csv_value(cell: str) -> str:
    """The value of a CSV cell as :func:`csv_cell` wrote it (only its own quote is removed)."""
    if cell.startswith("'") and cell[1:].startswith((*_FORMULA_STARTS, "'")):
        return cell[1:]
    return cell


def _guard_csv(path: Path, text: str, delimiter: str) -> Iterator[Sequence[str]]:
    # strict: a file that ends inside an open quote is refused, not read as one long cell.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        for row in reader:
            yield [csv_value(cell) for cell in row]
    except csv.Error as exc:
        raise InvalidInput(
            f"{path.name}: line {reader.line_num} is not valid CSV ({exc})",
            hint="check the quotes in that row, or import the .xlsx workbook instead",
        ) from None


def write_csv(
    path: Path, records: Iterable[Mapping[str, str]], extra_columns: Sequence[str] = ()
) -> int:
    """Write records as an HTCDS CSV file; returns the number of records written.

    Columns are every HTCDS field in spreadsheet order, then ``extra_columns`` (each must start
    with ``tessera_``). UTF-8 with a byte-order mark, so that Excel shows accented names right;
    ``read_table`` accepts it. A value a spreadsheet would run as a formula is neutralised
    (:func:`csv_cell`) and read back unchanged on import.
    """
    columns = export_columns(extra_columns)
    known = frozenset(columns)
    count = 0
    with atomic_file(path) as temp, temp.open("w", encoding="utf-8-sig", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(columns)
        for record in records:
            writer.writerow([csv_cell(v) for v in ordered(record, columns, known)])
            count += 1
    return count
