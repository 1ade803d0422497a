"""Reading the rows of an HTCDS file (.csv or .xlsx), without validating their values.

Row 1 names the columns; row 2 may hold the published spreadsheet's human labels. What is
wrong with the file as a whole (unreadable, unknown or duplicate columns, a value in a column
without a name) is raised as ``InvalidInput``; what is wrong with one row is left to
validation, except what only the reader can see (a formula cell), which it attaches to the row.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from node.htcds.catalogue import FIELD_NAMES, REPORT_COLUMNS, TESSERA_PREFIX, canonical_field
from node.htcds.csv_format import csv_rows
from node.htcds.validate import FieldError, clip
from node.htcds.xlsx_format import FormulaText, declared_rows, xlsx_rows
from tessera.errors import InvalidInput, NotFound

#: Largest file ``read_table`` accepts. A CSV is decoded in memory (for exact error positions)
#: and ``validate_file`` keeps every good row, so the size must be bounded; 100 MB is far above
#: any agency's case spreadsheet (10,000 cases are about 4 MB).
MAX_FILE_BYTES: Final = 100 * 1024 * 1024

#: Most rows (empty ones included) ``read_table`` reads from one file. A small .xlsx can unzip
#: to millions of rows; this bounds the memory ``validate_file`` uses.
MAX_ROWS: Final = 1_000_000

#: Why a formula cell is not imported; shown with the row and column (issue 16).
FORMULA_REASON: Final = "formula cells are not imported; paste values"


@dataclass(frozen=True)
class SourceRow:
    """One data row of a source file, before validation.

    ``number`` is the row number a person sees in the spreadsheet (the header is row 1).
    ``values`` maps each named column (canonical HTCDS name, or a ``tessera_*`` name) to the
    cell's text, ``""`` for an empty cell, in the file's column order. ``problems`` are what
    the reader found wrong with the row before any value is checked (a formula cell in an
    .xlsx file); validation rejects a row that has any.
    """

    number: int
    values: dict[str, str]
    problems: tuple[FieldError, ...] = ()


# Row 2 of the published v2.0 spreadsheet: human labels, not data. Compared as a set (case and
# spacing ignored), not by position: the published labels do not line up with the field names
# above them (the mailing-address columns are shifted), and agencies move columns around.
# fmt: off
_LABEL_TEXTS: Final = (
    "Case Owner", "Salutation", "First Name", "Second Name", "Consent", "Birthdate", "Gender",
    "Citizenship", "Title", "Email", "Home Phone", "Mobile Phone", "Mailing Street",
    "Mailing City", "Mailing State/Province", "Mailing Zip/Postal Code", "Mailing Country",
    "Trafficking Status", "Trafficking Status Decision Making Organization",
    "Method of Recruitment", "Location of Recruitment", "Methods of Control",
    "Type of Exploitation", "Forced Labour Industry", "Type of Sex Exploitation",
    "Location of Exploitation", "Status", "Referring Organisation", "Incoming Referral Date",
    "Referring Primary Case Worker", "Reason for Incoming Referral",
    "Incoming Referral Details", "Referred Organisation", "Referred Primary Case Worker",
    "Reason for Outgoing Referral", "Outgoing Referral Date", "Outgoing Referral Details",
    "Reason for Case Closure",
)
# fmt: on
_PUBLISHED_LABELS: Final = frozenset(" ".join(t.casefold().split()) for t in _LABEL_TEXTS)


def _is_label(text: str) -> bool:
    return " ".join(text.casefold().split()) in _PUBLISHED_LABELS


def _column_letter(index: int) -> str:
    """Spreadsheet column letter for a 0-based index (0 -> A, 26 -> AA)."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("A") + rest) + letters
    return letters


@dataclass(frozen=True)
class _Header:
    """What row 1 says about each column position."""

    names: tuple[str | None, ...]  # canonical or tessera_* name; None if the column is ignored
    unnamed: frozenset[int]  # positions with an empty header cell

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(name for name in self.names if name is not None)


# Unknown columns named in one error; the rest are counted (a message must stay readable and fit
# a gRPC status).
_SHOWN_UNKNOWN: Final = 10


