"""Backups and restores of a node (DESIGN.md sections 4 and 5; issue 4).

A backup must hold no survivor field in clear and open only with the node's passphrase; a
tampered backup or a wrong passphrase is refused before anything changes; restoring an older
backup never brings back an erased survivor or a removed staff credential, and leaves an audit
chain that verifies. Real SQLite files and PostgreSQL databases throughout.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import event

from node import backup
from node.backup import create_backup, read_backup, restore_backup
from node.domain import StaffRole
from node.htcds.synthetic import synthetic_records
from node.server import start_node
from node.store.cases import LEDGER_FILE, NewCase
from node.store.database import open_database
from node.store.records import survivor_key_context
from tessera import config, crypto
from tessera.errors import (
    ConfigError,
    InvalidInput,
    NotFound,
    TamperedCiphertext,
    TesseraError,
    WrongPassphrase,
)
from tessera.needs import NeedCategory, NeedStatus
from tests.nodefixtures import (
    PASSPHRASE,
    Node,
    NodeFactory,
    db_url_fixture,  # noqa: F401  (fixture)
    extra_postgres_database,
    flip_byte,
    found_in,
    identifying_values,
    nodes_fixture,  # noqa: F401  (fixture)
)

STAFF_NAME = "Visible Staffname"


def _seed(node: Node, count: int, seed: int = 11) -> tuple[list[str], list[dict[str, str]]]:
    records = synthetic_records(count, seed)
    new = [
        NewCase(fields=r, notes=f"note {n}", needs=((NeedCategory.SAFE_HOUSING, NeedStatus.UNMET),))
        for n, r in enumerate(records)
    ]
    return node.store.create_cases("maria", new), records


def _home_files(node: Node) -> dict[str, bytes]:
    """What restore must not touch on failure, besides the database: keyring, head, ledger."""
    names = ("keys/keyring.json", "audit-head", LEDGER_FILE)
    return {n: (node.home / n).read_bytes() for n in names if (node.home / n).exists()}


# --- plaintext never at rest, in the backup either -------------------------------------------


def test_a_backup_file_holds_no_survivor_field(nodes: NodeFactory, db_url: str) -> None:
    node = nodes.make(db_url)
    node.store.add_staff(
        "admin", STAFF_NAME, StaffRole.CASEWORKER, crypto.Identity.generate().public.signing_key
    )
    _ids, records = _seed(node, 50)

    made = create_backup(node.store, node.home, node.home / "backups", "admin")

    content = made.path.read_bytes()
    assert made.size == len(content)
    assert found_in(content, identifying_values(records)) == []
    # Control: the staff name is in the snapshot in clear, yet not in the file: the body is sealed.
    _header, _keyring, snapshot = read_backup(made.path, PASSPHRASE)
    assert len(snapshot["case_record"]) == 50
    assert STAFF_NAME in json.dumps(snapshot)
    assert found_in(content, [STAFF_NAME]) == []
    assert made.path.stat().st_mode & 0o077 == 0


# --- restore never resurrects ---------------------------------------------------------------


def test_restore_does_not_bring_back_an_erased_survivor_or_a_removed_staff_member(
    nodes: NodeFactory, db_url: str
) -> None:
    node = nodes.make(db_url)
    key = crypto.Identity.generate().public.signing_key
    staff = node.store.add_staff("admin", "Leaving Soon", StaffRole.CASEWORKER, key)
    (erased, kept_1, kept_2), records = _seed(node, 3)
    before = {i: node.store.get_case("maria", i) for i in (kept_1, kept_2)}
    (erased_key,) = node.sql("SELECT wrapped_key FROM case_record WHERE case_id = :c", c=erased)[0]
    made = create_backup(node.store, node.home, node.home / "backups", "admin")

    node.store.erase_case("maria", erased)
    node.store.remove_staff("admin", staff.staff_id)
    node.store.update_case("maria", kept_1, 1, {"prs_FirstName": "Laterchange"}, None)

    assert restore_backup(node.home, node.engine, made.path, PASSPHRASE) == 1

    store = nodes.open(node.home, node.url).store  # as the node would start after the restore
    with pytest.raises(NotFound):
        store.get_case("maria", erased)
    assert node.sql("SELECT count(*) FROM case_record WHERE case_id = :c", c=erased) == [(0,)]
    assert node.sql(
        "SELECT count(*) FROM case_record WHERE wrapped_key = :k", k=bytes(erased_key)
    ) == [(0,)]
    if node.is_sqlite:  # the restore wrote the key back for a moment; it must not linger on disk
        assert bytes(erased_key) not in node.disk_bytes()
    assert erased in store.erased_ids()
    for case_id, record in ((kept_1, records[1]), (kept_2, records[2])):
        case = store.get_case("maria", case_id)
        assert dict(case.fields) == record
        assert (case.version, case.notes, case.needs) == (
            before[case_id].version,
            before[case_id].notes,
            before[case_id].needs,
        )
    restored_staff = store.staff_by_key(key)
    assert restored_staff is not None
    assert not restored_staff.active
    report = store.verify_audit()
    assert (report.ok, report.problems) == (True, ())
    actions = [e.action for e in store.audit_entries()]
    assert actions.count("erasures.reapplied") == actions.count("node.restored") == 1
    assert actions.index("erasures.reapplied") < actions.index("node.restored")


def test_restore_keeps_an_erasure_that_never_reached_the_ledger(
    nodes: NodeFactory, db_url: str
) -> None:
    # A crash between the erasure's commit and its ledger line: the database still knows.
    node = nodes.make(db_url)
    (erased, kept), records = _seed(node, 2)
    made = create_backup(node.store, node.home, node.home / "backups", "admin")
    node.store.erase_case("maria", erased)
    ledger = node.home / LEDGER_FILE
    ledger.write_text(
        "".join(line + "\n" for line in ledger.read_text().splitlines() if erased not in line)
    )

    restore_backup(node.home, node.engine, made.path, PASSPHRASE)

    with pytest.raises(NotFound):
        node.store.get_case("maria", erased)
    assert dict(node.store.get_case("maria", kept).fields) == records[1]
    assert node.store.verify_audit().ok


_KILLED_RESTORE = """
import os, signal, sys
from pathlib import Path
from node.backup import restore_backup
from node.store.cases import NodeStore
from node.store.database import open_database

