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

import dataclasses
import datetime as dt
import uuid
from collections.abc import Iterable, Sequence

from sqlalchemy import delete, func, text, tuple_, update
from sqlalchemy import select as select_columns
from sqlmodel import Session, col, select

from broker.domain import (
    AcceptedEnvelope,
    EnvelopePut,
    PurgeResult,
    StoredEnvelope,
    check_bytes,
)
from broker.store._base import check_count, check_id, check_time
from broker.store.directory import DirectoryStore
from broker.store.notify import MAIL_CHANNEL
from broker.store.tables import (
    IDEMPOTENCY_KEY_CHARS,
    OWNER_CHARS,
    EnvelopeRow,
    NonceRow,
    PurgedConsentRow,
    ReceiptRow,
)
from tessera import crypto, labels
from tessera.errors import Conflict, InvalidInput, Refused, TesseraError

COMMITMENT_BYTES = 32
# Largest claim batch and acknowledgement chunk: bounds one transaction's locks and memory, and
# stays far below SQLite's limit on bound parameters.
MAX_CLAIM = 1000
_ACK_CHUNK = 500
_NOTIFY_MAIL = text(
    "SELECT pg_notify(:channel, r) FROM unnest(CAST(:recipients AS text[])) r"
).bindparams(channel=MAIL_CHANNEL)
# Request nonces are 16 random bytes (common.proto, convention 4); allow some room, no more.
MAX_NONCE_BYTES = 64


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


def _receipt_values(accepted: AcceptedEnvelope) -> dict[str, object]:
    return {
        "sender_id": accepted.sender_id,
        "idempotency_key": accepted.idempotency_key,
        "envelope_id": accepted.envelope_id,
        "recipient_id": accepted.recipient_id,
        "consent_commitment": accepted.consent_commitment,
        "envelope_digest": accepted.envelope_digest,
        "size": accepted.size,
        "received_at": accepted.received_at,
    }


def _checked_digest(put: EnvelopePut) -> bytes:
    """Check one put's fields; returns its envelope digest."""
    check_id(put.sender_id, "a sender id")
    check_id(put.recipient_id, "a recipient id")
    key = put.idempotency_key
    if not isinstance(key, str) or not key or len(key) > IDEMPOTENCY_KEY_CHARS:
        raise InvalidInput(f"an idempotency key must be 1 to {IDEMPOTENCY_KEY_CHARS} characters")
    _check_commitment(put.consent_commitment, required=False)
    if not isinstance(put.ciphertext, bytes) or not put.ciphertext:
        raise InvalidInput("an envelope must be non-empty bytes")
    return crypto.digest(labels.LABEL_ENVELOPE, put.ciphertext)


def _settled(outcome: AcceptedEnvelope | TesseraError | None) -> AcceptedEnvelope | TesseraError:
    if outcome is None:  # every put is settled above; this would be a bug in the store
        raise RuntimeError("a put of the batch was left without an outcome")
    return outcome


def _check_commitment(value: bytes, *, required: bool) -> bytes:
    sizes = (COMMITMENT_BYTES,) if required else (0, COMMITMENT_BYTES)
    return check_bytes(value, "a consent commitment", sizes)


def _check_owner(owner: str) -> str:
    if not isinstance(owner, str) or not owner or len(owner) > OWNER_CHARS:
        raise InvalidInput(f"a lease owner must be 1 to {OWNER_CHARS} characters")
    return owner


