"""Tests for node.htcds: the HTCDS catalogue, validation, and CSV/XLSX import and export.

Files are real files in a temporary directory; the published v2.0 spreadsheet is a copy kept in
tests/data (CC BY 4.0, IOM), so these tests do not depend on anything outside the repository.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import openpyxl
import pytest

from node import htcds
from node.htcds import (
    DATA_CATEGORIES,
    FIELD_BY_NAME,
    FIELD_NAMES,
    IDENTIFYING_FIELDS,
    FieldKind,
    NeedCategory,
    NeedStatus,
    count_rows,
    csv_cell,
    csv_value,
    read_table,
    synthetic_records,
    validate_file,
    validate_record,
    write_csv,
    write_rejects,
    write_xlsx,
)
from tessera.errors import InvalidInput, NotFound

TEMPLATE = Path(__file__).parent / "data" / "htcds_v2_template.xlsx"


def write_csv_rows(
    path: Path, rows: Sequence[Sequence[str]], *, encoding: str = "utf-8", delimiter: str = ","
) -> Path:
    with path.open("w", encoding=encoding, newline="") as out:
        csv.writer(out, delimiter=delimiter).writerows(rows)
    return path


def csv_of(path: Path, records: Sequence[Mapping[str, str]]) -> Path:
    """A CSV with the union of the records' keys as header, in first-seen order."""
    header: list[str] = []
    for record in records:
        header += [key for key in record if key not in header]
    rows = [header, *([record.get(key, "") for key in header] for record in records)]
    return write_csv_rows(path, rows)


def template_sheet() -> tuple[openpyxl.Workbook, dict[str, int]]:
    """The published spreadsheet opened for editing, and each field's 1-based column."""
    workbook = openpyxl.load_workbook(TEMPLATE)
    sheet = workbook.worksheets[0]
    columns = {cell.value: cell.column for cell in sheet[1] if isinstance(cell.value, str)}
    return workbook, columns


# --- catalogue ---------------------------------------------------------------------------------


def test_catalogue_matches_the_published_spreadsheet_header() -> None:
    workbook = openpyxl.load_workbook(TEMPLATE, read_only=True)
    try:
        header = next(workbook.worksheets[0].iter_rows(max_row=1, values_only=True))
    finally:
        workbook.close()
    assert tuple(name for name in header if name) == FIELD_NAMES
    assert len(FIELD_NAMES) == 37
    assert FIELD_BY_NAME["prs_Birthdate"].kind is FieldKind.DATE
    assert FIELD_BY_NAME["vic_MethodsOfControl"].kind is FieldKind.MULTI
    assert FIELD_BY_NAME["con_Consent"].allowed == {"TRUE", "FALSE"}
    assert FIELD_BY_NAME["prs_Citizenship"].allowed == htcds.COUNTRY_CODES
    assert FIELD_BY_NAME["prs_Gender"].choices[0] == "Feminine"


def test_country_list_is_iso_3166_alpha_2() -> None:
    assert len(htcds.COUNTRY_CODES) == 249
    assert {"GB", "NG", "PH", "US", "SS", "AX"} <= htcds.COUNTRY_CODES
    assert not {"UK", "EL", "XK", "EU"} & htcds.COUNTRY_CODES


def test_need_vocabulary_follows_needs_md() -> None:
    assert len(htcds.NEED_CATEGORIES) == 18
    assert htcds.NEED_CATEGORIES[0] == "safe_housing"
    assert htcds.NEED_CATEGORIES[-1] == "peer_support"
    assert NeedCategory("legal_civil") is NeedCategory.LEGAL_CIVIL
    assert htcds.NEED_STATUSES == (
        "identified",
        "referred",
        "in_progress",
        "met",
        "unmet",
        "declined",
    )
    assert NeedStatus("unmet") is NeedStatus.UNMET
    assert f"{NeedStatus.IN_PROGRESS}" == "in_progress"


