"""HTCDS files as Excel workbooks (.xlsx): reading the first sheet, and writing one.

Reading marks formula cells (:class:`FormulaText`) instead of reading their cached results: a
row holding one is rejected, never imported (issue 16). Writing stores every value as a
value: text that starts with '=' stays text, never a formula.
"""

from __future__ import annotations

import datetime as dt
import re
import zipfile
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

from node.htcds.files import atomic_file, export_columns, not_a, ordered
from node.htcds.validate import DATE_FIELDS, DATE_SHAPE, EXCEL_ERRORS
from tessera.errors import InvalidInput

if TYPE_CHECKING:
    from openpyxl.worksheet._write_only import WriteOnlyWorksheet


class _Cell(Protocol):
    """What the reader uses of an openpyxl cell (read-only mode yields ReadOnlyCell, EmptyCell)."""

    @property
    def value(self) -> object: ...
    @property
    def data_type(self) -> str: ...


class FormulaText(str):
    """The text of a formula cell (``=SUM(A1:A2)``), marked as a formula and not a value.

    A formula's result depends on the rest of the workbook (and a cell that no program has
    calculated has none), and its text would run again in the next spreadsheet that opens an
    export; so the reader hands formula cells on marked with this type, and the row that holds
    one is rejected, not imported.
    """

    __slots__ = ()


def _cell_text(value: object) -> str:
    """The text of an openpyxl cell value, as a person would have typed it."""
    if value is None:
        text = ""
    elif isinstance(value, bool):  # Excel TRUE/FALSE cells
        text = "TRUE" if value else "FALSE"
    elif isinstance(value, dt.datetime):  # Excel date cells come back as midnight datetimes
        midnight = value.time() == dt.time() and value.tzinfo is None
        text = value.date().isoformat() if midnight else value.isoformat(sep=" ")
    elif isinstance(value, dt.date):
        text = value.isoformat()
    elif isinstance(value, float) and value.is_integer():
        text = str(int(value))  # a phone or postal code typed as a number: no ".0"
    else:
        text = str(value)
    return text


@contextmanager
def xlsx_rows(path: Path, head: bytes) -> Iterator[Iterator[Sequence[str]]]:
    """The rows of a workbook's first sheet as lists of cell texts (formulas as FormulaText)."""
    if not head.startswith(b"PK\x03\x04"):
        raise not_a(path, head, "an Excel .xlsx workbook")
    from openpyxl import load_workbook

    # Opened here, not by openpyxl: a workbook it fails on half-way through opening would
    # otherwise keep its file open until garbage collection (found by fuzzing, issue 16).
    with path.open("rb") as handle:
        try:
            # Not data_only: a formula cell must be seen as one (its cached result, if any, is
            # not imported), and only the formula reading tells it apart from text.
            workbook = load_workbook(handle, read_only=True, data_only=False)
        except (
            Exception
        ) as exc:  # openpyxl raises many kinds (KeyError, BadZipFile, ParseError, ...)
            seems = "an OpenDocument spreadsheet (.ods)" if _is_ods(path) else "a zip archive"
            raise InvalidInput(
                f"{path.name} is not an Excel .xlsx workbook: it seems to be {seems} "
                f"({type(exc).__name__})",
                hint="open it in its spreadsheet program and save it as Excel Workbook (.xlsx)",
            ) from None
        try:
            if not workbook.worksheets:
                raise InvalidInput(f"{path.name} has no worksheet")
            sheet = workbook.worksheets[0]
            # Read-only mode trusts the size the file declares and stops there; some programs
            # write it wrongly, so it is dropped and every row present is read.
            sheet.reset_dimensions()
            rows = _guard_xlsx(path, sheet.iter_rows())
            try:
                yield rows
            finally:
                rows.close()  # release the sheet's zip member before the archive closes
        finally:
            workbook.close()


