"""SQLModel tables of an agency node. Only ``node.store`` imports this module.

Columns in clear are exactly the non-identifying metadata needed to run the node (docs/storage.md
lists them): ids, timestamps, record versions, case state, blind indexes (keyed hashes), staff
names and roles, audit actions. A case's needs are sealed under its data key (``NeedRow``).
Every survivor field lives inside ``CaseRow.ciphertext``, encrypted under that survivor's own data
key, which sits next to it in ``CaseRow.wrapped_key``, wrapped by the node's record key.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Column, LargeBinary, UniqueConstraint
from sqlmodel import Field, SQLModel


def as_utc(value: dt.datetime) -> dt.datetime:
    """A datetime read back from the database, as aware UTC (SQLite returns naive ones)."""
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def utcnow() -> dt.datetime:
    """Timestamps are stored in UTC."""
    return dt.datetime.now(dt.UTC)


class CaseRow(SQLModel, table=True):
    """One survivor's case: clear metadata, one ciphertext holding every survivor field, and the
    survivor's data key wrapped by the node's record key.

    The wrapped key lives in the case's own row, so deleting the row crypto-shreds the survivor
    (with SQLite's secure_delete and the WAL checkpoint after an erasure, see NodeStore.erase_case).
    """

    __tablename__ = "case_record"

    case_id: str = Field(primary_key=True, max_length=36)
    version: int = Field(default=1)
    state: str = Field(default="open", max_length=16, index=True)
    created_at: dt.datetime = Field(default_factory=utcnow)
    updated_at: dt.datetime = Field(default_factory=utcnow, index=True)
    # AEAD ciphertext; associated data binds it to (table, case_id, version).
    ciphertext: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    # The survivor's data key wrapped by the record key; associated data binds it to case_id
    # (``tessera/v1|survivor_key|<case_id>``), so a key moved into another row fails to open.
    wrapped_key: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class BlindIndexRow(SQLModel, table=True):
    """Keyed hash of one identifier of a survivor, for lookup without plaintext."""

    __tablename__ = "blind_index"
    __table_args__ = (UniqueConstraint("case_id", "kind", "digest"),)

    id: int | None = Field(default=None, primary_key=True)
    case_id: str = Field(
        foreign_key="case_record.case_id", index=True, max_length=36, ondelete="CASCADE"
    )
    kind: str = Field(max_length=32)
    digest: str = Field(max_length=64, index=True)


class NeedRow(SQLModel, table=True):
    """One aftercare need of a case, sealed under the survivor's data key (node.store.needs).

    Clear: the row id, the case id and ``tag``, a keyed hash of the category under a key derived
    from the case's own data key (unique per case, unrelated between cases). Category, status
    and dates are ``ciphertext``, whose associated data binds it to (table, case_id, tag).
    """

    __tablename__ = "need"
    __table_args__ = (UniqueConstraint("case_id", "tag"),)

    id: int | None = Field(default=None, primary_key=True)
    case_id: str = Field(
        foreign_key="case_record.case_id", index=True, max_length=36, ondelete="CASCADE"
    )
    tag: str = Field(max_length=64)
    ciphertext: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class ErasureRow(SQLModel, table=True):
    """A survivor erased by crypto-shredding; re-applied after any restore."""

    __tablename__ = "erasure"

    case_id: str = Field(primary_key=True, max_length=36)
    erased_at: dt.datetime = Field(default_factory=utcnow)
    erased_by: str = Field(max_length=64)


class StaffRow(SQLModel, table=True):
    """A staff credential: the person's verify key and role. Removal sets a time, never deletes."""

    __tablename__ = "staff"

    staff_id: str = Field(primary_key=True, max_length=36)
    name: str = Field(max_length=128, index=True)
    role: str = Field(max_length=16)
    signing_key: bytes = Field(sa_column=Column(LargeBinary, nullable=False, unique=True))
    added_at: dt.datetime = Field(default_factory=utcnow)
    removed_at: dt.datetime | None = None


class AuditRow(SQLModel, table=True):
    """One entry of the hash-chained audit log, signed by the node (see node.audit)."""

    __tablename__ = "audit_log"

    seq: int = Field(primary_key=True)
    at: dt.datetime
    actor: str = Field(max_length=128)
    action: str = Field(max_length=64, index=True)
    case_id: str | None = Field(default=None, max_length=36, index=True)
    detail: str  # canonical JSON; never a survivor field
    prev_hash: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    entry_hash: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    signature: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class AuditHeadRow(SQLModel, table=True):
    """The chain's head, one row, locked by every append so concurrent writers never fork it."""

    __tablename__ = "audit_head"

    id: int = Field(default=1, primary_key=True)
    seq: int = 0
    entry_hash: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class RequestKeyRow(SQLModel, table=True):
    """An idempotency key a client sent with a create or import, and what it created.

    A retried request (say after a lost answer) finds its key here and gets the same cases back
    instead of creating them twice.
    """

    __tablename__ = "request_key"

    key: str = Field(primary_key=True, max_length=128)
    action: str = Field(max_length=32)
    case_ids: str  # JSON list of the case ids the request created
    created_at: dt.datetime = Field(default_factory=utcnow)


# --- consent-gated referrals (DESIGN.md section 6; node.referrals) --------------------------
#
# None of these tables has a foreign key to ``case_record``: erasing a survivor (which deletes the
# case row) must keep working, and the rows below hold no survivor field (ids, codes, field
# *names*, timestamps, ciphertext). Incoming referrals are encrypted like cases.


class ConsentRow(SQLModel, table=True):
    """A survivor's consent recorded at the sending node: ids, codes, categories, how it was given
    and who witnessed it, its window, and the survivor's pseudonym. No survivor field."""

    __tablename__ = "consent"

    consent_id: str = Field(primary_key=True, max_length=36)
    case_id: str = Field(index=True, max_length=36)
    recipient_agency_id: str = Field(index=True, max_length=128)
    purpose: str = Field(max_length=32)
    categories: str  # JSON list of data category names, ascending
    method: str = Field(max_length=16)
    witnessed_by: str = Field(max_length=200)  # a staff principal
    survivor_pseudonym: str = Field(max_length=128)
    granted_at: dt.datetime
    expires_at: dt.datetime
    revoked_at: dt.datetime | None = None
    recorded_at: dt.datetime = Field(default_factory=utcnow)


class OutgoingReferralRow(SQLModel, table=True):
    """A referral this node sent: who to, under which consent, which field *names*, its state.

    ``decline_text`` (the recipient's free text) is encrypted under the survivor's data key, so
    erasing the survivor shreds it; empty bytes mean none.
    """

    __tablename__ = "outgoing_referral"

    referral_id: str = Field(primary_key=True, max_length=36)
    case_id: str = Field(index=True, max_length=36)
    consent_id: str = Field(foreign_key="consent.consent_id", index=True, max_length=36)
    recipient_id: str = Field(index=True, max_length=128)
    recipient_name: str = Field(max_length=200)
    need: str = Field(max_length=32)
    fields: str  # JSON list of the HTCDS field names sent (never values)
    state: str = Field(max_length=16, index=True)
    decline_reason: str | None = Field(default=None, max_length=32)
    decline_text: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    idempotency_key: str = Field(max_length=128, unique=True)
    message_id: str = Field(max_length=36, unique=True)
    consent_commitment: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    relay_receipt: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: dt.datetime = Field(default_factory=utcnow)
    updated_at: dt.datetime = Field(default_factory=utcnow, index=True)


class OutboxRow(SQLModel, table=True):
    """A sealed envelope waiting for the relay worker: ciphertext only, kept until the broker
    accepted it (at-least-once; the broker deduplicates by ``idempotency_key``)."""

    __tablename__ = "outbox"

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=24)
    referral_id: str = Field(index=True, max_length=36)
    recipient_id: str = Field(max_length=128)
    idempotency_key: str = Field(max_length=128, unique=True)
    consent_commitment: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    sealed: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    attempts: int = 0
    last_error: str = Field(default="", max_length=500)
    created_at: dt.datetime = Field(default_factory=utcnow)
    last_attempt_at: dt.datetime | None = None


