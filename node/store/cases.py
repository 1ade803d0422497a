"""The encrypted case store (DESIGN.md sections 2 and 5; issue 4 items 2 and 3).

Each survivor has a data key of their own, wrapped by the node's record key and kept in their
case row (``case_record.wrapped_key``, bound to the case id, so deleting the row crypto-shreds
them); all of their fields are one AEAD ciphertext whose associated data binds it to this table,
this case and this record version, so a ciphertext moved to another row or an older one put back
fails to open. Lookup by an identifier uses keyed blind indexes, never plaintext. Every operation
appends to the audit log in the same transaction, so an action is recorded if and only if it
happened.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Engine, delete, text
from sqlalchemy import select as sa_select
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, col, func, select

from node.domain import (
    AuditEntry,
    AuditReport,
    Case,
    CaseState,
    CaseSummary,
    CheckpointRef,
    Need,
    StaffMember,
    StaffRole,
)
from node.htcds import NeedCategory, NeedStatus
from node.keyring import Keyring
from node.store import anchors
from node.store.audit_log import AuditLog
from node.store.needs import need_tag, open_need, seal_need
from node.store.tables import (
    BlindIndexRow,
    CaseRow,
    ErasureRow,
    NeedRow,
    RequestKeyRow,
    StaffRow,
    as_utc,
    utcnow,
)
from node.tombstones import TombstoneKind
from tessera import crypto
from tessera.errors import Conflict, InvalidInput, NotFound, StorageError


class _SealedRow(Protocol):
    """What opening a case needs of its row: a CaseRow, or a row of _CASE_COLUMNS."""

    case_id: str
    version: int
    ciphertext: bytes
    wrapped_key: bytes


_CASE_COLUMNS = (
    col(CaseRow.case_id),
    col(CaseRow.version),
    col(CaseRow.state),
    col(CaseRow.created_at),
    col(CaseRow.updated_at),
    col(CaseRow.ciphertext),
    col(CaseRow.wrapped_key),
)
_NEED_COLUMNS = (
    col(NeedRow.case_id),
    col(NeedRow.tag),
    col(NeedRow.ciphertext),
)

# Which fields feed which blind index (issue 4: search by a survivor identifier).
_INDEXED: Mapping[str, tuple[str, ...]] = {
    "name": ("prs_FirstName", "prs_SecondName"),
    "email": ("prs_Email",),
    "phone": ("prs_MobilePhone",),
    "home_phone": ("prs_HomePhone",),
}
IDENTIFIER_KINDS = ("name", "email", "phone")
# The file in the node's home that records erasures and staff removals outside the database.
LEDGER_FILE = "ledger.log"
# The file in the node's home holding the last audit head the node recorded (node.store.audit_log).
AUDIT_HEAD_FILE = "audit-head"
# Audit actions that disclose survivor data to another agency (the accounting of disclosures).
DISCLOSURE_ACTIONS = ("referral.sent", "referral.delivered", "revocation.sent", "purge.confirmed")


@dataclass(frozen=True)
class NewCase:
    """What a caller supplies to create a case (fields already validated against HTCDS)."""

    fields: Mapping[str, str]
    notes: str = ""
    needs: tuple[tuple[NeedCategory, NeedStatus], ...] = ()


def record_associated_data(case_id: str, version: int) -> bytes:
    """Associated data of a case ciphertext: table, row and version (DESIGN.md section 5)."""
    return f"tessera/v1|case_record|{case_id}|{version}".encode()


def _key_context(case_id: str) -> bytes:
    return f"tessera/v1|survivor_key|{case_id}".encode()


class NodeStore:
    """Cases, needs, staff, erasures and the audit log of one node, over one database."""

    def __init__(self, engine: Engine, keyring: Keyring, home: Path | None = None) -> None:
        self._engine = engine
        self._keyring = keyring
        self._home = home
        self._audit = AuditLog(keyring.identity, home / AUDIT_HEAD_FILE if home else None)
        # One writer at a time inside this process; the audit head row's lock covers others.
        self._write_lock = threading.Lock()
        # Seals pin each case's last written version outside its row (node.store.anchors).
        self._seals = anchors.RecordSeals(keyring.record_key)
        #: Set by the running node (node.escrow.EscrowGate): whether cases may be opened now.
        self.guard: anchors.CaseGuard | None = None

    @property
    def keyring(self) -> Keyring:
        """The node's unwrapped keyring (for backups)."""
        return self._keyring

    @property
    def engine(self) -> Engine:
        """The database engine (for health checks and backups)."""
        return self._engine

    # --- transactions --------------------------------------------------------------------

    @contextmanager
    def _writing(self) -> Iterator[Session]:
        with self._write_lock, Session(self._engine, expire_on_commit=False) as session:
            try:
                if self._engine.dialect.name == "sqlite":
                    # Take SQLite's write lock before the first read. The sqlite3 driver would
                    # read the audit head and the case version outside any transaction, so a
                    # commit by another process could slip in between: a lost update, or a
                    # duplicate audit sequence number.
                    session.connection().exec_driver_sql("BEGIN IMMEDIATE")
                yield session
                session.commit()
            except OperationalError as exc:
                session.rollback()
                raise _storage_error(exc) from None
            except BaseException:
                session.rollback()
                raise
            self._audit.record_head(session)

    def _reading(self) -> Session:
        return Session(self._engine, expire_on_commit=False)

    @contextmanager
    def _snapshot(self) -> Iterator[Session]:
        """A read session that sees one moment: a case row, its seal and the audit log read in
        it agree, whatever another writer commits meanwhile."""
        with self._reading() as session:
            if self._engine.dialect.name == "sqlite":
                session.connection().exec_driver_sql("BEGIN")
            else:
                session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            yield session

    def audit(
        self,
        actor: str,
        action: str,
        case_id: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Record an event that changes nothing else (a refused call, a disclosure)."""
        with self._writing() as session:
            self._audit.append(session, actor, action, case_id, detail)

    # --- cases ---------------------------------------------------------------------------

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
        with self._writing() as session:
            if idempotency_key:
                seen = session.get(RequestKeyRow, idempotency_key)
                if seen is not None:
                    if seen.action != action:
                        raise Conflict("that idempotency key was used for another request")
                    return [str(i) for i in json.loads(seen.case_ids)]
            now = utcnow()
            today = now.date()
            record_key = self._keyring.record_key
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
                        ciphertext=self._seal(data_key, case_id, 1, new.fields, new.notes),
                        wrapped_key=crypto.wrap_key(record_key, data_key, _key_context(case_id)),
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
                seq = self._audit.append(session, actor, action, ids[0], detail)
            else:
                seq = self._audit.append(
                    session, actor, action, None, {"cases": len(ids), **(detail or {})}
                )
            self._seals.seal_new(session, rows, seq)
        return ids

    def create_case(self, actor: str, new: NewCase, idempotency_key: str = "") -> Case:
        """Create one case and return it as stored (the same one again for a repeated key)."""
        (case_id,) = self.create_cases(actor, [new], idempotency_key=idempotency_key)
        return self._load(case_id)

    def get_case(self, actor: str, case_id: str) -> Case:
        """Decrypt one case; the read is audited."""
        case = self._load(case_id)
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
        with self._writing() as session:
            row = self._row(session, case_id, for_update=True)
            self._seals.check(session, [row])
            _check_version(row, expected_version)
            data_key = self._data_key(row)
            current_fields, current_notes = self._open(data_key, row)
            merged = dict(current_fields)
            changed = sorted((fields or {}).keys())
            for name, value in (fields or {}).items():
                if value:
                    merged[name] = value
                else:
                    merged.pop(name, None)
            row.version += 1
            row.updated_at = utcnow()
            row.ciphertext = self._seal(
                data_key, case_id, row.version, merged, current_notes if notes is None else notes
            )
            session.add(row)
            session.exec(delete(BlindIndexRow).where(col(BlindIndexRow.case_id) == case_id))
            self._add_indexes(session, case_id, merged)
            seq = self._audit.append(
                session,
                actor,
                "case.update",
                case_id,
                {"fields": changed, "notes": notes is not None, "version": row.version},
            )
            self._seals.seal(session, row, seq)
        return self._load(case_id)

    def close_case(
        self, actor: str, case_id: str, expected_version: int, reason: str = ""
    ) -> CaseSummary:
        """Mark a case closed (its data stays, encrypted, until erased)."""
        with self._writing() as session:
            row = self._row(session, case_id, for_update=True)
            self._seals.check(session, [row])
            _check_version(row, expected_version)
            row.version += 1
            row.state = CaseState.CLOSED.value
            row.updated_at = utcnow()
            session.add(row)
            seq = self._audit.append(session, actor, "case.close", case_id, {"reason_code": reason})
            self._seals.seal(session, row, seq)
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
        with self._writing() as session:
            row = self._row(session, case_id)
            need = self._put_need(session, row, category, status, identified_on, utcnow())
            # The codes stay out of the audit log, which is in clear: the need itself is sealed.
            self._audit.append(session, actor, "need.set", case_id)
        return need

    def _put_need(
        self,
        session: Session,
        case: _SealedRow,
        category: NeedCategory,
        status: NeedStatus,
        identified_on: dt.date | None,
        now: dt.datetime,
    ) -> Need:
        """Add or change one need of ``case`` inside ``session``, sealed under its data key
        (node.store.needs); a changed need keeps its identification date unless one is given."""
        data_key = self._data_key(case)
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

    def _sealed_needs(self, rows: Iterable[Any], data_key: crypto.DataKey) -> tuple[Need, ...]:
        """Open need rows (all of one case) under its data key, in category order."""
        needs = [open_need(data_key, r.case_id, r.tag, r.ciphertext) for r in rows]
        return tuple(sorted(needs, key=lambda n: n.category.value))

    def need_facts(self) -> list[tuple[str, Need]]:
        """Every need of every case, decrypted, in the order they were recorded: what the
        statistics count at this node (node.store.budget.BudgetStore.need_rows)."""
        facts: list[tuple[str, Need]] = []
        with self._reading() as session:
            query = (
                sa_select(*_NEED_COLUMNS, col(CaseRow.wrapped_key))
                .join(CaseRow, col(CaseRow.case_id) == col(NeedRow.case_id))
                .order_by(col(NeedRow.id))
            )
            keys: dict[str, crypto.DataKey] = {}
            for r in session.execute(query):
                key = keys.get(r.case_id) or keys.setdefault(r.case_id, self._data_key(r))
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
        self._guard(())
        with self._reading() as session:
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
            sa_select(*_NEED_COLUMNS, col(CaseRow.wrapped_key))
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
                current, data_key = r.case_id, self._data_key(r)
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
        with self._reading() as session:
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
        digest = self._blind_index(kind, value)
        kinds = ("phone", "home_phone") if kind == "phone" else (kind,)
        with self._reading() as session:
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
        with self._reading() as session:
            query = select(CaseRow.case_id).order_by(col(CaseRow.created_at))
            if state is not None:
                query = query.where(CaseRow.state == state.value)
            ids = list(session.exec(query))
        self.audit(actor, "cases.export", None, {"cases": len(ids)})
        for start in range(0, len(ids), 500):
            yield from self.read_cases(ids[start : start + 500])

    # --- erasure (crypto-shredding) ------------------------------------------------------

    def erase_case(self, actor: str, case_id: str) -> None:
        """Destroy the survivor's data key and every row about them; record the erasure.

        The erasure is also appended to the ledger (``ledger.log``) in the node's home, outside
        the database, so a restore of an older backup re-applies it (node.backup), and queued,
        in the same transaction, as a tombstone for the broker's escrow, so no older copy of the
        node brings the survivor back (node.escrow).
        """
        with self._writing() as session:
            self._row(session, case_id, guard=False)
            self._delete_survivor(session, case_id)
            session.add(ErasureRow(case_id=case_id, erased_by=actor))
            self._queue_tombstone(session, TombstoneKind.ERASURE, case_id)
            self._audit.append(session, actor, "case.erase", case_id)
        if self.guard is not None:
            self.guard.note_erased(case_id)
        self._append_ledger(f"erase {case_id}")
        self._checkpoint()

    def reapply_erasures(self, actor: str, case_ids: Iterable[str], queue: bool = True) -> int:
        """Erase again every listed survivor still present (after a restore); returns how many.

        With ``queue``, an erasure this database did not know is also queued for the escrow
        (its tombstone id is derived from the case id, so the broker keeps one copy).
        """
        count = 0
        with self._writing() as session:
            for case_id in case_ids:
                if self.guard is not None:
                    self.guard.note_erased(case_id)
                present = session.get(CaseRow, case_id) is not None
                if present:
                    self._delete_survivor(session, case_id)
                    count += 1
                if session.get(ErasureRow, case_id) is None:
                    session.add(ErasureRow(case_id=case_id, erased_by=actor))
                    present = True
                if present and queue:
                    self._queue_tombstone(session, TombstoneKind.ERASURE, case_id)
            if count:
                self._audit.append(session, actor, "erasures.reapplied", None, {"cases": count})
        self._checkpoint()
        return count

    def erased_ids(self) -> list[str]:
        """Every survivor erased at this node, per the database."""
        with self._reading() as session:
            return list(session.exec(select(ErasureRow.case_id)))

    def _delete_survivor(self, session: Session, case_id: str) -> None:
        for table in (BlindIndexRow, NeedRow):
            session.exec(delete(table).where(col(table.case_id) == case_id))
        # The case row holds the wrapped data key: deleting it crypto-shreds the survivor.
        session.exec(delete(CaseRow).where(col(CaseRow.case_id) == case_id))
        self._seals.forget(session, [case_id])

    def _queue_tombstone(self, session: Session, kind: TombstoneKind, subject: str) -> None:
        anchors.queue_tombstone(
            session, self._keyring.identity, self._keyring.record_key, kind, subject
        )

    def _guard(self, case_ids: Sequence[str]) -> None:
        # The running node's gate (node.escrow): refuses while it cannot know every erasure.
        if self.guard is not None:
            self.guard.check_cases(case_ids)

    def _append_ledger(self, line: str) -> None:
        # The ledger outside the database: what a restore of an older backup must not undo.
        if self._home is None:
            return
        with (self._home / LEDGER_FILE).open("a", encoding="utf-8") as ledger:
            ledger.write(f"{line}\n")
            ledger.flush()
            os.fsync(ledger.fileno())

    def _checkpoint(self) -> None:
        # Push the WAL into the main file (whose freed pages secure_delete zeroed) and truncate
        # it, so no copy of an erased survivor's key lingers in the write-ahead log.
        if self._engine.dialect.name == "sqlite":
            with self._engine.connect() as conn:
                conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))

    # --- staff ---------------------------------------------------------------------------

    def add_staff(self, actor: str, name: str, role: StaffRole, signing_key: bytes) -> StaffMember:
        """Register a staff member's verify key with a role."""
        with self._writing() as session:
            if session.exec(select(StaffRow).where(StaffRow.signing_key == signing_key)).first():
                raise Conflict("that key already belongs to a staff member")
            if session.exec(
                select(StaffRow).where(StaffRow.name == name, col(StaffRow.removed_at).is_(None))
            ).first():
                raise Conflict(
                    f"an active staff member is already called {name!r}",
                    hint="choose another name or remove the old credential first",
                )
            row = StaffRow(
                staff_id=str(uuid.uuid4()), name=name, role=role.value, signing_key=signing_key
            )
            session.add(row)
            self._audit.append(
                session, actor, "staff.add", None, {"staff": name, "role": role.value}
            )
        return _staff(row)

    def remove_staff(self, actor: str, staff_id: str) -> StaffMember:
        """Revoke a staff credential at once; the last active administrator stays."""
        with self._writing() as session:
            row = session.get(StaffRow, staff_id)
            if row is None or row.removed_at is not None:
                raise NotFound(
                    f"no active staff member {staff_id!r}",
                    hint="`tessera node staff list` shows who there is",
                )
            if row.role == StaffRole.ADMIN.value:
                admins = session.exec(
                    select(func.count())
                    .select_from(StaffRow)
                    .where(
                        StaffRow.role == StaffRole.ADMIN.value, col(StaffRow.removed_at).is_(None)
                    )
                ).one()
                if admins <= 1:
                    raise Conflict(
                        "this is the node's last administrator",
                        hint="add another administrator first",
                    )
            row.removed_at = utcnow()
            session.add(row)
            self._queue_tombstone(session, TombstoneKind.STAFF_REMOVAL, row.signing_key.hex())
            self._audit.append(session, actor, "staff.remove", None, {"staff": row.name})
        if self.guard is not None:
            self.guard.note_removed(row.signing_key)
        self._append_ledger(f"staff-removed {row.signing_key.hex()}")
        return _staff(row)

    def reapply_staff_removals(
        self, actor: str, signing_keys: Iterable[bytes], queue: bool = True
    ) -> int:
        """Remove again every listed staff key still active (after a restore); with ``queue``,
        a removal this database did not know is queued for the escrow too."""
        count = 0
        with self._writing() as session:
            for key in signing_keys:
                if self.guard is not None:
                    self.guard.note_removed(key)
                row = session.exec(select(StaffRow).where(StaffRow.signing_key == key)).first()
                if row is not None and row.removed_at is None:
                    row.removed_at = utcnow()
                    session.add(row)
                    count += 1
                    if queue:
                        self._queue_tombstone(session, TombstoneKind.STAFF_REMOVAL, key.hex())
            if count:
                self._audit.append(
                    session, actor, "staff.removals_reapplied", None, {"staff": count}
                )
        return count

    def list_staff(self) -> list[StaffMember]:
        """All staff, including removed ones (with their removal time)."""
        with self._reading() as session:
            return [_staff(r) for r in session.exec(select(StaffRow).order_by(col(StaffRow.name)))]

    def staff_by_key(self, signing_key: bytes) -> StaffMember | None:
        """The staff member holding ``signing_key``, removed or not; None if unknown."""
        with self._reading() as session:
            row = session.exec(select(StaffRow).where(StaffRow.signing_key == signing_key)).first()
        return _staff(row) if row else None

    # --- audit ---------------------------------------------------------------------------

    def verify_audit(self, checkpoint: CheckpointRef | None = None) -> AuditReport:
        """Check the whole chain, links, signatures and head, all as of one moment (and against
        the broker's latest checkpoint, when given)."""
        with self._reading() as session:
            # One snapshot for the head and the chain, or an append committed between the two
            # reads would look like tampering.
            if self._engine.dialect.name == "sqlite":
                session.connection().exec_driver_sql("BEGIN")
            else:
                session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            return self._audit.verify(session, checkpoint)

    def disclosures(self, case_id: str) -> list[AuditEntry]:
        """The accounting of disclosures for one case (DESIGN.md section 6)."""
        return self.audit_entries(case_id, DISCLOSURE_ACTIONS)

    def audit_entries(
        self, case_id: str | None = None, actions: tuple[str, ...] = (), **filters: Any
    ) -> list[AuditEntry]:
        """Audit entries in order, optionally filtered (see AuditLog.entries)."""
        with self._reading() as session:
            return self._audit.entries(session, case_id, actions, **filters)

    # --- internals -----------------------------------------------------------------------

    def _seal(
        self,
        data_key: crypto.DataKey,
        case_id: str,
        version: int,
        fields: Mapping[str, str],
        notes: str,
    ) -> bytes:
        payload = json.dumps({"fields": dict(fields), "notes": notes}, separators=(",", ":"))
        return crypto.encrypt(data_key, payload.encode(), record_associated_data(case_id, version))

    def _open(self, data_key: crypto.DataKey, row: _SealedRow) -> tuple[dict[str, str], str]:
        plain = crypto.decrypt(
            data_key, row.ciphertext, record_associated_data(row.case_id, row.version)
        )
        payload = json.loads(plain)
        return dict(payload["fields"]), str(payload["notes"])

    def _data_key(self, row: _SealedRow) -> crypto.DataKey:
        # The context names the row the key is read from: a key moved here from another case
        # (or a ciphertext and key moved together) fails to unwrap.
        return crypto.unwrap_key(
            self._keyring.record_key, row.wrapped_key, _key_context(row.case_id)
        )

    def _row(
        self, session: Session, case_id: str, for_update: bool = False, guard: bool = True
    ) -> CaseRow:
        if guard:
            self._guard([case_id])
        query = select(CaseRow).where(CaseRow.case_id == case_id)
        if for_update:
            query = query.with_for_update()
        row = session.exec(query).first()
        if row is None:
            erased = session.get(ErasureRow, case_id) is not None
            raise NotFound(
                f"case {case_id} was erased" if erased else f"no case {case_id}",
                hint=None if erased else "`tessera case list` shows the cases there are",
            )
        return row

    def _blind_index(self, kind: str, value: str) -> str:
        # Whitespace is collapsed here (the crypto core normalises case and Unicode), so
        # " Ana  Ruiz" typed in a search finds "Ana Ruiz" as recorded.
        return crypto.blind_index(self._keyring.index_key, f"{kind}:{' '.join(value.split())}")

    def _add_indexes(self, session: Session, case_id: str, fields: Mapping[str, str]) -> None:
        digests: dict[tuple[str, str], str] = {}
        for kind, names in _INDEXED.items():
            value = " ".join(fields.get(n, "") for n in names)
            if value.strip():
                # A home phone is searched as a phone: the same number gets the same digest,
                # computed once.
                search_kind = "phone" if kind == "home_phone" else kind
                key = (search_kind, " ".join(value.split()))
                if key not in digests:
                    digests[key] = self._blind_index(*key)
                session.add(BlindIndexRow(case_id=case_id, kind=kind, digest=digests[key]))

    def _needs(self, session: Session, row: _SealedRow) -> tuple[Need, ...]:
        rows = list(
            session.execute(sa_select(*_NEED_COLUMNS).where(col(NeedRow.case_id) == row.case_id))
        )
        return self._sealed_needs(rows, self._data_key(row)) if rows else ()

    def read_cases(self, case_ids: Sequence[str]) -> list[Case]:
        """Decrypt several cases in two database round trips, case rows (each carrying its
        wrapped data key) and needs (not audited: callers that disclose cases to a person audit
        the disclosure themselves)."""
        if not case_ids:
            return []
        # Plain column tuples, not ORM objects: this is the hot path of exports and listings,
        # and nothing here is written back.
        self._guard(case_ids)
        with self._snapshot() as session:
            rows: dict[str, Any] = {
                r.case_id: r
                for r in session.execute(
                    sa_select(*_CASE_COLUMNS).where(col(CaseRow.case_id).in_(case_ids))
                )
            }
            self._seals.check(session, list(rows.values()))
            needs: dict[str, list[Any]] = {}
            for need in session.execute(
                sa_select(*_NEED_COLUMNS).where(col(NeedRow.case_id).in_(case_ids))
            ):
                needs.setdefault(need.case_id, []).append(need)
        cases = []
        for case_id in case_ids:
            row = rows.get(case_id)
            if row is None:
                raise NotFound(f"no case {case_id}")
            data_key = self._data_key(row)
            fields, notes = self._open(data_key, row)
            cases.append(
                Case(
                    case_id=case_id,
                    version=row.version,
                    fields=fields,
                    notes=notes,
                    state=CaseState(row.state),
                    created_at=as_utc(row.created_at),
                    updated_at=as_utc(row.updated_at),
                    needs=self._sealed_needs(needs.get(case_id, ()), data_key),
                )
            )
        return cases

    def _load(self, case_id: str) -> Case:
        with self._snapshot() as session:
            row = self._row(session, case_id)
            self._seals.check(session, [row])
            fields, notes = self._open(self._data_key(row), row)
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

    def summary(self, case_id: str) -> CaseSummary:
        with self._reading() as session:
            row = self._row(session, case_id)
            return CaseSummary(
                case_id=case_id,
                version=row.version,
                state=CaseState(row.state),
                created_at=as_utc(row.created_at),
                updated_at=as_utc(row.updated_at),
                needs=self._needs(session, row),
            )


def _check_version(row: CaseRow, expected_version: int) -> None:
    if row.version != expected_version:
        raise Conflict(
            f"case {row.case_id} is at version {row.version}, not {expected_version}",
            hint="someone changed it first; show it again and reapply your change",
        )


def _staff(row: StaffRow) -> StaffMember:
    return StaffMember(
        staff_id=row.staff_id,
        name=row.name,
        role=StaffRole(row.role),
        signing_key=row.signing_key,
        added_at=as_utc(row.added_at),
        removed_at=as_utc(row.removed_at) if row.removed_at else None,
    )


def _storage_error(exc: OperationalError) -> StorageError:
    text_ = str(exc.orig) if exc.orig else str(exc)
    if "full" in text_.lower() or "no space" in text_.lower():
        return StorageError(
            "the disk is full; nothing was written", hint="free disk space, then retry"
        )
    if "locked" in text_.lower():
        return StorageError("the database is busy; nothing was written", hint="retry shortly")
    return StorageError(
        "the database refused the write; nothing was written",
        hint="check the node's log and database",
    )
