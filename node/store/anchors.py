"""What the node writes so that an older copy of itself is recognised (issue 14; docs/storage.md).

- **Record seals** (DESIGN.md section 5: "a record cannot be rolled back to an older version
  unnoticed"). A case's AEAD binds its ciphertext to the version stored in the same row, so
  writing back an older (version, ciphertext, wrapped key) triple would open cleanly. Every write
  of a case therefore also writes its seal, in the same transaction: a MAC, under a key derived
  from the record key, over the case id, the version written, its state, digests of the
  ciphertext and wrapped key, and the sequence number of the audit entry that recorded the
  write. Reading a case checks (1) that the row is exactly what its seal describes, and (2) that
  the signed, hash-chained audit log records no later change of that case than the sealed one
  (since the last restore, which legitimately takes every case back). A row rolled back alone
  fails (1); a row rolled back together with its seal fails (2); both are refused as
  :class:`~tessera.errors.RolledBack` (INTEGRITY, exit 11). Dropping the audit entries too
  breaks the chain, which ``tessera node audit verify`` reports, and the whole database rolled
  back is caught by the audit head kept in the home and checkpointed at the broker.
- **The escrow outbox**: each erasure and staff removal, as a tombstone sealed by the node to
  itself, queued in the same transaction as the change and kept until the broker accepted it
  (node.escrow deposits it), so a broker outage never loses one.
- **The anchor**: how much of the broker's escrow this database has applied (size and chain
  value), so a database that predates the escrow is recognised.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import delete
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, func, select

from node.store.tables import (
    AnchorRow,
    AuditRow,
    CaseRow,
    EscrowOutboxRow,
    RecordSealRow,
    as_utc,
    utcnow,
)
from node.tombstones import Tombstone, TombstoneKind, seal_tombstone, tombstone_id
from tessera import crypto, escrow, labels
from tessera.errors import RolledBack, TamperedCiphertext

# Audit actions that change a case's version or remove it: none may postdate its seal.
CASE_WRITE_ACTIONS = ("case.create", "case.update", "case.close", "case.erase")
# Restores take every case back legitimately; writes before the latest one are not compared.
RESTORE_ACTION = "node.restored"
_HINT = (
    "do not trust this record: restore the node from a backup (`tessera node restore`) and "
    "investigate who wrote to its database (`tessera node audit verify`)"
)


class SealedCase(Protocol):
    """What sealing and checking a case needs of its row (a CaseRow or a column tuple)."""

    case_id: str
    version: int
    state: str
    ciphertext: bytes
    wrapped_key: bytes


class CaseGuard(Protocol):
    """What the running node knows beyond its database (node.escrow.EscrowGate): whether it may
    open cases at all, and which survivors and credentials it knows to be erased and removed."""

    def check_cases(self, case_ids: Sequence[str]) -> None:
        """Raise unless the node may open these cases now (empty: any case)."""

    def note_erased(self, case_id: str) -> None:
        """Remember an erasure this process made."""

    def note_removed(self, signing_key: bytes) -> None:
        """Remember a staff removal this process made."""


class RecordSeals:
    """Writes and checks the seals of case records (module docstring)."""

    def __init__(self, record_key: crypto.DataKey) -> None:
        self._key = crypto.derive_key(record_key, labels.LABEL_RECORD_SEAL)

    def _tag(self, case_id: str, version: int, audit_seq: int, row: SealedCase) -> bytes:
        return crypto.mac(
            self._key, labels.LABEL_RECORD_SEAL, *self._parts(case_id, version, audit_seq, row)
        )

    def seal_new(self, session: Session, rows: Iterable[SealedCase], audit_seq: int) -> None:
        """Seal cases just created (no seal yet), with no read per case."""
        session.add_all(
            RecordSealRow(
                case_id=row.case_id,
                version=row.version,
                audit_seq=audit_seq,
                seal=self._tag(row.case_id, row.version, audit_seq, row),
            )
            for row in rows
        )

    def seal(self, session: Session, row: SealedCase, audit_seq: int) -> None:
        """Record ``row`` as the version the node last wrote, by audit entry ``audit_seq``."""
        existing = session.get(RecordSealRow, row.case_id)
        seal = existing or RecordSealRow(case_id=row.case_id, version=0, audit_seq=0, seal=b"")
        seal.version = row.version
        seal.audit_seq = audit_seq
        seal.seal = self._tag(row.case_id, row.version, audit_seq, row)
        session.add(seal)

    @staticmethod
    def forget(session: Session, case_ids: Iterable[str]) -> None:
        """Drop the seals of erased cases."""
        ids = list(case_ids)
        if ids:
            session.exec(delete(RecordSealRow).where(col(RecordSealRow.case_id).in_(ids)))

    def check(self, session: Session, rows: Sequence[SealedCase]) -> None:
        """RolledBack unless every row is the version the node last wrote (module docstring)."""
        if not rows:
            return
        ids = [r.case_id for r in rows]
        # Column tuples, not ORM objects: this runs on every page of cases read.
        seals = {
            s.case_id: s
            for s in session.execute(
                sa_select(
                    col(RecordSealRow.case_id),
                    col(RecordSealRow.version),
                    col(RecordSealRow.audit_seq),
                    col(RecordSealRow.seal),
                ).where(col(RecordSealRow.case_id).in_(ids))
            )
        }
        for row in rows:
            seal = seals.get(row.case_id)
            if seal is None:
                raise RolledBack(
                    f"case {row.case_id} carries no seal of this node: it was written into the "
                    "database from outside, or its seal was removed",
                    hint=_HINT,
                )
            if row.version != seal.version:
                raise RolledBack(
                    f"case {row.case_id} is at version {row.version} in the database, but the "
                    f"node last wrote version {seal.version} of it: the record was rolled back",
                    hint=_HINT,
                )
            if not crypto.mac_matches(
                self._key,
                labels.LABEL_RECORD_SEAL,
                seal.seal,
                *self._parts(row.case_id, seal.version, seal.audit_seq, row),
            ):
                # Same version, other bytes: an altered row (or a seal written by someone
                # without the record key).
                raise TamperedCiphertext(
                    f"case {row.case_id} does not match the version {seal.version} the node "
                    "last wrote of it: its row or its seal was altered",
                    hint=_HINT,
                )
        restored = session.exec(
            select(func.max(AuditRow.seq)).where(AuditRow.action == RESTORE_ACTION)
        ).one()
        latest = dict(
            session.exec(
                select(AuditRow.case_id, func.max(AuditRow.seq))
                .where(col(AuditRow.case_id).in_(ids), col(AuditRow.action).in_(CASE_WRITE_ACTIONS))
                .group_by(col(AuditRow.case_id))
            ).all()
        )
        for row in rows:
            seal = seals[row.case_id]
            later = latest.get(row.case_id)
            if later is not None and later > max(seal.audit_seq, restored or 0):
                raise RolledBack(
                    f"case {row.case_id} was rolled back: the audit log records a later change "
                    f"of it (entry {later}) than the version {row.version} the database holds",
                    hint=_HINT,
                )

    def _parts(self, case_id: str, version: int, audit_seq: int, row: SealedCase) -> list[bytes]:
        return [
            case_id.encode(),
            version.to_bytes(8, "big"),
            audit_seq.to_bytes(8, "big"),
            row.state.encode(),
            crypto.digest(labels.LABEL_RECORD_SEAL, bytes(row.ciphertext)),
            crypto.digest(labels.LABEL_RECORD_SEAL, bytes(row.wrapped_key)),
        ]

    def unsealed(self, session: Session) -> list[CaseRow]:
        """Cases without a seal (written before seals existed)."""
        return list(
            session.exec(
                select(CaseRow).where(col(CaseRow.case_id).not_in(select(RecordSealRow.case_id)))
            )
        )


# --- the escrow outbox and the anchor ---------------------------------------------------------


@dataclass(frozen=True)
class QueuedTombstone:
    """A sealed tombstone waiting for the broker."""

    tombstone_id: str
    sealed: bytes
    attempts: int


@dataclass(frozen=True)
class EscrowAnchor:
    """How much of the broker's escrow a database has applied, and when it was confirmed."""

    size: int
    chain: bytes
    confirmed_at: dt.datetime | None
    sealed_at: dt.datetime | None