class IncomingReferralRow(SQLModel, table=True):
    """A referral another agency sent here, encrypted at rest like a case.

    Clear: ids, the sender, the need code, state and timestamps. ``ciphertext`` (fields, note,
    sender contact, consent receipt, this node's decline text) is one AEAD bound to table, row and
    version, under a data key of its own wrapped by the record key in ``wrapped_key``. A purge
    empties both and keeps the row as a tombstone with the purged field *names*.
    """

    __tablename__ = "incoming_referral"

    referral_id: str = Field(primary_key=True, max_length=36)
    sender_id: str = Field(index=True, max_length=128)
    consent_id: str = Field(index=True, max_length=36)
    need: str | None = Field(default=None, max_length=32)  # None: tombstone of an unseen one
    state: str = Field(max_length=16, index=True)
    version: int = Field(default=1)
    decline_reason: str | None = Field(default=None, max_length=32)
    purged_fields: str | None = None  # JSON list of field names, once purged
    received_at: dt.datetime = Field(default_factory=utcnow, index=True)
    updated_at: dt.datetime = Field(default_factory=utcnow)
    purged_at: dt.datetime | None = None
    ciphertext: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    wrapped_key: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class ProcessedMessageRow(SQLModel, table=True):
    """An incoming envelope already applied: each (sender, message id) and each relay delivery
    id takes effect once, whatever the relay redelivers."""

    __tablename__ = "processed_message"

    sender_id: str = Field(primary_key=True, max_length=128)
    message_id: str = Field(primary_key=True, max_length=36)
    kind: str = Field(max_length=24)
    referral_id: str = Field(max_length=36, index=True)
    delivery_id: str | None = Field(default=None, max_length=128, unique=True)
    processed_at: dt.datetime = Field(default_factory=utcnow)


