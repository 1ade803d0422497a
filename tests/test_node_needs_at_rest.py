"""Need records encrypted at rest, attacked (issue 14 item 5; DESIGN.md section 5).

A survivor's needs (substance_use/unmet, say) are sealed under their own data key: no category or
status code may sit on disk in clear (SQLite file and WAL, a PostgreSQL dump), erasing a survivor
destroys their needs with them, a need ciphertext moved to another case or another need is refused
as an integrity failure, and filters and statistics still work at the node.
"""

from __future__ import annotations

import pytest

from node.domain import CaseState, StaffRole
from node.store.budget import BudgetStore
from node.store.cases import NewCase
from node.store.needs import need_associated_data
from tessera import crypto
from tessera.errors import TamperedCiphertext
from tessera.needs import NeedCategory, NeedStatus
from tests.nodefixtures import (
    Node,
    NodeFactory,
    db_url_fixture,  # noqa: F401  (fixture)
    found_in,
    nodes_fixture,  # noqa: F401  (fixture)
    pg_dump_data,
)

CANARY_STAFF = "Canary Visible-Staffname"
# Every category, and every status long enough that five random bytes will not match it by chance
# ("met" is three letters: random ciphertext bytes hit it; "unmet" and the others never do).
CODES = [c.value for c in NeedCategory] + [s.value for s in NeedStatus if len(s.value) >= 5]


def _cases_with_every_need(node: Node) -> list[str]:
    node.store.add_staff(
        "admin", CANARY_STAFF, StaffRole.CASEWORKER, crypto.Identity.generate().public.signing_key
    )
    statuses = list(NeedStatus)
    cases = [
        NewCase(
            fields={"prs_FirstName": f"Quillon{i}"},
            needs=tuple(
                (category, statuses[(i + j) % len(statuses)])
                for j, category in enumerate(NeedCategory)
                if (i + j) % 3 == 0
            ),
        )
        for i in range(12)
    ]
    ids = node.store.create_cases("tester", cases)
    # Changes go through set_need too (its audit entry must not carry the codes either).
    node.store.set_need("tester", ids[0], NeedCategory.SUBSTANCE_USE, NeedStatus.UNMET)
    node.store.set_need("tester", ids[1], NeedCategory.IMMIGRATION, NeedStatus.IN_PROGRESS)
    return ids


def test_no_need_code_is_in_the_sqlite_file_or_its_wal(nodes: NodeFactory) -> None:
    node = nodes.make()
    _cases_with_every_need(node)
    assert node.sql("SELECT count(*) FROM need")[0][0] > 40
    on_disk = node.disk_bytes()
    assert found_in(on_disk, [CANARY_STAFF]) == [CANARY_STAFF]  # the search sees the data
    assert found_in(on_disk, CODES) == []

    node.dispose()  # the last connection checkpoints the WAL into the main file
    after_close = node.disk_bytes()
    assert found_in(after_close, [CANARY_STAFF]) == [CANARY_STAFF]
    assert found_in(after_close, CODES) == []


def test_no_need_code_is_in_a_postgres_dump(nodes: NodeFactory, postgres_url: str) -> None:
    node = nodes.make(postgres_url)
    _cases_with_every_need(node)
    dump = pg_dump_data(postgres_url)
    assert found_in(dump, [CANARY_STAFF]) == [CANARY_STAFF]
    assert found_in(dump, CODES) == []


def test_filters_and_statistics_still_work_on_sealed_needs(nodes: NodeFactory, db_url: str) -> None:
    node = nodes.make(db_url)
    ids = _cases_with_every_need(node)
    expected: dict[str, list[tuple[str, str]]] = {}
    for case in node.store.read_cases(ids):
        expected[case.case_id] = [(n.category.value, n.status.value) for n in case.needs]
    assert expected[ids[0]].count(("substance_use", "unmet")) == 1

    unmet_substance = {c for c, needs in expected.items() if ("substance_use", "unmet") in needs}
    listed = node.store.list_cases(need=NeedCategory.SUBSTANCE_USE, need_status=NeedStatus.UNMET)
    assert {s.case_id for s in listed} == unmet_substance
    # Paging over the decrypted filter: the pages are the whole answer, in the listing's order.
    every_unmet = node.store.list_cases(need_status=NeedStatus.UNMET, limit=1000)
    pages = [
        node.store.list_cases(need_status=NeedStatus.UNMET, limit=2, offset=o)
        for o in range(0, len(every_unmet), 2)
    ]
    assert [s.case_id for p in pages for s in p] == [s.case_id for s in every_unmet]
    assert {s.case_id for s in every_unmet} == {
        c for c, needs in expected.items() if any(st == "unmet" for _, st in needs)
    }
    node.store.close_case("tester", ids[0], 1)
    assert ids[0] not in {
        s.case_id
        for s in node.store.list_cases(state=CaseState.OPEN, need=NeedCategory.SUBSTANCE_USE)
    }

    # The statistics input: every need, with its case, codes and time, as before.
    rows = BudgetStore(node.store).need_rows()
    assert sorted((c, cat, st) for c, cat, st, _ in rows) == sorted(
        (c, cat, st) for c, needs in expected.items() for cat, st in needs
    )
    assert all(at.tzinfo is not None for *_, at in rows)


