"""The node's encrypted case store, attacked at rest (DESIGN.md sections 4 and 5; issue 4).

Survivor fields must never sit on disk in clear; a ciphertext altered, moved to another row or
rolled back must fail loudly and leave every other case readable; a stale update must change
nothing; an erased survivor's key must be gone from the database file itself; concurrent writers
must never fork the audit chain. Real SQLite files, real PostgreSQL, real PyNaCl throughout.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import pytest
from sqlalchemy import event

from node.domain import StaffRole
from node.htcds.synthetic import synthetic_records
from node.store.cases import NewCase, NodeStore
from node.store.records import record_associated_data, survivor_key_context
from tessera import crypto
from tessera.errors import Conflict, NotFound, TamperedCiphertext
from tests.nodefixtures import (
    Node,
    NodeFactory,
    db_url_fixture,  # noqa: F401  (fixture)
    flip_byte,
    found_in,
    identifying_values,
    nodes_fixture,  # noqa: F401  (fixture)
    pg_dump_data,
    synthetic_cases,
)

# A staff name is stored in clear by design: finding it proves the byte search sees the data.
CANARY_STAFF = "Canary Visible-Staffname"


def _ciphertext(node: Node, case_id: str) -> bytes:
    rows = node.sql("SELECT ciphertext FROM case_record WHERE case_id = :c", c=case_id)
    return bytes(rows[0][0])


def _set_ciphertext(node: Node, case_id: str, value: bytes) -> None:
    node.sql("UPDATE case_record SET ciphertext = :v WHERE case_id = :c", v=value, c=case_id)


def _wrapped_key(node: Node, case_id: str) -> bytes:
    rows = node.sql("SELECT wrapped_key FROM case_record WHERE case_id = :c", c=case_id)
    return bytes(rows[0][0])


def _set_wrapped_key(node: Node, case_id: str, value: bytes) -> None:
    node.sql("UPDATE case_record SET wrapped_key = :k WHERE case_id = :c", k=value, c=case_id)


def _fields_of(store: NodeStore, case_ids: list[str]) -> dict[str, dict[str, str]]:
    return {i: dict(store.get_case("tester", i).fields) for i in case_ids}


def _import(node: Node, count: int, seed: int = 7) -> tuple[list[str], list[dict[str, str]]]:
    records = synthetic_records(count, seed)
    ids = node.store.create_cases("tester", [NewCase(fields=r) for r in records])
    return ids, records


# --- 1. plaintext never at rest ---------------------------------------------------------------


def test_no_survivor_field_is_in_the_sqlite_file_or_its_wal(nodes: NodeFactory) -> None:
    node = nodes.make()
    node.store.add_staff(
        "admin", CANARY_STAFF, StaffRole.CASEWORKER, crypto.Identity.generate().public.signing_key
    )
    ids, records = _import(node, 50)
    node.store.update_case("tester", ids[0], 1, {"prs_FirstName": "Renamedqux"}, "moved shelter")
    secrets_ = [*identifying_values(records), "Renamedqux", "moved shelter"]
    assert len(secrets_) > 250

    assert node.wal_file.stat().st_size > 0  # the newest pages are still only in the WAL
    on_disk = node.disk_bytes()  # main file plus WAL, as the store left them
    assert found_in(on_disk, [CANARY_STAFF]) == [CANARY_STAFF]
    assert found_in(on_disk, secrets_) == []

    node.dispose()  # the last connection checkpoints the WAL into the main file
    after_close = node.disk_bytes()
    assert found_in(after_close, [CANARY_STAFF]) == [CANARY_STAFF]
    assert found_in(after_close, secrets_) == []


def test_no_survivor_field_is_in_a_postgres_dump(nodes: NodeFactory, postgres_url: str) -> None:
    node = nodes.make(postgres_url)
    node.store.add_staff(
        "admin", CANARY_STAFF, StaffRole.CASEWORKER, crypto.Identity.generate().public.signing_key
    )
    ids, records = _import(node, 50)
    node.store.update_case("tester", ids[3], 1, {"prs_Email": "changed.addr@example.org"}, None)

    dump = pg_dump_data(postgres_url)
    assert found_in(dump, [CANARY_STAFF]) == [CANARY_STAFF]
    assert found_in(dump, [*identifying_values(records), "changed.addr@example.org"]) == []


# --- 2. tamper detection ----------------------------------------------------------------------


def test_a_flipped_ciphertext_byte_is_refused_and_other_cases_still_read(
    nodes: NodeFactory, db_url: str
) -> None:
    node = nodes.make(db_url)
    ids, records = _import(node, 6)
    victim = ids[2]
    original = _ciphertext(node, victim)
    for index in (0, len(original) // 2, len(original) - 1):  # in the nonce, the body, the tag
        tampered = flip_byte(original, index)
        _set_ciphertext(node, victim, tampered)

        with pytest.raises(TamperedCiphertext):
            node.store.get_case("tester", victim)
        # An update must not "repair" the record by re-encrypting garbage over it.
        with pytest.raises(TamperedCiphertext):
            node.store.update_case("tester", victim, 1, {"prs_FirstName": "Overwrite"}, None)
        assert _ciphertext(node, victim) == tampered
        assert node.store.summary(victim).version == 1

    others = [i for i in ids if i != victim]
    assert _fields_of(node.store, others) == {
        i: r for i, r in zip(ids, records, strict=True) if i != victim
    }
    _set_ciphertext(node, victim, original)  # the untouched bytes still open: nothing was lost
    assert dict(node.store.get_case("tester", victim).fields) == records[2]


def test_a_ciphertext_copied_into_another_case_is_refused(nodes: NodeFactory, db_url: str) -> None:
    node = nodes.make(db_url)
    (a, b, c), records = _import(node, 3)
    b_original = _ciphertext(node, b)
    _set_ciphertext(node, b, _ciphertext(node, a))  # same version (1): only the row differs

    with pytest.raises(TamperedCiphertext):
        node.store.get_case("tester", b)
    # Moving the survivor wholesale (ciphertext and wrapped key) into B's row fails as well.
    _set_wrapped_key(node, b, _wrapped_key(node, a))
    assert (_ciphertext(node, b), _wrapped_key(node, b)) == (
        _ciphertext(node, a),
        _wrapped_key(node, a),
    )
    with pytest.raises(TamperedCiphertext):
        node.store.get_case("tester", b)
    assert _fields_of(node.store, [a, c]) == {a: records[0], c: records[2]}
    assert _ciphertext(node, b) != b_original  # the attack really changed B's row


def test_an_older_ciphertext_put_back_is_refused(nodes: NodeFactory, db_url: str) -> None:
    node = nodes.make(db_url)
    (a, other), records = _import(node, 2)
    version_1 = _ciphertext(node, a)
    updated = node.store.update_case("tester", a, 1, {"prs_MobilePhone": "+1-202-555-0199"}, None)
    assert updated.version == 2

    _set_ciphertext(node, a, version_1)  # roll the data back, keep the row at version 2
    with pytest.raises(TamperedCiphertext):
        node.store.get_case("tester", a)
    assert dict(node.store.get_case("tester", other).fields) == records[1]


def test_swapped_wrapped_survivor_keys_are_refused(nodes: NodeFactory, db_url: str) -> None:
    node = nodes.make(db_url)
    (a, b, c), records = _import(node, 3)
    key_a, key_b = _wrapped_key(node, a), _wrapped_key(node, b)
    assert key_a != key_b
    _set_wrapped_key(node, a, key_b)
    _set_wrapped_key(node, b, key_a)

    for case_id in (a, b):
        with pytest.raises(TamperedCiphertext):
            node.store.get_case("tester", case_id)
        with pytest.raises(TamperedCiphertext):  # the batch read (lists, exports) as well
            node.store.read_cases([c, case_id])
    # An update must not re-seal the record under the other survivor's key.
    with pytest.raises(TamperedCiphertext):
        node.store.update_case("tester", a, 1, {"prs_FirstName": "Overwrite"}, None)
    assert _wrapped_key(node, a) == key_b
    assert node.store.summary(a).version == 1
    assert dict(node.store.get_case("tester", c).fields) == records[2]
    # Swapping back restores both: the attack destroyed nothing.
    _set_wrapped_key(node, a, key_a)
    _set_wrapped_key(node, b, key_b)
    assert _fields_of(node.store, [a, b]) == {a: records[0], b: records[1]}


# --- 3. version conflicts ---------------------------------------------------------------------


def test_a_stale_update_is_a_conflict_and_changes_nothing(nodes: NodeFactory, db_url: str) -> None:
    node = nodes.make(db_url)
    case = node.store.create_case("alice", synthetic_cases(1)[0])
    current = node.store.update_case("alice", case.case_id, 1, {"prs_FirstName": "Alicefix"}, "n2")
    stored = _ciphertext(node, case.case_id)
    updates_before = len(node.store.audit_entries(case.case_id, ("case.update",)))

    with pytest.raises(Conflict) as info:
        node.store.update_case("bob", case.case_id, 1, {"prs_FirstName": "Bobfix"}, "stale")
    assert "version 2" in info.value.message
    with pytest.raises(Conflict):
        node.store.close_case("bob", case.case_id, 1)

    after = node.store.get_case("alice", case.case_id)
    assert (after.version, dict(after.fields), after.notes, after.state) == (
        2,
        dict(current.fields),
        "n2",
        current.state,
    )
    assert after.fields["prs_FirstName"] == "Alicefix"
    assert _ciphertext(node, case.case_id) == stored
    assert len(node.store.audit_entries(case.case_id, ("case.update",))) == updates_before


# --- 4. erasure (crypto-shredding) ------------------------------------------------------------


def test_an_erased_case_cannot_be_read_and_its_key_is_gone(nodes: NodeFactory, db_url: str) -> None:
    node = nodes.make(db_url)
    (victim, keep), records = _import(node, 2)
    wrapped = _wrapped_key(node, victim)
    ciphertext = _ciphertext(node, victim)
    aad = record_associated_data(victim, 1)
    # Control: before erasure, the keyring plus these two blobs give back the survivor's fields.
    data_key = crypto.unwrap_key(node.keyring.record_key, wrapped, survivor_key_context(victim))
    assert json.loads(crypto.decrypt(data_key, ciphertext, aad))["fields"] == records[0]

    node.store.erase_case("caseworker:maria", victim)

    with pytest.raises(NotFound, match="erased"):
        node.store.get_case("tester", victim)
    for table in ("case_record", "blind_index", "need"):
        assert node.sql(f"SELECT count(*) FROM {table} WHERE case_id = :c", c=victim) == [(0,)]
    # The wrapped key went with the row: no other row holds a copy of it.
    assert node.sql("SELECT count(*) FROM case_record WHERE wrapped_key = :k", k=wrapped) == [(0,)]
    # With the keyring alone, no key left in the database opens the old ciphertext.
    remaining = node.sql("SELECT case_id, wrapped_key FROM case_record")
    assert [r[0] for r in remaining] == [keep]
    for key_case, other_wrapped in remaining:
        with pytest.raises(TamperedCiphertext):
            crypto.unwrap_key(
                node.keyring.record_key, bytes(other_wrapped), survivor_key_context(victim)
            )
        other_key = crypto.unwrap_key(
            node.keyring.record_key, bytes(other_wrapped), survivor_key_context(key_case)
        )
        with pytest.raises(TamperedCiphertext):
            crypto.decrypt(other_key, ciphertext, aad)
    with pytest.raises(TamperedCiphertext):
        crypto.decrypt(node.keyring.record_key, ciphertext, aad)

    erasures = node.store.audit_entries(victim, ("case.erase",))
    assert [(e.actor, e.case_id) for e in erasures] == [("caseworker:maria", victim)]
    assert node.store.erased_ids() == [victim]
    assert dict(node.store.get_case("tester", keep).fields) == records[1]
    assert node.store.verify_audit().ok


def test_an_erased_survivors_key_bytes_are_gone_from_the_sqlite_file(nodes: NodeFactory) -> None:
    node = nodes.make()
    # 50 cases: deleting one leaves its page in place (no rebalancing that would rewrite the
    # page anyway), so only secure_delete and the WAL truncation stand between the key and disk.
    ids, _records = _import(node, 50)
    victim = ids[20]
    wrapped = _wrapped_key(node, victim)
    ciphertexts = [_ciphertext(node, victim)]
    # The wrapped key sits in the case row, which every update rewrites: leave several old
    # images of that row behind, in the main file and in the WAL, before the erasure.
    node.store.update_case("tester", victim, 1, {"prs_FirstName": "Firstrename"}, None)
    ciphertexts.append(_ciphertext(node, victim))
    node.store.update_case("tester", victim, 2, None, "a note")
    ciphertexts.append(_ciphertext(node, victim))
    node.dispose()  # checkpoint: the key now sits in the main file, not only in the WAL
    node = nodes.open(node.home, node.url)
    assert wrapped in node.disk_bytes()  # control: the search finds it while it exists
    node.store.update_case("tester", victim, 3, {"prs_Email": "later@example.org"}, None)
    ciphertexts.append(_ciphertext(node, victim))
    assert _wrapped_key(node, victim) == wrapped  # updates re-encrypt the record, not the key
    assert node.wal_file.stat().st_size > 0  # this last image of the row is in the WAL

    node.store.erase_case("admin", victim)

    on_disk = node.disk_bytes()
    assert wrapped not in on_disk
    for ciphertext in ciphertexts:
        assert ciphertext[:48] not in on_disk
        assert ciphertext[-48:] not in on_disk
    assert not node.wal_file.exists() or node.wal_file.stat().st_size == 0  # truncated


# --- 8. concurrency ---------------------------------------------------------------------------


def _hammer(workers: list[Callable[[int], None]], rounds: int) -> list[BaseException]:
    barrier = threading.Barrier(len(workers))
    errors: list[BaseException] = []

    def run(work: Callable[[int], None]) -> None:
        barrier.wait()
        try:
            for n in range(rounds):
                work(n)
        except BaseException as exc:  # reported below, not swallowed
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    return errors


def _worker(store: NodeStore, name: str, new: NewCase) -> Callable[[int], None]:
    def work(n: int) -> None:
        if n % 2:
            store.create_case(name, new)
        else:
            store.audit(name, "test.event", None, {"n": n})

    return work


def _assert_one_unbroken_chain(node: Node, expected: int) -> None:
    report = node.store.verify_audit()
    assert report.problems == ()
    assert report.ok
    assert report.entries == expected
    seqs = [e.seq for e in node.store.audit_entries()]
    assert seqs == list(range(1, expected + 1))


def test_four_threads_on_one_sqlite_store_never_fork_the_audit_chain(nodes: NodeFactory) -> None:
    node = nodes.make()
    before = node.store.verify_audit().entries
    new = synthetic_cases(1)[0]
    workers = [_worker(node.store, f"worker-{i}", new) for i in range(4)]

    assert _hammer(workers, 25) == []

    _assert_one_unbroken_chain(node, before + 100)
    assert node.store.count_cases() == 4 * 12


def test_two_stores_on_one_database_never_fork_the_audit_chain(
    nodes: NodeFactory, db_url: str
) -> None:
    # Two processes of one node (say the server and an offline admin command) on one database.
    node = nodes.make(db_url)
    second = node.another_store()
    before = node.store.verify_audit().entries
    new = synthetic_cases(1)[0]
    workers = [
        _worker(store, f"worker-{i}", new)
        for i, store in enumerate((node.store, second, node.store, second))
    ]

    assert _hammer(workers, 25) == []

    _assert_one_unbroken_chain(node, before + 100)
    assert second.verify_audit().ok
    assert node.store.count_cases() == 4 * 12


def test_two_stores_never_lose_an_update_to_one_case(nodes: NodeFactory, db_url: str) -> None:
    node = nodes.make(db_url)
    second = node.another_store()
    case = node.store.create_case("admin", synthetic_cases(1)[0])
    applied: list[str] = []

    def updater(store: NodeStore, name: str) -> Callable[[int], None]:
        def work(n: int) -> None:
            version = store.summary(case.case_id).version
            try:
                store.update_case(name, case.case_id, version, {"prs_Title": f"{name}-{n}"}, None)
            except Conflict:
                return  # someone else went first: refused, as it should be
            applied.append(f"{name}-{n}")

        return work

    stores = (node.store, second, node.store, second)
    assert _hammer([updater(s, f"w{i}") for i, s in enumerate(stores)], 15) == []

    final = node.store.get_case("admin", case.case_id)
    assert final.version == 1 + len(applied)  # every accepted update is in the count
    assert len(node.store.audit_entries(case.case_id, ("case.update",))) == len(applied)
    assert final.fields["prs_Title"] in applied
    assert node.store.verify_audit().ok


def _append_on_first_read_of(
    table: str, writer: NodeStore, appended: list[str]
) -> Callable[..., None]:
    def hook(_conn: object, _cursor: object, statement: str, *_rest: object) -> None:
        if not appended and f"FROM {table}" in statement:
            writer.audit("other-process", "case.read", None, {"during": table})
            appended.append(table)

    return hook


def test_verifying_while_another_process_appends_reports_no_tampering(
    nodes: NodeFactory, db_url: str
) -> None:
    node = nodes.make(db_url)
    second = node.another_store()
    node.store.create_cases("admin", synthetic_cases(3))

    for table in ("audit_head", "audit_log"):  # a write lands between verify's reads
        appended: list[str] = []
        hook = _append_on_first_read_of(table, second, appended)
        event.listen(node.engine, "after_cursor_execute", hook)
        try:
            report = node.store.verify_audit()
        finally:
            event.remove(node.engine, "after_cursor_execute", hook)
        assert appended == [table]
        assert (report.ok, report.problems) == (True, ())
    assert node.store.verify_audit().ok
