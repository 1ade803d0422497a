"""Checking a whole HTCDS file, and writing its rejected rows back for a person to correct.

Typical use::

    report = validate_file(Path("cases.xlsx"))
    if report.bad:
        write_rejects(Path("rejects.csv"), report.header, report.rejects())
    records = [values for _row, values in report.good]
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from node.htcds.catalogue import REPORT_COLUMNS
from node.htcds.csv_format import csv_cell
from node.htcds.files import atomic_file
from node.htcds.reading import SourceRow, open_table
from node.htcds.validate import FieldError, validate_record


@dataclass
class ValidationReport:
    """The outcome of checking a whole file.

    ``header`` lists the file's named columns (canonical names) in file order. ``good`` holds
    ``(row number, normalised values)`` of valid rows, ``bad`` ``(row number, errors)`` of
    invalid ones, and ``rejected`` the raw rows behind ``bad``, in the same order.
    """

    header: tuple[str, ...]
    good: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    bad: list[tuple[int, list[FieldError]]] = field(default_factory=list)
    rejected: list[SourceRow] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every row is valid."""
        return not self.bad

    @property
    def rows(self) -> int:
        """Data rows read (empty rows and the label row not counted)."""
        return len(self.good) + len(self.bad)

    def rejects(self) -> list[tuple[SourceRow, list[FieldError]]]:
        """The invalid rows with their errors, ready for ``write_rejects``."""
        return [(row, errors) for row, (_n, errors) in zip(self.rejected, self.bad, strict=True)]

    def error_lines(self, limit: int | None = None) -> list[str]:
        """One line per error, ``row 7, prs_Gender: ...``; safe to print or log."""
        lines = [f"row {n}, {error}" for n, errors in self.bad for error in errors]
        if limit is not None and len(lines) > limit:
            lines = [*lines[:limit], f"... and {len(lines) - limit} more"]
        return lines


def validate_file(path: Path, progress: Callable[[int], None] | None = None) -> ValidationReport:
    """Read and check every row of an HTCDS file (``read_table`` then ``validate_record``).

    ``progress``, if given, is called with the number of data rows checked so far after each
    row. Raises what ``read_table`` raises; row-level problems are reported, not raised. A row
    the reader found a problem in (a formula cell) is rejected with it; the cell's text is
    not checked as a value, so each problem is reported once.
    """
    with open_table(path) as (columns, rows):
        report = ValidationReport(columns)
        for count, row in enumerate(rows, start=1):
            if row.problems:
                flagged = {problem.field for problem in row.problems}
                rest = {k: v for k, v in row.values.items() if k not in flagged}
                values, errors = validate_record(rest)
                errors = [*row.problems, *errors]
            else:
                values, errors = validate_record(row.values)
            if errors:
                report.bad.append((row.number, errors))
                report.rejected.append(row)
            else:
                report.good.append((row.number, values))
            if progress is not None:
                progress(count)
    return report


def write_rejects(
    path: Path,
    header: Sequence[str],
    rows_with_errors: Iterable[tuple[SourceRow, Sequence[FieldError]]],
) -> int:
    """Write rejected rows, as read, to a CSV a person can correct and import again.

    Columns are ``header`` (use ``ValidationReport.header``), then ``tessera_source_row`` (the
    row number in the original file) and ``tessera_errors`` (``field: reason | field: reason``).
    An import ignores those two columns. Returns the number of rows written. The file holds
    survivor data as the source file did; it is created readable by its owner only.
    """
    columns = [name for name in header if name not in REPORT_COLUMNS]
    count = 0
    with atomic_file(path) as temp, temp.open("w", encoding="utf-8-sig", newline="") as out:
        writer = csv.writer(out)
        writer.writerow([*columns, *REPORT_COLUMNS])
        for row, errors in rows_with_errors:
            cells = [row.values.get(name, "") for name in columns]
            report = [str(row.number), " | ".join(str(e) for e in errors)]
            writer.writerow([csv_cell(cell) for cell in [*cells, *report]])
            count += 1
    return count
