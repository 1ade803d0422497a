"""Formula cells in an .xlsx import (issue 16): the row is rejected, never dropped or imported.

A formula-only row used to vanish (read-only openpyxl gives no value for a formula nobody has
calculated), and a formula Excel had calculated came in as its cached result. Both are now a
rejected row naming the column, like any other bad row. The workbooks are real ones, built with
openpyxl; the command-line import is in tests/test_node_cli.py.
"""

from __future__ import annotations

import csv
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import openpyxl
import pytest
from openpyxl.worksheet.formula import ArrayFormula

from node.htcds.catalogue import FIELD_NAMES
from node.htcds.reading import FORMULA_REASON, read_table
from node.htcds.report import validate_file, write_rejects
from node.htcds.synthetic import synthetic_records
from node.htcds.xlsx_format import write_xlsx
from tessera.errors import InvalidInput

DETAILS = "cas_IncomingReferralDetails"  # a free-text field: any text would pass its check


def formula_workbook(path: Path, records: Sequence[Mapping[str, object]]) -> Path:
    """An .xlsx with every HTCDS column in row 1 and one row per record (values as given: a
    string starting with '=' becomes a formula cell, as if typed into Excel)."""
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    assert sheet is not None
    sheet.append(list(FIELD_NAMES))
    for record in records:
        sheet.append([record.get(name) for name in FIELD_NAMES])
    workbook.save(path)
    return path


def with_cached_results(path: Path, result: str = "3") -> Path:
    """The workbook as Excel saves it: every formula cell also holds its calculated result."""
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    sheet = "xl/worksheets/sheet1.xml"
    xml, count = re.subn(rb"(</f>)<v\s*/>", rb"\1<v>" + result.encode() + rb"</v>", members[sheet])
    assert count, "the workbook has no formula cell to give a result"
    members[sheet] = xml
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def column_of(name: str) -> str:
    return openpyxl.utils.get_column_letter(FIELD_NAMES.index(name) + 1)


def intake(tmp_path: Path, *, cached: bool = False) -> tuple[Path, list[dict[str, str]]]:
    """Rows 2 and 5 good; row 3 holds only a formula; row 4 is a good record but for a formula
    in its details column."""
    good = synthetic_records(3, seed=16)
    mixed = {**good[2], DETAILS: '="Referred by "&A2'}
    rows: list[Mapping[str, object]] = [good[0], {DETAILS: "=SUM(A1:A2)"}, mixed, good[1]]
    path = formula_workbook(tmp_path / "intake.xlsx", rows)
    return (with_cached_results(path) if cached else path), good


@pytest.mark.parametrize("cached", [False, True], ids=["never-calculated", "saved-by-excel"])
def test_formula_rows_are_rejected_with_row_and_column(tmp_path: Path, cached: bool) -> None:
    path, good = intake(tmp_path, cached=cached)
    report = validate_file(path)
    assert [n for n, _values in report.good] == [2, 5]
    assert [values for _n, values in report.good] == [good[0], good[1]]
    assert [n for n, _errors in report.bad] == [3, 4]
    for _n, errors in report.bad:
        assert [(e.field, e.value_excerpt) for e in errors] == [(DETAILS, None)]
        assert errors[0].reason.startswith(f"column {column_of(DETAILS)} holds a formula")
        assert FORMULA_REASON in errors[0].reason
    assert report.error_lines() == [
        f"row {n}, {DETAILS}: column {column_of(DETAILS)} holds a formula: {FORMULA_REASON} "
        "(Paste Special > Values)"
        for n in (3, 4)
    ]


def test_rejects_file_keeps_the_formula_text_neutralised(tmp_path: Path) -> None:
    path, _good = intake(tmp_path, cached=True)
    report = validate_file(path)
    rejects = write_rejects(tmp_path / "rejects.csv", report.header, report.rejects())
    assert rejects == 2
    with (tmp_path / "rejects.csv").open(encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.DictReader(handle))
    # The formula as typed, not its cached result, and quoted so no spreadsheet runs it.
    assert [row[DETAILS] for row in rows] == ["'=SUM(A1:A2)", '\'="Referred by "&A2']
    assert [row["tessera_source_row"] for row in rows] == ["3", "4"]
    assert all(FORMULA_REASON in row["tessera_errors"] for row in rows)


def test_a_formula_is_rejected_in_any_column_and_never_quoted(tmp_path: Path) -> None:
    base = synthetic_records(1, seed=3)[0]
    rows: list[Mapping[str, object]] = [
        {**base, "prs_FirstName": '="Ana"&" Lopez"'},  # identifying: never shown back
        {**base, "prs_Gender": '=IF(TRUE,"Feminine","")', "prs_Citizenship": "XX"},
        {**base, "tessera_case_id": "=1"},  # not even Tessera's own columns take one
    ]
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    assert sheet is not None
    columns = [*FIELD_NAMES, "tessera_case_id"]
    sheet.append(columns)
    for record in rows:
        sheet.append([record.get(name) for name in columns])
    sheet.append([base.get(name) for name in columns])
    where = f"{column_of('cas_ReferringOrganisation')}5"
    sheet[where] = ArrayFormula(where, "=UPPER(A2)")
    path = tmp_path / "mixed.xlsx"
    workbook.save(path)
    report = validate_file(path)
    assert report.good == []
    bad = dict(report.bad)
    assert [e.field for e in bad[2]] == ["prs_FirstName"]
    # The formula is reported once (not also as a bad code); the row's other errors still are.
    assert [e.field for e in bad[3]] == ["prs_Gender", "prs_Citizenship"]
    assert [e.field for e in bad[4]] == ["tessera_case_id"]
    assert [e.field for e in bad[5]] == ["cas_ReferringOrganisation"]  # an array formula
    assert "Ana" not in "\n".join(report.error_lines())
    assert "IF(" not in "\n".join(report.error_lines())


def test_text_that_starts_with_equals_is_still_text(tmp_path: Path) -> None:
    # Tessera's own export stores such text as text cells: they are values, not formulas.
    record = {**synthetic_records(1, seed=5)[0], DETAILS: "=SUM(A1:A2) is not a formula"}
    path = tmp_path / "export.xlsx"
    write_xlsx(path, [record])
    report = validate_file(path)
    assert report.bad == []
    assert report.good[0][1][DETAILS] == "=SUM(A1:A2) is not a formula"


def test_read_table_passes_the_formula_problem_on(tmp_path: Path) -> None:
    path, _good = intake(tmp_path)
    rows = list(read_table(path))
    assert [(row.number, len(row.problems)) for row in rows] == [(2, 0), (3, 1), (4, 1), (5, 0)]
    assert rows[1].values[DETAILS] == "=SUM(A1:A2)"
    assert type(rows[1].values[DETAILS]) is str  # plain text, not the reader's marker


def test_a_formula_in_the_header_or_an_unnamed_column(tmp_path: Path) -> None:
    record = synthetic_records(1, seed=9)[0]
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    assert sheet is not None
    sheet.append(["", *FIELD_NAMES])
    sheet.append(["=ROW()-1", *(record.get(name) for name in FIELD_NAMES)])
    numbered = tmp_path / "numbered.xlsx"
    workbook.save(numbered)
    # Column A of the published spreadsheet numbers the rows: a formula there is ignored.
    assert [values for _n, values in validate_file(numbered).good] == [record]

    sheet["B1"] = '="cas_"&"CaseOwner"'
    headed = tmp_path / "headed.xlsx"
    workbook.save(headed)
    with pytest.raises(InvalidInput, match=r"row 1, column B holds a formula"):
        validate_file(headed)
