"""Imports that keep one survivor to one case, and the cases an erasure should mention (issue 14
item 4). The rule itself is :mod:`node.dedup`'s; this module does the I/O around it.

A companion of :class:`~node.store.cases.NodeStore`, like ``node.store.budget``: it uses the
store's engine, keys and transactions. Matching goes through the blind index: each row's name is
turned into its keyed digest, the ``blind_index`` table gives the cases with the same name digest
(and ``case_record`` the cases that ``tessera_case_id`` cells name), and only those candidates are
decrypted, to compare birthdates and to see what an update would change. No case outside that
set is ever opened.

An import then writes in two steps: every new case in ONE transaction (``create_cases``, with the
request's idempotency key and the ``cases.import`` audit entry), then each update through
``NodeStore.update_case``, the path ``tessera case update`` takes (versioned, merged, re-indexed,
audited as ``case.update``), refused if the case changed since it was read. Imports run one at a
time per store, so two imports of the same file cannot both add its survivors.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlmodel import col, select

from node.dedup import (
    BIRTHDATE,
    CASE_ID_COLUMN,
    Identity,
    IncomingRow,
    KnownCase,
    Target,
    match,
    outcomes,
    plan_import,
    same_survivor,
)
from node.domain import DuplicatePolicy, MatchRule, RowAction, RowOutcome
from node.store.blind_index import search_kind
from node.store.cases import NewCase, NodeStore
from node.store.tables import BlindIndexRow, CaseRow, ErasureRow, RequestKeyRow
from tessera.errors import Conflict, NotFound

# Ids per IN (...) list: well below SQLite's and PostgreSQL's parameter limits.
_BATCH = 500
_ACTION = "cases.import"
_LOCKS: weakref.WeakKeyDictionary[NodeStore, threading.Lock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


@dataclass(frozen=True)
class ImportOutcome:
    """What an import did: one outcome per good row, in row order, and the ids it created."""

    rows: tuple[RowOutcome, ...]

    @property
    def case_ids(self) -> tuple[str, ...]:
        """The cases the import added, in row order."""
        added = (RowAction.ADDED, RowAction.ADDED_DESPITE_MATCH)
        return tuple(o.case_id for o in self.rows if o.action in added)


def identity(store: NodeStore, fields: Mapping[str, str]) -> Identity:
    """A record's identifiers as matching compares them: the same digests the store indexes
    (``NodeStore.index_entries``), and the birthdate."""
    digests: dict[str, set[str]] = {"name": set(), "email": set(), "phone": set()}
    for kind, digest in store.index_entries(fields):
        digests[search_kind(kind)].add(digest)
    return Identity(
        name=next(iter(digests["name"]), None),
        emails=frozenset(digests["email"]),
        phones=frozenset(digests["phone"]),
        birthdate=fields.get(BIRTHDATE) or None,
    )


def import_cases(
    store: NodeStore,
    actor: str,
    rows: Sequence[tuple[int, Mapping[str, str]]],
    policy: DuplicatePolicy,
    *,
    detail: Mapping[str, Any] | None = None,
    on_progress: Callable[[int], None] | None = None,
    idempotency_key: str = "",
) -> ImportOutcome:
    """Import validated rows ``(row number, values)``, matching each to the node's cases and to
    the rows above it (node.dedup), and handling matches per ``policy``.

    A non-empty ``idempotency_key`` already used returns the first attempt's report and
    changes nothing (a retried request after a lost answer).
    """
    with _lock(store):
        if idempotency_key:
            replay = _replay(store, idempotency_key)
            if replay is not None:
                return replay
        incoming = [
            IncomingRow(
                row=number,
                fields={k: v for k, v in values.items() if k != CASE_ID_COLUMN},
                case_id=values.get(CASE_ID_COLUMN, "").strip(),
                identity=identity(store, values),
            )
            for number, values in rows
        ]
        known, erased = _candidates(store, incoming)
        plan = plan_import(incoming, known, erased, policy)
        matched = sum(1 for step in plan.steps if step.action is not RowAction.ADDED)
        ids = store.create_cases(
            actor,
            [NewCase(fields=target.fields) for target in plan.added],
            action=_ACTION,
            detail={
                **(detail or {}),
                "on_duplicate": policy.value,
                "matched": matched,
                "updates": len(plan.updates),
            },
            on_progress=on_progress,
            idempotency_key=idempotency_key,
        )
        for target, case_id in zip(plan.added, ids, strict=True):
            target.case_id = case_id
        failed: dict[Target, str] = {}
        for written, target in enumerate(plan.updates, start=len(ids) + 1):
            try:
                store.update_case(actor, target.case_id, target.version, target.changes, None)
            except Conflict:
                failed[target] = f"case {target.case_id} changed during the import; import again"
            except NotFound:
                failed[target] = f"case {target.case_id} was erased during the import"
            if on_progress is not None and written % _BATCH == 0:
                on_progress(written)
        result = ImportOutcome(tuple(outcomes(plan, failed)))
        if idempotency_key:
            _save_report(store, idempotency_key, result)
        return result


def same_survivor_cases(store: NodeStore, case_id: str) -> list[str]:
    """The other cases that are the same survivor as ``case_id`` by the matching rule (what an
    erasure names, so that the administrator can erase them too). NotFound if there is no such
    case (or it was erased)."""
    case = store.load_case(case_id)
    own = identity(store, case.fields)
    if own.name is None:
        return []
    with store.core.reading() as session:
        ids = sorted(
            set(
                session.exec(
                    select(BlindIndexRow.case_id).where(
                        BlindIndexRow.kind == "name",
                        BlindIndexRow.digest == own.name,
                        BlindIndexRow.case_id != case_id,
                    )
                )
            )
        )
    others = []
    for start in range(0, len(ids), _BATCH):
        for other in store.read_cases(ids[start : start + _BATCH]):
            theirs = identity(store, other.fields)
            if (
                same_survivor(own, theirs) is not None
                or match(own, case.fields, theirs, other.fields) is not None
                or match(theirs, other.fields, own, case.fields) is not None
            ):
                others.append(other.case_id)
    return others


def _lock(store: NodeStore) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(store, threading.Lock())


def _chunks(values: Iterable[str]) -> Iterable[list[str]]:
    ordered = sorted(set(values))
    for start in range(0, len(ordered), _BATCH):
        yield ordered[start : start + _BATCH]


def _candidates(
    store: NodeStore, rows: Sequence[IncomingRow]
) -> tuple[list[KnownCase], frozenset[str]]:
    """The cases the rows could match (same name digest, or named by a case id cell), decrypted,
    and which of the named ids were erased here."""
    ids: set[str] = set()
    erased: set[str] = set()
    with store.core.reading() as session:
        for digests in _chunks(r.identity.name for r in rows if r.identity.name):
            ids.update(
                session.exec(
                    select(BlindIndexRow.case_id).where(
                        BlindIndexRow.kind == "name", col(BlindIndexRow.digest).in_(digests)
                    )
                )
            )
        for named in _chunks(r.case_id for r in rows if r.case_id):
            ids.update(session.exec(select(CaseRow.case_id).where(col(CaseRow.case_id).in_(named))))
            erased.update(
                session.exec(select(ErasureRow.case_id).where(col(ErasureRow.case_id).in_(named)))
            )
    known = []
    for batch in _chunks(ids):
        for case in store.read_cases(batch):
            known.append(
                KnownCase(case.case_id, case.version, case.fields, identity(store, case.fields))
            )
    return known, frozenset(erased)


def _outcome_json(outcome: RowOutcome) -> dict[str, Any]:
    return {
        "row": outcome.row,
        "action": outcome.action.value,
        "case_id": outcome.case_id,
        "matched_cases": list(outcome.matched_cases),
        "matched_row": outcome.matched_row,
        "match": outcome.match.value if outcome.match else None,
        "changed_fields": list(outcome.changed_fields),
        "note": outcome.note,
    }


def _outcome_of(item: Any) -> RowOutcome:
    if isinstance(item, str):  # the key row of an import made before reports were kept
        return RowOutcome(row=0, action=RowAction.ADDED, case_id=item)
    return RowOutcome(
        row=int(item["row"]),
        action=RowAction(item["action"]),
        case_id=str(item["case_id"]),
        matched_cases=tuple(item["matched_cases"]),
        matched_row=int(item["matched_row"]),
        match=MatchRule(item["match"]) if item["match"] else None,
        changed_fields=tuple(item["changed_fields"]),
        note=str(item["note"]),
    )


def _replay(store: NodeStore, key: str) -> ImportOutcome | None:
    with store.core.reading() as session:
        seen = session.get(RequestKeyRow, key)
    if seen is None:
        return None
    if seen.action != _ACTION:
        raise Conflict("that idempotency key was used for another request")
    return ImportOutcome(tuple(_outcome_of(item) for item in json.loads(seen.case_ids)))


def _save_report(store: NodeStore, key: str, result: ImportOutcome) -> None:
    # The key row create_cases wrote holds the created ids; the whole report (ids, codes and
    # row numbers, never a value) replaces them, so a retry is answered exactly as the first.
    with store.core.writing() as session:
        seen = session.get(RequestKeyRow, key)
        if seen is not None:
            seen.case_ids = json.dumps([_outcome_json(o) for o in result.rows])
            session.add(seen)
