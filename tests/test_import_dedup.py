"""One survivor, one case (issue 14 item 4), tried as an agency's administrator would.

Re-importing the same spreadsheet, or the node's own export, must add nobody twice; an export
edited and imported with ``--on-duplicate update`` changes exactly the edited case, through the
versioned, audited update path; ``--on-duplicate new`` adds them and says what each matched; a
survivor entered twice in one file is one case; erasing one of two matching cases names the
other and leaves it findable. Real servers on loopback port 0, real SQLite and PostgreSQL, real
spreadsheets (the published HTCDS template filled with openpyxl, and CSV).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import openpyxl
import pytest

from node.client import NodeClient
from node.dedup import Identity, adds_nothing, same_survivor
from node.domain import DuplicatePolicy, MatchRule, RowAction, RowOutcome
from node.htcds.csv_format import write_csv
from node.htcds.synthetic import synthetic_records
from node.store import imports
from tessera.errors import Conflict
from tessera.needs import NeedCategory, NeedStatus
from tests.nodefixtures import (
    NodeFactory,
    db_url_fixture,  # noqa: F401  (fixture)
    flip_byte,
    nodes_fixture,  # noqa: F401  (fixture)
)
from tests.support import BackgroundNode, make_node, unlock
from tests.test_node_cli import tessera

TEMPLATE = Path(__file__).parent / "data" / "htcds_v2_template.xlsx"


@pytest.fixture
def node(tmp_path: Path, db_url: str) -> Iterator[BackgroundNode]:
    running = BackgroundNode(make_node(tmp_path / "node", database_url=db_url))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def admin(node: BackgroundNode) -> Iterator[NodeClient]:
    with NodeClient(node.settings.home, unlock=unlock) as client:
        yield client


def _count(node: BackgroundNode) -> int:
    return node.running.store.count_cases()


def _import(
    admin: NodeClient, path: Path, policy: DuplicatePolicy = DuplicatePolicy.SKIP
) -> dict[str, object]:
    return admin.import_cases(path, False, lambda *_p: None, policy)


def _rows(result: Mapping[str, object]) -> list[RowOutcome]:
    rows = result["rows"]
    assert isinstance(rows, list)
    return rows


def _filled_template(path: Path, records: Sequence[Mapping[str, str]]) -> Path:
    """The published HTCDS spreadsheet filled in as an agency does: data from row 3 (row 2 holds
    labels), birthdates as Excel date cells, mobile numbers typed as numbers."""
    workbook = openpyxl.load_workbook(TEMPLATE)
    sheet = workbook.worksheets[0]
    column = {cell.value: cell.column for cell in sheet[1] if isinstance(cell.value, str)}
    for offset, record in enumerate(records):
        for name, value in record.items():
            cell: object = value
            if name in ("prs_Birthdate", "cas_IncomingReferralDate"):
                cell = dt.date.fromisoformat(value)
            elif name == "prs_MobilePhone":
                cell = int("".join(ch for ch in value if ch.isdigit()))
            sheet.cell(3 + offset, column[name], cell)
    workbook.save(path)
    return path


def _intake(n: int, seed: int) -> list[dict[str, str]]:
    """Synthetic intake rows with the fields an agency's first spreadsheet holds."""
    keep = (
        "cas_CaseOwner",
        "prs_FirstName",
        "prs_SecondName",
        "prs_Birthdate",
        "prs_Gender",
        "prs_Citizenship",
        "prs_Email",
        "prs_MobilePhone",
        "vic_TypeOfExploitation",
        "cas_IncomingReferralDate",
    )
    return [{k: v for k, v in record.items() if k in keep} for record in synthetic_records(n, seed)]


def _edit_csv(path: Path, row: int, field: str, value: str) -> None:
    """Change one cell of a CSV as a person would in a spreadsheet program (row as shown)."""
    with path.open(encoding="utf-8-sig", newline="") as source:
        table = list(csv.reader(source))
    table[row - 1][table[0].index(field)] = value
    with path.open("w", encoding="utf-8-sig", newline="") as out:
        csv.writer(out).writerows(table)


def _export(admin: NodeClient, path: Path) -> Path:
    path.write_bytes(b"".join(chunk for chunk, _n in admin.export_cases(path.suffix[1:], None)))
    return path


# --- (1) the same spreadsheet twice ---------------------------------------------------------