def test_data_categories_partition_every_field_exactly_once() -> None:
    assert set(DATA_CATEGORIES) == {
        "identity",
        "contact",
        "demographics",
        "exploitation",
        "case",
        "needs",
        "notes",
    }
    placed = [name for members in DATA_CATEGORIES.values() for name in members]
    assert sorted(placed) == sorted(FIELD_NAMES)
    assert DATA_CATEGORIES["needs"] == DATA_CATEGORIES["notes"] == frozenset()
    assert "prs_Birthdate" in DATA_CATEGORIES["identity"]
    assert "prs_MailingCountry" in DATA_CATEGORIES["contact"]
    assert DATA_CATEGORIES["demographics"] == {"prs_Gender", "prs_Citizenship"}
    assert "con_Consent" in DATA_CATEGORIES["case"]
    assert all(name.startswith("vic_") for name in DATA_CATEGORIES["exploitation"])
    assert htcds.fields_in(["identity", "contact"]) == IDENTIFYING_FIELDS
    assert htcds.FIELD_CATEGORY["cas_Status"] == "case"
    with pytest.raises(InvalidInput, match="unknown data category"):
        htcds.fields_in(["everything"])


# --- validation --------------------------------------------------------------------------------


def test_validate_record_normalises_values() -> None:
    values, errors = validate_record(
        {
            "prs_FirstName": "  Mirelka \r\nDovanto ",
            "prs_SecondName": "   ",
            "con_Consent": "true",
            "prs_Gender": "feminine",
            "prs_Citizenship": "ng",
            "vic_MethodsOfControl": " DebtBondage ; physicalabuse;DebtBondage; ",
            "cas_IncomingReferralDate": "2025-02-28",
            "tessera_case_id": " c-17 ",
        }
    )
    assert errors == []
    assert values == {
        "prs_FirstName": "Mirelka \nDovanto",
        "con_Consent": "TRUE",
        "prs_Gender": "Feminine",
        "prs_Citizenship": "NG",
        "vic_MethodsOfControl": "DebtBondage;PhysicalAbuse",
        "cas_IncomingReferralDate": "2025-02-28",
        "tessera_case_id": "c-17",
    }
    assert list(values)[:3] == ["prs_FirstName", "con_Consent", "prs_Gender"]  # sheet order


def test_every_kind_of_bad_value_is_reported_with_row_and_field(tmp_path: Path) -> None:
    path = csv_of(
        tmp_path / "cases.csv",
        [
            {"cas_CaseOwner": "Talenu Brisvek", "prs_Gender": "Feminine"},  # row 2: good
            {"prs_Gender": "Femenine"},  # row 3
            {"cas_IncomingReferralDate": "2026-13-01"},  # row 4
            {"prs_Citizenship": "XX"},  # row 5
            {"vic_MethodsOfControl": "DebtBondage;Blackmail"},  # row 6
            {"con_Consent": "yes"},  # row 7
            {"cas_Status": "Active;Closed"},  # row 8
            {"vic_TypeOfExploitation": "ForcedLabour,ForcedBegging"},  # row 9
            {"cas_OutgoingReferralDate": "45123"},  # row 10
            {"cas_ReferredOrganisation": "#N/A"},  # row 11
            {"cas_IncomingReferralDetails": "x" * (htcds.MAX_TEXT_CHARS + 1)},  # row 12
            {"prs_Citizenship": "UK", "prs_Gender": "Masculin"},  # row 13: two errors
        ],
    )
    report = validate_file(path)
    assert [n for n, _ in report.good] == [2]
    found = {(n, e.field): e.reason for n, errors in report.bad for e in errors}
    assert set(found) == {
        (3, "prs_Gender"),
        (4, "cas_IncomingReferralDate"),
        (5, "prs_Citizenship"),
        (6, "vic_MethodsOfControl"),
        (7, "con_Consent"),
        (8, "cas_Status"),
        (9, "vic_TypeOfExploitation"),
        (10, "cas_OutgoingReferralDate"),
        (11, "cas_ReferredOrganisation"),
        (12, "cas_IncomingReferralDetails"),
        (13, "prs_Citizenship"),
        (13, "prs_Gender"),
    }
    assert found[3, "prs_Gender"].startswith(
        "'Femenine' is not an allowed value (did you mean Feminine?); allowed: Feminine, Masculine,"
    )
    assert found[4, "cas_IncomingReferralDate"] == "'2026-13-01' is not a date (YYYY-MM-DD)"
    assert found[5, "prs_Citizenship"] == "'XX' is not an ISO 3166-1 alpha-2 country code"
    assert found[6, "vic_MethodsOfControl"].startswith("'Blackmail' is not an allowed value")
    assert "DebtBondage" not in found[6, "vic_MethodsOfControl"].split(";")[0]
    assert found[7, "con_Consent"].startswith("'yes' is not an allowed value; allowed: TRUE, FALSE")
    assert "this field takes one value" in found[8, "cas_Status"]
    assert "separate several values with ';'" in found[9, "vic_TypeOfExploitation"]
    assert "Excel date serial number" in found[10, "cas_OutgoingReferralDate"]
    assert "Excel error" in found[11, "cas_ReferredOrganisation"]
    assert "longer than 10,000 characters" in found[12, "cas_IncomingReferralDetails"]
    assert "(use GB)" in found[13, "prs_Citizenship"]
    assert report.error_lines(limit=1) == [
        f"row 3, prs_Gender: {found[3, 'prs_Gender']}",
        f"... and {len(found) - 1} more",
    ]


