"""The HTCDS file readers, fuzzed (issue 16 item 3): generated and mutated CSV and XLSX files.

``validate_file``, ``read_table`` and ``count_rows`` read what an administrator uploads
(``Node.ImportCases`` hands them the bytes unchanged). Whatever the bytes, they must either read
the file or refuse it with a typed error (a ``TesseraError``: InvalidInput naming the problem),
never raise anything else, and ``count_rows`` never raises at all. Files are generated from the
HTCDS catalogue (real field names, aliases in other cases, unknown and duplicate columns, hostile
cell values, other delimiters, encodings and line endings), written by Tessera's own writers,
built with openpyxl, and then mutated: bytes flipped, cut and inserted, and for workbooks one zip
member replaced by a mutation of itself, so the damage lands inside the XML rather than only in
the zip's checksums.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import io
import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.htcds import FIELD_NAMES, count_rows, read_table, validate_file, write_csv, write_xlsx
from tessera.errors import TesseraError
from tests import fuzzkit
from tests.fuzzkit import TALLY

CELL_VALUES = (
    "",
    " ",
    "Feminine",
    "feminine;masculine",
    "2026-02-30",
    "1990-01-01",
    '=HYPERLINK("http://x")',
    "'=1+1",
    "+441234567890",
    "GB",
    "ZZ",
    "TRUE",
    '"',
    '""',
    "a,b;c\td",
    "\r\n",
    "\x00",
    "\ufeff",
    "é" * 40,
    "x" * 3000,
)

header_names = st.one_of(
    st.sampled_from(FIELD_NAMES),
    st.sampled_from(FIELD_NAMES).map(str.upper),
    st.sampled_from(FIELD_NAMES).map(lambda n: f"  {n.lower()} "),
    st.sampled_from(["", "tessera_case_id", "tessera_errors", "tessera_x", "First Name"]),
    st.text(max_size=12),
)
cells = st.one_of(st.sampled_from(CELL_VALUES), st.text(max_size=20))
tables = st.tuples(
    st.lists(header_names, min_size=0, max_size=8),
    st.lists(st.lists(cells, max_size=9), max_size=5),
)


def _csv_bytes(header: list[str], rows: list[list[str]], delimiter: str, eol: str) -> str:
    def quote(cell: str) -> str:
        if any(c in cell for c in (delimiter, '"', "\n", "\r")):
            return '"' + cell.replace('"', '""') + '"'
        return cell

    return eol.join(delimiter.join(quote(c) for c in row) for row in [header, *rows]) + eol


@st.composite
def csv_files(draw: st.DrawFn) -> bytes:
    header, rows = draw(tables)
    text = _csv_bytes(
        header, rows, draw(st.sampled_from([",", ";", "\t"])), draw(st.sampled_from(["\n", "\r\n"]))
    )
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1", "cp1252"]))
    data = text.encode(encoding, errors="replace")
    if draw(st.booleans()):
        data = draw(fuzzkit.mutated(data))
    return data


def _workbook(header: list[str], rows: Sequence[Sequence[object]]) -> bytes:
    from openpyxl import Workbook

    book = Workbook()
    sheet = book.active
    assert sheet is not None
    for row in [header, *rows]:
        sheet.append([_excel_safe(v) for v in row])
    out = io.BytesIO()
    book.save(out)
    return _repacked(out.getvalue())


_CORE = (
    b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
    b'<cp:coreProperties xmlns:cp="http://schemas.openxmlformats.org/package/2006/metadata/'
    b'core-properties"/>'
)


def _repacked(data: bytes, members: dict[str, bytes] | None = None) -> bytes:
    """A workbook's zip rebuilt with fixed member times and no creation time inside, so the
    same draw makes the same bytes (hypothesis replays draws); ``members`` replaces the
    contents when given."""
    if members is None:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = {name: archive.read(name) for name in archive.namelist()}
        members["docProps/core.xml"] = _CORE
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
            archive.writestr(info, content)
    return out.getvalue()


def _excel_text(value: str) -> str:
    return "".join(c for c in value if c >= " " or c in "\t\n\r")[:32000]


def _excel_safe(value: object) -> object:
    # openpyxl refuses control characters in cells; a real spreadsheet cannot hold them either.
    if isinstance(value, str):
        return _excel_text(value)
    return value


xlsx_values = st.one_of(
    cells,
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.dates(min_value=dt.date(1900, 3, 1)),
    st.datetimes(min_value=dt.datetime(1900, 3, 1)),
    st.none(),
)


@st.composite
def xlsx_files(draw: st.DrawFn) -> bytes:
    header, _ = draw(tables)
    rows = draw(st.lists(st.lists(xlsx_values, max_size=9), max_size=4))
    data = _workbook(header, rows)
    how = draw(st.sampled_from(["intact", "bytes", "member", "drop-member"]))
    if how == "bytes":
        return draw(fuzzkit.mutated(data))
    if how in ("member", "drop-member"):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = {name: archive.read(name) for name in archive.namelist()}
        target = draw(st.sampled_from(sorted(members)))
        if how == "drop-member":
            del members[target]
        else:
            members[target] = draw(fuzzkit.mutated(members[target]))
        return _repacked(b"", members)
    return data


@st.composite
def exported_files(draw: st.DrawFn, suffix: str) -> bytes:
    """A file Tessera's own writer produced (what an agency re-imports), then mutated."""
    records = draw(
        st.lists(
            st.dictionaries(st.sampled_from(FIELD_NAMES), cells.map(_excel_text), max_size=5),
            max_size=4,
        )
    )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"export{suffix}"
        (write_csv if suffix == ".csv" else write_xlsx)(path, records, ())
        data = path.read_bytes() if suffix == ".csv" else _repacked(path.read_bytes())
    return draw(fuzzkit.mutated(data)) if draw(st.booleans()) else data


