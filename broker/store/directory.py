"""The broker's half of the directory: enrolment tokens, the log, and each agency's current state.

DESIGN.md section 5 ("Enrolment", "The directory is an append-only log"). The broker is the log's
keeper; building and checking entries, chain values and heads is ``tessera.directory``'s job, done
before anything reaches this module. This module only stores, and guarantees three things the
logic above cannot do alone:

- an enrolment token works once, even when two enrolments race with it;
- the log never forks or gets a gap: entry n+1 is appended only onto a log of exactly n entries,
  and of two appenders at the same size exactly one wins (the other gets :class:`Conflict` and
  retries on the new head);
- the agency table always matches the log, because it changes in the same transaction.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import secrets

from sqlalchemy import func, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from broker.domain import AgencyState, StoredLogEntry, check_bytes
from broker.store._base import StoreBase, check_count, check_id, check_time
from broker.store.tables import AgencyRow, EnrolmentTokenRow, LogEntryRow
from tessera import crypto
from tessera.directory import GENESIS_CHAIN
from tessera.errors import Conflict, InvalidInput, NotFound, Refused, Unauthenticated

TOKEN_BYTES = 32
# The broker stores digest(label, token) only: a copy of its database enrols nobody.
_LABEL_ENROLMENT_TOKEN = b"tessera/v1/broker/enrolment-token"
_KEY_BYTES = crypto.KEY_BYTES
_CHAIN_BYTES = len(GENESIS_CHAIN)


def _token_hash(raw: bytes) -> bytes:
    return crypto.digest(_LABEL_ENROLMENT_TOKEN, raw)


def _decode_token(token: str) -> bytes | None:
    """The token's 32 random bytes, or None if ``token`` is not one of ours.

    Tolerates what a person does to a token they paste: surrounding spaces, lower case, and the
    base32 padding they may or may not have copied.
    """
    if not isinstance(token, str):
        return None
    cleaned = "".join(token.split()).upper().rstrip("=")
    if not cleaned or len(cleaned) > 64:
        return None
    try:
        raw = base64.b32decode(cleaned + "=" * (-len(cleaned) % 8))
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == TOKEN_BYTES else None


def _agency(row: AgencyRow) -> AgencyState:
    return AgencyState(
        agency_id=row.agency_id,
        region=row.region,
        signing_key=bytes(row.signing_key),
        encryption_key=bytes(row.encryption_key),
        revoked=row.revoked,
        sequence=row.sequence,
    )


def _entry(row: LogEntryRow) -> StoredLogEntry:
    return StoredLogEntry(
        sequence=row.sequence,
        agency_id=row.agency_id,
        body=bytes(row.body),
        signature=bytes(row.signature),
        chain=bytes(row.chain),
    )


class DirectoryStore(StoreBase):
    """Enrolment tokens, the directory log and the agency table, over one database."""

    # --- enrolment tokens -------------------------------------------------------------------

    def issue_token(self, agency_id: str, region: str, expires_at: dt.datetime) -> str:
        """A new one-time enrolment token for ``agency_id`` in ``region``, valid until
        ``expires_at``.

        The token is 32 random bytes in base32 (52 characters), returned once; only its digest
        is stored, so neither the database nor a backup of it can enrol anyone.
        """
        check_id(agency_id, "an agency id")
        check_id(region, "a region")
        expires_at = check_time(expires_at, "a token's expiry")
        raw = secrets.token_bytes(TOKEN_BYTES)
        with self._writing("issue the enrolment token") as session:
            session.add(
                EnrolmentTokenRow(
                    token_hash=_token_hash(raw),
                    agency_id=agency_id,
                    region=region,
                    expires_at=expires_at,
                )
            )
        return base64.b32encode(raw).decode("ascii").rstrip("=")

    def consume_token(self, token: str, now: dt.datetime) -> tuple[str, str]:
        """Use up an enrolment token; returns the (agency_id, region) it was issued for.

        Exactly one caller wins a token, however many present it at once: the winner is the one
        whose conditional UPDATE changes the row. Unknown or already used: Unauthenticated.
        Expired: Refused.
        """
        now = check_time(now, "now")
        raw = _decode_token(token)
        if raw is None:
            raise Unauthenticated(
                "this is not an enrolment token of this broker",
                hint="copy the token exactly as `tessera broker token issue` printed it",
            )
        digest = _token_hash(raw)
        with self._writing("use the enrolment token") as session:
            won = session.exec(
                update(EnrolmentTokenRow)
                .where(
                    col(EnrolmentTokenRow.token_hash) == digest,
                    col(EnrolmentTokenRow.consumed_at).is_(None),
                    col(EnrolmentTokenRow.expires_at) > now,
                )
                .values(consumed_at=now)
                .returning(col(EnrolmentTokenRow.agency_id), col(EnrolmentTokenRow.region))
            ).first()
            if won is not None:
                return str(won[0]), str(won[1])
            row = session.get(EnrolmentTokenRow, digest)
        if row is None:
            raise Unauthenticated(
                "this enrolment token is unknown to this broker",
                hint="check the broker address, or ask its operator for a new token",
            )
        if row.consumed_at is not None:
            raise Unauthenticated(
                "this enrolment token has already been used",
                hint="each token enrols one node once; ask the broker operator for a new one",
            )
        raise Refused(
            f"this enrolment token expired at {row.expires_at:%Y-%m-%d %H:%M} UTC",
            hint="ask the broker operator for a new token",
        )

    # --- the directory log --------------------------------------------------------------------

    def append_log_entry(
        self,
        expected_size: int,
        entry_body: bytes,
        signature: bytes,
        chain: bytes,
        agency_id: str,
        signing_key: bytes,
        encryption_key: bytes,
        revoked: bool,
        *,
        region: str,
    ) -> StoredLogEntry:
        """Append entry ``expected_size + 1`` and set the agency's current state, atomically.

        ``entry_body`` and ``signature`` are the broker-signed LogEntry blob, ``chain`` is
        chain(expected_size + 1); the keys, ``region`` and ``revoked`` are the agency's record
        after this entry (a revoked agency keeps the keys it was revoked with). Conflict, with
        nothing written, if the log no longer has ``expected_size`` entries (another broker
        process appended first: re-read the head and retry) or if another agency already holds
        ``signing_key``.
        """
        check_count(expected_size, "the expected log size")
        if not isinstance(entry_body, bytes) or not entry_body:
            raise InvalidInput("a log entry body must be non-empty bytes")
        if not isinstance(signature, bytes) or not signature:
            raise InvalidInput("a log entry needs the broker's signature")
        check_bytes(chain, "a chain value", (_CHAIN_BYTES,))
        check_id(agency_id, "an agency id")
        check_id(region, "a region")
        check_bytes(signing_key, "a signing key", (_KEY_BYTES,))
        check_bytes(encryption_key, "an encryption key", (_KEY_BYTES,))
        sequence = expected_size + 1
        with self._writing("append to the directory log") as session:
            size = self._log_size(session)
            if size != expected_size:
                raise Conflict(
                    f"the directory log is at size {size}, not {expected_size}",
                    hint="re-read the log head and build the entry on it",
                )
            holder = session.exec(
                select(AgencyRow.agency_id).where(col(AgencyRow.signing_key) == signing_key)
            ).first()
            if holder is not None and holder != agency_id:
                raise Conflict(f"agency {holder} already uses this signing key")
            entry = LogEntryRow(
                sequence=sequence,
                agency_id=agency_id,
                body=entry_body,
                signature=signature,
                chain=chain,
            )
            session.add(entry)
            try:
                # Flush the entry first: a racing appender at the same size fails here, on the
                # sequence primary key, before it has touched the agency table.
                session.flush()
                current = session.get(AgencyRow, agency_id)
                if current is None:
                    current = AgencyRow(
                        agency_id=agency_id,
                        region=region,
                        signing_key=signing_key,
                        encryption_key=encryption_key,
                        revoked=revoked,
                        sequence=sequence,
                    )
                    session.add(current)
                else:
                    current.region = region
                    current.signing_key = signing_key
                    current.encryption_key = encryption_key
                    current.revoked = revoked
                    current.sequence = sequence
                session.flush()
            except IntegrityError:
                raise Conflict(
                    f"another broker process changed the directory at entry {sequence} first",
                    hint="re-read the log head and build the entry on it",
                ) from None
            return _entry(entry)

    def log_size_and_chain(self) -> tuple[int, bytes]:
        """The log's size and chain(size); (0, 32 zero bytes) for an empty log."""
        with self._reading("read the directory head") as session:
            last = session.exec(
                select(LogEntryRow.sequence, LogEntryRow.chain)
                .order_by(col(LogEntryRow.sequence).desc())
                .limit(1)
            ).first()
        if last is None:
            return 0, GENESIS_CHAIN
        return int(last[0]), bytes(last[1])

    def log_entries(self, since: int, limit: int) -> list[StoredLogEntry]:
        """Up to ``limit`` entries with sequence greater than ``since``, oldest first."""
        check_count(since, "since")
        check_count(limit, "limit")
        if limit == 0:
            return []
        with self._reading("read the directory log") as session:
            rows = session.exec(
                select(LogEntryRow)
                .where(col(LogEntryRow.sequence) > since)
                .order_by(col(LogEntryRow.sequence))
                .limit(limit)
            ).all()
            return [_entry(row) for row in rows]

    def log_entry(self, sequence: int) -> StoredLogEntry | None:
        """The entry at ``sequence``, or None if the log is shorter."""
        check_count(sequence, "a log sequence", minimum=1)
        with self._reading("read the directory log") as session:
            row = session.get(LogEntryRow, sequence)
            return None if row is None else _entry(row)

    def leaf_bodies(self, from_size: int, to_size: int) -> list[bytes]:
        """The bodies b_n for n = from_size+1 .. to_size, in order (for leaf hashes).

        NotFound if the log has fewer than ``to_size`` entries.
        """
        check_count(from_size, "from_size")
        check_count(to_size, "to_size")
        if from_size > to_size:
            raise InvalidInput(f"a log of size {to_size} cannot extend one of size {from_size}")
        with self._reading("read the directory log") as session:
            bodies = [
                bytes(body)
                for body in session.exec(
                    select(LogEntryRow.body)
                    .where(col(LogEntryRow.sequence) > from_size)
                    .where(col(LogEntryRow.sequence) <= to_size)
                    .order_by(col(LogEntryRow.sequence))
                )
            ]
        if len(bodies) != to_size - from_size:
            raise NotFound(f"the directory log has fewer than {to_size} entries")
        return bodies

    @staticmethod
    def _log_size(session: Session) -> int:
        """The log's size as this transaction sees it."""
        return int(session.exec(select(func.coalesce(func.max(LogEntryRow.sequence), 0))).one())

    # --- agencies' current state ------------------------------------------------------------

    def agency(self, agency_id: str) -> AgencyState | None:
        """The agency's current state, or None if it never enrolled."""
        check_id(agency_id, "an agency id")
        with self._reading("read the directory") as session:
            row = session.get(AgencyRow, agency_id)
            return None if row is None else _agency(row)

    def agency_by_signing_key(self, signing_key: bytes) -> AgencyState | None:
        """The agency whose current (or, if revoked, last) signing key this is, or None.

        A database read, for inspection and tools. Requests are not authenticated with it: the
        serving broker answers from its verified in-memory view of the log
        (``broker.service.DirectoryView``), which an edited agency row cannot mislead.
        """
        if not isinstance(signing_key, bytes) or len(signing_key) != _KEY_BYTES:
            return None  # not a key any agency could hold
        with self._reading("read the directory") as session:
            row = session.exec(
                select(AgencyRow).where(col(AgencyRow.signing_key) == signing_key)
            ).first()
            return None if row is None else _agency(row)

    def agencies(self, region: str | None = None) -> list[AgencyState]:
        """Every agency (of ``region``, if given), revoked ones included, by agency id."""
        query = select(AgencyRow).order_by(col(AgencyRow.agency_id))
        if region is not None:
            query = query.where(col(AgencyRow.region) == check_id(region, "a region"))
        with self._reading("read the directory") as session:
            return [_agency(row) for row in session.exec(query)]