def test_the_same_spreadsheet_imported_twice_adds_nobody_twice(
    node: BackgroundNode, admin: NodeClient, tmp_path: Path
) -> None:
    records = _intake(12, seed=31)
    xlsx = _filled_template(tmp_path / "intake.xlsx", records)
    first = _import(admin, xlsx)
    assert first["imported"] == 12
    assert [o.action for o in _rows(first)] == [RowAction.ADDED] * 12
    assert [o.row for o in _rows(first)] == list(range(3, 15))  # the template's sheet rows
    ids = first["case_ids"]

    again = _import(admin, xlsx)
    assert _count(node) == 12
    assert again["imported"] == 0 and again["case_ids"] == []
    assert [(o.action, o.case_id, o.matched_cases) for o in _rows(again)] == [
        (RowAction.SKIPPED, case_id, (case_id,)) for case_id in ids
    ]
    assert {o.match for o in _rows(again)} == {MatchRule.NAME_AND_BIRTHDATE}

    # The same people typed into a CSV by someone else (other letter case and spacing, no
    # birthdates): matched by name and email, still nobody added.
    retyped = [
        {
            "prs_FirstName": r["prs_FirstName"].upper(),
            "prs_SecondName": f"  {r['prs_SecondName'].lower()} ",
            "prs_Email": r["prs_Email"].upper(),
        }
        for r in records
    ]
    as_csv = tmp_path / "retyped.csv"
    write_csv(as_csv, retyped)
    third = _import(admin, as_csv)
    assert _count(node) == 12
    assert [(o.action, o.case_id, o.match) for o in _rows(third)] == [
        (RowAction.SKIPPED, case_id, MatchRule.NAME_AND_EMAIL) for case_id in ids
    ]
    imported = node.running.store.audit_entries(actions=("cases.import",))
    assert [(e.detail["cases"], e.detail["matched"]) for e in imported] == [
        (12, 0),
        (0, 12),
        (0, 12),
    ]


def test_the_same_csv_imported_twice_adds_nobody_twice(
    node: BackgroundNode, admin: NodeClient, tmp_path: Path
) -> None:
    source = tmp_path / "intake.csv"
    write_csv(source, synthetic_records(25, seed=5))
    first = _import(admin, source)
    again = _import(admin, source)
    assert _count(node) == 25
    assert [o.action for o in _rows(again)] == [RowAction.SKIPPED] * 25
    assert [o.case_id for o in _rows(again)] == first["case_ids"]


# --- (2) the node's own export ----------------------------------------------------------------


def test_an_export_imported_back_adds_nothing_and_an_edited_cell_updates_one_case(
    node: BackgroundNode, admin: NodeClient, tmp_path: Path
) -> None:
    source = tmp_path / "intake.csv"
    write_csv(source, synthetic_records(10, seed=8))
    ids = _import(admin, source)["case_ids"]
    assert isinstance(ids, list)
    # What the file does not carry must survive an update from it: notes and needs.
    noted = admin.update_case(ids[3], 1, {}, [], "moved to the north shelter")
    admin.set_need(ids[3], NeedCategory.LEGAL_CIVIL, NeedStatus.UNMET)
    before = {i: admin.get_case(i) for i in ids}

    exported = _export(admin, tmp_path / "export.csv")
    back = _import(admin, exported)
    assert _count(node) == 10
    by_case = {o.case_id: o for o in _rows(back)}
    assert set(by_case) == set(ids)
    assert {(o.action, o.match) for o in _rows(back)} == {(RowAction.SKIPPED, MatchRule.CASE_ID)}

    # One cell edited in the export; imported with --on-duplicate update.
    with exported.open(encoding="utf-8-sig", newline="") as handle:
        table = list(csv.reader(handle))
    target_row = next(
        n for n, line in enumerate(table[1:], start=2) if line[-1] == ids[3]
    )  # the tessera_case_id column is last
    _edit_csv(exported, target_row, "prs_MailingCity", "Velmor Harbour")
    updated = _import(admin, exported, DuplicatePolicy.UPDATE)
    assert _count(node) == 10 and updated["imported"] == 0
    changed = [o for o in _rows(updated) if o.action is RowAction.UPDATED]
    assert [(o.row, o.case_id, o.changed_fields) for o in changed] == [
        (target_row, ids[3], ("prs_MailingCity",))
    ]
    assert {o.action for o in _rows(updated) if o is not changed[0]} == {RowAction.UNCHANGED}

    after = {i: admin.get_case(i) for i in ids}
    edited = after[ids[3]]
    assert edited["version"] == noted["version"] + 1
    assert edited["fields"] == {**before[ids[3]]["fields"], "prs_MailingCity": "Velmor Harbour"}
    assert edited["notes"] == "moved to the north shelter"
    assert [(n["category"], n["status"]) for n in edited["needs"]] == [("legal_civil", "unmet")]
    assert "tessera_case_id" not in edited["fields"]
    for case_id in ids:
        if case_id != ids[3]:
            assert after[case_id]["version"] == before[case_id]["version"]
            assert after[case_id]["fields"] == before[case_id]["fields"]
    # The update went through `case update`'s path: audited with its field names and version.
    updates = node.running.store.audit_entries(ids[3], ("case.update",))
    assert updates[-1].detail == {"fields": ["prs_MailingCity"], "notes": False, "version": 3}
    assert node.running.store.verify_audit().ok


