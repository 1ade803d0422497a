"""The node's signed, hash-chained audit log, attacked with raw SQL (DESIGN.md section 5; issue 4).

Each attack edits, drops, reorders, truncates or forges rows of ``audit_log`` the way someone with
the database (but not the node's signing key) could, and checks that ``verify_audit`` reports it
naming the entry's sequence number, while the untouched log verifies cleanly.
"""

from __future__ import annotations

import datetime as dt
import json

from node import audit
from tessera import crypto
from tests.nodefixtures import (
    Node,
    NodeFactory,
    db_url_fixture,  # noqa: F401  (fixture)
    nodes_fixture,  # noqa: F401  (fixture)
    problem_about,
    synthetic_cases,
)


def _node_with_log(nodes: NodeFactory, db_url: str) -> Node:
    """A node whose log holds 10 entries, all verified."""
    node = nodes.make(db_url)
    store = node.store
    (case_id,) = store.create_cases("maria", synthetic_cases(1))
    for n in range(7):
        store.audit("maria", "case.read", case_id, {"n": n})
    store.audit("system", "node.started")
    report = store.verify_audit()
    assert (report.ok, report.entries, report.problems) == (True, 10, ())
    return node


def test_an_edited_detail_or_actor_is_reported_with_its_sequence_number(
    nodes: NodeFactory, db_url: str
) -> None:
    node = _node_with_log(nodes, db_url)
    node.sql("UPDATE audit_log SET detail = :d WHERE seq = 5", d=json.dumps({"n": 99}))
    node.sql("UPDATE audit_log SET actor = 'someone-else' WHERE seq = 8")

    report = node.store.verify_audit()
    assert not report.ok
    assert problem_about(report.problems, 5, "was edited")
    assert problem_about(report.problems, 8, "was edited")
    untouched = (1, 2, 3, 4, 6, 7, 9, 10)
    assert not any(problem_about(report.problems, s, "was edited") for s in untouched)


def test_a_deleted_middle_entry_is_reported_missing(nodes: NodeFactory, db_url: str) -> None:
    node = _node_with_log(nodes, db_url)
    node.sql("DELETE FROM audit_log WHERE seq = 6")

    report = node.store.verify_audit()
    assert not report.ok
    assert report.entries == 9
    assert problem_about(report.problems, 6, "is missing")
    assert problem_about(report.problems, 7, "does not link")


def test_two_swapped_entries_are_reported(nodes: NodeFactory, db_url: str) -> None:
    node = _node_with_log(nodes, db_url)
    node.sql("UPDATE audit_log SET seq = -1 WHERE seq = 4")
    node.sql("UPDATE audit_log SET seq = 4 WHERE seq = 5")
    node.sql("UPDATE audit_log SET seq = 5 WHERE seq = -1")

    report = node.store.verify_audit()
    assert not report.ok
    assert problem_about(report.problems, 4, "does not link")
    assert problem_about(report.problems, 4, "was edited")
    assert problem_about(report.problems, 5, "was edited")


def test_dropping_the_newest_entries_and_the_head_row_is_caught_by_the_head_file(
    nodes: NodeFactory, db_url: str
) -> None:
    node = _node_with_log(nodes, db_url)
    (hash_7,) = node.sql("SELECT entry_hash FROM audit_log WHERE seq = 7")[0]
    node.sql("DELETE FROM audit_log WHERE seq > 7")
    node.sql("UPDATE audit_head SET seq = 7, entry_hash = :h", h=bytes(hash_7))

    report = node.store.verify_audit()
    assert not report.ok
    assert report.entries == 7
    assert any("entry 7" in p and "entry 10" in p for p in report.problems)


def test_truncation_stays_detected_after_the_node_writes_again(
    nodes: NodeFactory, db_url: str
) -> None:
    # The next legitimate write must not overwrite the evidence kept outside the database.
    node = _node_with_log(nodes, db_url)
    (hash_6,) = node.sql("SELECT entry_hash FROM audit_log WHERE seq = 6")[0]
    node.sql("DELETE FROM audit_log WHERE seq > 6")
    node.sql("UPDATE audit_head SET seq = 6, entry_hash = :h", h=bytes(hash_6))

    node.store.audit("maria", "case.read", None, {"after": "truncation"})
    report = node.store.verify_audit()
    assert not report.ok
    assert any("entry 7" in p and "entry 10" in p for p in report.problems)

    for n in range(5):  # past the recorded entry 10, whose content is now different
        node.store.audit("maria", "case.read", None, {"after": n})
    report = node.store.verify_audit()
    assert not report.ok
    assert any("entry 12" in p and "entry 10" in p for p in report.problems)


def test_an_entry_signed_by_another_identity_is_reported(nodes: NodeFactory, db_url: str) -> None:
    node = _node_with_log(nodes, db_url)
    (seq, head_hash) = node.sql("SELECT seq, entry_hash FROM audit_head")[0]
    forger = crypto.Identity.generate()
    forged = audit.seal_entry(
        forger,
        bytes(head_hash),
        seq + 1,
        dt.datetime.now(dt.UTC),
        "admin",
        "case.erase",
        None,
        {"forged": True},
    )
    node.sql(
        "INSERT INTO audit_log (seq, at, actor, action, case_id, detail, prev_hash, entry_hash,"
        " signature) VALUES (:seq, :at, :actor, :action, NULL, :detail, :prev, :hash, :sig)",
        seq=forged.seq,
        at=forged.at,
        actor=forged.actor,
        action=forged.action,
        detail=forged.detail_json,
        prev=forged.prev_hash,
        hash=forged.entry_hash,
        sig=forged.signature,
    )
    node.sql("UPDATE audit_head SET seq = :s, entry_hash = :h", s=forged.seq, h=forged.entry_hash)

    report = node.store.verify_audit()
    assert not report.ok
    assert problem_about(report.problems, 11, "is not signed by this node")
    # Its hash and link are valid: only the signature gives the forgery away.
    assert not problem_about(report.problems, 11, "was edited")
    assert not problem_about(report.problems, 11, "does not link")


def test_a_resigned_edit_in_the_middle_is_reported(nodes: NodeFactory) -> None:
    # Rewriting entry 4 with a correct hash still cannot produce the node's signature.
    node = _node_with_log(nodes, "")  # SQLite: the same checks run on PostgreSQL above
    entry = node.store.audit_entries()[3]
    (prev,) = node.sql("SELECT prev_hash FROM audit_log WHERE seq = 4")[0]
    forged = audit.seal_entry(
        crypto.Identity.generate(),
        bytes(prev),
        entry.seq,
        entry.at,
        entry.actor,
        entry.action,
        entry.case_id,
        {"n": "hidden"},
    )
    node.sql(
        "UPDATE audit_log SET detail = :d, entry_hash = :h, signature = :s WHERE seq = 4",
        d=forged.detail_json,
        h=forged.entry_hash,
        s=forged.signature,
    )

    report = node.store.verify_audit()
    assert not report.ok
    assert problem_about(report.problems, 4, "is not signed by this node")
    assert problem_about(report.problems, 5, "does not link")


def test_an_edit_at_either_end_of_the_chain_is_reported(nodes: NodeFactory) -> None:
    node = _node_with_log(nodes, "")  # SQLite: the same checks run on PostgreSQL above
    node.sql("UPDATE audit_log SET action = 'tampered' WHERE seq IN (1, 10)")

    report = node.store.verify_audit()
    assert not report.ok
    assert problem_about(report.problems, 1, "was edited")
    assert problem_about(report.problems, 10, "was edited")