def test_unknown_key_in_a_record_is_reported() -> None:
    values, errors = validate_record({"prs_Nickname": "Mimi", "prs_FirstName": "Mirelka"})
    assert values == {"prs_FirstName": "Mirelka"}
    assert [(e.field, e.reason) for e in errors] == [
        ("prs_Nickname", "unknown field 'prs_Nickname'")
    ]


def test_aliases_and_letter_case_are_accepted(tmp_path: Path) -> None:
    header = [
        "prs_First_Name",
        "prs_Second_Name",
        "vic_Methods_of_Control",
        "vic_TraffickingStatusDecisionMakingOrg",
        "PRS_GENDER",
    ]
    path = write_csv_rows(
        tmp_path / "survey.csv",
        [header, ["Mirelka", "Dovanto", "DebtBondage;FalsePromises", "NGO", "Feminine"]],
    )
    [row] = read_table(path)
    assert list(row.values) == [
        "prs_FirstName",
        "prs_SecondName",
        "vic_MethodsOfControl",
        "vic_TraffickinStatusDecisionMakingOrg",
        "prs_Gender",
    ]
    values, errors = validate_record({"vic_TraffickingStatusDecisionMakingOrg": "police"})
    assert errors == []
    assert values == {"vic_TraffickinStatusDecisionMakingOrg": "Police"}
    assert htcds.canonical_field("prs_First_Name") == "prs_FirstName"
    assert htcds.canonical_field("prs_Nickname") is None


def test_alias_and_canonical_spelling_with_different_values_conflict() -> None:
    _, errors = validate_record({"prs_FirstName": "Mirelka", "prs_First_Name": "Dovanto"})
    assert [e.field for e in errors] == ["prs_FirstName"]
    assert "given twice" in errors[0].reason
    assert "Mirelka" not in errors[0].reason
    assert "Dovanto" not in errors[0].reason
    same, none = validate_record({"prs_FirstName": "Mirelka", "prs_First_Name": "Mirelka"})
    assert none == []
    assert same == {"prs_FirstName": "Mirelka"}


def test_identifying_values_never_appear_in_errors(tmp_path: Path) -> None:
    marker = "Qzorvath"  # appears in every bad identifying value below
    bad: dict[str, str] = {}
    for name in sorted(IDENTIFYING_FIELDS):
        kind = FIELD_BY_NAME[name].kind
        bad[name] = f"{marker} 1990" if kind is not FieldKind.TEXT else f"{marker}\x07"
    bad["prs_FirstName"] = marker * 2000  # too long, as well as identifying
    path = csv_of(tmp_path / "cases.csv", [bad])
    report = validate_file(path)
    [(row, errors)] = report.bad
    assert row == 2
    assert {e.field for e in errors} == IDENTIFYING_FIELDS
    for error in errors:
        assert error.value_excerpt is None
        assert "value hidden" in error.reason
        assert marker not in str(error)
    assert not any(marker in line for line in report.error_lines())
    rejects = tmp_path / "rejects.csv"
    write_rejects(rejects, report.header, report.rejects())
    with rejects.open(encoding="utf-8-sig", newline="") as handle:
        [written] = csv.DictReader(handle)
    assert marker not in written["tessera_errors"]
    assert written["prs_Email"] == bad["prs_Email"]  # the raw row itself is kept, for fixing


def test_long_text_typed_into_a_code_field_is_not_quoted() -> None:
    story = "She was taken from the market by her uncle and held for months"
    _, [error] = validate_record({"vic_TypeOfExploitation": story})
    assert error.value_excerpt is None
    assert "value hidden" in error.reason
    assert "uncle" not in error.reason


# --- reading -----------------------------------------------------------------------------------


def test_published_template_reads_as_zero_rows() -> None:
    assert list(read_table(TEMPLATE)) == []
    report = validate_file(TEMPLATE)
    assert report.header == FIELD_NAMES
    assert report.rows == 0
    assert report.ok


