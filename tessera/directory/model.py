"""The directory's domain objects and its integrity errors (all fail closed)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar

from tessera.crypto import PublicIdentity
from tessera.directory.fields import SERVICE_VALUES
from tessera.errors import CryptoError, InvalidInput
from tessera.timestamps import require_aware
from tessera.v1 import directory_pb2 as directory_pb

# --- errors -----------------------------------------------------------------------------------


class DirectoryError(CryptoError):
    """Base of the directory's integrity failures; ``sequence`` names the log entry concerned.

    All of them fail closed: a node that gets one keeps its previously verified head and pins.
    """

    default_hint: ClassVar[str | None] = None

    def __init__(
        self, message: str, *, sequence: int | None = None, hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint if hint is not None else self.default_hint)
        self.sequence = sequence


class BadDirectoryData(DirectoryError):
    """Broker-served directory data does not verify on its own: a log entry or head with a bad or
    foreign signature, a malformed body, a statement not signed by the key its kind requires, a
    missing or bad possession signature, or data for another region."""

    default_hint = (
        "the broker served directory data that does not verify; nothing was accepted. Check "
        "the broker address and pinned broker key, and report it to the broker operator"
    )


class DirectoryInconsistent(DirectoryError):
    """The log contradicts what this node verified before: a fork (rewritten history), a
    truncated or rolled-back log, missing, repeated or reordered entries, or a chain value that
    does not recompute to the signed head (directory.proto header)."""

    default_hint = (
        "nothing was accepted. If the log contradicts a head this node verified before, history "
        "was rewritten (a fork): keep the stored head and this response as evidence, alert the "
        "broker operator and the other agencies, and trust no new directory data until it is "
        "explained"
    )


class KeyChanged(DirectoryError):
    """An agency's keys would change in a way its current (pinned) key did not authorise: a
    second ENROL, a ROTATE not signed by the current key, any change to a revoked agency, or a
    replayed older rotation (DESIGN.md section 5: nodes refuse silently changed keys)."""

    default_hint = (
        "do not use this agency's new keys; compare its fingerprint out of band "
        "(`tessera agency verify`) and contact the agency and the broker operator"
    )


# --- domain objects ---------------------------------------------------------------------------


class EntryKind(enum.Enum):
    """What a directory entry does (directory.proto ``EntryKind``); values are wire numbers."""

    ENROL = directory_pb.ENTRY_KIND_ENROL
    ROTATE = directory_pb.ENTRY_KIND_ROTATE
    REVOKE = directory_pb.ENTRY_KIND_REVOKE


@dataclass(frozen=True)
class AgencyRecord:
    """What the directory currently says about one agency: the result of applying its entries.

    ``services`` are NEEDS.md codes (``"safe_housing"``) in ascending wire order; ``sequence``
    is the log sequence of the entry that last changed the record (0: not yet in the log, as
    returned by :func:`check_statement` before the broker appends). A revoked record keeps the
    keys it was revoked with, so that nothing signed by them is trusted again.
    """

    agency_id: str
    name: str
    region: str
    services: tuple[str, ...]
    identity: PublicIdentity
    valid_from: datetime
    valid_until: datetime | None
    revoked: bool
    sequence: int

    def __post_init__(self) -> None:
        if not isinstance(self.identity, PublicIdentity):
            raise InvalidInput("an agency record needs a PublicIdentity")
        if not isinstance(self.services, tuple) or any(
            code not in SERVICE_VALUES for code in self.services
        ):
            raise InvalidInput("an agency record's services must be a tuple of NEEDS.md codes")
        require_aware(self.valid_from, "valid_from")
        if self.valid_until is not None:
            require_aware(self.valid_until, "valid_until")
        if not isinstance(self.sequence, int) or self.sequence < 0:
            raise InvalidInput("an agency record's sequence must be a non-negative integer")


@dataclass(frozen=True)
class AgencyStatement:
    """A parsed ``DirectoryEntry`` whose signature verified under ``signer``.

    ``identity`` is ``None`` for a REVOKE (which carries no keys); ``previous_signing_key`` is
    ``None`` for an ENROL. Whether ``signer`` is allowed to make this statement is checked
    separately (by kind, and against the current record).
    """

    kind: EntryKind
    agency_id: str
    name: str
    region: str
    services: tuple[str, ...]
    identity: PublicIdentity | None
    previous_signing_key: bytes | None
    valid_from: datetime
    valid_until: datetime | None
    reason: str
    created_at: datetime
    signer: bytes


@dataclass(frozen=True)
class VerifiedEntry:
    """One broker-signed log entry whose broker signature, statement signature and (for a ROTATE)
    possession signature verified; returned only by :func:`verify_entry` and
    :func:`verify_extension`. ``chain`` is chain(sequence) = next_chain(previous_chain, leaf)."""

    sequence: int
    statement: AgencyStatement
    logged_at: datetime
    previous_chain: bytes
    leaf: bytes
    chain: bytes

    @property
    def kind(self) -> EntryKind:
        """The statement's kind."""
        return self.statement.kind


@dataclass(frozen=True)
class VerifiedHead:
    """A broker-signed ``LogHead`` that verified under the pinned broker key for ``region``."""

    region: str
    size: int
    chain: bytes
    signed_at: datetime
