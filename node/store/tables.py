"""SQLModel tables of an agency node. Only ``node.store`` imports this module.

Columns in clear are exactly the non-identifying metadata needed to run the node (docs/storage.md
lists them): ids, timestamps, record versions, case state, need category and status codes, blind
indexes (keyed hashes), staff names and roles, audit actions. Every survivor field lives inside
``CaseRow.ciphertext``, encrypted under that survivor's own data key, which sits next to it in
``CaseRow.wrapped_key``, wrapped by the node's record key.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Column, LargeBinary, UniqueConstraint
from sqlmodel import Field, SQLModel


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
    """One aftercare need of a case: codes and dates only."""

    __tablename__ = "need"
    __table_args__ = (UniqueConstraint("case_id", "category"),)

    id: int | None = Field(default=None, primary_key=True)
    case_id: str = Field(
        foreign_key="case_record.case_id", index=True, max_length=36, ondelete="CASCADE"
    )
    category: str = Field(max_length=32, index=True)
    status: str = Field(max_length=16, index=True)
    identified_on: dt.date
    updated_at: dt.datetime = Field(default_factory=utcnow)


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
