"""The escrow's side of the node's store: the tombstone outbox, the anchor, seals to backfill, and
the audit head to checkpoint (issue 14; node.store.anchors says what each is for).

:class:`EscrowStore` is a companion of :class:`~node.store.cases.NodeStore` (like BudgetStore):
it shares its engine, write lock and audit log, so whatever it changes is audited in the same
transaction. ``node.escrow`` calls it around its broker I/O.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from sqlmodel import col, select

from node.domain import CheckpointRef
from node.store import anchors
from node.store.cases import NodeStore
from node.store.tables import AuditRow, ErasureRow, StaffRow, utcnow
from node.tombstones import AuditPosition, TombstoneKind

# Audit actions after which the node checkpoints its head at the broker without waiting for the
# periodic one: erasures, disclosures, staff and key changes, exports, backups, restores.
SENSITIVE_ACTIONS = (
    "case.erase",
    "erasures.reapplied",
    "staff.add",
    "staff.remove",
    "staff.removals_reapplied",
    "referral.sent",
    "referral.delivered",
    "revocation.sent",
    "purge.confirmed",
    "consent.revoke",
    "cases.export",
    "node.backup",
    "node.restored",
    "keys.rotate_kek",
)


class EscrowStore:
    """What node.escrow reads and writes in the node's database."""

    def __init__(self, store: NodeStore) -> None:
        self._store = store

    # --- the outbox ----------------------------------------------------------------------

    def pending(self, limit: int = 100) -> list[anchors.QueuedTombstone]:
        """Tombstones waiting for the broker, oldest first."""
        with self._store.core.reading() as session:
            return anchors.pending_tombstones(session, limit)

    def count_pending(self) -> int:
        """How many tombstones wait for the broker."""
        with self._store.core.reading() as session:
            return anchors.count_pending(session)

    def deposited(self, tombstone_ids: Iterable[str]) -> None:
        """The broker accepted these: they leave the outbox."""
        with self._store.core.writing() as session:
            anchors.mark_deposited(session, tombstone_ids)

    def deposit_failed(self, tombstone_ids: Iterable[str], error: str) -> None:
        """Count a failed deposit on each; they stay queued."""
        with self._store.core.writing() as session:
            anchors.deposit_failed(session, tombstone_ids, error)

    def requeue_all(self) -> int:
        """Queue again a tombstone for every erasure and removal this database knows (after the
        broker was found holding fewer than the node had seen); returns how many."""
        with self._store.core.writing() as session:
            erased = list(session.exec(select(ErasureRow.case_id)))
            removed = list(
                session.exec(
                    select(StaffRow.signing_key).where(col(StaffRow.removed_at).is_not(None))
                )
            )
            for case_id in erased:
                self._store.core.queue_tombstone(session, TombstoneKind.ERASURE, case_id)
            for key in removed:
                self._store.core.queue_tombstone(session, TombstoneKind.STAFF_REMOVAL, key.hex())
        return len(erased) + len(removed)

    # --- the anchor ----------------------------------------------------------------------

    def anchor(self) -> anchors.EscrowAnchor:
        """How much of the escrow this database has applied."""
        with self._store.core.reading() as session:
            return anchors.anchor(session)

    def set_anchor(self, size: int, chain: bytes, confirmed_at: dt.datetime) -> None:
        """This database has applied the escrow up to (size, chain), confirmed at that time."""
        with self._store.core.writing() as session:
            anchors.set_escrow_anchor(session, size, chain, confirmed_at)

    def removed_keys(self) -> list[bytes]:
        """The signing keys of every removed staff member, per the database."""
        with self._store.core.reading() as session:
            return list(
                session.exec(
                    select(StaffRow.signing_key).where(col(StaffRow.removed_at).is_not(None))
                )
            )

    # --- seals ---------------------------------------------------------------------------

    def backfill_seals(self, actor: str) -> int:
        """Seal every case written before seals existed, once per database (audited)."""
        with self._store.core.writing() as session:
            if anchors.anchor(session).sealed_at is not None:
                return 0
            rows = self._store.core.seals.unsealed(session)
            if rows:
                seq = self._store.core.audit_log.append(
                    session, actor, "records.sealed", None, {"cases": len(rows)}
                )
                for row in rows:
                    self._store.core.seals.seal(session, row, seq)
            anchors.set_sealed(session, utcnow())
        return len(rows)

    # --- the audit head ------------------------------------------------------------------

    def audit_head(self) -> AuditPosition:
        """The committed audit head, to checkpoint."""
        with self._store.core.reading() as session:
            seq, entry_hash = self._store.core.audit_log.head(session)
        return AuditPosition(seq, entry_hash)

    def holds(self, position: AuditPosition) -> bool:
        """Whether the log still holds this entry (so it extends that head)."""
        with self._store.core.reading() as session:
            return self._store.core.audit_log.holds(session, position.seq, position.entry_hash)

    def acknowledged(self, position: AuditPosition) -> bool:
        """Whether a restore recorded going back behind this head."""
        with self._store.core.reading() as session:
            found = self._store.core.audit_log.acknowledged(
                session, position.seq, position.entry_hash
            )
        return found is not None

    def extends(self, position: AuditPosition) -> bool:
        """Whether the log still holds this head, or a restore recorded going back behind it."""
        with self._store.core.reading() as session:
            log = self._store.core.audit_log
            return (
                log.holds(session, position.seq, position.entry_hash)
                or log.acknowledged(session, position.seq, position.entry_hash) is not None
            )

    def check_checkpoint(self, checkpoint: CheckpointRef) -> str | None:
        """What is wrong with the log against the checkpoint; None when it extends it (or a
        restore recorded going back behind it)."""
        with self._store.core.reading() as session:
            return self._store.core.audit_log.check_checkpoint(session, checkpoint)

    def sensitive_since(self, seq: int) -> bool:
        """Whether an entry after ``seq`` records a sensitive action (SENSITIVE_ACTIONS)."""
        with self._store.core.reading() as session:
            found = session.exec(
                select(AuditRow.seq)
                .where(col(AuditRow.seq) > seq, col(AuditRow.action).in_(SENSITIVE_ACTIONS))
                .limit(1)
            ).first()
        return found is not None
