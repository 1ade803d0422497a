"""The broker's store for agencies' escrows: sealed tombstones and audit checkpoints (issue 14).

Both lists are per agency and append-only: this module inserts and reads, and never updates or
deletes a row. Positions are assigned inside the write transaction under a per-agency lock (a
transaction-scoped advisory lock on PostgreSQL; SQLite's BEGIN IMMEDIATE already serialises
writers), so several broker processes on one database never hand out a position twice, and a
tombstone id already present keeps its first position (a retried or repeated deposit).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import text
from sqlmodel import Session, col, select

from broker.store._base import StoreBase, check_id, check_time
from broker.store.tables import AuditCheckpointRow, EscrowTombstoneRow
from tessera import crypto, escrow
from tessera.errors import InvalidInput

_LABEL_ESCROW_LOCK = b"tessera/v1/broker/escrow-lock"
_LOCK = text("SELECT pg_advisory_xact_lock(:key)")
MAX_PAGE = 1000
MAX_DEPOSIT = 500


@dataclass(frozen=True)
class StoredTombstone:
    """One tombstone as stored."""

    sequence: int
    tombstone_id: str
    sealed: bytes
    deposited_at: dt.datetime


@dataclass(frozen=True)
class Head:
    """An agency's escrow as of one read: its size and the chain value at that size."""

    size: int
    chain: bytes


class EscrowStore(StoreBase):
    """Appends and reads agencies' escrowed tombstones and audit checkpoints."""

    def _lock_agency(self, session: Session, agency_id: str) -> None:
        if self._sqlite:
            return
        key = int.from_bytes(
            crypto.digest(_LABEL_ESCROW_LOCK, agency_id.encode())[:8], "big", signed=True
        )
        session.connection().execute(_LOCK, {"key": key})

    @staticmethod
    def _head(session: Session, agency_id: str) -> Head:
        last = session.exec(
            select(EscrowTombstoneRow)
            .where(EscrowTombstoneRow.agency_id == agency_id)
            .order_by(col(EscrowTombstoneRow.sequence).desc())
            .limit(1)
        ).first()
        return Head(0, escrow.GENESIS_CHAIN) if last is None else Head(last.sequence, last.chain)

    def deposit(
        self, agency_id: str, tombstones: Sequence[tuple[str, bytes]], now: dt.datetime
    ) -> tuple[list[int], Head]:
        """Append ``(tombstone_id, sealed)`` pairs in order; each one's position, and the head."""
        agency_id = check_id(agency_id, "agency_id")
        now = check_time(now, "now")
        if not tombstones or len(tombstones) > MAX_DEPOSIT:
            raise InvalidInput(f"deposit 1 to {MAX_DEPOSIT} tombstones at a time")
        for tombstone_id, sealed in tombstones:
            if not tombstone_id or len(tombstone_id) > escrow.TOMBSTONE_ID_CHARS:
                raise InvalidInput("a tombstone id is a UUID")
            if len(sealed) != escrow.SEALED_BYTES:
                raise InvalidInput(f"a sealed tombstone is exactly {escrow.SEALED_BYTES} bytes")
        sequences: list[int] = []
        with self._writing("store the tombstones") as session:
            self._lock_agency(session, agency_id)
            head = self._head(session, agency_id)
            size, chain = head.size, head.chain
            for tombstone_id, sealed in tombstones:
                existing = session.exec(
                    select(EscrowTombstoneRow.sequence).where(
                        EscrowTombstoneRow.agency_id == agency_id,
                        EscrowTombstoneRow.tombstone_id == tombstone_id,
                    )
                ).first()
                if existing is not None:
                    sequences.append(existing)
                    continue
                size += 1
                chain = escrow.chain_next(chain, size, tombstone_id, sealed)
                session.add(
                    EscrowTombstoneRow(
                        agency_id=agency_id,
                        sequence=size,
                        tombstone_id=tombstone_id,
                        sealed=sealed,
                        chain=chain,
                        deposited_at=now,
                    )
                )
                # The next tombstone of the same request may repeat this one's id.
                session.flush()
                sequences.append(size)
        return sequences, Head(size, chain)

    def tombstones(
        self, agency_id: str, since: int, limit: int
    ) -> tuple[list[StoredTombstone], Head]:
        """Tombstones after position ``since`` (at most ``limit``), and the head they lead to."""
        agency_id = check_id(agency_id, "agency_id")
        limit = min(max(limit, 1), MAX_PAGE)
        with self._reading("read the escrow") as session:
            # The head first: the list only grows, so every tombstone up to it is there to read.
            head = self._head(session, agency_id)
            rows = session.exec(
                select(EscrowTombstoneRow)
                .where(
                    EscrowTombstoneRow.agency_id == agency_id,
                    col(EscrowTombstoneRow.sequence) > since,
                    col(EscrowTombstoneRow.sequence) <= head.size,
                )
                .order_by(col(EscrowTombstoneRow.sequence))
                .limit(limit)
            ).all()
        return [
            StoredTombstone(r.sequence, r.tombstone_id, r.sealed, r.deposited_at) for r in rows
        ], head

    def checkpoint(
        self,
        agency_id: str,
        now: dt.datetime,
        sign: Callable[[int, bytes], tuple[bytes, bytes]],
    ) -> tuple[bytes, bytes]:
        """Append the agency's next checkpoint: ``sign(number, previous)`` makes its signed body
        and signature, which are returned as stored."""
        agency_id = check_id(agency_id, "agency_id")
        check_time(now, "now")
        with self._writing("store the checkpoint") as session:
            self._lock_agency(session, agency_id)
            last = self._latest(session, agency_id)
            number = 1 if last is None else last.number + 1
            previous = bytes(32) if last is None else escrow.checkpoint_digest(last.body)
            body, signature = sign(number, previous)
            session.add(
                AuditCheckpointRow(
                    agency_id=agency_id,
                    number=number,
                    body=body,
                    signature=signature,
                    checkpointed_at=now,
                )
            )
        return body, signature

    def latest_checkpoint(self, agency_id: str) -> tuple[bytes, bytes] | None:
        """The agency's latest checkpoint as (signed body, signature), or None."""
        agency_id = check_id(agency_id, "agency_id")
        with self._reading("read the checkpoint") as session:
            last = self._latest(session, agency_id)
            return None if last is None else (last.body, last.signature)

    @staticmethod
    def _latest(session: Session, agency_id: str) -> AuditCheckpointRow | None:
        return session.exec(
            select(AuditCheckpointRow)
            .where(AuditCheckpointRow.agency_id == agency_id)
            .order_by(col(AuditCheckpointRow.number).desc())
            .limit(1)
        ).first()