def test_an_xlsx_export_imported_back_adds_nothing(
    node: BackgroundNode, admin: NodeClient, tmp_path: Path
) -> None:
    source = _filled_template(tmp_path / "intake.xlsx", _intake(6, seed=2))
    _import(admin, source)
    back = _import(admin, _export(admin, tmp_path / "export.xlsx"), DuplicatePolicy.UPDATE)
    assert _count(node) == 6
    assert {(o.action, o.match) for o in _rows(back)} == {(RowAction.UNCHANGED, MatchRule.CASE_ID)}


# --- (3) --on-duplicate new -------------------------------------------------------------------


def test_on_duplicate_new_adds_them_and_says_what_each_matched(
    node: BackgroundNode, admin: NodeClient, tmp_path: Path
) -> None:
    source = tmp_path / "intake.csv"
    write_csv(source, synthetic_records(8, seed=13))
    first = _import(admin, source)["case_ids"]
    again = _import(admin, source, DuplicatePolicy.NEW)
    assert _count(node) == 16
    assert again["imported"] == 8
    rows = _rows(again)
    assert [o.action for o in rows] == [RowAction.ADDED_DESPITE_MATCH] * 8
    assert [o.matched_cases for o in rows] == [(case_id,) for case_id in first]
    assert [o.case_id for o in rows] == again["case_ids"]
    assert not set(again["case_ids"]) & set(first)


# --- (4) the same survivor twice in one file --------------------------------------------------


def test_a_survivor_twice_in_one_file_is_one_case(
    node: BackgroundNode, admin: NodeClient, tmp_path: Path
) -> None:
    ana, other = _intake(2, seed=40)
    again = {**ana, "prs_MobilePhone": "+1-202-555-0199"}  # entered again, new phone
    sparse = {"prs_FirstName": "Quelbri", "prs_SecondName": "Omtas"}  # a name and nothing else
    source = tmp_path / "intake.csv"
    write_csv(source, [ana, other, again, sparse, dict(sparse)])
    result = _import(admin, source)
    assert _count(node) == 3
    rows = _rows(result)
    first_case, _other, sparse_case = result["case_ids"]
    assert [(o.row, o.action) for o in rows] == [
        (2, RowAction.ADDED),
        (3, RowAction.ADDED),
        (4, RowAction.SKIPPED),
        (5, RowAction.ADDED),
        (6, RowAction.SKIPPED),
    ]
    assert (rows[2].case_id, rows[2].matched_row, rows[2].match) == (
        first_case,
        2,
        MatchRule.NAME_AND_BIRTHDATE,
    )
    assert (rows[4].case_id, rows[4].matched_row, rows[4].match) == (
        sparse_case,
        5,
        MatchRule.NAME_NOTHING_NEW,
    )
    # With --on-duplicate update on a fresh file, the second row's new phone goes into the
    # case the first row added: still one case.
    ana2 = _intake(1, seed=41)[0]
    later = tmp_path / "later.csv"
    write_csv(later, [ana2, {**ana2, "prs_MobilePhone": "+1-202-555-0100"}])
    merged = _import(admin, later, DuplicatePolicy.UPDATE)
    assert _count(node) == 4
    (new_case,) = merged["case_ids"]
    assert [(o.action, o.case_id, o.matched_row) for o in _rows(merged)] == [
        (RowAction.ADDED, new_case, 0),
        (RowAction.UPDATED, new_case, 2),
    ]
    assert admin.get_case(new_case)["fields"]["prs_MobilePhone"] == "+1-202-555-0100"


# --- (5) erasing one of two matching cases ----------------------------------------------------


