"""SQLModel tables of the regional broker. Only ``broker.store`` imports this module.

The broker sees only what DESIGN.md section 4 lets it learn, and its tables hold nothing else
(docs list them column by column): agency ids and regions, public keys, the signed directory log,
hashes of enrolment tokens, who sent an envelope to whom, when, its size, its digest, its consent
commitment, and the sealed ciphertext itself, only until its recipient acknowledges it.

Every table name starts with ``broker_`` so a broker may share a PostgreSQL database with other
components; the migrations (``broker/migrations``) touch only the tables named in
:data:`BROKER_TABLES`.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, Column, Index, Integer, LargeBinary, UniqueConstraint
from sqlmodel import Field, SQLModel

# On PostgreSQL a 64-bit identity column; SQLite only auto-increments an INTEGER PRIMARY KEY
# (its 64-bit rowid), so the same column is declared INTEGER there.
_ROWID = BigInteger().with_variant(Integer(), "sqlite")

# Directory ids are at most 128 characters (tessera.directory.DirectoryLimits.max_id_chars).
ID_CHARS = 128
# Relay idempotency keys: chosen by the sender (a UUID in practice), bounded by the broker.
IDEMPOTENCY_KEY_CHARS = 128
# Lease owners are broker process names ("broker-<uuid>").
OWNER_CHARS = 128
# A decline's or a cancellation's reason, as the coordinator reads it (stats.proto, RoundDecline).
REASON_CHARS = 300


class EnrolmentTokenRow(SQLModel, table=True):
    """A one-time enrolment token, by its hash only: the token itself is shown once, never kept."""

    __tablename__ = "broker_enrolment_token"

    token_hash: bytes = Field(sa_column=Column(LargeBinary, primary_key=True))
    agency_id: str = Field(max_length=ID_CHARS, index=True)
    region: str = Field(max_length=ID_CHARS)
    expires_at: dt.datetime
    # Set (never cleared) by the one consumer that wins; a used token stays refused.
    consumed_at: dt.datetime | None = None


class LogEntryRow(SQLModel, table=True):
    """One entry of the append-only directory log, exactly the bytes the broker signed.

    ``sequence`` is the primary key and is never generated: an appender names the sequence it
    expects, so two appenders at the same log size cannot both succeed.
    """

    __tablename__ = "broker_log_entry"

    sequence: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    agency_id: str = Field(max_length=ID_CHARS, index=True)
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    signature: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    chain: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class AgencyRow(SQLModel, table=True):
    """Current state of one agency, derived from the log in the same transaction as each entry."""

    __tablename__ = "broker_agency"

    agency_id: str = Field(primary_key=True, max_length=ID_CHARS)
    region: str = Field(max_length=ID_CHARS, index=True)
    # Unique: a request's signer key names at most one agency.
    signing_key: bytes = Field(sa_column=Column(LargeBinary, nullable=False, unique=True))
    encryption_key: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    revoked: bool = False
    sequence: int = Field(sa_column=Column(BigInteger, nullable=False))


class EnvelopeRow(SQLModel, table=True):
    """A sealed envelope waiting in its recipient's mailbox; deleted once acknowledged.

    ``seq`` orders envelopes received in the same instant (first in, first out); it is never
    shown outside the store. ``envelope_id`` is the delivery id the recipient sees.
    """

    __tablename__ = "broker_envelope"
    __table_args__ = (
        # Claim: the oldest deliverable envelopes of one recipient.
        Index("ix_broker_envelope_mailbox", "recipient_id", "received_at", "seq"),
        # Consent purge: one sender's envelopes under one commitment.
        Index("ix_broker_envelope_consent", "sender_id", "consent_commitment"),
    )

    seq: int | None = Field(
        default=None, sa_column=Column(_ROWID, primary_key=True, autoincrement=True)
    )
    envelope_id: str = Field(max_length=36, unique=True)
    sender_id: str = Field(max_length=ID_CHARS)
    recipient_id: str = Field(max_length=ID_CHARS)
    # Empty for envelopes that carry no survivor data (statuses, revocations).
    consent_commitment: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    ciphertext: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    received_at: dt.datetime = Field(index=True)
    attempts: int = 0
    lease_owner: str | None = Field(default=None, max_length=OWNER_CHARS, index=True)
    lease_until: dt.datetime | None = None


class ReceiptRow(SQLModel, table=True):
    """The broker's record of each accepted envelope: the facts of its signed RelayReceipt.

    It outlives the envelope's ciphertext (deleted on acknowledgement) until the retention limit,
    so a sender's retry of an already delivered envelope is still recognised as a repeat and
    never delivered twice (DESIGN.md section 6: idempotency keys everywhere). No ciphertext here.
    """

    __tablename__ = "broker_receipt"
    __table_args__ = (Index("ix_broker_receipt_consent", "sender_id", "consent_commitment"),)

    sender_id: str = Field(primary_key=True, max_length=ID_CHARS)
    idempotency_key: str = Field(primary_key=True, max_length=IDEMPOTENCY_KEY_CHARS)
    envelope_id: str = Field(max_length=36, unique=True)
    recipient_id: str = Field(max_length=ID_CHARS)
    consent_commitment: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    envelope_digest: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    size: int = Field(sa_column=Column(BigInteger, nullable=False))
    received_at: dt.datetime = Field(index=True)
    acknowledged_at: dt.datetime | None = None


class PurgedConsentRow(SQLModel, table=True):
    """A consent commitment its sender revoked: envelopes under it are refused from then on."""

    __tablename__ = "broker_purged_consent"

    sender_id: str = Field(primary_key=True, max_length=ID_CHARS)
    consent_commitment: bytes = Field(sa_column=Column(LargeBinary, primary_key=True))
    purged_at: dt.datetime


class NonceRow(SQLModel, table=True):
    """A request nonce seen from a signer, shared by every broker process (DESIGN.md section 5).

    The primary key makes "remember" and "was it already seen" one atomic insert.
    """

    __tablename__ = "broker_nonce"

    signer: bytes = Field(sa_column=Column(LargeBinary, primary_key=True))
    nonce: bytes = Field(sa_column=Column(LargeBinary, primary_key=True))
    seen_at: dt.datetime
    expires_at: dt.datetime = Field(index=True)


# --- statistics rounds and releases (DESIGN.md section 7) ---------------------------------------


class StatsRoundRow(SQLModel, table=True):
    """One statistics round: its state and current attempt (the signed parameters are in
    :class:`StatsAttemptRow`). ``seq`` orders rounds newest first; never shown outside the store."""

    __tablename__ = "broker_stats_round"

    seq: int | None = Field(
        default=None, sa_column=Column(_ROWID, primary_key=True, autoincrement=True)
    )
    round_id: str = Field(max_length=36, unique=True)
    # Chosen by the opener; repeating OpenRound with it returns the same round.
    idempotency_key: str | None = Field(default=None, max_length=IDEMPOTENCY_KEY_CHARS, unique=True)
    period: str = Field(max_length=7, index=True)
    table_name: str = Field(max_length=ID_CHARS)
    state: int
    attempt: int
    attempt_timeout_seconds: int
    release_id: str | None = Field(default=None, max_length=36)
    opened_at: dt.datetime
    # Set once, when a coordinator cancels the round (state ABANDONED); never survivor data.
    cancelled_at: dt.datetime | None = None
    cancel_reason: str | None = Field(default=None, max_length=REASON_CHARS)


class StatsAttemptRow(SQLModel, table=True):
    """One attempt of a round: exactly the Round bytes the broker signed, and its signature."""

    __tablename__ = "broker_stats_attempt"

    round_id: str = Field(primary_key=True, max_length=36)
    attempt: int = Field(primary_key=True)
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    signature: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    deadline: dt.datetime
    abandoned_at: dt.datetime | None = None
    abandon_reason: str | None = Field(default=None, max_length=500)


class StatsParticipantRow(SQLModel, table=True):
    """An agency listed in one attempt (so nodes can find the rounds they are in)."""

    __tablename__ = "broker_stats_participant"

    round_id: str = Field(primary_key=True, max_length=36)
    attempt: int = Field(primary_key=True)
    agency_id: str = Field(primary_key=True, max_length=ID_CHARS, index=True)


class StatsShareRow(SQLModel, table=True):
    """One participant's submission to an attempt.

    ``cells`` (masked, or locally noised, little-endian uint64s) exists only until the attempt is
    summed or abandoned; then it is set to NULL and only ``digest`` remains, so an identical retry
    is still recognised. The broker never holds an unmasked single-agency table.
    """

    __tablename__ = "broker_stats_share"

    round_id: str = Field(primary_key=True, max_length=36)
    attempt: int = Field(primary_key=True)
    agency_id: str = Field(primary_key=True, max_length=ID_CHARS)
    digest: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    cells: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    submitted_at: dt.datetime


class StatsDeclineRow(SQLModel, table=True):
    """A participant's refusal of one attempt, and why (its own policy; never survivor data).

    Keyed by attempt: a restarted round's new attempt starts with none, and the abandoned
    attempt's declines stay as the reason it was restarted. A participant that submits after all
    loses its decline of that attempt.
    """

    __tablename__ = "broker_stats_decline"

    round_id: str = Field(primary_key=True, max_length=36)
    attempt: int = Field(primary_key=True)
    agency_id: str = Field(primary_key=True, max_length=ID_CHARS)
    reason: str = Field(max_length=REASON_CHARS)
    declined_at: dt.datetime


class StatsReleaseRow(SQLModel, table=True):
    """A broker-signed release: exactly the bytes signed, served unchanged forever."""

    __tablename__ = "broker_stats_release"

    seq: int | None = Field(
        default=None, sa_column=Column(_ROWID, primary_key=True, autoincrement=True)
    )
    release_id: str = Field(max_length=36, unique=True)
    round_id: str = Field(max_length=36, unique=True)
    period: str = Field(max_length=7, index=True)
    table_name: str = Field(max_length=ID_CHARS, index=True)
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    signature: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    released_at: dt.datetime


# --- the escrow of erasures and audit checkpoints (issue 14; escrow.proto) ----------------------


class EscrowTombstoneRow(SQLModel, table=True):
    """One sealed tombstone of an agency's escrow: append-only, never updated or deleted.

    The broker holds only the agency, its position, an opaque id, the sealed bytes (every one the
    same size) and when it arrived: it learns how many erasures and removals an agency recorded
    and when, never which.
    """

    __tablename__ = "broker_escrow_tombstone"
    __table_args__ = (UniqueConstraint("agency_id", "tombstone_id"),)

    agency_id: str = Field(primary_key=True, max_length=ID_CHARS)
    sequence: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    tombstone_id: str = Field(max_length=36)
    sealed: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    # The chain value after this tombstone (tessera.escrow), so a head is one indexed read.
    chain: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    deposited_at: dt.datetime


class AuditCheckpointRow(SQLModel, table=True):
    """One broker-signed checkpoint of an agency's sealed audit position: append-only."""

    __tablename__ = "broker_audit_checkpoint"

    agency_id: str = Field(primary_key=True, max_length=ID_CHARS)
    number: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    # The signed AuditCheckpoint (it holds the sealed position) and the broker's signature.
    body: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    signature: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    checkpointed_at: dt.datetime


BROKER_TABLES = frozenset(
    {
        EnrolmentTokenRow.__tablename__,
        LogEntryRow.__tablename__,
        AgencyRow.__tablename__,
        EnvelopeRow.__tablename__,
        ReceiptRow.__tablename__,
        PurgedConsentRow.__tablename__,
        NonceRow.__tablename__,
        StatsRoundRow.__tablename__,
        StatsAttemptRow.__tablename__,
        StatsParticipantRow.__tablename__,
        StatsShareRow.__tablename__,
        StatsDeclineRow.__tablename__,
        StatsReleaseRow.__tablename__,
        EscrowTombstoneRow.__tablename__,
        AuditCheckpointRow.__tablename__,
    }
)
"""Every table the broker owns; its migrations ignore any other table in the database."""