def _parse_header(path: Path, cells: Sequence[str]) -> _Header:
    names: list[str | None] = []
    unnamed: set[int] = set()
    unknown: list[tuple[str, int]] = []
    first_seen: dict[str, tuple[str, int]] = {}
    duplicates: list[str] = []
    for index, cell in enumerate(cells):
        if isinstance(cell, FormulaText):
            raise InvalidInput(
                f"{path.name}: row 1, column {_column_letter(index)} holds a formula; "
                f"{FORMULA_REASON}",
                hint="type the field names into row 1 (cas_CaseOwner, prs_FirstName, ...)",
            )
        text = cell.strip()
        if not text:
            names.append(None)
            unnamed.add(index)
            continue
        if text in REPORT_COLUMNS:
            names.append(None)
            continue
        name = canonical_field(text)
        if name is None and text.startswith(TESSERA_PREFIX):
            name = text
        if name is None:
            unknown.append((text, index))
            names.append(None)
            continue
        if name in first_seen:
            other, where = first_seen[name]
            spelled = f"'{other}' and '{text}'" if other != text else f"'{text}'"
            duplicates.append(
                f"{name} appears twice, as {spelled} in columns "
                f"{_column_letter(where)} and {_column_letter(index)}"
            )
        first_seen[name] = (text, index)
        names.append(name)
    if not first_seen:
        # Without one recognised name, row 1 is not a header and may be survivor data, so its
        # cells are not repeated in the message.
        if not any(cell.strip() for cell in cells):
            raise InvalidInput(
                f"{path.name}: row 1 is empty; it must hold the HTCDS field names",
                hint="start from the published HTCDS spreadsheet or a Tessera export",
            )
        if any(_is_label(cell) for cell in cells):
            raise InvalidInput(
                f"{path.name}: row 1 holds human labels (like 'First Name'), not HTCDS field names",
                hint="put the field names (cas_CaseOwner, prs_FirstName, ...) in row 1; "
                "the published HTCDS spreadsheet has them there",
            )
        raise InvalidInput(
            f"{path.name}: row 1 has no HTCDS field names",
            hint="row 1 must name the columns (cas_CaseOwner, prs_FirstName, ...); "
            "start from the published HTCDS spreadsheet or a Tessera export",
        )
    if unknown:
        raise _unknown_columns(path, unknown)
    if duplicates:
        raise InvalidInput(
            f"{path.name}: " + "; ".join(duplicates),
            hint="keep one column per field and delete the other",
        )
    return _Header(tuple(names), frozenset(unnamed))


def _unknown_columns(path: Path, unknown: Sequence[tuple[str, int]]) -> InvalidInput:
    """The error for header cells that name no field: the first few, each with a guess."""
    suggestions = []
    for text, index in unknown[:_SHOWN_UNKNOWN]:
        close = difflib.get_close_matches(text, FIELD_NAMES, n=1, cutoff=0.75)
        guess = f", did you mean {close[0]}?" if close else ""
        suggestions.append(f"'{clip(text)}' (column {_column_letter(index)}{guess})")
    if len(unknown) > _SHOWN_UNKNOWN:
        suggestions.append(f"and {len(unknown) - _SHOWN_UNKNOWN} more")
    return InvalidInput(
        f"{path.name}: row 1 has {len(unknown)} column(s) that are not HTCDS v2.0 fields: "
        + "; ".join(suggestions),
        hint="rename them to HTCDS field names (listed in docs/data-model.md) or delete "
        "them; columns for Tessera's own data start with 'tessera_'",
    )


def _data_rows(path: Path, header: _Header, rows: Iterator[Sequence[str]]) -> Iterator[SourceRow]:
    named = [(index, name) for index, name in enumerate(header.names) if name is not None]
    labels_seen: dict[int, str] = {}
    for number, cells in enumerate(rows, start=2):
        if number > MAX_ROWS:
            raise InvalidInput(
                f"{path.name} has more than {MAX_ROWS:,} rows",
                hint="split it into smaller files and import each",
            )
        values = {name: cells[index] if index < len(cells) else "" for index, name in named}
        filled = [text for text in values.values() if text and not text.isspace()]
        if number == 2 and filled and all(_is_label(text) for text in filled):
            # The published spreadsheet's row 2 holds human labels. A real case cannot consist
            # only of label texts (its codes and dates would not be labels), so a row 2 whose
            # every non-empty cell under a field name is a published label is skipped.
            labels_seen = {i: c.strip() for i, c in enumerate(cells) if i in header.unnamed}
            continue
        _check_unnamed_cells(path, header, number, cells, labels_seen)
        if filled:
            problems = _formula_problems(named, cells)
            if problems:  # the formulas' text, as plain strings, for the rejects file
                values = {name: str(text) for name, text in values.items()}
            yield SourceRow(number, values, problems)


def _formula_problems(
    named: Sequence[tuple[int, str]], cells: Sequence[str]
) -> tuple[FieldError, ...]:
    """One error per formula cell under a named column (issue 16); its text is never quoted."""
    return tuple(
        FieldError(
            name,
            None,
            f"column {_column_letter(index)} holds a formula: {FORMULA_REASON} "
            "(Paste Special > Values)",
        )
        for index, name in named
        if index < len(cells) and isinstance(cells[index], FormulaText)
    )