def _text_of(cell: _Cell) -> str:
    """A cell's text; a formula cell's as :class:`FormulaText`, whatever its cached result."""
    value = cell.value
    if cell.data_type == "f":
        # Array formulas come as objects carrying their text; data-table formulas carry none.
        formula = value if isinstance(value, str) else getattr(value, "text", None)
        return FormulaText(formula or "=")
    return value if type(value) is str else _cell_text(value)


def _is_ods(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return b"opendocument.spreadsheet" in archive.read("mimetype")[:100]
    except Exception:  # only refines an error message
        return False


def _guard_xlsx(
    path: Path, rows: Iterator[tuple[_Cell, ...]]
) -> Generator[Sequence[str], None, None]:
    number = 1
    try:
        for row in rows:
            yield [_text_of(cell) for cell in row]
            number += 1
    except Exception as exc:  # damaged sheet XML or zip member: any parser error means the same
        raise InvalidInput(
            f"{path.name} is damaged: row {number} of its first sheet cannot be read "
            f"({type(exc).__name__})",
            hint="open it in Excel or LibreOffice and save it again as .xlsx",
        ) from None


_SHEET_REF: Final = re.compile(rb'<(?:\w+:)?sheet\b[^>]*?\br:id="([^"]+)"')
_DIMENSION: Final = re.compile(rb'<(?:\w+:)?dimension\s+ref="[A-Z]+[0-9]+:[A-Z]+([0-9]+)"')


def declared_rows(path: Path) -> int | None:
    """The last row number the first sheet declares in its ``<dimension>``, if it has one."""
    with zipfile.ZipFile(path) as archive:
        first = _SHEET_REF.search(archive.read("xl/workbook.xml"))
        if first is None:
            return None
        rels = archive.read("xl/_rels/workbook.xml.rels")
        target = re.search(rb'Id="' + re.escape(first.group(1)) + rb'"[^>]*?Target="([^"]+)"', rels)
        if target is None:
            target = re.search(
                rb'Target="([^"]+)"[^>]*?Id="' + re.escape(first.group(1)) + rb'"', rels
            )
        if target is None:
            return None
        name = target.group(1).decode()
        name = name.lstrip("/") if name.startswith("/") else f"xl/{name}"
        with archive.open(name) as sheet:
            head = sheet.read(4096)  # the dimension comes before any cell
    size = _DIMENSION.search(head)
    return int(size.group(1)) if size else None


def write_xlsx(
    path: Path, records: Iterable[Mapping[str, str]], extra_columns: Sequence[str] = ()
) -> int:
    """Write records as an HTCDS Excel workbook (one sheet); returns the records written.

    Same columns as ``write_csv``. Date fields become Excel date cells (shown YYYY-MM-DD);
    everything else is stored as text, including values starting with '=' (never formulas).
    """
    from openpyxl import Workbook
    from openpyxl.cell.cell import WriteOnlyCell
    from openpyxl.utils.exceptions import IllegalCharacterError

    columns = export_columns(extra_columns)
    known = frozenset(columns)
    dates = {i for i, name in enumerate(columns) if name in DATE_FIELDS}
    workbook = Workbook(write_only=True)
    sheet: WriteOnlyWorksheet = workbook.create_sheet("HTCDS cases")
    sheet.append(list(columns))
    count = 0
    for count, record in enumerate(records, start=1):
        row: list[object] = [*ordered(record, columns, known)]
        for index, value in enumerate(row):
            if not value:
                row[index] = None
            elif index in dates and isinstance(value, str) and DATE_SHAPE.fullmatch(value):
                row[index] = _to_date(value)
            elif isinstance(value, str) and (value[0] == "=" or value in EXCEL_ERRORS):
                # openpyxl would store these as a formula or an error cell; force text.
                cell = WriteOnlyCell(sheet, value=value)
                cell.data_type = "s"
                row[index] = cell
        try:
            sheet.append(row)
        except IllegalCharacterError:
            raise InvalidInput(
                f"record {count} has a control character that an .xlsx file cannot hold",
                hint="validate records before exporting them",
            ) from None
    with atomic_file(path) as temp:
        workbook.save(str(temp))
    return count


def _to_date(value: str) -> dt.date | str:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        return value