def test_filled_copy_of_the_template_imports(tmp_path: Path) -> None:
    workbook, column = template_sheet()
    sheet = workbook.worksheets[0]
    sheet.cell(3, column["prs_FirstName"], "Mirelka")
    sheet.cell(3, column["prs_SecondName"], "Dovanto")
    sheet.cell(3, column["con_Consent"], True)  # an Excel TRUE cell
    sheet.cell(3, column["prs_Birthdate"], dt.datetime(1994, 5, 17))  # an Excel date cell
    sheet.cell(3, column["prs_Gender"], "feminine")
    sheet.cell(3, column["prs_Citizenship"], "ph")
    sheet.cell(3, column["prs_MobilePhone"], 5550142)  # typed as a number
    sheet.cell(3, column["vic_MethodsOfControl"], "DebtBondage; WithholdsDocuments")
    sheet.cell(3, column["cas_IncomingReferralDate"], dt.date(2025, 3, 1))
    sheet.cell(5, column["cas_CaseOwner"], "Talenu Brisvek")  # row 4 left empty
    sheet.cell(5, column["con_Consent"], False)
    path = tmp_path / "filled.xlsx"
    workbook.save(path)

    report = validate_file(path)
    assert report.bad == []
    assert report.good == [
        (
            3,
            {
                "prs_FirstName": "Mirelka",
                "prs_SecondName": "Dovanto",
                "con_Consent": "TRUE",
                "prs_Birthdate": "1994-05-17",
                "prs_Gender": "Feminine",
                "prs_Citizenship": "PH",
                "prs_MobilePhone": "5550142",
                "vic_MethodsOfControl": "DebtBondage;WithholdsDocuments",
                "cas_IncomingReferralDate": "2025-03-01",
            },
        ),
        (5, {"cas_CaseOwner": "Talenu Brisvek", "con_Consent": "FALSE"}),
    ]


def test_bad_cells_in_a_filled_template_are_reported_by_sheet_row(tmp_path: Path) -> None:
    workbook, column = template_sheet()
    sheet = workbook.worksheets[0]
    sheet.cell(3, column["cas_CaseOwner"], "Talenu Brisvek")
    sheet.cell(7, column["prs_Birthdate"], dt.datetime(1994, 5, 17, 14, 30))  # a time as well
    sheet.cell(7, column["cas_Status"], "Open")
    path = tmp_path / "filled.xlsx"
    workbook.save(path)
    report = validate_file(path)
    assert [n for n, _ in report.good] == [3]
    assert [(n, [e.field for e in errors]) for n, errors in report.bad] == [
        (7, ["prs_Birthdate", "cas_Status"])
    ]


def test_text_in_the_templates_unnamed_column_is_refused(tmp_path: Path) -> None:
    workbook, column = template_sheet()
    sheet = workbook.worksheets[0]
    unnamed = next(c.column for c in sheet[2] if c.value == "Reason for Outgoing Referral")
    sheet.cell(4, column["cas_CaseOwner"], "Talenu Brisvek")
    sheet.cell(4, unnamed, "Needed specialist care")
    path = tmp_path / "filled.xlsx"
    workbook.save(path)
    with pytest.raises(InvalidInput) as caught:
        validate_file(path)
    assert "column AJ" in caught.value.message
    assert "'Reason for Outgoing Referral'" in caught.value.message
    assert "row 4" in caught.value.message
    assert "cas_OutgoingReferralDetails" in (caught.value.hint or "")


def test_csv_variants_and_row_numbers(tmp_path: Path) -> None:
    labels = ["Case Owner", "First Name", "Gender"]
    path = write_csv_rows(
        tmp_path / "excel-eu.csv",
        [
            ["cas_CaseOwner", "prs_FirstName", "prs_Gender"],
            labels,  # row 2: the published spreadsheet's labels, skipped
            ["Talenu Brisvek", "Mirelka", "feminine"],  # row 3
            ["", "", ""],  # row 4: empty, skipped
            ["Talenu Brisvek", "Line one\nline two", ""],  # row 5 spans two lines
            ["Talenu Brisvek", "Dovanto", "Masculine"],  # row 6
        ],
        encoding="utf-8-sig",  # Excel's "CSV UTF-8" starts with a byte-order mark
        delimiter=";",  # and uses ';' between cells in many locales
    )
    rows = list(read_table(path))
    assert [row.number for row in rows] == [3, 5, 6]
    assert rows[0].values == {
        "cas_CaseOwner": "Talenu Brisvek",
        "prs_FirstName": "Mirelka",
        "prs_Gender": "feminine",  # raw: read_table does not validate
    }
    report = validate_file(path)
    assert report.bad == []
    assert report.good[0][1]["prs_Gender"] == "Feminine"