class ReferralEventRow(SQLModel, table=True):
    """One state a referral reached, for its history (both directions)."""

    __tablename__ = "referral_event"

    id: int | None = Field(default=None, primary_key=True)
    referral_id: str = Field(index=True, max_length=36)
    direction: str = Field(max_length=8)
    state: str = Field(max_length=16)
    at: dt.datetime = Field(default_factory=utcnow)


# --- differentially private statistics (DESIGN.md section 7; node.store.budget) ---------------


class BudgetPeriodRow(SQLModel, table=True):
    """The privacy budget of one period ("YYYY-MM"): its cap, locked by every charge."""

    __tablename__ = "budget_period"

    period: str = Field(primary_key=True, max_length=7)
    cap: float
    created_at: dt.datetime = Field(default_factory=utcnow)


class BudgetChargeRow(SQLModel, table=True):
    """One contribution to a statistics round: charged before the share is submitted, once per
    (round, attempt); a restarted round's new attempt is a new charge."""

    __tablename__ = "budget_charge"
    __table_args__ = (UniqueConstraint("round_id", "attempt"),)

    id: int | None = Field(default=None, primary_key=True)
    period: str = Field(foreign_key="budget_period.period", index=True, max_length=7)
    round_id: str = Field(max_length=64)
    attempt: int
    table_name: str = Field(max_length=128)
    epsilon: float
    charged_at: dt.datetime = Field(default_factory=utcnow)


# --- erasures that outlive the home; records that cannot be rolled back (issue 14) ------------
#
# node.store.anchors reads and writes these; docs/storage.md explains the design.


class EscrowOutboxRow(SQLModel, table=True):
    """A tombstone (an erasure or staff removal, sealed by the node to itself) waiting to be
    deposited at the broker; written in the same transaction as the erasure or removal, kept
    until the broker accepted it. Nothing here is readable without the node's key."""

    __tablename__ = "escrow_outbox"

    tombstone_id: str = Field(primary_key=True, max_length=36)
    sealed: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: dt.datetime = Field(default_factory=utcnow)
    attempts: int = 0
    last_error: str = Field(default="", max_length=500)


class AnchorRow(SQLModel, table=True):
    """One row: how much of the broker's escrow this database has applied (its size and chain
    value) and when the node last confirmed it, and when every case was first sealed."""

    __tablename__ = "anchor"

    id: int = Field(default=1, primary_key=True)
    escrow_size: int = 0
    escrow_chain: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    escrow_confirmed_at: dt.datetime | None = None
    sealed_at: dt.datetime | None = None


class RecordSealRow(SQLModel, table=True):
    """The version of a case the node last wrote, outside its row: a MAC (under a key derived
    from the record key) over the case id, that version, its state, digests of its ciphertext
    and wrapped key, and the audit entry that recorded the write. A row put back at an older
    version no longer matches it (node.store.anchors)."""

    __tablename__ = "record_seal"

    case_id: str = Field(primary_key=True, max_length=36)
    version: int
    audit_seq: int
    seal: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
