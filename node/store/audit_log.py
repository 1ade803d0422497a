"""Storage of the node's audit log: appends inside the caller's transaction, verification, queries.

The chain logic is in :mod:`node.audit`; this module only reads and writes rows. Appends lock the
single head row (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite has one writer at a time), so two
writers can never fork the chain. After each commit the head is copied to ``audit-head`` in the
node's home, outside the database, so dropping the newest entries together with the head row is
still detected. That copy only moves forward (under a lock, as several processes may share the
home), so the next write cannot erase the evidence of a truncation; restoring a backup, the one
legitimate rewind, records what it went back behind and starts it afresh (node.backup).

The node also checkpoints its head at the broker (node.escrow); :meth:`AuditLog.verify` given the
latest checkpoint reports a log rolled back behind it, unless a restore recorded, in a signed
entry of this log, that it went back behind exactly that checkpoint (``node.restored`` entries
list what they superseded).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, select

from node import audit
from node.domain import AuditEntry, AuditReport, CheckpointRef
from node.store.tables import AuditHeadRow, AuditRow, as_utc, utcnow
from tessera import crypto

# The audit action a restore records; its detail lists the heads it went back behind.
RESTORE_ACTION = "node.restored"


class AuditLog:
    """Appends and verifies the node's signed hash chain."""

    def __init__(
        self,
        identity: crypto.Identity,
        head_file: Path | None,
        retired: Sequence[crypto.PublicIdentity] = (),
    ) -> None:
        self._identity = identity
        # Entries signed before a key rotation verify under the keys retired by it.
        self._signers = (identity.public, *retired)
        self._head_file = head_file

    def append(
        self,
        session: Session,
        actor: str,
        action: str,
        case_id: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> int:
        """Add one entry in ``session``'s transaction; returns its sequence number."""
        head = session.exec(select(AuditHeadRow).with_for_update()).first()
        if head is None:
            head = AuditHeadRow(id=1, seq=0, entry_hash=audit.GENESIS_HASH)
        sealed = audit.seal_entry(
            self._identity,
            head.entry_hash,
            head.seq + 1,
            utcnow(),
            actor,
            action,
            case_id,
            detail or {},
        )
        session.add(
            AuditRow(
                seq=sealed.seq,
                at=sealed.at,
                actor=actor,
                action=action,
                case_id=case_id,
                detail=sealed.detail_json,
                prev_hash=sealed.prev_hash,
                entry_hash=sealed.entry_hash,
                signature=sealed.signature,
            )
        )
        head.seq = sealed.seq
        head.entry_hash = sealed.entry_hash
        session.add(head)
        return sealed.seq

    def record_head(self, session: Session) -> None:
        """Copy the committed head outside the database (call after commit)."""
        if self._head_file is None:
            return
        head = session.exec(select(AuditHeadRow)).first()
        if head is None:
            return
        with _locked(self._head_file.with_suffix(".lock")):
            recorded = self._read_head_file()
            # Only move the copy forward along the same chain: never back (another writer
            # recorded a later head) and never past a recorded entry that was dropped or
            # rewritten, so verify keeps reporting that rather than the next write erasing it.
            if recorded is not None and not _extends(session, recorded, head.seq):
                return
            tmp = self._head_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"seq": head.seq, "hash": head.entry_hash.hex()}))
            os.replace(tmp, self._head_file)

    def head(self, session: Session) -> tuple[int, bytes]:
        """The committed head: (sequence number, entry hash) of the last entry."""
        row = session.exec(select(AuditHeadRow)).first()
        return (row.seq, row.entry_hash) if row else (0, audit.GENESIS_HASH)

    def holds(self, session: Session, seq: int, entry_hash: bytes) -> bool:
        """Whether the log's entry ``seq`` is the one with ``entry_hash`` (so it extends it)."""
        if seq == 0:
            return True
        row = session.get(AuditRow, seq)
        return row is not None and row.entry_hash == entry_hash

    def superseded(self, session: Session) -> list[tuple[int, dict[str, Any]]]:
        """Every head a restore recorded going back behind: (the restore's seq, what it named)."""
        found = []
        for row in session.exec(
            select(AuditRow).where(AuditRow.action == RESTORE_ACTION).order_by(col(AuditRow.seq))
        ):
            for item in json.loads(row.detail).get("superseded", []):
                found.append((row.seq, item))
        return found

    def acknowledged(self, session: Session, seq: int, entry_hash: bytes) -> int | None:
        """The restore entry that recorded going back behind (seq, hash), if one did."""
        for restore_seq, item in self.superseded(session):
            if item.get("seq") == seq and item.get("hash") == entry_hash.hex():
                return restore_seq
        return None

    def check_checkpoint(self, session: Session, checkpoint: CheckpointRef) -> str | None:
        """What is wrong with the log against a broker checkpoint; None if it extends it, or if
        a restore recorded going back behind exactly this checkpoint."""
        if self.holds(session, checkpoint.seq, checkpoint.entry_hash):
            return None
        if self.acknowledged(session, checkpoint.seq, checkpoint.entry_hash) is not None:
            return None
        head_seq, _hash = self.head(session)
        if head_seq < checkpoint.seq:
            return (
                f"the log was rolled back behind {checkpoint.describe()}: that checkpoint "
                f"recorded entry {checkpoint.seq}, but the log now ends at entry {head_seq}"
            )
        return (
            f"entry {checkpoint.seq} is not the one {checkpoint.describe()} recorded: the log "
            "was rolled back and written over"
        )

    def verify(self, session: Session, checkpoint: CheckpointRef | None = None) -> AuditReport:
        """Walk the whole chain; compare its end with the head row and the head file, and with
        the broker's latest checkpoint when given.

        ``session`` should read one snapshot (NodeStore.verify_audit arranges it).
        """
        # Read the file first: it is written after each commit, so read before the snapshot it
        # can trail the database but never be ahead of it.
        outside = self._read_head_file()
        head_row = session.exec(select(AuditHeadRow)).first()
        head = (head_row.seq, head_row.entry_hash) if head_row else (0, audit.GENESIS_HASH)
        report = audit.verify_chain(self._sealed(session), self._signers, head)
        problems = list(report.problems)
        if outside is not None and outside != head:
            # The copy is written just after each commit, so it may trail the database by the
            # writes still recording; it must never be ahead of it nor disagree with the chain.
            trailing = session.get(AuditRow, outside[0]) if outside[0] < head[0] else None
            if trailing is None or trailing.entry_hash != outside[1]:
                problems.append(
                    f"the database's head is entry {head[0]} but the node last recorded entry "
                    f"{outside[0]}: entries were dropped or rewritten"
                )
        notes = [
            f"entry {restore_seq}: a restore went back behind {item.get('what', 'a head')} "
            f"(entry {item.get('seq')}); entries recorded after the copy it restored are not in "
            "this log"
            for restore_seq, item in self.superseded(session)
        ]
        if checkpoint is not None:
            problem = self.check_checkpoint(session, checkpoint)
            if problem:
                problems.append(problem)
        return AuditReport(
            entries=report.entries,
            ok=not problems,
            problems=tuple(problems),
            notes=tuple(notes),
            checkpoint=checkpoint,
        )

    def entries(
        self,
        session: Session,
        case_id: str | None = None,
        actions: tuple[str, ...] = (),
        *,
        actor: str | None = None,
        since: dt.datetime | None = None,
        after: int = 0,
        limit: int | None = None,
    ) -> list[AuditEntry]:
        """Entries in order, optionally of one case, some actions, one actor (a principal, or a
        staff member's name), from a moment, after a sequence number, at most ``limit``."""
        query = select(AuditRow).order_by(col(AuditRow.seq))
        if case_id is not None:
            query = query.where(AuditRow.case_id == case_id)
        if actions:
            query = query.where(col(AuditRow.action).in_(actions))
        if actor:
            query = query.where(col(AuditRow.actor).in_((actor, f"staff:{actor}")))
        if since is not None:
            query = query.where(col(AuditRow.at) >= since)
        if after:
            query = query.where(col(AuditRow.seq) > after)
        if limit is not None:
            query = query.limit(limit)
        return [
            AuditEntry(
                seq=row.seq,
                at=as_utc(row.at),
                actor=row.actor,
                action=row.action,
                case_id=row.case_id,
                detail=json.loads(row.detail),
            )
            for row in session.exec(query)
        ]

    def _sealed(self, session: Session) -> Iterator[audit.SealedEntry]:
        for row in session.exec(select(AuditRow).order_by(col(AuditRow.seq))):
            yield audit.SealedEntry(
                seq=row.seq,
                at=as_utc(row.at),
                actor=row.actor,
                action=row.action,
                case_id=row.case_id,
                detail_json=row.detail,
                prev_hash=row.prev_hash,
                entry_hash=row.entry_hash,
                signature=row.signature,
            )

    def _read_head_file(self) -> tuple[int, bytes] | None:
        if self._head_file is None or not self._head_file.exists():
            return None
        data = json.loads(self._head_file.read_text())
        return int(data["seq"]), bytes.fromhex(data["hash"])


def _extends(session: Session, recorded: tuple[int, bytes], head_seq: int) -> bool:
    """True if the chain, now ending at ``head_seq``, still holds the recorded entry before it."""
    seq, entry_hash = recorded
    if seq >= head_seq:
        return False
    row = session.get(AuditRow, seq)
    return row is not None and row.entry_hash == entry_hash


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    # An advisory lock on a file of its own: excludes other threads and processes alike.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