def test_erasing_one_of_two_matching_cases_names_the_other(
    node: BackgroundNode, admin: NodeClient, tmp_path: Path
) -> None:
    records = _intake(3, seed=17)
    source = tmp_path / "intake.csv"
    write_csv(source, records)
    first = _import(admin, source)["case_ids"]
    second = _import(admin, source, DuplicatePolicy.NEW)["case_ids"]
    assert isinstance(first, list) and isinstance(second, list)
    name = {
        "prs_FirstName": records[0]["prs_FirstName"],
        "prs_SecondName": records[0]["prs_SecondName"],
    }
    assert sorted(c["case_id"] for c in admin.find_cases(name)) == sorted([first[0], second[0]])

    erased = admin.erase_case(second[0], "survivor asked")
    assert erased["same_survivor"] == [first[0]]
    assert [c["case_id"] for c in admin.find_cases(name)] == [first[0]]
    # The one left names nobody now; the other survivors were not touched.
    assert admin.erase_case(first[0], "survivor asked")["same_survivor"] == []
    assert _count(node) == 4
    # An old export naming an erased case never brings it back, whatever the policy.
    old = tmp_path / "old.csv"
    write_csv(old, [{**records[0], "tessera_case_id": first[0]}], ("tessera_case_id",))
    for policy in DuplicatePolicy:
        (row,) = _rows(_import(admin, old, policy))
        assert (row.action, row.case_id) == (RowAction.ERASED, first[0])
    assert _count(node) == 4


# --- the rule, on the store of both databases -------------------------------------------------


def _person(**fields: str) -> dict[str, str]:
    return {"prs_FirstName": "Mirelka", "prs_SecondName": "Dovanto", **fields}


def test_the_matching_rule(nodes: NodeFactory, db_url: str) -> None:
    node = nodes.make(db_url)
    base = _person(
        prs_Birthdate="1994-05-17",
        prs_Email="mirelka@example.org",
        prs_MobilePhone="+1-202-555-0142",
        prs_HomePhone="+1-202-555-0150",
    )
    (case_id,) = imports.import_cases(
        node.store, "admin", [(2, base)], DuplicatePolicy.SKIP
    ).case_ids

    def verdict(fields: dict[str, str]) -> tuple[RowAction, MatchRule | None]:
        # A fresh node would add it; against the case above, what does the rule say?
        (outcome,) = imports.import_cases(
            node.store, "admin", [(2, fields)], DuplicatePolicy.SKIP
        ).rows
        if outcome.action is RowAction.ADDED:
            node.store.erase_case("admin", outcome.case_id)  # keep the node to one case
        else:
            assert outcome.matched_cases == (case_id,)
        return outcome.action, outcome.match

    skipped, added = RowAction.SKIPPED, (RowAction.ADDED, None)
    assert verdict(_person(prs_Birthdate="1994-05-17")) == (skipped, MatchRule.NAME_AND_BIRTHDATE)
    assert verdict(_person(prs_Email="MIRELKA@example.org ")) == (skipped, MatchRule.NAME_AND_EMAIL)
    # A home phone matches a mobile one and the other way round.
    assert verdict(_person(prs_MobilePhone="+1-202-555-0150")) == (
        skipped,
        MatchRule.NAME_AND_PHONE,
    )
    assert verdict(_person(prs_HomePhone="+1-202-555-0142")) == (skipped, MatchRule.NAME_AND_PHONE)
    # Same name, different birthdates: two people, even with the same shared phone.
    assert verdict(_person(prs_Birthdate="1990-01-01", prs_MobilePhone="+1-202-555-0142")) == added
    # A row matched to the case earlier in the same file cannot carry a different birthdate in:
    # the second row shares the first one's email, but its birthdate is not the case's.
    sparse = _person(prs_Email="mirelka@example.org")
    two = [(2, sparse), (3, {**sparse, "prs_Birthdate": "1985-03-03"})]
    outcome = imports.import_cases(node.store, "admin", two, DuplicatePolicy.SKIP).rows
    assert [(o.action, o.matched_cases) for o in outcome] == [
        (RowAction.SKIPPED, (case_id,)),
        (RowAction.ADDED, ()),
    ]
    node.store.erase_case("admin", outcome[1].case_id)
    # A name alone with something new, or an email or a phone without the name: not enough.
    assert verdict(_person(prs_Gender="Feminine")) == added
    assert verdict({"prs_FirstName": "Ana", "prs_Email": "mirelka@example.org"}) == added
    assert verdict({"prs_MobilePhone": "+1-202-555-0142"}) == added
    # The same name and nothing new (a sparse row imported again): a duplicate.
    assert verdict(_person()) == (skipped, MatchRule.NAME_NOTHING_NEW)
    assert node.store.count_cases() == 1