def _read_every_way(path: Path) -> None:
    """Each reader either reads the file or raises a typed error; count_rows never raises."""
    TALLY.files += 1
    estimate = count_rows(path)
    assert estimate is None or estimate >= 0
    try:
        report = validate_file(path)
    except TesseraError as exc:
        assert exc.message and len(exc.message) < 4000, exc.message
    else:
        assert report.rows == len(report.good) + len(report.bad)
    try:
        for row in read_table(path):
            assert row.number >= 2
    except TesseraError:
        pass


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("htcds-fuzz")


@pytest.mark.parametrize("suffix", [".csv", ".xlsx"])
@settings(max_examples=fuzzkit.examples(ci=60, full=1500))
@given(data=st.data())
def test_a_generated_or_mutated_file_is_read_or_refused_with_a_typed_error(
    scratch: Path, suffix: str, data: st.DataObject
) -> None:
    maker = csv_files() if suffix == ".csv" else xlsx_files()
    content = data.draw(st.one_of(maker, exported_files(suffix)), label="file")
    path = scratch / f"upload{suffix}"
    path.write_bytes(content)
    _read_every_way(path)


@settings(max_examples=fuzzkit.examples(ci=20, full=400))
@given(
    content=st.one_of(csv_files(), xlsx_files(), st.binary(max_size=200)),
    suffix=st.sampled_from([".csv", ".xlsx", ".CSV", ".txt", ""]),
)
def test_a_file_under_the_wrong_name_is_refused_with_a_typed_error(
    scratch: Path, content: bytes, suffix: str
) -> None:
    path = scratch / f"misnamed{suffix}"
    path.write_bytes(content)
    _read_every_way(path)


def _open_files() -> set[str]:
    fds = Path("/proc/self/fd")
    found = set()
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            found.add(os.readlink(fd))
    return found


def test_a_workbook_openpyxl_cannot_open_leaves_no_file_open(scratch: Path) -> None:
    """Found by fuzzing: openpyxl left the zip it failed on open until a garbage collection
    (a file descriptor per damaged upload; pytest saw the ResourceWarning)."""
    members = {"xl/styles.xml": b"<garbage"}  # parsed after the zip is opened
    with zipfile.ZipFile(io.BytesIO(_workbook(["prs_FirstName"], [["x"]]))) as archive:
        members = {**{n: archive.read(n) for n in archive.namelist()}, **members}
    path = scratch / "openpyxl-fails.xlsx"
    path.write_bytes(_repacked(b"", members))
    gc.disable()  # only closing the file, not a collection, may release it
    try:
        with pytest.raises(TesseraError):
            validate_file(path)
        assert str(path) not in _open_files()
    finally:
        gc.enable()