def killed(*_args, **_kwargs):
    os.kill(os.getpid(), signal.SIGKILL)  # right after the tables were replaced

NodeStore.reapply_erasures = killed
home, url, backup_file, passphrase = sys.argv[1:]
restore_backup(Path(home), open_database(url), Path(backup_file), passphrase)
"""


def test_a_restore_killed_after_replacing_the_tables_never_brings_an_erased_survivor_back(
    nodes: NodeFactory, db_url: str
) -> None:
    node = nodes.make(db_url)
    (erased, kept), records = _seed(node, 2)
    made = create_backup(node.store, node.home, node.home / "backups", "admin")
    node.store.erase_case("maria", erased)
    # The erasure is known to the database only (its ledger line was lost in an earlier crash):
    # once the restore has replaced the tables, nothing but the restore's own note knows it.
    ledger = node.home / LEDGER_FILE
    ledger.write_text(
        "".join(line + "\n" for line in ledger.read_text().splitlines() if erased not in line)
    )
    node.engine.dispose()

    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            _KILLED_RESTORE,
            str(node.home),
            node.url,
            str(made.path),
            PASSPHRASE,
        ],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    # Killed between the two steps: the backup's tables are in, the erased survivor with them.
    assert node.sql("SELECT count(*) FROM case_record WHERE case_id = :c", c=erased) == [(1,)]
    assert (node.home / backup.RESTORE_PENDING_FILE).exists()

    # The node starting again finishes the restore before anything reads a case.
    async def start_and_stop() -> None:
        running = await start_node(config.load(node.home, {}), PASSPHRASE)
        await running.stop(0)

    asyncio.run(start_and_stop())
    restarted = nodes.open(node.home, node.url)
    with pytest.raises(NotFound):
        restarted.store.get_case("maria", erased)
    assert node.sql("SELECT count(*) FROM case_record WHERE case_id = :c", c=erased) == [(0,)]
    assert dict(restarted.store.get_case("maria", kept).fields) == records[1]
    assert not (node.home / backup.RESTORE_PENDING_FILE).exists()
    assert backup.finish_interrupted_restore(node.home, restarted.engine, restarted.keyring) is None
    report = restarted.store.verify_audit()
    assert (report.ok, report.problems) == (True, ())


def test_restore_into_a_fresh_home_and_database_brings_every_case_back(
    nodes: NodeFactory, db_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    node = nodes.make(db_url)
    ids, records = _seed(node, 5)
    made = create_backup(node.store, node.home, node.home / "backups", "admin")
    fresh_home = tmp_path / "rebuilt"

    def restore_and_use(url: str) -> None:
        engine = open_database(url)
        try:
            restore_backup(fresh_home, engine, made.path, PASSPHRASE)
        finally:
            engine.dispose()
        rebuilt = nodes.open(fresh_home, url)
        for case_id, record in zip(ids, records, strict=True):
            assert dict(rebuilt.store.get_case("maria", case_id).fields) == record
        # The rebuilt node keeps working: new cases, needs and indexes get fresh row ids.
        more = synthetic_records(2, 99)
        new_ids = rebuilt.store.create_cases(
            "maria",
            [
                NewCase(fields=r, needs=((NeedCategory.LEGAL_CIVIL, NeedStatus.IDENTIFIED),))
                for r in more
            ],
        )
        rebuilt.store.set_need("maria", ids[0], NeedCategory.MEDICAL, NeedStatus.REFERRED)
        assert [
            s.case_id for s in rebuilt.store.find_cases("maria", "email", more[1]["prs_Email"])
        ] == [new_ids[1]]
        report = rebuilt.store.verify_audit()
        assert (report.ok, report.problems) == (True, ())

    if node.is_sqlite:
        restore_and_use(f"sqlite:///{tmp_path / 'rebuilt.db'}")
    else:
        with extra_postgres_database(request.getfixturevalue("postgres_url")) as url:
            try:
                restore_and_use(url)
            finally:
                nodes.close()


def test_a_backup_is_one_snapshot_even_while_another_writer_commits(
    nodes: NodeFactory, db_url: str, tmp_path: Path
) -> None:
    node = nodes.make(db_url)
    _seed(node, 3)
    other = node.another_store()  # another process of the node, say the server during a backup
    intruder: list[str] = []

    def write_between_tables(
        _conn: object, _cursor: object, statement: str, *_rest: object
    ) -> None:
        # Right after the backup has read case_record, the other writer creates a case.
        reads_cases = (
            statement.lstrip().upper().startswith("SELECT") and "FROM case_record" in statement
        )
        if reads_cases and not intruder:
            new = NewCase(fields=synthetic_records(1, 5)[0])
            intruder.append(other.create_case("other", new).case_id)

    event.listen(node.engine, "after_cursor_execute", write_between_tables)
    try:
        made = create_backup(node.store, node.home, node.home / "backups", "admin")
    finally:
        event.remove(node.engine, "after_cursor_execute", write_between_tables)
    assert len(intruder) == 1

    _header, keyring, snapshot = read_backup(made.path, PASSPHRASE)
    cases = {r["case_id"] for r in snapshot["case_record"]}
    # Every case in the snapshot carries its own survivor's key, and it opens for that case.
    for row in snapshot["case_record"]:
        wrapped = base64.b64decode(row["wrapped_key"]["b64"])
        crypto.unwrap_key(keyring.record_key, wrapped, survivor_key_context(row["case_id"]))
    assert {r["case_id"] for r in snapshot["blind_index"]} <= cases
    assert intruder[0] not in cases
    assert snapshot["audit_head"][0]["seq"] == max(r["seq"] for r in snapshot["audit_log"])
    # And the snapshot restores into a working node whose chain verifies.
    url = f"sqlite:///{tmp_path / 'copy.db'}"
    engine = open_database(url)
    try:
        restore_backup(tmp_path / "copy", engine, made.path, PASSPHRASE)
    finally:
        engine.dispose()
    assert nodes.open(tmp_path / "copy", url).store.verify_audit().ok


# --- refused backups leave the node as it was ------------------------------------------------


def _body_offset(path: Path) -> int:
    content = path.read_bytes()
    return content.index(b"\n", len(b"TESSERA-BACKUP-1\n")) + 1


def test_a_tampered_backup_is_refused_and_the_database_is_untouched(
    nodes: NodeFactory, db_url: str
) -> None:
    node = nodes.make(db_url)
    (erased, kept), _records = _seed(node, 2)
    made = create_backup(node.store, node.home, node.home / "backups", "admin")
    node.store.erase_case("maria", erased)  # the node moves on after its backup
    later = node.store.create_case("maria", NewCase(fields=synthetic_records(1, 3)[0]))
    content = made.path.read_bytes()
    body = _body_offset(made.path)
    stamp = str(json.loads(content[len(b"TESSERA-BACKUP-1\n") : body - 1])["taken_at"])
    attacks = {
        "nonce": flip_byte(content, body),
        "body": flip_byte(content, (body + len(content)) // 2),
        "tag": flip_byte(content, -1),
        "time": content.replace(stamp.encode(), stamp.replace(stamp[:4], "1999").encode(), 1),
    }
    rows, files = node.table_rows(), _home_files(node)

    for attack, tampered in attacks.items():
        assert tampered != content, attack
        made.path.write_bytes(tampered)
        with pytest.raises(TamperedCiphertext) as info:
            restore_backup(node.home, node.engine, made.path, PASSPHRASE)
        assert made.path.name in info.value.message
        assert "backup" in info.value.message

    assert node.table_rows() == rows
    assert _home_files(node) == files
    assert node.store.get_case("maria", later.case_id).fields == later.fields
    assert node.store.verify_audit().ok
    # Control: the same file, untampered, restores (and the erasure is applied again).
    made.path.write_bytes(content)
    assert restore_backup(node.home, node.engine, made.path, PASSPHRASE) == 1
    assert node.store.get_case("maria", kept).version == 1
    with pytest.raises(NotFound):
        node.store.get_case("maria", erased)


def test_a_backup_with_the_wrong_passphrase_is_refused_and_the_database_is_untouched(
    nodes: NodeFactory, db_url: str
) -> None:
    node = nodes.make(db_url)
    (case_id,), _records = _seed(node, 1)
    made = create_backup(node.store, node.home, node.home / "backups", "admin")
    node.store.erase_case("maria", case_id)
    rows, files = node.table_rows(), _home_files(node)

    with pytest.raises(WrongPassphrase) as info:
        restore_backup(node.home, node.engine, made.path, "not the passphrase")
    assert "passphrase" in info.value.message

    assert node.table_rows() == rows
    assert _home_files(node) == files
    assert node.store.verify_audit().ok


def test_a_file_that_is_not_a_whole_backup_is_refused(nodes: NodeFactory, tmp_path: Path) -> None:
    node = nodes.make()
    _seed(node, 2)
    made = create_backup(node.store, node.home, node.home / "backups", "admin")
    rows = node.table_rows()
    truncated = tmp_path / "truncated.tbk"
    truncated.write_bytes(made.path.read_bytes()[: made.size - 40])
    not_backup = tmp_path / "notes.txt"
    not_backup.write_text("just some notes\n")

    with pytest.raises(TamperedCiphertext):
        restore_backup(node.home, node.engine, truncated, PASSPHRASE)
    with pytest.raises(InvalidInput, match="not a Tessera backup"):
        restore_backup(node.home, node.engine, not_backup, PASSPHRASE)
    with pytest.raises(InvalidInput):
        restore_backup(node.home, node.engine, tmp_path / "missing.tbk", PASSPHRASE)
    assert node.table_rows() == rows


def test_a_backup_of_another_node_is_refused(nodes: NodeFactory) -> None:
    ours = nodes.make(name="ours")
    theirs = nodes.make(name="theirs")
    _seed(ours, 2)
    _seed(theirs, 2, seed=12)
    made = create_backup(theirs.store, theirs.home, theirs.home / "backups", "admin")
    rows, files = ours.table_rows(), _home_files(ours)

    with pytest.raises(ConfigError, match="another node"):
        restore_backup(ours.home, ours.engine, made.path, PASSPHRASE)
    assert ours.table_rows() == rows
    assert _home_files(ours) == files


def test_a_damaged_backup_is_named_and_the_operator_told_what_to_do(nodes: NodeFactory) -> None:
    node = nodes.make()
    made = create_backup(node.store, node.home, node.home / "backups", "admin")
    made.path.write_bytes(flip_byte(made.path.read_bytes(), -1))

    with pytest.raises(TesseraError) as info:
        backup.read_backup(made.path, PASSPHRASE)
    assert isinstance(info.value, TamperedCiphertext)
    assert made.path.name in str(info.value)
    assert "another copy" in (info.value.hint or "")


def test_a_backup_taken_before_needs_were_sealed_restores_them_sealed(
    nodes: NodeFactory, db_url: str
) -> None:
    node = nodes.make(db_url)
    ids, _records = _seed(node, 3)
    node.store.set_need("maria", ids[1], NeedCategory.MEDICAL, NeedStatus.MET)
    expected = {c.case_id: c.needs for c in node.store.read_cases(ids)}
    made = create_backup(node.store, node.home, node.home / "backups", "admin")
    # Rewrite the backup as schema 0004 wrote need rows: category, status and dates in clear.
    header, keyring, snapshot = read_backup(made.path, PASSPHRASE)
    snapshot["need"] = [
        {
            "id": index + 1,
            "case_id": case_id,
            "category": need.category.value,
            "status": need.status.value,
            "identified_on": {"iso": need.identified_on.isoformat(), "kind": "date"},
            "updated_at": {"iso": need.updated_at.isoformat(), "kind": "datetime"},
        }
        for index, (case_id, need) in enumerate(
            (c, n) for c, needs in expected.items() for n in needs
        )
    ]
    associated = b"tessera/v1|backup|" + header["taken_at"].encode()
    body = crypto.encrypt(backup._body_key(keyring), json.dumps(snapshot).encode(), associated)
    old = made.path.with_name("old-format.tbk")
    old.write_bytes(backup._MAGIC + json.dumps(header).encode() + b"\n" + body)
    node.store.set_need("maria", ids[0], NeedCategory.FAMILY, NeedStatus.REFERRED)

    restore_backup(node.home, node.engine, old, PASSPHRASE)

    assert {c.case_id: c.needs for c in node.store.read_cases(ids)} == expected
    assert node.sql("SELECT count(*) FROM need WHERE ciphertext IS NULL") == [(0,)]
    assert node.store.verify_audit().ok