def queue_tombstone(
    session: Session,
    identity: crypto.Identity,
    record_key: crypto.DataKey,
    kind: TombstoneKind,
    subject: str,
) -> str:
    """Queue the tombstone of an erasure or removal in ``session``'s transaction; its id.

    The id is derived from (kind, subject), so queueing the same one again changes nothing.
    """
    tid = tombstone_id(record_key, kind, subject)
    if session.get(EscrowOutboxRow, tid) is None:
        sealed = seal_tombstone(identity, Tombstone(tid, kind, subject, utcnow()))
        session.add(EscrowOutboxRow(tombstone_id=tid, sealed=sealed))
    return tid


def pending_tombstones(session: Session, limit: int) -> list[QueuedTombstone]:
    """Tombstones not yet accepted by the broker, oldest first."""
    rows = session.exec(
        select(EscrowOutboxRow)
        .order_by(col(EscrowOutboxRow.created_at), col(EscrowOutboxRow.tombstone_id))
        .limit(limit)
    )
    return [QueuedTombstone(r.tombstone_id, r.sealed, r.attempts) for r in rows]


def count_pending(session: Session) -> int:
    """How many tombstones wait for the broker."""
    return int(session.exec(select(func.count()).select_from(EscrowOutboxRow)).one())


def mark_deposited(session: Session, tombstone_ids: Iterable[str]) -> None:
    """The broker holds these: they leave the outbox."""
    ids = list(tombstone_ids)
    if ids:
        session.exec(delete(EscrowOutboxRow).where(col(EscrowOutboxRow.tombstone_id).in_(ids)))


