"""Erase a survivor, remove a staff member, then bring an older copy of the node back by every
route there is (DESIGN.md section 5; issue 14 item 1). Each attack must fail, and nothing else
may be lost.

Real broker and node servers on loopback, the node's database on SQLite and on PostgreSQL, real
files copied around, real pg_dump / pg_restore as the point-in-time restore. "Erased" is checked
every way a person could meet the survivor again: found by an identifier, read, exported,
counted in statistics, or sitting in the database at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.store.escrow import EscrowStore as BrokerEscrowStore
from node import backup, directory_sync, escrow
from node.backup import restore_backup
from node.keyring import open_keyring
from node.store.anchors import QueuedTombstone
from node.store.budget import BudgetStore
from node.store.database import open_database
from node.tombstones import AuditPosition
from tessera import config, credential, crypto, labels, tls
from tessera.errors import (
    ErrorKind,
    NotFound,
    TesseraError,
    Unauthenticated,
    Unavailable,
)
from tests.escrowfixtures import (
    AGENCY,
    Site,
    attempt,
    copy_home,
    database_copy,
    enrolled_site,
    on_port,
    put_database_back,
    put_home_back,
    site_fixture,  # noqa: F401  (fixture)
    step_until_it_works,
)
from tests.nodefixtures import (
    db_url_fixture,  # noqa: F401  (fixture)
    extra_postgres_database,
)
from tests.support import PASSPHRASE, enrolled_node, unlock


def _erased_everywhere(site: Site, case_id: str, record: dict[str, str]) -> None:
    """The survivor of ``case_id`` is gone: no row, not found, not read, not exported, not
    counted."""
    assert site.sql("SELECT count(*) FROM case_record WHERE case_id = :c", c=case_id) == [(0,)]
    assert site.sql("SELECT count(*) FROM need WHERE case_id = :c", c=case_id) == [(0,)]
    with site.client() as client:
        assert client.find_cases({"prs_Email": record["prs_Email"]}) == []
        error = attempt(client.get_case, case_id)
        assert isinstance(error, NotFound), error
        exported = b"".join(chunk for chunk, _n in client.export_cases("csv", None))
    assert record["prs_Email"].encode() not in exported
    assert case_id.encode() not in exported
    assert site.node is not None
    counted = {row[0] for row in BudgetStore(site.node.running.store).need_rows()}
    assert case_id not in counted


def _kept(site: Site, kept: dict[str, dict[str, str]]) -> None:
    """Every other survivor is there, with their fields, and findable."""
    with site.client() as client:
        for case_id, record in kept.items():
            assert client.get_case(case_id).fields == record
            assert [c.case_id for c in client.find_cases({"prs_Email": record["prs_Email"]})] == [
                case_id
            ]
    assert site.node is not None
    counted = {row[0] for row in BudgetStore(site.node.running.store).need_rows()}
    assert set(kept) <= counted


def _morning(site: Site, erased: str, leaving: str) -> None:
    """This morning: one survivor erased, one staff member removed; both reach the escrow."""
    with site.client() as client:
        client.erase_case(erased, "survivor asked")
    site.remove_staff(leaving)
    site.worker.step()
    assert site.sql("SELECT count(*) FROM escrow_outbox") == [(0,)]


def test_a_node_escrows_each_erasure_and_removal_sealed_and_the_broker_learns_only_a_count(
    site: Site,
) -> None:
    ids = site.seed(3)
    leaving = site.add_staff("Leaving Soon")
    _morning(site, ids[0], "Leaving Soon")

    broker_store = BrokerEscrowStore(site.broker.running.store.engine)
    tombstones, head = broker_store.tombstones(AGENCY, 0, 100)
    assert head.size == 2 == len(tombstones)
    # Every tombstone has the same size, and none names the survivor or the staff key.
    assert {len(t.sealed) for t in tombstones} == {escrow.escrow.SEALED_BYTES}
    stored = b"".join(t.sealed + t.tombstone_id.encode() for t in tombstones)
    key = leaving.public.signing_key
    for secret in (ids[0].encode(), key, key.hex().encode()):
        assert secret not in stored
    broker_db = (site.broker.settings.home / "tessera.db").read_bytes()
    assert ids[0].encode() not in broker_db
    assert site.records[0]["prs_Email"].encode() not in broker_db
    # Depositing again (a retry, or after a restore) keeps one copy.
    with site.client() as client:
        assert client.status().escrowed_tombstones == 2
    assert site.node is not None
    site.node.running.store.reapply_erasures("test", [ids[0]])
    site.sql("DELETE FROM erasure")
    site.node.running.store.reapply_erasures("test", [ids[0]])
    site.worker.step()
    assert broker_store.tombstones(AGENCY, 0, 100)[1].size == 2


def test_an_erasure_survives_restoring_last_nights_home_and_backup(
    site: Site, tmp_path: Path
) -> None:
    # Last night: the host copy of the whole home, and the node's backup.
    ids = site.seed(3)
    leaving = site.add_staff("Leaving Soon")
    assert not isinstance(site.call_as(leaving), TesseraError)
    with site.client() as client:
        made = client.backup(None)
    site.stop()
    copy_home(site, tmp_path / "host-copy")
    site.start()
    # This morning: the erasure and the removal, then a disk loss.
    _morning(site, ids[0], "Leaving Soon")
    assert isinstance(site.call_as(leaving), Unauthenticated)
    site.stop()
    backup_file = tmp_path / "offsite.tbk"  # kept off the machine
    shutil.copy2(made.path, backup_file)
    put_home_back(site, tmp_path / "host-copy")
    ledger = site.home / "ledger.log"
    assert not ledger.exists() or ids[0] not in ledger.read_text()  # last night's ledger

    engine = open_database(site.url)
    try:
        restore_backup(site.home, engine, backup_file, PASSPHRASE)
    finally:
        engine.dispose()
    site.start()

    _erased_everywhere(site, ids[0], site.records[0])
    _kept(site, dict(zip(ids[1:], site.records[1:], strict=True)))
    assert isinstance(site.call_as(leaving), Unauthenticated)
    with site.client() as client:
        assert client.status().escrow == "confirmed"
        report = client.verify_audit()
    assert report.intact, report.problems


def test_an_older_database_put_back_is_refused_until_accepted_and_the_erasure_holds(
    site: Site, tmp_path: Path
) -> None:
    ids = site.seed(3)
    leaving = site.add_staff("Leaving Soon")
    site.stop()
    database_copy(site, tmp_path / "old-db")  # a file copy, or pg_dump (point in time)
    site.start()
    _morning(site, ids[0], "Leaving Soon")
    site.stop()
    put_database_back(site, tmp_path / "old-db")  # the home (ledger, anchors) is today's
    assert site.sql("SELECT count(*) FROM case_record WHERE case_id = :c", c=ids[0]) == [(1,)]

    site.start()
    # Re-applied at start, before anything could read it.
    assert site.sql("SELECT count(*) FROM case_record WHERE case_id = :c", c=ids[0]) == [(0,)]
    assert isinstance(site.call_as(leaving), Unauthenticated)
    with site.client() as client:
        status = client.status()
        assert status.escrow == "rolled_back"
        assert "older" in status.escrow_detail
        # The node opens no case of a database older than what it last recorded.
        refused = attempt(client.get_case, ids[1])
        assert isinstance(refused, TesseraError) and refused.kind is ErrorKind.INTEGRITY, refused
        assert "older than what the node last recorded" in refused.message
        found = attempt(client.find_cases, {"prs_Email": site.records[1]["prs_Email"]})
        assert found.kind is ErrorKind.INTEGRITY
        # The administrator accepts this copy: a backup of it, restored, records the rewind.
        made = client.backup(None)
    site.stop()
    engine = open_database(site.url)
    try:
        restore_backup(site.home, engine, Path(made.path), PASSPHRASE)
    finally:
        engine.dispose()
    site.start()

    _erased_everywhere(site, ids[0], site.records[0])
    _kept(site, dict(zip(ids[1:], site.records[1:], strict=True)))
    assert isinstance(site.call_as(leaving), Unauthenticated)
    with site.client() as client:
        assert client.status().escrow == "confirmed"
        report = client.verify_audit()
    assert report.intact, report.problems
    assert any("restore went back behind" in n for n in report.notes)


def test_a_host_rebuilt_from_a_backup_on_an_empty_machine_keeps_the_erasure(
    site: Site, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    ids = site.seed(3)
    leaving = site.add_staff("Leaving Soon")
    with site.client() as client:
        made = client.backup(None)
    offsite = tmp_path / "offsite.tbk"
    shutil.copy2(made.path, offsite)
    _morning(site, ids[0], "Leaving Soon")
    admin = credential.read(site.home, unlock)
    site.stop()

    # A new machine: an empty home with the node's settings and a new certificate, an empty
    # database, and the administrator's own credential; keys and broker link come from the
    # backup alone.
    def rebuild(url: str) -> None:
        home = tmp_path / "rebuilt"
        rebuilt = dataclasses.replace(config.load(site.home, {}), home=home, database_url=url)
        home.mkdir(mode=0o700)
        config.write(rebuilt)
        tls.create_self_signed(rebuilt.cert_path, rebuilt.key_path, rebuilt.name)
        credential.write(
            home,
            dataclasses.replace(admin, node_certificate=rebuilt.cert_path.read_bytes()),
            credential.PassphraseLock(PASSPHRASE, crypto.Argon2Params.TEST_CHEAP),
        )
        engine = open_database(rebuilt.effective_database_url)
        try:
            restore_backup(home, engine, offsite, PASSPHRASE)
        finally:
            engine.dispose()
        assert not (home / "ledger.log").exists()
        site.settings = rebuilt
        site.start()
        _erased_everywhere(site, ids[0], site.records[0])
        _kept(site, dict(zip(ids[1:], site.records[1:], strict=True)))
        assert isinstance(site.call_as(leaving), Unauthenticated)
        site.stop()

    if site.is_sqlite:
        rebuild("")
    else:
        with extra_postgres_database(request.getfixturevalue("postgres_url")) as url:
            rebuild(url)


def test_a_node_that_cannot_reach_its_broker_at_start_opens_no_case_until_it_can(
    tmp_path: Path, db_url: str
) -> None:
    site = enrolled_site(tmp_path, db_url)
    try:
        site.start()
        ids = site.seed(2)
        broker_address = site.broker.address
        site.stop()
        broker_settings = site.broker.settings
        site.stop_broker()

        site.start()
        with site.client() as client:
            status = client.status()
            assert status.escrow == "unconfirmed"
            assert "cannot reach the broker" in status.escrow_detail
            refused = attempt(client.get_case, ids[0])
            assert isinstance(refused, Unavailable), refused
            assert "opens no case" in refused.message
            assert isinstance(attempt(client.list_staff), list)  # status and staff still answer
            client.erase_case(ids[1], "survivor asked")  # and a survivor can still be erased
        # Statistics count no survivor either.
        assert site.node is not None
        assert isinstance(attempt(site.node.running.store.guard.check_cases, ()), Unavailable)  # type: ignore[union-attr]

        site.start_broker(on_port(broker_settings, broker_address))
        step_until_it_works(site)
        with site.client() as client:
            assert client.status().escrow == "confirmed"
            assert client.get_case(ids[0]).fields == site.records[0]
            assert isinstance(attempt(client.get_case, ids[1]), NotFound)
    finally:
        site.stop()
        site.stop_broker()


def test_an_erasure_made_while_the_broker_is_down_is_kept_and_escrowed_later(
    tmp_path: Path, db_url: str
) -> None:
    site = enrolled_site(tmp_path, db_url)
    try:
        site.start()
        ids = site.seed(2)
        with site.client() as client:
            made = client.backup(None)
        broker_address, broker_settings = site.broker.address, site.broker.settings
        site.stop_broker()
        with site.client() as client:
            client.erase_case(ids[0], "survivor asked")  # confirmed at start: still serving
        assert isinstance(attempt(site.worker.step), Unavailable)
        assert site.sql("SELECT count(*) FROM escrow_outbox") == [(1,)]
        with site.client() as client:
            assert client.status().tombstones_waiting == 1
        site.stop()  # a restart in between loses nothing
        site.start_broker(on_port(broker_settings, broker_address))
        site.start()
        assert site.sql("SELECT count(*) FROM escrow_outbox") == [(0,)]
        assert (
            BrokerEscrowStore(site.broker.running.store.engine).tombstones(AGENCY, 0, 10)[1].size
            == 1
        )

        # From now on no copy from before brings the survivor back, not even without the ledger.
        site.stop()
        (site.home / "ledger.log").unlink()
        engine = open_database(site.url)
        try:
            restore_backup(site.home, engine, Path(made.path), PASSPHRASE)
        finally:
            engine.dispose()
        site.start()
        _erased_everywhere(site, ids[0], site.records[0])
        _kept(site, {ids[1]: site.records[1]})
    finally:
        site.stop()
        site.stop_broker()


def test_a_restore_of_an_enrolled_node_needs_its_broker_and_changes_nothing_without_it(
    site: Site,
) -> None:
    ids = site.seed(2)
    with site.client() as client:
        made = client.backup(None)
        client.erase_case(ids[0], "survivor asked")
    site.worker.step()
    site.stop()
    site.stop_broker()
    before = site.sql("SELECT case_id, version FROM case_record ORDER BY case_id")
    engine = open_database(site.url)
    try:
        with pytest.raises(Unavailable, match="nothing was restored"):
            restore_backup(site.home, engine, Path(made.path), PASSPHRASE)
    finally:
        engine.dispose()
    assert site.sql("SELECT case_id, version FROM case_record ORDER BY case_id") == before
    assert not (site.home / backup.RESTORE_PENDING_FILE).exists()


def test_the_broker_keeps_each_agencys_escrow_apart_and_append_only(site: Site) -> None:
    ids = site.seed(1)
    with site.client() as client:
        client.erase_case(ids[0], "survivor asked")
    site.worker.step()
    store = BrokerEscrowStore(site.broker.running.store.engine)
    other = crypto.Identity.generate()
    tombstone = crypto.seal(other, other.public, labels.LABEL_TOMBSTONE, bytes(256))
    sequences, head = store.deposit("another-agency", [("t-1", tombstone)], dt.datetime.now(dt.UTC))
    assert (sequences, head.size) == ([1], 1)
    assert store.tombstones(AGENCY, 0, 10)[1].size == 1
    # Same id again: the first position and bytes stay.
    again = crypto.seal(other, other.public, labels.LABEL_TOMBSTONE, bytes(256))
    assert store.deposit("another-agency", [("t-1", again)], dt.datetime.now(dt.UTC))[0] == [1]
    (kept,), _head = store.tombstones("another-agency", 0, 10)
    assert kept.sealed == tombstone


_TAMPERING = {
    # A compromised broker (or its database) serving an escrow other than the one it signed.
    "altered": [
        "UPDATE broker_escrow_tombstone SET sealed = :junk WHERE agency_id = :a AND sequence = 1"
    ],
    "missing": ["DELETE FROM broker_escrow_tombstone WHERE agency_id = :a AND sequence = 1"],
    "reordered": [
        "UPDATE broker_escrow_tombstone SET sequence = 99 WHERE agency_id = :a AND sequence = 1",
        "UPDATE broker_escrow_tombstone SET sequence = 1 WHERE agency_id = :a AND sequence = 2",
        "UPDATE broker_escrow_tombstone SET sequence = 2 WHERE agency_id = :a AND sequence = 99",
    ],
}


@pytest.mark.parametrize("tampering", sorted(_TAMPERING))
def test_an_escrow_served_altered_truncated_or_reordered_is_refused(
    site: Site, tampering: str
) -> None:
    ids = site.seed(3)
    with site.client() as client:
        client.erase_case(ids[0], "survivor asked")
        client.erase_case(ids[1], "survivor asked")
    site.worker.step()
    site.stop()
    from sqlalchemy import text

    with site.broker.running.store.engine.begin() as conn:
        for statement in _TAMPERING[tampering]:
            conn.execute(text(statement), {"a": AGENCY, "junk": os.urandom(368)})
    site.start()
    with site.client() as client:
        status = client.status()
        # The node does not take this escrow as the whole truth: it opens no case, says why,
        # and the erased survivors stay erased.
        assert status.escrow != "confirmed", status
        assert "escrow does not verify" in status.escrow_detail, status
        refused = attempt(client.get_case, ids[2])
        assert isinstance(refused, TesseraError) and not isinstance(refused, NotFound), refused
        for erased in ids[:2]:
            assert isinstance(attempt(client.get_case, erased), TesseraError)


def test_a_broker_restored_from_an_older_backup_gets_every_erasure_again(site: Site) -> None:
    ids = site.seed(3)
    with site.client() as client:
        client.erase_case(ids[0], "survivor asked")
        client.erase_case(ids[1], "survivor asked")
    site.worker.step()
    site.stop()
    from sqlalchemy import text

    # The broker's database comes back from before the erasures: the agency's escrow is empty.
    with site.broker.running.store.engine.begin() as conn:
        conn.execute(
            text("DELETE FROM broker_escrow_tombstone WHERE agency_id = :a"), {"a": AGENCY}
        )
    site.start()
    step_until_it_works(site)
    store = BrokerEscrowStore(site.broker.running.store.engine)
    assert store.tombstones(AGENCY, 0, 10)[1].size == 2
    with site.client() as client:
        assert client.status().escrow == "confirmed"
        for erased in ids[:2]:
            assert isinstance(attempt(client.get_case, erased), NotFound)


def test_over_the_wire_an_agency_reaches_only_its_own_escrow(site: Site) -> None:
    ids = site.seed(1)
    with site.client() as client:
        client.erase_case(ids[0], "survivor asked")
    site.worker.step()
    store = BrokerEscrowStore(site.broker.running.store.engine)
    harbour_head = store.tombstones(AGENCY, 0, 10)[1]
    harbour_checkpoint = store.latest_checkpoint(AGENCY)
    # Another enrolled agency, signing its own calls: the escrow it sees is its own (empty),
    # whatever it asks for; what it deposits and checkpoints lands under its own id.
    other = enrolled_node(site.broker, site.root, "lantern-clinic")
    keyring = open_keyring(other.home, PASSPHRASE)
    link = directory_sync.load_link(other.home)
    with escrow.EscrowClient(link, keyring.identities) as lantern:
        opened, head = lantern.tombstones()
        assert (opened, head.size) == ([], 0)
        assert lantern.latest_checkpoint() is None
        forged = crypto.seal(
            keyring.identity, keyring.identity.public, labels.LABEL_TOMBSTONE, bytes(256)
        )
        queued = QueuedTombstone(tombstone_id=str(uuid.uuid4()), sealed=forged, attempts=0)
        assert lantern.deposit([queued]).size == 1
        lantern.checkpoint(AuditPosition(1, bytes(32)))
    assert store.tombstones(AGENCY, 0, 10)[1] == harbour_head
    assert store.latest_checkpoint(AGENCY) == harbour_checkpoint
    assert store.tombstones("lantern-clinic", 0, 10)[1].size == 1


# --- the administrator's check, from the command line ------------------------------------------


def _tessera(home: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("tessera", path=os.path.dirname(sys.executable))
    assert exe
    result = subprocess.run(
        [exe, "--home", str(home), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env={**os.environ, "TESSERA_PASSPHRASE": PASSPHRASE, "COLUMNS": "200"},
        timeout=120,
        check=False,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


@contextlib.contextmanager
def _serving(home: Path) -> Iterator[None]:
    exe = shutil.which("tessera", path=os.path.dirname(sys.executable))
    assert exe
    process = subprocess.Popen(
        [exe, "--home", str(home), "node", "serve"],
        env={**os.environ, "TESSERA_PASSPHRASE": PASSPHRASE, "TESSERA_LOG_FORMAT": "json"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run_file = home / "run" / "node.json"
    deadline = time.monotonic() + 30
    while not run_file.exists():
        assert process.poll() is None, "the node stopped"
        assert time.monotonic() < deadline, "the node did not start"
        time.sleep(0.05)
    try:
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def test_an_administrator_after_a_disk_loss_finds_no_survivor_erased_this_morning(
    tmp_path: Path,
) -> None:
    site = enrolled_site(tmp_path, "")
    home = site.home
    # Backups go to an off-site mount, which outlives the disk.
    config.write(dataclasses.replace(config.load(home, {}), backup_root=tmp_path / "nightly"))
    try:
        with _serving(home):
            created = [
                json.loads(
                    _tessera(
                        home, "case", "create", "--from-json", "-", "--format", "json", stdin=s
                    ).stdout
                )["case_id"]
                for s in (
                    json.dumps({"prs_FirstName": "Zorelka", "prs_Email": "zorelka@example.org"}),
                    json.dumps({"prs_FirstName": "Mivanto", "prs_Email": "mivanto@example.org"}),
                )
            ]
            made = _tessera(home, "node", "backup")
            assert made.returncode == 0, made.stderr
        shutil.copytree(home, tmp_path / "last-night")  # the host backup, last night
        with _serving(home):  # this morning
            erased = _tessera(home, "case", "erase", created[0], "--yes", "--reason", "asked")
            assert erased.returncode == 0, erased.stderr
            time.sleep(0.5)
            status = json.loads(_tessera(home, "node", "status", "--format", "json").stdout)
            assert status["tombstones_waiting"] == 0
        # The disk is lost. Last night's host copy and backup come back.
        shutil.rmtree(home)
        shutil.copytree(tmp_path / "last-night", home)
        (backup_file,) = (tmp_path / "nightly").glob("*.tbk")
        restored = _tessera(home, "node", "restore", str(backup_file))
        assert restored.returncode == 0, restored.stderr
        assert "1 erased survivor(s) erased again" in restored.stdout
        with _serving(home):
            found = _tessera(home, "case", "find", "--email", "zorelka@example.org")
            assert found.returncode == 0, found.stderr
            assert created[0] not in found.stdout and "Zorelka" not in found.stdout
            shown = _tessera(home, "case", "show", created[0])
            assert shown.returncode == 6, shown.stdout + shown.stderr
            assert "erased" in shown.stderr
            kept = _tessera(home, "case", "show", created[1], "--format", "json")
            assert kept.returncode == 0 and "Mivanto" in kept.stdout
            trail = _tessera(home, "node", "audit", "show", "--action", "node.restored")
            assert trail.returncode == 0 and "system:restore" in trail.stdout
            verified = _tessera(home, "node", "audit", "verify")
            assert verified.returncode == 0, verified.stdout + verified.stderr
    finally:
        site.stop_broker()
