"""The encrypted case store (DESIGN.md sections 2 and 5; issue 4 items 2 and 3).

Each survivor has a data key of their own, wrapped by the node's record key and kept in their
case row (``case_record.wrapped_key``, bound to the case id, so deleting the row crypto-shreds
them); all of their fields are one AEAD ciphertext whose associated data binds it to this table,
this case and this record version, so a ciphertext moved to another row or an older one put back
fails to open (``node.store.records``). Lookup by an identifier uses keyed blind indexes, never
plaintext (``node.store.blind_index``). Every operation appends to the audit log in the same
transaction, so an action is recorded if and only if it happened.

:class:`NodeStore` is the case store proper plus its staff (``node.store.staff``) and erasure
(``node.store.erasure``) halves, over one :class:`~node.store.core.StoreCore` (``NodeStore.core``):
the transactions, audit log, seals, tombstones and ledger. The companion stores
(``node.store.budget``, ``node.store.escrow``, ``node.store.imports``, ``node.referrals``) use
that core and the case methods named for them (:meth:`NodeStore.case_row`,
:meth:`NodeStore.data_key`, :meth:`NodeStore.put_need`, :meth:`NodeStore.load_case`,
:meth:`NodeStore.blind_index`, :meth:`NodeStore.index_entries`), never a private member.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, delete
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, func, select

from node.domain import (
    AuditEntry,
    AuditReport,
    Case,
    CaseState,
    CaseSummary,
    CheckpointRef,
    Need,
)
from node.htcds import NeedCategory, NeedStatus
from node.keyring import Keyring
from node.store import anchors
from node.store import blind_index as indexes
from node.store.blind_index import IDENTIFIER_KINDS
from node.store.core import AUDIT_HEAD_FILE, LEDGER_FILE, StoreCore
from node.store.erasure import Erasures
from node.store.needs import need_tag, open_need, seal_need
from node.store.records import (
    CASE_COLUMNS,
    NEED_COLUMNS,
    SealedRow,
    check_version,
    find_case_row,
    open_needs,
    open_record,
    record_associated_data,
    seal_record,
    unwrap_data_key,
    wrap_data_key,
)
from node.store.staff import StaffRegister
from node.store.tables import (
    BlindIndexRow,
    CaseRow,
    NeedRow,
    RequestKeyRow,
    as_utc,
    utcnow,
)
from tessera import crypto
from tessera.errors import Conflict, InvalidInput, NotFound

__all__ = [
    "AUDIT_HEAD_FILE",
    "DISCLOSURE_ACTIONS",
    "IDENTIFIER_KINDS",
    "LEDGER_FILE",
    "NewCase",
    "NodeStore",
    "record_associated_data",
]

# Audit actions that disclose survivor data to another agency (the accounting of disclosures).
DISCLOSURE_ACTIONS = ("referral.sent", "referral.delivered", "revocation.sent", "purge.confirmed")


@dataclass(frozen=True)
class NewCase:
    """What a caller supplies to create a case (fields already validated against HTCDS)."""

    fields: Mapping[str, str]
    notes: str = ""
    needs: tuple[tuple[NeedCategory, NeedStatus], ...] = ()


class NodeStore(StaffRegister, Erasures):
    """Cases, needs, staff, erasures and the audit log of one node, over one database."""

    def __init__(self, engine: Engine, keyring: Keyring, home: Path | None = None) -> None:
        #: The database as the stores share it: transactions, audit log, seals, ledger.
        self.core = StoreCore(engine, keyring, home)

    @property
    def keyring(self) -> Keyring:
        """The node's unwrapped keyring (for backups)."""
        return self.core.keyring

    @property
    def engine(self) -> Engine:
        """The database engine (for health checks and backups)."""
        return self.core.engine

    @property
    def guard(self) -> anchors.CaseGuard | None:
        """Set by the running node (node.escrow.EscrowGate): whether cases may be opened now."""
        return self.core.guard

    @guard.setter
    def guard(self, gate: anchors.CaseGuard | None) -> None:
        self.core.guard = gate

    # --- cases ----------------------------------------------------------------------------

    def create_cases(
        self,
        actor: str,
        cases: Sequence[NewCase],
        action: str = "case.create",
        detail: Mapping[str, Any] | None = None,
        on_progress: Callable[[int], None] | None = None,
        idempotency_key: str = "",
    ) -> list[str]:
        """Create several cases in ONE transaction: all of them are stored or none is.

        ``on_progress(written)`` is called every few hundred cases (before the commit). A
        non-empty ``idempotency_key`` already used returns the ids it created the first time and
        creates nothing (a retried request after a lost answer).
        """
        ids: list[str] = []
        with self.core.writing() as session:
            if idempotency_key:
                seen = session.get(RequestKeyRow, idempotency_key)
                if seen is not None:
                    if seen.action != action:
                        raise Conflict("that idempotency key was used for another request")
                    return [str(i) for i in json.loads(seen.case_ids)]
            now = utcnow()
            today = now.date()
            record_key = self.core.keyring.record_key
            rows: list[CaseRow] = []
            data_keys: list[crypto.DataKey] = []
            for new in cases:
                case_id = str(uuid.uuid4())
                # A fresh data key per survivor, wrapped into the case's own row.
                data_key = crypto.DataKey.generate()
                data_keys.append(data_key)
                rows.append(
                    CaseRow(
                        case_id=case_id,
                        version=1,
                        state=CaseState.OPEN.value,
                        created_at=now,
                        updated_at=now,
                        ciphertext=seal_record(data_key, case_id, 1, new.fields, new.notes),
                        wrapped_key=wrap_data_key(record_key, data_key, case_id),
                    )
                )
                session.add(rows[-1])
                ids.append(case_id)
                if on_progress is not None and len(ids) % 500 == 0:
                    on_progress(len(ids))
            if idempotency_key:
                session.add(
                    RequestKeyRow(key=idempotency_key, action=action, case_ids=json.dumps(ids))
                )
            # Parent rows first: the indexes and needs below reference them, and with no
            # relationship() between the tables the unit of work would not order them itself.
            session.flush()
            for case_id, new, data_key in zip(ids, cases, data_keys, strict=True):
                self._add_indexes(session, case_id, new.fields)
                for category, status in new.needs:
                    sealed = seal_need(data_key, case_id, Need(category, status, today, now))
                    session.add(
                        NeedRow(case_id=case_id, tag=sealed.tag, ciphertext=sealed.ciphertext)
                    )
            if len(ids) == 1 and action == "case.create":
                seq = self.core.audit_log.append(session, actor, action, ids[0], detail)
            else:
                seq = self.core.audit_log.append(
                    session, actor, action, None, {"cases": len(ids), **(detail or {})}
                )
            self.core.seals.seal_new(session, rows, seq)
        return ids

    def create_case(self, actor: str, new: NewCase, idempotency_key: str = "") -> Case:
        """Create one case and return it as stored (the same one again for a repeated key)."""
        (case_id,) = self.create_cases(actor, [new], idempotency_key=idempotency_key)
        return self.load_case(case_id)

    def get_case(self, actor: str, case_id: str) -> Case:
        """Decrypt one case; the read is audited."""
        case = self.load_case(case_id)
        self.audit(actor, "case.read", case_id)
        return case

    def update_case(
        self,
        actor: str,
        case_id: str,
        expected_version: int,
        fields: Mapping[str, str] | None,
        notes: str | None,
    ) -> Case:
        """Replace fields (empty value removes one) and/or notes; refuses a stale version."""
        with self.core.writing() as session:
            row = self.case_row(session, case_id, for_update=True)
            self.core.seals.check(session, [row])
            check_version(row, expected_version)
            data_key = self.data_key(row)
            current_fields, current_notes = open_record(data_key, row)
            merged = dict(current_fields)
            changed = sorted((fields or {}).keys())
            for name, value in (fields or {}).items():
                if value:
                    merged[name] = value
                else:
                    merged.pop(name, None)
            row.version += 1
            row.updated_at = utcnow()
            row.ciphertext = seal_record(
                data_key, case_id, row.version, merged, current_notes if notes is None else notes
            )
            session.add(row)
            session.exec(delete(BlindIndexRow).where(col(BlindIndexRow.case_id) == case_id))
            self._add_indexes(session, case_id, merged)
            seq = self.core.audit_log.append(
                session,
                actor,
                "case.update",
                case_id,
                {"fields": changed, "notes": notes is not None, "version": row.version},
            )
            self.core.seals.seal(session, row, seq)
        return self.load_case(case_id)

    def close_case(
        self, actor: str, case_id: str, expected_version: int, reason: str = ""
    ) -> CaseSummary:
        """Mark a case closed (its data stays, encrypted, until erased)."""
        with self.core.writing() as session:
            row = self.case_row(session, case_id, for_update=True)
            self.core.seals.check(session, [row])
            check_version(row, expected_version)
            row.version += 1
            row.state = CaseState.CLOSED.value
            row.updated_at = utcnow()
            session.add(row)
            seq = self.core.audit_log.append(
                session, actor, "case.close", case_id, {"reason_code": reason}
            )
            self.core.seals.seal(session, row, seq)
        return self.summary(case_id)

    def set_need(
        self,
        actor: str,
        case_id: str,
        category: NeedCategory,
        status: NeedStatus,
        identified_on: dt.date | None = None,
    ) -> Need:
        """Add a need to a case or change its status."""
        with self.core.writing() as session:
            row = self.case_row(session, case_id)
            need = self.put_need(session, row, category, status, identified_on, utcnow())
            # The codes stay out of the audit log, which is in clear: the need itself is sealed.
            self.core.audit_log.append(session, actor, "need.set", case_id)
        return need

    def put_need(
        self,
        session: Session,
        case: SealedRow,
        category: NeedCategory,
        status: NeedStatus,
        identified_on: dt.date | None,
        now: dt.datetime,
    ) -> Need:
        """Add or change one need of ``case`` inside ``session`` (the caller's transaction, which
        audits it), sealed under its data key (node.store.needs); a changed need keeps its
        identification date unless one is given."""
        data_key = self.data_key(case)
        tag = need_tag(data_key, category)
        row = session.exec(
            select(NeedRow).where(NeedRow.case_id == case.case_id, NeedRow.tag == tag)
        ).first()
        if row is None:
            row = NeedRow(case_id=case.case_id, tag=tag, ciphertext=b"")
        elif identified_on is None:
            identified_on = open_need(data_key, case.case_id, tag, row.ciphertext).identified_on
        need = Need(category, status, identified_on or now.date(), now)
        row.ciphertext = seal_need(data_key, case.case_id, need).ciphertext
        session.add(row)
        return need

    def need_facts(self) -> list[tuple[str, Need]]:
        """Every need of every case, decrypted, in the order they were recorded: what the
        statistics count at this node (node.store.budget.BudgetStore.need_rows)."""
        facts: list[tuple[str, Need]] = []
        with self.core.reading() as session:
            query = (
                sa_select(*NEED_COLUMNS, col(CaseRow.wrapped_key))
                .join(CaseRow, col(CaseRow.case_id) == col(NeedRow.case_id))
                .order_by(col(NeedRow.id))
            )
            keys: dict[str, crypto.DataKey] = {}
            for r in session.execute(query):
                key = keys.get(r.case_id) or keys.setdefault(r.case_id, self.data_key(r))
                facts.append((r.case_id, open_need(key, r.case_id, r.tag, r.ciphertext)))
        return facts

    def _case_ids(
        self,
        state: CaseState | None,
        limit: int,
        offset: int,
        need: NeedCategory | None,
        need_status: NeedStatus | None,
    ) -> list[str]:
        self.core.check_guard(())
        with self.core.reading() as session:
            if need is not None or need_status is not None:
                return self._case_ids_by_need(session, state, need, need_status, limit, offset)
            query = select(CaseRow.case_id).order_by(
                col(CaseRow.updated_at).desc(), col(CaseRow.case_id)
            )
            if state is not None:
                query = query.where(CaseRow.state == state.value)
            return list(session.exec(query.offset(offset).limit(limit)))

    def _case_ids_by_need(
        self,
        session: Session,
        state: CaseState | None,
        need: NeedCategory | None,
        need_status: NeedStatus | None,
        limit: int,
        offset: int,
    ) -> list[str]:
        # Needs are sealed, so SQL cannot filter on them: read every need row of the cases in
        # order (a coarse query), open each under its case's key and filter here. A case's rows
        # are adjacent, so one data key is unwrapped per case (node.store.needs says why no
        # node-wide index of the codes is kept).
        query = (
            sa_select(*NEED_COLUMNS, col(CaseRow.wrapped_key))
            .join(CaseRow, col(CaseRow.case_id) == col(NeedRow.case_id))
            .order_by(col(CaseRow.updated_at).desc(), col(CaseRow.case_id))
        )
        if state is not None:
            query = query.where(col(CaseRow.state) == state.value)
        matched: list[str] = []
        current, data_key = "", None
        for r in session.execute(query):
            if matched and matched[-1] == r.case_id:
                continue
            if r.case_id != current or data_key is None:
                current, data_key = r.case_id, self.data_key(r)
            found = open_need(data_key, r.case_id, r.tag, r.ciphertext)
            if (need is None or found.category is need) and (
                need_status is None or found.status is need_status
            ):
                matched.append(r.case_id)
                if len(matched) >= offset + limit:
                    break
        return matched[offset : offset + limit]

    def list_cases(
        self,
        state: CaseState | None = None,
        limit: int = 100,
        offset: int = 0,
        need: NeedCategory | None = None,
        need_status: NeedStatus | None = None,
    ) -> list[CaseSummary]:
        """Case metadata, most recently updated first; no survivor field is decrypted."""
        return [self.summary(i) for i in self._case_ids(state, limit, offset, need, need_status)]

    def list_cases_with_fields(
        self,
        actor: str,
        state: CaseState | None,
        need: NeedCategory | None,
        need_status: NeedStatus | None,
        limit: int,
        offset: int,
    ) -> list[Case]:
        """Like :meth:`list_cases` but decrypted (the caller picks fields); audited as a read."""
        ids = self._case_ids(state, limit, offset, need, need_status)
        self.audit(actor, "cases.list", None, {"cases": len(ids)})
        return self.read_cases(ids)

    def count_cases(self, state: CaseState | None = None) -> int:
        """How many cases the node holds (in ``state``, if given)."""
        with self.core.reading() as session:
            query = select(func.count()).select_from(CaseRow)
            if state is not None:
                query = query.where(CaseRow.state == state.value)
            return int(session.exec(query).one())

    def find_cases(self, actor: str, kind: str, value: str) -> list[CaseSummary]:
        """Cases whose identifier of ``kind`` matches ``value``, through the blind index."""
        if kind not in IDENTIFIER_KINDS:
            raise InvalidInput(
                f"cannot search by {kind!r}",
                hint=f"search by one of: {', '.join(IDENTIFIER_KINDS)}",
            )
        digest = self.blind_index(kind, value)
        kinds = ("phone", "home_phone") if kind == "phone" else (kind,)
        with self.core.reading() as session:
            ids = sorted(
                set(
                    session.exec(
                        select(BlindIndexRow.case_id).where(
                            col(BlindIndexRow.kind).in_(kinds), BlindIndexRow.digest == digest
                        )
                    )
                )
            )
        self.audit(actor, "case.search", None, {"kind": kind, "matches": len(ids)})
        return [self.summary(case_id) for case_id in ids]

    def export_cases(self, actor: str, state: CaseState | None = None) -> Iterator[Case]:
        """Every case, decrypted, for an HTCDS export; audited once as an export."""
        with self.core.reading() as session:
            query = select(CaseRow.case_id).order_by(col(CaseRow.created_at))
            if state is not None:
                query = query.where(CaseRow.state == state.value)
            ids = list(session.exec(query))
        self.audit(actor, "cases.export", None, {"cases": len(ids)})
        for start in range(0, len(ids), 500):
            yield from self.read_cases(ids[start : start + 500])

    def read_cases(self, case_ids: Sequence[str]) -> list[Case]:
        """Decrypt several cases in two database round trips, case rows (each carrying its
        wrapped data key) and needs (not audited: callers that disclose cases to a person audit
        the disclosure themselves)."""
        if not case_ids:
            return []
        # Plain column tuples, not ORM objects: this is the hot path of exports and listings,
        # and nothing here is written back.
        self.core.check_guard(case_ids)
        with self.core.snapshot() as session:
            rows: dict[str, Any] = {
                r.case_id: r
                for r in session.execute(
                    sa_select(*CASE_COLUMNS).where(col(CaseRow.case_id).in_(case_ids))
                )
            }
            self.core.seals.check(session, list(rows.values()))
            needs: dict[str, list[Any]] = {}
            for need in session.execute(
                sa_select(*NEED_COLUMNS).where(col(NeedRow.case_id).in_(case_ids))
            ):
                needs.setdefault(need.case_id, []).append(need)
        cases = []
        for case_id in case_ids:
            row = rows.get(case_id)
            if row is None:
                raise NotFound(f"no case {case_id}")
            data_key = self.data_key(row)
            fields, notes = open_record(data_key, row)
            cases.append(
                Case(
                    case_id=case_id,
                    version=row.version,
                    fields=fields,
                    notes=notes,
                    state=CaseState(row.state),
                    created_at=as_utc(row.created_at),
                    updated_at=as_utc(row.updated_at),
                    needs=open_needs(needs.get(case_id, ()), data_key),
                )
            )
        return cases

    def summary(self, case_id: str) -> CaseSummary:
        """One case's metadata and needs; no survivor field is decrypted."""
        with self.core.reading() as session:
            row = self.case_row(session, case_id)
            return CaseSummary(
                case_id=case_id,
                version=row.version,
                state=CaseState(row.state),
                created_at=as_utc(row.created_at),
                updated_at=as_utc(row.updated_at),
                needs=self._needs(session, row),
            )

    # --- audit ----------------------------------------------------------------------------

    def audit(
        self,
        actor: str,
        action: str,
        case_id: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Record an event that changes nothing else (a refused call, a disclosure)."""
        self.core.audit(actor, action, case_id, detail)

    def verify_audit(self, checkpoint: CheckpointRef | None = None) -> AuditReport:
        """Check the whole chain, links, signatures and head, all as of one moment (and against
        the broker's latest checkpoint, when given)."""
        # One snapshot for the head and the chain, or an append committed between the two reads
        # would look like tampering.
        with self.core.snapshot() as session:
            return self.core.audit_log.verify(session, checkpoint)

    def disclosures(self, case_id: str) -> list[AuditEntry]:
        """The accounting of disclosures for one case (DESIGN.md section 6)."""
        return self.audit_entries(case_id, DISCLOSURE_ACTIONS)

    def audit_entries(
        self, case_id: str | None = None, actions: tuple[str, ...] = (), **filters: Any
    ) -> list[AuditEntry]:
        """Audit entries in order, optionally filtered (see AuditLog.entries)."""
        with self.core.reading() as session:
            return self.core.audit_log.entries(session, case_id, actions, **filters)

    # --- what the companion stores share (node.store.imports, node.referrals) -------------

    def case_row(self, session: Session, case_id: str, for_update: bool = False) -> CaseRow:
        """The row of ``case_id`` in ``session``, once the escrow's gate allows opening cases;
        NotFound (naming the erasure, if it was one) when there is none."""
        self.core.check_guard([case_id])
        return find_case_row(session, case_id, for_update)

    def data_key(self, case: SealedRow) -> crypto.DataKey:
        """The survivor's data key, unwrapped from their case row (for what else is sealed
        under it: needs, a declined referral's text)."""
        return unwrap_data_key(self.core.keyring.record_key, case)

    def blind_index(self, kind: str, value: str) -> str:
        """The digest of ``value`` searched as ``kind`` (node.store.blind_index)."""
        return indexes.blind_index(self.core.keyring.index_key, kind, value)

    def index_entries(self, fields: Mapping[str, str]) -> list[tuple[str, str]]:
        """The (index kind, digest) pairs a case with ``fields`` is indexed under."""
        return indexes.index_entries(self.core.keyring.index_key, fields)

    def load_case(self, case_id: str) -> Case:
        """Decrypt one case, not audited (a caller that shows it to a person audits that)."""
        with self.core.snapshot() as session:
            row = self.case_row(session, case_id)
            self.core.seals.check(session, [row])
            fields, notes = open_record(self.data_key(row), row)
            return Case(
                case_id=case_id,
                version=row.version,
                fields=fields,
                notes=notes,
                state=CaseState(row.state),
                created_at=as_utc(row.created_at),
                updated_at=as_utc(row.updated_at),
                needs=self._needs(session, row),
            )

    # --- internals ------------------------------------------------------------------------

    def _add_indexes(self, session: Session, case_id: str, fields: Mapping[str, str]) -> None:
        for kind, digest in self.index_entries(fields):
            session.add(BlindIndexRow(case_id=case_id, kind=kind, digest=digest))

    def _needs(self, session: Session, row: SealedRow) -> tuple[Need, ...]:
        rows = list(
            session.execute(sa_select(*NEED_COLUMNS).where(col(NeedRow.case_id) == row.case_id))
        )
        return open_needs(rows, self.data_key(row)) if rows else ()