def test_erasing_a_survivor_destroys_their_needs(nodes: NodeFactory, db_url: str) -> None:
    node = nodes.make(db_url)
    ids = _cases_with_every_need(node)
    victim = ids[0]
    stolen = node.sql("SELECT tag, ciphertext FROM need WHERE case_id = :c", c=victim)
    assert stolen
    before = len(BudgetStore(node.store).need_rows())

    node.store.erase_case("tester", victim)

    assert node.sql("SELECT count(*) FROM need WHERE case_id = :c", c=victim) == [(0,)]
    rows = BudgetStore(node.store).need_rows()
    assert victim not in {c for c, *_ in rows}
    assert len(rows) == before - len(stolen)
    # A copy an attacker kept opens under no key the node still holds: the data key is gone.
    for tag, ciphertext in stolen:
        for key in (node.keyring.record_key, node.keyring.index_key):
            with pytest.raises(TamperedCiphertext):
                crypto.decrypt(key, bytes(ciphertext), need_associated_data(victim, tag))
    if node.is_sqlite:
        on_disk = node.disk_bytes()
        assert not any(bytes(ciphertext) in on_disk for _, ciphertext in stolen)


def test_need_rows_swapped_between_cases_are_refused(nodes: NodeFactory, db_url: str) -> None:
    node = nodes.make(db_url)
    first, second, bystander = node.store.create_cases(
        "tester",
        [
            NewCase(fields={}, needs=((NeedCategory.SUBSTANCE_USE, NeedStatus.UNMET),)),
            NewCase(fields={}, needs=((NeedCategory.SUBSTANCE_USE, NeedStatus.MET),)),
            NewCase(fields={}, needs=((NeedCategory.MEDICAL, NeedStatus.MET),)),
        ],
    )
    (a,) = node.sql("SELECT id, tag, ciphertext FROM need WHERE case_id = :c", c=first)
    (b,) = node.sql("SELECT id, tag, ciphertext FROM need WHERE case_id = :c", c=second)
    # Same category, different cases: the tags differ (no link between cases) ...
    assert a.tag != b.tag
    # ... and an attacker who swaps the two rows' sealed contents gets an integrity failure.
    for row, other in ((a, b), (b, a)):
        node.sql(
            "UPDATE need SET tag = :t, ciphertext = :x WHERE id = :i",
            t=other.tag,
            x=bytes(other.ciphertext),
            i=row.id,
        )
    for case_id in (first, second):
        with pytest.raises(TamperedCiphertext):
            node.store.get_case("tester", case_id)
        with pytest.raises(TamperedCiphertext):
            node.store.summary(case_id)
    with pytest.raises(TamperedCiphertext):
        BudgetStore(node.store).need_rows()  # a statistics round refuses, never miscounts
    with pytest.raises(TamperedCiphertext):
        node.store.list_cases(need=NeedCategory.SUBSTANCE_USE)
    assert [n.category for n in node.store.summary(bystander).needs] == [NeedCategory.MEDICAL]

    # Moving only the ciphertext (keeping each row's own tag) is refused the same way.
    node.sql(
        "UPDATE need SET tag = :t, ciphertext = :x WHERE id = :i",
        t=a.tag,
        x=bytes(b.ciphertext),
        i=a.id,
    )
    with pytest.raises(TamperedCiphertext):
        node.store.summary(first)


def test_two_needs_of_one_case_cannot_trade_places(nodes: NodeFactory, db_url: str) -> None:
    node = nodes.make(db_url)
    (case_id,) = node.store.create_cases(
        "tester",
        [
            NewCase(
                fields={},
                needs=(
                    (NeedCategory.SUBSTANCE_USE, NeedStatus.UNMET),
                    (NeedCategory.MEDICAL, NeedStatus.MET),
                ),
            )
        ],
    )
    a, b = node.sql("SELECT id, ciphertext FROM need WHERE case_id = :c ORDER BY id", c=case_id)
    node.sql("UPDATE need SET ciphertext = :x WHERE id = :i", x=bytes(b.ciphertext), i=a.id)
    node.sql("UPDATE need SET ciphertext = :x WHERE id = :i", x=bytes(a.ciphertext), i=b.id)
    with pytest.raises(TamperedCiphertext):
        node.store.summary(case_id)


def test_set_need_changes_one_sealed_row(nodes: NodeFactory, db_url: str) -> None:
    node = nodes.make(db_url)
    (case_id,) = node.store.create_cases(
        "tester", [NewCase(fields={}, needs=((NeedCategory.MEDICAL, NeedStatus.IDENTIFIED),))]
    )
    (first,) = node.store.summary(case_id).needs
    changed = node.store.set_need("tester", case_id, NeedCategory.MEDICAL, NeedStatus.MET)
    assert changed.identified_on == first.identified_on
    assert changed.updated_at >= first.updated_at
    node.store.set_need("tester", case_id, NeedCategory.FAMILY, NeedStatus.REFERRED)
    assert [(n.category, n.status) for n in node.store.summary(case_id).needs] == [
        (NeedCategory.FAMILY, NeedStatus.REFERRED),
        (NeedCategory.MEDICAL, NeedStatus.MET),
    ]
    assert node.sql("SELECT count(*) FROM need WHERE case_id = :c", c=case_id) == [(2,)]
    # The audit log says a need changed, not which one or to what.
    entries = node.store.audit_entries(case_id, ("need.set",))
    assert len(entries) == 2
    assert all(not e.detail for e in entries)