def test_a_data_row_2_is_not_taken_for_labels(tmp_path: Path) -> None:
    path = write_csv_rows(
        tmp_path / "cases.csv",
        [["cas_CaseOwner", "prs_Gender"], ["Status", "Feminine"], ["Consent", ""]],
    )
    assert [row.number for row in read_table(path)] == [2, 3]


def test_non_utf8_csv_is_refused_with_advice(tmp_path: Path) -> None:
    path = tmp_path / "legacy.csv"
    path.write_bytes("prs_FirstName,prs_Gender\nJosé,Masculine\n".encode("cp1252"))
    with pytest.raises(InvalidInput) as caught:
        list(read_table(path))
    assert "not UTF-8" in caught.value.message
    assert "line 2" in caught.value.message
    assert "CSV UTF-8" in (caught.value.hint or "")


def test_text_file_renamed_xlsx_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cases.xlsx"
    path.write_text("prs_FirstName,prs_Gender\nMirelka,Feminine\n", encoding="utf-8")
    with pytest.raises(InvalidInput) as caught:
        validate_file(path)
    assert "not an Excel .xlsx workbook" in caught.value.message
    assert "text file" in caught.value.message
    assert "rename it to .csv" in (caught.value.hint or "")


def test_damaged_and_misnamed_workbooks_are_refused(tmp_path: Path) -> None:
    broken = tmp_path / "broken.xlsx"
    broken.write_bytes(b"PK\x03\x04" + b"\x00" * 200)
    with pytest.raises(InvalidInput, match=r"not an Excel \.xlsx workbook"):
        validate_file(broken)

    old = tmp_path / "old.xlsx"
    old.write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 100)
    with pytest.raises(InvalidInput, match=r"97-2003 \(\.xls\)"):
        validate_file(old)

    workbook = tmp_path / "cases.csv"  # an .xlsx saved under a .csv name
    shutil.copy(TEMPLATE, workbook)
    with pytest.raises(InvalidInput) as caught:
        validate_file(workbook)
    assert "rename it to .xlsx" in (caught.value.hint or "")

    truncated = tmp_path / "truncated.xlsx"  # a real workbook whose sheet XML is cut short
    with zipfile.ZipFile(TEMPLATE) as source, zipfile.ZipFile(truncated, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename == "xl/worksheets/sheet1.xml":
                data = data[: len(data) // 2]
            target.writestr(item, data)
    with pytest.raises(InvalidInput, match=r"damaged|not an Excel"):
        validate_file(truncated)


def test_unknown_column_is_refused_with_suggestion(tmp_path: Path) -> None:
    path = write_csv_rows(
        tmp_path / "cases.csv",
        [["cas_CaseOwner", "prs_Nickname", "prs_FristName"], ["Talenu Brisvek", "Mimi", "Mi"]],
    )
    with pytest.raises(InvalidInput) as caught:
        list(read_table(path))
    message = caught.value.message
    assert "'prs_Nickname' (column B)" in message
    assert "'prs_FristName' (column C, did you mean prs_FirstName?)" in message
    assert "tessera_" in (caught.value.hint or "")
    assert "Mimi" not in str(caught.value)


def test_duplicate_column_is_refused(tmp_path: Path) -> None:
    path = write_csv_rows(
        tmp_path / "cases.csv", [["prs_FirstName", "cas_Status", "prs_First_Name"], ["a", "", "b"]]
    )
    with pytest.raises(InvalidInput, match=r"prs_FirstName appears twice.*columns A and C"):
        list(read_table(path))


def test_missing_header_is_refused_without_echoing_data(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(InvalidInput, match="row 1 is empty"):
        list(read_table(empty))

    headless = write_csv_rows(tmp_path / "headless.csv", [["Mirelka", "Dovanto", "Feminine"]])
    with pytest.raises(InvalidInput) as caught:
        list(read_table(headless))
    assert "no HTCDS field names" in caught.value.message
    assert "Mirelka" not in str(caught.value)

    labels = write_csv_rows(tmp_path / "labels.csv", [["First Name", "Gender"], ["Mirelka", ""]])
    with pytest.raises(InvalidInput, match="human labels"):
        list(read_table(labels))

    stray = write_csv_rows(
        tmp_path / "stray.csv", [["prs_FirstName", ""], ["Mirelka", "Mirelka's sister"]]
    )
    with pytest.raises(InvalidInput, match=r"column B has no field name in row 1.*row 2"):
        list(read_table(stray))


def test_unsupported_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"\.csv or \.xlsx, not \.xls"):
        list(read_table(tmp_path / "cases.xls"))
    with pytest.raises(NotFound):
        list(read_table(tmp_path / "absent.csv"))


def test_count_rows_estimates(tmp_path: Path) -> None:
    path = write_csv_rows(tmp_path / "a.csv", [["prs_FirstName"], ["a"], ["b"], ["c"]])
    assert count_rows(path) == 3
    assert count_rows(TEMPLATE) == 1001  # the declared size: labels and numbered empty rows
    assert count_rows(tmp_path / "absent.csv") is None
    assert count_rows(tmp_path / "cases.ods") is None


# --- writing and round trips -------------------------------------------------------------------


def tricky_records() -> list[dict[str, str]]:
    """Synthetic records plus values that trip spreadsheets up, each tagged with a case id."""
    records = synthetic_records(40, seed=11)
    records[0]["cas_IncomingReferralDetails"] = "=SUM(A1:A2) is not a formula"
    records[1]["prs_MobilePhone"] = "+1-202-555-0100"
    records[2]["prs_MailingPostalCode"] = "01234"
    records[3]["cas_OutgoingReferralDetails"] = "First line\nSecond line, with ümlauts"
    records[4]["prs_MailingStreet"] = '12 "Quoted" Street; Flat 3'
    return [{**record, "tessera_case_id": f"case-{i:03d}"} for i, record in enumerate(records)]


@pytest.mark.parametrize("writer", [write_csv, write_xlsx], ids=["csv", "xlsx"])
def test_export_then_import_gives_the_same_records(tmp_path: Path, writer: object) -> None:
    records = tricky_records()
    path = tmp_path / ("export.csv" if writer is write_csv else "export.xlsx")
    assert callable(writer)
    assert writer(path, records, extra_columns=["tessera_case_id"]) == len(records)
    report = validate_file(path)
    assert report.header == (*FIELD_NAMES, "tessera_case_id")
    assert report.bad == []
    assert [values for _n, values in report.good] == records
    assert [n for n, _values in report.good] == list(range(2, len(records) + 2))
    if os.name == "posix":
        assert path.stat().st_mode & 0o777 == 0o600  # survivor data: owner only


def test_xlsx_export_stores_text_as_text_and_dates_as_dates(tmp_path: Path) -> None:
    path = tmp_path / "export.xlsx"
    write_xlsx(path, tricky_records()[:1], extra_columns=["tessera_case_id"])
    sheet = openpyxl.load_workbook(path).worksheets[0]
    header = [cell.value for cell in sheet[1]]
    details = sheet.cell(2, header.index("cas_IncomingReferralDetails") + 1)
    assert details.data_type == "s"
    assert details.value == "=SUM(A1:A2) is not a formula"
    referred = sheet.cell(2, header.index("cas_IncomingReferralDate") + 1)
    assert isinstance(referred.value, dt.datetime)
    assert referred.number_format == "yyyy-mm-dd"


def test_writers_refuse_columns_they_cannot_read_back(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must start with 'tessera_'"):
        write_csv(tmp_path / "a.csv", [], extra_columns=["case_id"])
    with pytest.raises(ValueError, match="outside the export columns"):
        write_csv(tmp_path / "a.csv", [{"prs_Nickname": "Mimi"}])
    assert not (tmp_path / "a.csv").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_rejects_file_lists_errors_and_imports_once_corrected(tmp_path: Path) -> None:
    source = csv_of(
        tmp_path / "cases.csv",
        [
            {"cas_CaseOwner": "Talenu Brisvek", "prs_Gender": "Feminine", "cas_Status": "Active"},
            {"cas_CaseOwner": "Talenu Brisvek", "prs_Gender": "Femenine", "cas_Status": "Opened"},
        ],
    )
    report = validate_file(source)
    rejects = tmp_path / "rejects.csv"
    assert write_rejects(rejects, report.header, report.rejects()) == 1
    with rejects.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        [row] = list(reader)
    assert reader.fieldnames == [
        "cas_CaseOwner",
        "prs_Gender",
        "cas_Status",
        "tessera_source_row",
        "tessera_errors",
    ]
    assert row["tessera_source_row"] == "3"
    assert row["prs_Gender"] == "Femenine"
    problems = row["tessera_errors"].split(" | ")
    assert [problem.split(": ", 1)[0] for problem in problems] == ["prs_Gender", "cas_Status"]

    fixed = {**row, "prs_Gender": "Feminine", "cas_Status": "Active"}
    corrected = csv_of(tmp_path / "corrected.csv", [fixed])
    again = validate_file(corrected)
    assert again.bad == []
    assert again.good == [
        (2, {"cas_CaseOwner": "Talenu Brisvek", "prs_Gender": "Feminine", "cas_Status": "Active"})
    ]


# --- synthetic records -------------------------------------------------------------------------


def test_synthetic_records_are_valid_fictional_and_deterministic() -> None:
    records = synthetic_records(300, seed=5)
    assert records == synthetic_records(300, seed=5)
    assert records != synthetic_records(300, seed=6)
    for record in records:
        values, errors = validate_record(record)
        assert errors == []
        assert values == record  # already in normalised form
        assert record["prs_Email"].endswith("@example.org")
        assert "-555-01" in record["prs_MobilePhone"]
    coded = [spec.name for spec in htcds.FIELDS if spec.kind is not FieldKind.TEXT]
    for name in coded:
        assert any(name in record for record in records), name
    assert {r["prs_Gender"] for r in records} == set(FIELD_BY_NAME["prs_Gender"].choices)


# --- attacks on the CSV path (issue 16) ---------------------------------------------------------

FORMULAS = [
    '=HYPERLINK("http://evil","click")',
    "+1-202-555-0100",
    "-2+3",
    "@SUM(A1)",
    "'=already quoted",
    "''",
    "'plain apostrophe",
]


def test_exported_csv_cells_never_start_a_formula_and_read_back_unchanged(tmp_path: Path) -> None:
    """OWASP: a cell starting = + - @ TAB or CR is prefixed with ' on export, and that quote
    alone is removed on import, so every value round-trips, the phone numbers included."""
    records = [
        {**record, "cas_IncomingReferralDetails": value}
        for record, value in zip(synthetic_records(len(FORMULAS), seed=5), FORMULAS, strict=True)
    ]
    path = tmp_path / "export.csv"
    write_csv(path, records)
    import csv as csv_module

    with path.open(encoding="utf-8-sig", newline="") as handle:
        cells = [cell for row in csv_module.reader(handle) for cell in row]
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")]
    # Leading TAB or CR (which validation trims from a field) are neutralised all the same.
    for value in ("\tx", "\rx", *FORMULAS):
        assert csv_value(csv_cell(value)) == value and csv_cell(value)[:1] not in "=+-@\t\r"
    report = validate_file(path)
    assert report.bad == []
    assert [values for _n, values in report.good] == records
    # The rejects file a person opens in Excel is neutralised the same way.
    rejects = tmp_path / "rejects.csv"
    bad = [dict(r, prs_Citizenship="XX") for r in records]
    write_csv(tmp_path / "bad.csv", bad)
    validated = validate_file(tmp_path / "bad.csv")
    write_rejects(rejects, validated.header, validated.rejects())
    with rejects.open(encoding="utf-8-sig", newline="") as handle:
        cells = [cell for row in csv_module.reader(handle) for cell in row]
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")]


def test_a_csv_ending_inside_an_open_quote_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cut.csv"
    path.write_text('prs_FirstName,prs_SecondName\nAna,"Ruiz\nBo,Lind\n', encoding="utf-8")
    with pytest.raises(InvalidInput, match="is not valid CSV"):
        validate_file(path)


def test_thousands_of_unknown_columns_get_a_short_error(tmp_path: Path) -> None:
    path = tmp_path / "wide.csv"
    header = ["prs_FirstName", *(f"junk_{i}" for i in range(5000))]
    path.write_text(",".join(header) + "\n" + "Ana" + "," * 5000 + "\n", encoding="utf-8")
    with pytest.raises(InvalidInput) as caught:
        validate_file(path)
    message = caught.value.message
    assert "5000 column(s)" in message and "and 4990 more" in message
    assert len(message) < 1500