def deposit_failed(session: Session, tombstone_ids: Iterable[str], error: str) -> None:
    """Count a failed attempt on each (they stay queued)."""
    for tid in tombstone_ids:
        row = session.get(EscrowOutboxRow, tid)
        if row is not None:
            row.attempts += 1
            row.last_error = error[:500]
            session.add(row)


def anchor(session: Session) -> EscrowAnchor:
    """The database's anchor (an empty one before the first confirmation)."""
    row = session.get(AnchorRow, 1)
    if row is None:
        return EscrowAnchor(0, escrow.GENESIS_CHAIN, None, None)
    return EscrowAnchor(
        row.escrow_size,
        bytes(row.escrow_chain),
        as_utc(row.escrow_confirmed_at) if row.escrow_confirmed_at else None,
        as_utc(row.sealed_at) if row.sealed_at else None,
    )


def _anchor_row(session: Session) -> AnchorRow:
    row = session.get(AnchorRow, 1)
    if row is None:
        row = AnchorRow(id=1, escrow_size=0, escrow_chain=escrow.GENESIS_CHAIN)
    return row


def set_escrow_anchor(
    session: Session, size: int, chain: bytes, confirmed_at: dt.datetime | None
) -> None:
    """Record that this database has applied the escrow up to (size, chain)."""
    row = _anchor_row(session)
    row.escrow_size, row.escrow_chain = size, chain
    row.escrow_confirmed_at = confirmed_at
    session.add(row)


def set_sealed(session: Session, at: dt.datetime) -> None:
    """Record that every case of this database carries a seal from now on."""
    row = _anchor_row(session)
    row.sealed_at = at
    session.add(row)