def test_pure_rule_is_symmetric_and_needs_the_name() -> None:
    a = Identity(name="n1", emails=frozenset({"e"}), birthdate="2000-01-01")
    b = Identity(name="n1", emails=frozenset({"e"}))
    assert same_survivor(a, b) is same_survivor(b, a) is MatchRule.NAME_AND_EMAIL
    assert same_survivor(Identity(name=None, emails=frozenset({"e"})), b) is None
    assert same_survivor(a, Identity(name="n1", birthdate="2000-01-02", emails=a.emails)) is None
    assert adds_nothing({"x": "1"}, {"x": "1", "y": "2"})
    assert not adds_nothing({"x": "1", "z": "3"}, {"x": "1"})


def test_matching_opens_only_the_candidates(nodes: NodeFactory, db_url: str) -> None:
    """An import decrypts only cases the blind index points at: a case it has no reason to open
    stays unopened, which a corrupted ciphertext there proves (opening it would fail)."""
    node = nodes.make(db_url)
    records = synthetic_records(6, seed=21)
    ids = imports.import_cases(
        node.store, "admin", list(enumerate(records[:3], start=2)), DuplicatePolicy.SKIP
    ).case_ids
    (row,) = node.sql("SELECT ciphertext FROM case_record WHERE case_id = :c", c=ids[0])
    node.sql(
        "UPDATE case_record SET ciphertext = :v WHERE case_id = :c",
        v=flip_byte(bytes(row[0]), 40),
        c=ids[0],
    )
    rows = list(enumerate(records[1:], start=2))  # everyone but the corrupted case's survivor
    outcome = imports.import_cases(node.store, "admin", rows, DuplicatePolicy.SKIP)
    assert [o.action for o in outcome.rows] == [RowAction.SKIPPED] * 2 + [RowAction.ADDED] * 3


def test_a_retried_import_answers_as_the_first_and_adds_nothing(
    nodes: NodeFactory, db_url: str
) -> None:
    node = nodes.make(db_url)
    records = synthetic_records(4, seed=9)
    rows = list(enumerate([*records, records[0]], start=2))
    first = imports.import_cases(
        node.store, "admin", rows, DuplicatePolicy.SKIP, idempotency_key="k-1"
    )
    retried = imports.import_cases(
        node.store, "admin", rows, DuplicatePolicy.SKIP, idempotency_key="k-1"
    )
    assert retried == first
    assert [o.action for o in first.rows][-1] is RowAction.SKIPPED
    assert node.store.count_cases() == 4
    node.store.create_cases("admin", [], idempotency_key="k-2")  # a create's key
    with pytest.raises(Conflict):
        imports.import_cases(node.store, "admin", rows, DuplicatePolicy.SKIP, idempotency_key="k-2")


def test_an_update_refused_by_a_concurrent_change_is_reported(
    nodes: NodeFactory, db_url: str
) -> None:
    """A row whose case changed between matching and writing is reported NOT_UPDATED, and the
    concurrent change is kept: no lost update."""
    node = nodes.make(db_url)
    base = _person(prs_Birthdate="1994-05-17")
    (case_id,) = imports.import_cases(
        node.store, "admin", [(2, base)], DuplicatePolicy.SKIP
    ).case_ids
    real_create = node.store.create_cases

    def create_then_someone_edits(*args: object, **kwargs: object) -> list[str]:
        ids = real_create(*args, **kwargs)
        node.another_store().update_case("caseworker", case_id, 1, {"prs_Gender": "Feminine"}, None)
        return ids

    node.store.create_cases = create_then_someone_edits
    (row,) = imports.import_cases(
        node.store, "admin", [(2, {**base, "prs_Citizenship": "PH"})], DuplicatePolicy.UPDATE
    ).rows
    assert (row.action, row.case_id) == (RowAction.NOT_UPDATED, case_id)
    assert "changed during the import" in row.note
    case = node.store.get_case("admin", case_id)
    assert (case.version, case.fields.get("prs_Gender"), case.fields.get("prs_Citizenship")) == (
        2,
        "Feminine",
        None,
    )


