"""The broker's store: relay mailboxes, consent purges and request nonces, plus the directory.

DESIGN.md section 6, "Delivery is at-least-once on the wire and exactly-once in effect", and
section 3, "Scale-out". Several broker processes may share one PostgreSQL database, so every
guarantee below lives in the database, never in a process's memory:

- a put is committed before it returns, and repeating it (same sender, same idempotency key)
  stores nothing new and returns the original receipt, even after the envelope was delivered;
- an envelope leaves the database only when its recipient acknowledges it (or it is purged,
  expired past retention, or its recipient revoked); until then it is offered again, under the
  same envelope id, each time a lease ends unacknowledged, so nothing is lost when a process dies;
- at any moment at most one broker process holds a lease on an envelope (``FOR UPDATE SKIP
  LOCKED`` on PostgreSQL; SQLite has a single writer), so across processes each envelope is
  handed out once per lease;
- a purged consent commitment refuses every later put under it, atomically with the purge.

The relay holds only what the broker may learn (DESIGN.md section 4): sender and recipient ids,
times, sizes, digests, consent commitments, and the sealed ciphertext it cannot open.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable

from sqlalchemy import delete, func, update
from sqlmodel import Session, col, select

from broker.domain import AcceptedEnvelope, PurgeResult, StoredEnvelope
from broker.store._base import check_bytes, check_count, check_id, check_time
from broker.store.directory import DirectoryStore
from broker.store.tables import (
    IDEMPOTENCY_KEY_CHARS,
    OWNER_CHARS,
    EnvelopeRow,
    NonceRow,
    PurgedConsentRow,
    ReceiptRow,
)
from tessera import crypto
from tessera.errors import Conflict, InvalidInput, Refused

COMMITMENT_BYTES = 32
# Largest claim batch and acknowledgement chunk: bounds one transaction's locks and memory, and
# stays far below SQLite's limit on bound parameters.
MAX_CLAIM = 1000
_ACK_CHUNK = 500
# Request nonces are 16 random bytes (common.proto, convention 4); allow some room, no more.
MAX_NONCE_BYTES = 64


def _envelope(row: EnvelopeRow) -> StoredEnvelope:
    return StoredEnvelope(
        envelope_id=row.envelope_id,
        sender_id=row.sender_id,
        recipient_id=row.recipient_id,
        consent_commitment=bytes(row.consent_commitment),
        ciphertext=bytes(row.ciphertext),
        received_at=row.received_at,
        attempts=row.attempts,
        lease_owner=row.lease_owner,
        lease_until=row.lease_until,
    )


def _accepted(row: ReceiptRow, *, duplicate: bool) -> AcceptedEnvelope:
    return AcceptedEnvelope(
        envelope_id=row.envelope_id,
        sender_id=row.sender_id,
        recipient_id=row.recipient_id,
        idempotency_key=row.idempotency_key,
        consent_commitment=bytes(row.consent_commitment),
        envelope_digest=bytes(row.envelope_digest),
        size=row.size,
        received_at=row.received_at,
        duplicate=duplicate,
    )


def _check_commitment(value: bytes, *, required: bool) -> bytes:
    sizes = (COMMITMENT_BYTES,) if required else (0, COMMITMENT_BYTES)
    return check_bytes(value, "a consent commitment", sizes)


def _check_owner(owner: str) -> str:
    if not isinstance(owner, str) or not owner or len(owner) > OWNER_CHARS:
        raise InvalidInput(f"a lease owner must be 1 to {OWNER_CHARS} characters")
    return owner


def _check_seconds(value: float, name: str) -> dt.timedelta:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise InvalidInput(f"{name} must be a positive number of seconds")
    return dt.timedelta(seconds=value)


class BrokerStore(DirectoryStore):
    """Everything the regional broker keeps, over one database (SQLite or PostgreSQL).

    Safe to share between threads, and between processes on one database. Every method either
    commits before it returns or raises a typed error having written nothing.
    """

    # --- sending ----------------------------------------------------------------------------

    def put_envelope(
        self,
        sender_id: str,
        recipient_id: str,
        idempotency_key: str,
        consent_commitment: bytes,
        ciphertext: bytes,
        now: dt.datetime,
    ) -> AcceptedEnvelope:
        """Store a sealed envelope for ``recipient_id``; committed before this returns.

        Idempotent per (sender, idempotency key): a repeat with the same envelope stores nothing
        and returns the original (same envelope id and received_at, ``duplicate=True``), even if
        the first one was already delivered; the same key with a different envelope, recipient
        or commitment is refused (Conflict). ``consent_commitment`` is 32 bytes, or empty for
        envelopes that carry no survivor data; Refused, a repeat included, once the sender has
        purged it.
        """
        check_id(sender_id, "a sender id")
        check_id(recipient_id, "a recipient id")
        if (
            not isinstance(idempotency_key, str)
            or not idempotency_key
            or len(idempotency_key) > IDEMPOTENCY_KEY_CHARS
        ):
            raise InvalidInput(
                f"an idempotency key must be 1 to {IDEMPOTENCY_KEY_CHARS} characters"
            )
        _check_commitment(consent_commitment, required=False)
        if not isinstance(ciphertext, bytes) or not ciphertext:
            raise InvalidInput("an envelope must be non-empty bytes")
        now = check_time(now, "now")
        digest = crypto.digest(crypto.LABEL_ENVELOPE, ciphertext)
        envelope_id = str(uuid.uuid4())
        with self._writing("store the envelope") as session:
            if consent_commitment:
                self._lock_consent(session, sender_id, consent_commitment, shared=True)
                # Checked before the repeat test: once consent is revoked, even a retry of an
                # envelope accepted earlier gets no receipt suggesting it is still on its way.
                if self._is_purged(session, sender_id, consent_commitment):
                    raise Refused(
                        "the consent this envelope travels under was revoked; it was not stored",
                        hint="record a new consent with the survivor before referring again",
                    )
            # The receipt row carries the idempotency key's uniqueness. Inserting it first, as
            # one atomic "insert unless present", decides between a new put and a repeat even
            # when two copies of the same request race.
            inserted = session.exec(
                self._insert_ignoring_duplicates(ReceiptRow)
                .values(
                    sender_id=sender_id,
                    idempotency_key=idempotency_key,
                    envelope_id=envelope_id,
                    recipient_id=recipient_id,
                    consent_commitment=consent_commitment,
                    envelope_digest=digest,
                    size=len(ciphertext),
                    received_at=now,
                )
                .returning(col(ReceiptRow.envelope_id))
            ).first()
            if inserted is None:
                original = session.get(ReceiptRow, (sender_id, idempotency_key))
                if original is None:  # the insert only yields to a committed row; be safe anyway
                    raise Conflict("the envelope's idempotency key is in use", hint="retry")
                if (
                    bytes(original.envelope_digest) != digest
                    or original.recipient_id != recipient_id
                    or bytes(original.consent_commitment) != consent_commitment
                ):
                    raise Conflict(
                        "this idempotency key was already used for a different envelope",
                        hint="use a new idempotency key for each envelope; reuse it only to retry",
                    )
                return _accepted(original, duplicate=True)
            session.add(
                EnvelopeRow(
                    envelope_id=envelope_id,
                    sender_id=sender_id,
                    recipient_id=recipient_id,
                    consent_commitment=consent_commitment,
                    ciphertext=ciphertext,
                    received_at=now,
                )
            )
        return AcceptedEnvelope(
            envelope_id=envelope_id,
            sender_id=sender_id,
            recipient_id=recipient_id,
            idempotency_key=idempotency_key,
            consent_commitment=consent_commitment,
            envelope_digest=digest,
            size=len(ciphertext),
            received_at=now,
            duplicate=False,
        )

    # --- receiving ----------------------------------------------------------------------------

    def claim(
        self, recipient_id: str, owner: str, limit: int, lease_seconds: float, now: dt.datetime
    ) -> list[StoredEnvelope]:
        """Lease up to ``limit`` deliverable envelopes of the recipient to ``owner``, oldest first.

        Deliverable: not leased, or its lease ended. Each claimed envelope's attempt count goes
        up by one and its lease runs until ``now + lease_seconds``; unless acknowledged by then
        it is offered again, with the same envelope id. On PostgreSQL, rows another broker
        process is claiming right now are skipped (``FOR UPDATE SKIP LOCKED``), never waited
        for and never handed out twice.
        """
        check_id(recipient_id, "a recipient id")
        _check_owner(owner)
        check_count(limit, "limit")
        lease = _check_seconds(lease_seconds, "a lease")
        now = check_time(now, "now")
        limit = min(limit, MAX_CLAIM)
        if limit == 0:
            return []
        until = now + lease
        with self._writing("lease envelopes") as session:
            rows = session.exec(
                select(EnvelopeRow)
                .where(col(EnvelopeRow.recipient_id) == recipient_id)
                .where(
                    col(EnvelopeRow.lease_until).is_(None) | (col(EnvelopeRow.lease_until) <= now)
                )
                .order_by(col(EnvelopeRow.received_at), col(EnvelopeRow.seq))
                .limit(limit)
                # Ignored by SQLite, whose BEGIN IMMEDIATE already excludes other writers.
                .with_for_update(skip_locked=True)
            ).all()
            if not rows:
                return []
            for row in rows:
                row.attempts += 1
                row.lease_owner = owner
                row.lease_until = until
            claimed = [_envelope(row) for row in rows]
        return claimed

    def acknowledge(
        self, recipient_id: str, envelope_ids: Iterable[str], now: dt.datetime | None = None
    ) -> list[str]:
        """Delete acknowledged envelopes from ``recipient_id``'s mailbox; returns the ids deleted.

        Only envelopes addressed to ``recipient_id`` are touched, so an agency cannot delete
        another's mail. Idempotent: unknown and already acknowledged ids are ignored (and not
        returned). ``now`` (default: the current time) is recorded on the envelopes' receipts.
        """
        check_id(recipient_id, "a recipient id")
        wanted = sorted({i for i in envelope_ids if isinstance(i, str) and 0 < len(i) <= 36})
        when = check_time(now, "now") if now is not None else dt.datetime.now(dt.UTC)
        if not wanted:
            return []
        deleted: list[str] = []
        with self._writing("acknowledge the envelopes") as session:
            for start in range(0, len(wanted), _ACK_CHUNK):
                chunk = wanted[start : start + _ACK_CHUNK]
                gone = session.exec(
                    delete(EnvelopeRow)
                    .where(col(EnvelopeRow.recipient_id) == recipient_id)
                    .where(col(EnvelopeRow.envelope_id).in_(chunk))
                    .returning(col(EnvelopeRow.envelope_id))
                ).all()
                ids = sorted(str(row[0]) for row in gone)
                if ids:
                    session.exec(
                        update(ReceiptRow)
                        .where(col(ReceiptRow.envelope_id).in_(ids))
                        .values(acknowledged_at=when)
                    )
                deleted.extend(ids)
        return deleted

    def release(self, owner: str) -> int:
        """End every lease held by ``owner`` (a stopping broker process); returns how many.

        The envelopes become deliverable at once instead of when their leases would have ended.
        Their attempt counts stay: each was offered once.
        """
        _check_owner(owner)
        with self._writing("release leases") as session:
            result = session.exec(
                update(EnvelopeRow)
                .where(col(EnvelopeRow.lease_owner) == owner)
                .values(lease_owner=None, lease_until=None)
            )
            return int(result.rowcount)

    def waiting_count(self, recipient_id: str | None = None) -> int:
        """Envelopes not yet acknowledged (leased or not), for one recipient or for all."""
        query = select(func.count()).select_from(EnvelopeRow)
        if recipient_id is not None:
            query = query.where(
                col(EnvelopeRow.recipient_id) == check_id(recipient_id, "a recipient id")
            )
        with self._reading("count waiting envelopes") as session:
            return int(session.exec(query).one())

    # --- consent revocation, expiry, revoked agencies ----------------------------------------

    def purge_consent(self, sender_id: str, commitment: bytes, now: dt.datetime) -> PurgeResult:
        """Revoke a consent commitment of ``sender_id`` at the broker (DESIGN.md section 6).

        Deletes every undelivered envelope the sender sent under it and records the commitment
        as purged, so every later put under it is refused. Only the sender's own envelopes and
        puts are affected. Calling it again is harmless (it then purges nothing).
        """
        check_id(sender_id, "a sender id")
        _check_commitment(commitment, required=True)
        now = check_time(now, "now")
        with self._writing("purge the consent's envelopes") as session:
            self._lock_consent(session, sender_id, commitment, shared=False)
            session.exec(
                self._insert_ignoring_duplicates(PurgedConsentRow).values(
                    sender_id=sender_id, consent_commitment=commitment, purged_at=now
                )
            )
            purged = session.exec(
                delete(EnvelopeRow)
                .where(col(EnvelopeRow.sender_id) == sender_id)
                .where(col(EnvelopeRow.consent_commitment) == commitment)
            ).rowcount
            delivered = session.exec(
                select(func.count())
                .select_from(ReceiptRow)
                .where(col(ReceiptRow.sender_id) == sender_id)
                .where(col(ReceiptRow.consent_commitment) == commitment)
                .where(col(ReceiptRow.acknowledged_at).is_not(None))
            ).one()
        return PurgeResult(purged=int(purged), already_delivered=int(delivered))

    def is_purged(self, sender_id: str, commitment: bytes) -> bool:
        """Whether ``sender_id`` purged ``commitment``."""
        check_id(sender_id, "a sender id")
        _check_commitment(commitment, required=True)
        with self._reading("read purged consents") as session:
            return self._is_purged(session, sender_id, commitment)

    def purge_agency(self, agency_id: str) -> int:
        """Delete every undelivered envelope addressed to ``agency_id``; returns how many.

        For a revoked agency: it can no longer authenticate, so nothing could ever fetch them.
        Envelopes it sent before revocation stay for their recipients.
        """
        check_id(agency_id, "an agency id")
        with self._writing("drop the revoked agency's mailbox") as session:
            result = session.exec(
                delete(EnvelopeRow).where(col(EnvelopeRow.recipient_id) == agency_id)
            )
            return int(result.rowcount)

    def expire(self, now: dt.datetime, retention: dt.timedelta) -> int:
        """Delete envelopes older than ``retention`` that were never acknowledged; returns how many.

        An envelope leased right now is left alone (its recipient may be acknowledging it).
        Receipts older than ``retention`` whose envelope is gone are forgotten too: past the
        retention limit a sender's retry is treated as a new envelope.
        """
        now = check_time(now, "now")
        if not isinstance(retention, dt.timedelta) or retention <= dt.timedelta(0):
            raise InvalidInput("the retention limit must be a positive duration")
        cutoff = now - retention
        with self._writing("expire old envelopes") as session:
            expired = session.exec(
                delete(EnvelopeRow)
                .where(col(EnvelopeRow.received_at) < cutoff)
                .where(
                    col(EnvelopeRow.lease_until).is_(None) | (col(EnvelopeRow.lease_until) <= now)
                )
            ).rowcount
            pending = select(EnvelopeRow.envelope_id)
            session.exec(
                delete(ReceiptRow)
                .where(col(ReceiptRow.received_at) < cutoff)
                .where(col(ReceiptRow.envelope_id).not_in(pending))
            )
        return int(expired)

    # --- request nonces (DESIGN.md section 5, "In transit") ----------------------------------

    def remember_nonce(
        self, signer: bytes, nonce: bytes, seen_at: dt.datetime, window_seconds: float
    ) -> bool:
        """Record a request nonce; False if this signer already used it (a replay).

        One atomic insert decides, so two broker processes receiving the same request at once
        cannot both accept it. The nonce is kept until ``seen_at + window_seconds``; pass the
        request's own timestamp as ``seen_at`` so it is remembered exactly as long as the
        request could pass the freshness check.
        """
        check_bytes(signer, "a signer key", (crypto.KEY_BYTES,))
        if not isinstance(nonce, bytes) or not 0 < len(nonce) <= MAX_NONCE_BYTES:
            raise InvalidInput(f"a request nonce must be 1 to {MAX_NONCE_BYTES} bytes")
        seen_at = check_time(seen_at, "seen_at")
        window = _check_seconds(window_seconds, "the replay window")
        with self._writing("remember the request nonce") as session:
            stored = session.exec(
                self._insert_ignoring_duplicates(NonceRow)
                .values(signer=signer, nonce=nonce, seen_at=seen_at, expires_at=seen_at + window)
                .returning(col(NonceRow.nonce))
            ).first()
        return stored is not None

    def prune_nonces(self, now: dt.datetime) -> int:
        """Forget nonces whose replay window has ended; returns how many."""
        now = check_time(now, "now")
        with self._writing("prune request nonces") as session:
            result = session.exec(delete(NonceRow).where(col(NonceRow.expires_at) < now))
            return int(result.rowcount)

    # --- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _is_purged(session: Session, sender_id: str, commitment: bytes) -> bool:
        return session.get(PurgedConsentRow, (sender_id, commitment)) is not None
