"""A case row put back at an older version is refused as INTEGRITY (DESIGN.md section 5: "a
record cannot be rolled back to an older version unnoticed"; issue 14 item 2).

The attacker has the database but not the node's keys: they copy a case's (version, ciphertext,
wrapped key) triple, wait for a newer version, and write the old triple back with raw SQL, alone
or together with its seal. Every read path refuses it; every other case still reads; a restore,
the one legitimate way back, is not mistaken for an attack. Real SQLite files and PostgreSQL.
"""

from __future__ import annotations

import pytest

from node.backup import create_backup, restore_backup
from node.store.cases import NewCase
from tessera.errors import ErrorKind, RolledBack, TamperedCiphertext
from tests.nodefixtures import (
    PASSPHRASE,
    Node,
    NodeFactory,
    db_url_fixture,  # noqa: F401  (fixture)
    nodes_fixture,  # noqa: F401  (fixture)
    synthetic_cases,
)


def _triple(node: Node, case_id: str) -> tuple[int, bytes, bytes]:
    ((version, ciphertext, wrapped),) = node.sql(
        "SELECT version, ciphertext, wrapped_key FROM case_record WHERE case_id = :c", c=case_id
    )
    return int(version), bytes(ciphertext), bytes(wrapped)


def _write_back(node: Node, case_id: str, triple: tuple[int, bytes, bytes]) -> None:
    version, ciphertext, wrapped = triple
    node.sql(
        "UPDATE case_record SET version = :v, ciphertext = :ct, wrapped_key = :wk"
        " WHERE case_id = :c",
        v=version,
        ct=ciphertext,
        wk=wrapped,
        c=case_id,
    )


def _every_read_refuses(node: Node, case_id: str) -> None:
    store = node.store
    for read in (
        lambda: store.get_case("maria", case_id),
        lambda: store.read_cases([case_id]),
        lambda: list(store.export_cases("admin")),
        lambda: store.update_case("maria", case_id, 1, {"prs_Title": "x"}, None),
        lambda: store.close_case("maria", case_id, 1),
    ):
        with pytest.raises(RolledBack) as refused:
            read()
        assert refused.value.kind is ErrorKind.INTEGRITY
        assert case_id in refused.value.message


def test_an_older_triple_written_back_over_a_case_is_refused(
    nodes: NodeFactory, db_url: str
) -> None:
    node = nodes.make(db_url)
    target, other = node.store.create_cases("maria", synthetic_cases(2))
    old = _triple(node, target)
    node.store.update_case("maria", target, 1, {"prs_FirstName": "Laterchange"}, None)
    current = _triple(node, target)
    # The old triple opens by itself (its AEAD binds the version it carries): only the seal
    # outside the row can tell.
    _write_back(node, target, old)

    _every_read_refuses(node, target)
    with pytest.raises(RolledBack, match="version 1 in the database, but the node last wrote"):
        node.store.get_case("maria", target)
    # Nothing else is affected, and the refusal changed nothing.
    assert node.store.get_case("maria", other).version == 1
    assert _triple(node, target) == old
    # Put back what the node wrote, and it reads again.
    _write_back(node, target, current)
    assert node.store.get_case("maria", target).fields["prs_FirstName"] == "Laterchange"
    assert node.store.verify_audit().ok


def test_a_case_rolled_back_together_with_its_seal_is_refused_by_the_audit_log(
    nodes: NodeFactory, db_url: str
) -> None:
    node = nodes.make(db_url)
    target, other = node.store.create_cases("maria", synthetic_cases(2))
    old = _triple(node, target)
    ((seal_version, seq, seal),) = node.sql(
        "SELECT version, audit_seq, seal FROM record_seal WHERE case_id = :c", c=target
    )
    node.store.update_case("maria", target, 1, {"prs_FirstName": "Laterchange"}, None)
    _write_back(node, target, old)
    node.sql(
        "UPDATE record_seal SET version = :v, audit_seq = :s, seal = :m WHERE case_id = :c",
        v=seal_version,
        s=seq,
        m=bytes(seal),
        c=target,
    )

    with pytest.raises(RolledBack, match="the audit log records a later change"):
        node.store.get_case("maria", target)
    _every_read_refuses(node, target)
    assert node.store.get_case("maria", other).version == 1


def test_a_row_without_a_seal_or_with_a_state_rolled_back_is_refused(
    nodes: NodeFactory, db_url: str
) -> None:
    node = nodes.make(db_url)
    sealed, unsealed, closed = node.store.create_cases("maria", synthetic_cases(3))
    node.sql("DELETE FROM record_seal WHERE case_id = :c", c=unsealed)
    with pytest.raises(RolledBack, match="carries no seal"):
        node.store.get_case("maria", unsealed)
    node.store.close_case("maria", closed, 1)
    node.sql("UPDATE case_record SET state = 'open', version = 1 WHERE case_id = :c", c=closed)
    with pytest.raises(RolledBack):
        node.store.get_case("maria", closed)
    node.sql("UPDATE case_record SET version = 2 WHERE case_id = :c", c=closed)
    with pytest.raises(TamperedCiphertext, match="does not match the version 2"):
        node.store.get_case("maria", closed)
    assert node.store.get_case("maria", sealed).version == 1


def test_a_restore_takes_cases_back_without_being_taken_for_a_rollback(
    nodes: NodeFactory, db_url: str
) -> None:
    node = nodes.make(db_url)
    (target,) = node.store.create_cases("maria", synthetic_cases(1))
    made = create_backup(node.store, node.home, node.home / "backups", "admin")
    node.store.update_case("maria", target, 1, {"prs_FirstName": "Laterchange"}, None)
    node.store.update_case("maria", target, 2, {"prs_FirstName": "Laterstill"}, None)

    restore_backup(node.home, node.engine, made.path, PASSPHRASE)

    restored = nodes.open(node.home, node.url).store
    case = restored.get_case("maria", target)
    assert case.version == 1
    assert case.fields["prs_FirstName"] != "Laterchange"
    # The audit log kept the later updates (it is never rewound) and the restore is an entry.
    actions = [e.action for e in restored.audit_entries(target)]
    assert actions.count("case.update") == 2
    # The restored case moves on from its restored version, and is sealed again.
    restored.update_case("maria", target, 1, {"prs_Title": "Mr"}, None)
    assert restored.get_case("maria", target).version == 2
    assert restored.verify_audit().ok


def test_sealing_costs_no_read_an_extra_round_trip_per_case(
    nodes: NodeFactory, db_url: str
) -> None:
    # read_cases checks a whole page of seals in two queries, not two per case.
    from sqlalchemy import event

    node = nodes.make(db_url)
    ids = node.store.create_cases("maria", [NewCase(fields=c.fields) for c in synthetic_cases(50)])
    statements: list[str] = []

    def count(_c: object, _cur: object, statement: str, *_rest: object) -> None:
        statements.append(statement)

    event.listen(node.engine, "after_cursor_execute", count)
    try:
        assert len(node.store.read_cases(ids)) == 50
    finally:
        event.remove(node.engine, "after_cursor_execute", count)
    assert len([s for s in statements if s.lstrip().upper().startswith("SELECT")]) <= 6