def _envelope_ids(envelope_ids: Iterable[str]) -> list[str]:
    """The distinct ids that could name an envelope (uuid text), sorted; anything else is
    dropped, since no envelope has it."""
    return sorted({i for i in envelope_ids if isinstance(i, str) and 0 < len(i) <= 36})


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
        put = EnvelopePut(sender_id, recipient_id, idempotency_key, consent_commitment, ciphertext)
        (outcome,) = self.put_envelopes([put], now)
        if isinstance(outcome, TesseraError):
            raise outcome
        return outcome

    def put_envelopes(
        self, puts: Sequence[EnvelopePut], now: dt.datetime
    ) -> list[AcceptedEnvelope | TesseraError]:
        """Store several envelopes in one transaction (group commit); one outcome per put.

        Each put gets exactly what :meth:`put_envelope` would give it alone: its receipt, or
        the typed error of its own (InvalidInput, Conflict, Refused), which stores nothing of
        that put and does not affect the others. Two puts of the batch with the same (sender,
        idempotency key) are an original and its repeat. Everything accepted is committed
        before this returns; if the commit fails, it raises and nothing of the batch is stored.
        """
        now = check_time(now, "now")
        outcomes: list[AcceptedEnvelope | TesseraError | None] = [None] * len(puts)
        pending: list[tuple[int, EnvelopePut, bytes]] = []
        for index, put in enumerate(puts):
            try:
                pending.append((index, put, _checked_digest(put)))
            except TesseraError as exc:
                outcomes[index] = exc
        if pending:
            with self._writing("store the envelope") as session:
                pending = self._refuse_purged(session, pending, outcomes)
                self._insert_new(session, pending, outcomes, now)
        return [_settled(outcome) for outcome in outcomes]

    def _refuse_purged(
        self,
        session: Session,
        pending: list[tuple[int, EnvelopePut, bytes]],
        outcomes: list[AcceptedEnvelope | TesseraError | None],
    ) -> list[tuple[int, EnvelopePut, bytes]]:
        """Settle every put under a purged consent as Refused; returns the others.

        Checked before the repeat test: once consent is revoked, even a retry of an envelope
        accepted earlier gets no receipt suggesting it is still on its way.
        """
        consents = sorted(
            {(p.sender_id, p.consent_commitment) for _, p, _ in pending if p.consent_commitment}
        )
        if not consents:
            return pending
        self._lock_consents(session, consents, shared=True)
        purged = {
            (str(row[0]), bytes(row[1]))
            for row in session.connection().execute(
                select(PurgedConsentRow.sender_id, PurgedConsentRow.consent_commitment).where(
                    tuple_(
                        col(PurgedConsentRow.sender_id), col(PurgedConsentRow.consent_commitment)
                    ).in_(consents)
                )
            )
        }
        remaining = []
        for index, put, digest in pending:
            if (put.sender_id, put.consent_commitment) in purged:
                outcomes[index] = Refused(
                    "the consent this envelope travels under was revoked; it was not stored",
                    hint="record a new consent with the survivor before referring again",
                )
            else:
                remaining.append((index, put, digest))
        return remaining

    def _insert_new(
        self,
        session: Session,
        pending: list[tuple[int, EnvelopePut, bytes]],
        outcomes: list[AcceptedEnvelope | TesseraError | None],
        now: dt.datetime,
    ) -> None:
        """Insert a receipt and an envelope for each put not seen before; settle repeats."""
        if not pending:
            return
        # The receipt row carries the idempotency key's uniqueness. Inserting the receipts first,
        # as one atomic "insert unless present", decides between a new put and a repeat even
        # when two copies of the same request race (in this batch or in another process).
        fresh: dict[tuple[str, str], AcceptedEnvelope] = {}
        for _index, put, digest in pending:
            key = (put.sender_id, put.idempotency_key)
            if key not in fresh:
                fresh[key] = AcceptedEnvelope(
                    envelope_id=str(uuid.uuid4()),
                    sender_id=put.sender_id,
                    recipient_id=put.recipient_id,
                    idempotency_key=put.idempotency_key,
                    consent_commitment=put.consent_commitment,
                    envelope_digest=digest,
                    size=len(put.ciphertext),
                    received_at=now,
                    duplicate=False,
                )
        # Executed as one executemany (a multi-row INSERT the driver is handed in one go), with
        # a statement SQLAlchemy compiles once: group commit gains nothing if each batch pays for
        # compiling a statement of its own size.
        connection = session.connection()
        inserted = {
            (str(row[0]), str(row[1]))
            for row in connection.execute(
                self._insert_ignoring_duplicates(ReceiptRow).returning(
                    col(ReceiptRow.sender_id), col(ReceiptRow.idempotency_key)
                ),
                [_receipt_values(a) for a in fresh.values()],
            )
        }
        originals = {key: a for key, a in fresh.items() if key in inserted}
        earlier = [key for key in fresh if key not in inserted]
        if earlier:
            for row in session.exec(
                select(ReceiptRow).where(
                    tuple_(col(ReceiptRow.sender_id), col(ReceiptRow.idempotency_key)).in_(earlier)
                )
            ):
                originals[(row.sender_id, row.idempotency_key)] = _accepted(row, duplicate=True)
        envelopes: list[tuple[AcceptedEnvelope, bytes]] = []
        stored: set[tuple[str, str]] = set()
        for index, put, digest in pending:
            key = (put.sender_id, put.idempotency_key)
            original = originals.get(key)
            if original is None:  # the insert only yields to a committed row; be safe anyway
                outcomes[index] = Conflict("the envelope's idempotency key is in use", hint="retry")
            elif (
                original.envelope_digest != digest
                or original.recipient_id != put.recipient_id
                or original.consent_commitment != put.consent_commitment
            ):
                outcomes[index] = Conflict(
                    "this idempotency key was already used for a different envelope",
                    hint="use a new idempotency key for each envelope; reuse it only to retry",
                )
            elif original.duplicate or key in stored:
                outcomes[index] = dataclasses.replace(original, duplicate=True)
            else:
                outcomes[index] = original
                stored.add(key)
                envelopes.append((original, put.ciphertext))
        if envelopes and not self._sqlite:
            # Wake the recipients' streams in every broker process (broker.store.notify); sent
            # by PostgreSQL when this transaction commits.
            connection.execute(
                _NOTIFY_MAIL, {"recipients": sorted({a.recipient_id for a, _c in envelopes})}
            )
        if envelopes:
            connection.execute(
                EnvelopeRow.__table__.insert(),  # type: ignore[attr-defined]
                [
                    {
                        "envelope_id": a.envelope_id,
                        "sender_id": a.sender_id,
                        "recipient_id": a.recipient_id,
                        "consent_commitment": a.consent_commitment,
                        "ciphertext": ciphertext,
                        "received_at": a.received_at,
                    }
                    for a, ciphertext in envelopes
                ],
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
        table = EnvelopeRow.__table__.c  # type: ignore[attr-defined]
        with self._writing("lease envelopes") as session:
            connection = session.connection()
            rows = connection.execute(
                select_columns(
                    table.seq,
                    table.envelope_id,
                    table.sender_id,
                    table.consent_commitment,
                    table.ciphertext,
                    table.received_at,
                    table.attempts,
                )
                .where(table.recipient_id == recipient_id)
                .where(table.lease_until.is_(None) | (table.lease_until <= now))
                .order_by(table.received_at, table.seq)
                .limit(limit)
                # Ignored by SQLite, whose BEGIN IMMEDIATE already excludes other writers.
                .with_for_update(skip_locked=True)
            ).all()
            if not rows:
                return []
            connection.execute(
                update(EnvelopeRow)
                .where(col(EnvelopeRow.seq).in_([row.seq for row in rows]))
                .values(
                    attempts=col(EnvelopeRow.attempts) + 1, lease_owner=owner, lease_until=until
                )
            )
        return [
            StoredEnvelope(
                envelope_id=row.envelope_id,
                sender_id=row.sender_id,
                recipient_id=recipient_id,
                consent_commitment=bytes(row.consent_commitment),
                ciphertext=bytes(row.ciphertext),
                received_at=row.received_at,
                attempts=row.attempts + 1,
                lease_owner=owner,
                lease_until=until,
            )
            for row in rows
        ]

    def acknowledge(
        self, recipient_id: str, envelope_ids: Iterable[str], now: dt.datetime | None = None
    ) -> list[str]:
        """Delete acknowledged envelopes from ``recipient_id``'s mailbox; returns the ids deleted.

        Only envelopes addressed to ``recipient_id`` are touched, so an agency cannot delete
        another's mail. Idempotent: unknown and already acknowledged ids are ignored (and not
        returned). ``now`` (default: the current time) is recorded on the envelopes' receipts.
        """
        check_id(recipient_id, "a recipient id")
        wanted = _envelope_ids(envelope_ids)
        when = check_time(now, "now") if now is not None else dt.datetime.now(dt.UTC)
        if not wanted:
            return []
        deleted: list[str] = []
        with self._writing("acknowledge the envelopes") as session:
            connection = session.connection()
            for start in range(0, len(wanted), _ACK_CHUNK):
                chunk = wanted[start : start + _ACK_CHUNK]
                gone = connection.execute(
                    delete(EnvelopeRow)
                    .where(col(EnvelopeRow.recipient_id) == recipient_id)
                    .where(col(EnvelopeRow.envelope_id).in_(chunk))
                    .returning(col(EnvelopeRow.envelope_id))
                ).all()
                ids = sorted(str(row[0]) for row in gone)
                if ids:
                    connection.execute(
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

    def unclaim(self, owner: str, envelope_ids: Iterable[str]) -> int:
        """Undo a claim whose envelopes ``owner`` never handed out (its stream ended first):
        their leases end and their attempt counts go back down, as if never claimed. Envelopes
        no longer leased to ``owner`` are left alone. Returns how many were released."""
        _check_owner(owner)
        wanted = _envelope_ids(envelope_ids)
        if not wanted:
            return 0
        with self._writing("release unsent leases") as session:
            result = session.exec(
                update(EnvelopeRow)
                .where(col(EnvelopeRow.lease_owner) == owner)
                .where(col(EnvelopeRow.envelope_id).in_(wanted))
                .where(col(EnvelopeRow.attempts) > 0)
                .values(
                    lease_owner=None,
                    lease_until=None,
                    attempts=col(EnvelopeRow.attempts) - 1,
                )
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
            self._lock_consents(session, [(sender_id, commitment)], shared=False)
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
        (fresh,) = self.remember_nonces([(signer, nonce, seen_at)], window_seconds)
        if isinstance(fresh, TesseraError):
            raise fresh
        return fresh

    def remember_nonces(
        self, seen: Sequence[tuple[bytes, bytes, dt.datetime]], window_seconds: float
    ) -> list[bool | TesseraError]:
        """Record several (signer, nonce, seen_at) in one transaction (group commit).

        One outcome each, as :meth:`remember_nonce` would give: True for a nonce not seen
        before, False for a replay (of an earlier request, or of one earlier in ``seen``), or
        InvalidInput for a malformed one.
        """
        outcomes, _log_size = self._remember_nonces(seen, window_seconds, read_log_size=False)
        return outcomes

    def remember_nonces_and_log_size(
        self, seen: Sequence[tuple[bytes, bytes, dt.datetime]], window_seconds: float
    ) -> tuple[list[bool | TesseraError], int | None]:
        """:meth:`remember_nonces`, plus the directory log's size read in the same transaction
        once the nonces are written (None if no nonce was well-formed, so nothing was written).

        Each statement sees what was committed before it began, so that size covers every log
        entry (a revocation, say) committed by any broker process before these nonces were
        accepted. Reading it here costs no connection or transaction of its own, which matters
        because the broker on PostgreSQL does it for every batch of requests it authenticates.
        """
        return self._remember_nonces(seen, window_seconds, read_log_size=True)

    def _remember_nonces(
        self,
        seen: Sequence[tuple[bytes, bytes, dt.datetime]],
        window_seconds: float,
        *,
        read_log_size: bool,
    ) -> tuple[list[bool | TesseraError], int | None]:
        window = _check_seconds(window_seconds, "the replay window")
        outcomes: list[bool | TesseraError] = []
        rows: dict[tuple[bytes, bytes], dict[str, object]] = {}
        for signer, nonce, seen_at in seen:
            try:
                check_bytes(signer, "a signer key", (crypto.KEY_BYTES,))
                if not isinstance(nonce, bytes) or not 0 < len(nonce) <= MAX_NONCE_BYTES:
                    raise InvalidInput(f"a request nonce must be 1 to {MAX_NONCE_BYTES} bytes")
                when = check_time(seen_at, "seen_at")
            except TesseraError as exc:
                outcomes.append(exc)
                continue
            outcomes.append(False)
            rows.setdefault(
                (signer, nonce),
                {"signer": signer, "nonce": nonce, "seen_at": when, "expires_at": when + window},
            )
        if not rows:
            return outcomes, None
        with self._writing("remember the request nonces") as session:
            stored = {
                (bytes(row[0]), bytes(row[1]))
                for row in session.connection().execute(
                    self._insert_ignoring_duplicates(NonceRow).returning(
                        col(NonceRow.signer), col(NonceRow.nonce)
                    ),
                    list(rows.values()),
                )
            }
            log_size = self._log_size(session) if read_log_size else None
        # Only the first occurrence of a stored nonce is fresh; every other one is a replay.
        for index, (signer, nonce, _seen_at) in enumerate(seen):
            if outcomes[index] is False and (signer, nonce) in stored:
                outcomes[index] = True
                stored.discard((signer, nonce))
        return outcomes, log_size

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