def _check_unnamed_cells(
    path: Path, header: _Header, number: int, cells: Sequence[str], labels: Mapping[int, str]
) -> None:
    """Refuse a value under an empty header: dropping it could silently lose case data.

    Exception: the published spreadsheet numbers its rows (1, 2, 3, ...) in column A under an
    empty header; whole numbers there are ignored, and so is a formula (say ``=ROW()-2``).
    Note that the published spreadsheet also has an unnamed column AJ labelled 'Reason for
    Outgoing Referral', which HTCDS v2.0 defines no field for; values typed there are refused
    with advice rather than dropped.
    """
    for index in header.unnamed:
        if index >= len(cells):
            continue
        text = cells[index].strip()
        if not text or (index == 0 and (text.isdigit() or isinstance(cells[index], FormulaText))):
            continue
        _refuse_unnamed(path, number, index, labels.get(index, ""))
    for index in range(len(header.names), len(cells)):
        if cells[index].strip():
            _refuse_unnamed(path, number, index, "")


def _refuse_unnamed(path: Path, number: int, index: int, label: str) -> None:
    letter = _column_letter(index)
    labelled = f" (labelled {label!r} in row 2)" if label else ""
    hint = "give the column an HTCDS field name in row 1, or delete it"
    if label.casefold() == "reason for outgoing referral":
        hint = (
            "HTCDS v2.0 has no field for this column: move its text into "
            "cas_OutgoingReferralDetails, or delete the column"
        )
    raise InvalidInput(
        f"{path.name}: column {letter}{labelled} has no field name in row 1, "
        f"but row {number} has a value in it",
        hint=hint,
    )


@contextmanager
def _open_rows(path: Path) -> Iterator[Iterator[Sequence[str]]]:
    """Open a CSV or XLSX file and yield an iterator over its rows as lists of cell texts."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".xlsx"):
        raise InvalidInput(
            f"{path.name}: Tessera reads HTCDS files as .csv or .xlsx, not {suffix or 'no suffix'}",
            hint="save the spreadsheet as Excel Workbook (.xlsx) or CSV UTF-8 (.csv)",
        )
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(4096)
    except FileNotFoundError:
        raise NotFound(f"{path} does not exist") from None
    except OSError as exc:
        raise InvalidInput(f"{path} cannot be read: {exc.strerror}") from None
    if size > MAX_FILE_BYTES:
        raise InvalidInput(
            f"{path.name} is {size / 1e6:.0f} MB; the limit is {MAX_FILE_BYTES / 1e6:.0f} MB",
            hint="split the file into smaller ones and import each",
        )
    if suffix == ".csv":
        yield csv_rows(path, head)
    else:
        with xlsx_rows(path, head) as rows:
            yield rows


def read_table(path: Path) -> Iterator[SourceRow]:
    """Read the data rows of an HTCDS ``.csv`` or ``.xlsx`` file, without validating values.

    Row 1 must hold field names (canonical, alias or any case; ``tessera_*`` columns pass
    through; ``tessera_source_row``/``tessera_errors`` are ignored). Row 2 is skipped when it
    holds the published spreadsheet's human labels. Fully empty rows are skipped. For XLSX the
    first sheet is read, date cells become YYYY-MM-DD and TRUE/FALSE cells TRUE/FALSE.

    Raises ``InvalidInput`` for an unreadable file (naming what it seems to be), unknown or
    duplicate column names, or a value in a column without a name; ``NotFound`` if the file does
    not exist. Header problems are raised when iteration starts. An .xlsx row with a formula
    cell comes with ``problems`` (the formula's text in ``values``, never its result).
    """
    with open_table(path) as (_columns, rows):
        yield from rows


@contextmanager
def open_table(path: Path) -> Iterator[tuple[tuple[str, ...], Iterator[SourceRow]]]:
    """Open an HTCDS file as ``read_table`` reads it: yields its named columns (canonical names,
    in file order) and an iterator over its data rows. Header problems are raised on entry."""
    with _open_rows(path) as rows:
        header = _parse_header(path, next(iter(rows), []))
        yield header.columns, _data_rows(path, header, rows)


def count_rows(path: Path) -> int | None:
    """A cheap estimate of the data rows in a file, for a progress bar; None if unknown.

    Counts the lines of a CSV, and reads the size an XLSX file declares for its first sheet
    (without opening the workbook, which can cost a full pass over the sheet). Both may count
    the label row and empty rows, so the estimate is usually an upper bound. Never raises.
    """
    try:
        suffix = path.suffix.lower()
        if suffix == ".csv":
            lines = 0
            last = b"\n"
            with path.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    lines += chunk.count(b"\n")
                    last = chunk[-1:]
            lines += last != b"\n"
            return max(lines - 1, 0)
        if suffix == ".xlsx":
            declared = declared_rows(path)
            return None if declared is None else max(declared - 1, 0)
    except Exception:  # a progress estimate must never stop an import; read_table reports
        return None
    return None