def test_several_matching_cases_are_never_updated(nodes: NodeFactory, db_url: str) -> None:
    node = nodes.make(db_url)
    base = _person(prs_Birthdate="1994-05-17")
    two = [(2, base), (3, base)]
    ids = imports.import_cases(node.store, "admin", two, DuplicatePolicy.NEW).case_ids
    assert len(ids) == 2
    (row,) = imports.import_cases(
        node.store, "admin", [(2, {**base, "prs_Gender": "Feminine"})], DuplicatePolicy.UPDATE
    ).rows
    assert (row.action, row.case_id, row.matched_cases) == (
        RowAction.NOT_UPDATED,
        "",
        tuple(sorted(ids)),
    )
    assert [node.store.get_case("admin", i).version for i in ids] == [1, 1]
    (skipped,) = imports.import_cases(node.store, "admin", [(2, base)], DuplicatePolicy.SKIP).rows
    assert skipped.matched_cases == tuple(sorted(ids))
    assert imports.same_survivor_cases(node.store, ids[0]) == [ids[1]]


# --- the command line, as an administrator types it -------------------------------------------


@pytest.fixture
def served(tmp_path: Path, db_url: str) -> Iterator[Path]:
    home = tmp_path / "shelter"
    init = ["node", "init", "--name", "Harbour Shelter", "--region", "north"]
    init += ["--listen", "127.0.0.1:0", *(["--database-url", db_url] if db_url else [])]
    made = tessera(home, *init)
    assert made.returncode == 0, made.stderr
    exe = shutil.which("tessera", path=os.path.dirname(sys.executable))
    assert exe
    env = {**os.environ, "TESSERA_PASSPHRASE": "a long test passphrase"}
    env["TESSERA_ARGON2"] = "test-cheap"
    process = subprocess.Popen(
        [exe, "--home", str(home), "node", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not (home / "run" / "node.json").exists():
        assert process.poll() is None, "the node stopped"
        assert time.monotonic() < deadline, "the node did not start"
        time.sleep(0.05)
    try:
        yield home
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def test_the_cli_reports_every_row_and_erase_names_the_other_case(
    served: Path, tmp_path: Path
) -> None:
    records = _intake(3, seed=23)
    source = tmp_path / "intake.csv"
    write_csv(source, records)
    first = tessera(served, "case", "import", str(source))
    assert first.returncode == 0, first.stderr
    assert "Imported 3 case(s); 0 row(s) refused." in first.stdout
    added = [line.split()[-1] for line in first.stdout.splitlines() if ": added case " in line]
    assert len(added) == 3

    report = tmp_path / "report.csv"
    again = tessera(served, "case", "import", str(source), "--report", str(report))
    assert again.returncode == 0, again.stderr
    for row, case_id in enumerate(added, start=2):
        assert (
            f"row {row}: skipped: duplicate of case {case_id} (same name and birthdate)"
            in again.stdout
        )
    assert "Imported 0 case(s); 0 row(s) refused. Rows matched: 3 skipped as duplicates." in (
        again.stdout
    )
    with report.open(encoding="utf-8", newline="") as handle:
        lines = list(csv.DictReader(handle))
    assert [(r["row"], r["action"], r["case_id"]) for r in lines] == [
        (str(n), "skipped", c) for n, c in enumerate(added, start=2)
    ]
    assert oct(report.stat().st_mode & 0o777) == "0o600"

    bad = tessera(served, "case", "import", str(source), "--on-duplicate", "merge")
    assert bad.returncode == 2
    assert "--on-duplicate" in bad.stderr and "'skip'" in bad.stderr

    new = tessera(served, "case", "import", str(source), "--on-duplicate", "new")
    assert new.returncode == 0, new.stderr
    copies = [
        line.split()[4].rstrip(",")
        for line in new.stdout.splitlines()
        if line.startswith("row ") and ": added case " in line
    ]
    assert f"new despite match with case {added[0]}" in new.stdout

    name = f"{records[0]['prs_FirstName']} {records[0]['prs_SecondName']}"
    found = json.loads(tessera(served, "case", "find", "--name", name, "-f", "json").stdout)
    assert sorted(c["case_id"] for c in found) == sorted([added[0], copies[0]])

    erased = tessera(served, "case", "erase", copies[0], "--yes")
    assert erased.returncode == 0, erased.stderr
    assert (
        f"Other cases with the same identifiers: {added[0]}; erase them too if they are the "
        "same survivor." in erased.stdout
    )
    found = json.loads(tessera(served, "case", "find", "--name", name, "-f", "json").stdout)
    assert [c["case_id"] for c in found] == [added[0]]
