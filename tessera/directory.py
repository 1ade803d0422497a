"""The regional directory: who is enrolled, with which keys, in an append-only signed log.

This module is the directory core shared by the broker (which builds statements' log entries,
the hash chain and signed heads) and by every node (which verifies them and pins keys). It
implements DESIGN.md section 5 ("Keys, identity, encryption": enrolment with a one-time token,
an append-only log whose head the broker signs, keys pinned at first sight, silently changed keys
refused, key rotation signed by the old key) exactly as the header comment of
``proto/tessera/v1/directory.proto`` specifies it on the wire:

- an agency *statement* is a ``DirectoryEntry`` carried as a ``SignedBlob`` under label
  ``tessera/v1/key-rotation``, signed by the new key (ENROL), the previous key (ROTATE, plus a
  possession signature by the new key over the same body bytes) or the broker (REVOKE);
- the broker wraps it in a ``LogEntry`` (sequence from 1, ``previous_chain``) that it signs under
  ``tessera/v1/directory-entry``;
- the hash chain is ``leaf(n) = digest("tessera/v1/directory-entry", b_n)``,
  ``chain(0) = 32 zero bytes``, ``chain(n) = digest("tessera/v1/directory-head",
  chain(n-1) || leaf(n))`` where ``b_n`` is the exact body of the broker-signed LogEntry ``n``;
- the broker signs a ``LogHead`` (region, size, chain(size)) under ``tessera/v1/directory-head``.

Everything here is pure: functions take protobuf ``SignedBlob`` messages (whose ``body`` bytes are
never re-serialised, common.proto convention 2), bytes and domain objects, and return frozen
domain objects or raise typed errors. There is no I/O, no clock (callers pass ``now``) and no
storage; the broker's and node's servicers do that around these functions. Keys are touched only
through :mod:`tessera.crypto`. docs/directory.md is the reviewer's summary.

Verification order follows the signing rule of docs/wire.md: a signature is checked against the
key that *should* have signed (the pinned broker key; for a statement, the signer is checked
against what its kind requires) and only verified bytes are parsed further.
"""

from __future__ import annotations

import enum
import itertools
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import ClassVar, Final

from google.protobuf.message import DecodeError

from tessera import crypto
from tessera.crypto import Identity, PublicIdentity
from tessera.errors import (
    BadSignature,
    Conflict,
    CryptoError,
    InvalidInput,
    NotFound,
    Refused,
)
from tessera.timestamps import require_aware, to_datetime, to_timestamp
from tessera.v1 import common_pb2 as common_pb
from tessera.v1 import directory_pb2 as directory_pb

__all__ = [
    "CHAIN_BYTES",
    "DEFAULT_LIMITS",
    "GENESIS_CHAIN",
    "POSSESSION_LABEL",
    "AgencyRecord",
    "AgencyStatement",
    "BadDirectoryData",
    "DirectoryError",
    "DirectoryInconsistent",
    "DirectoryLimits",
    "EntryKind",
    "KeyChanged",
    "VerifiedEntry",
    "VerifiedHead",
    "append",
    "apply_to_pins",
    "check_statement",
    "enrol_statement",
    "leaf_hash",
    "next_chain",
    "revoke_statement",
    "rotate_statement",
    "sign_head",
    "verify_consistency",
    "verify_entry",
    "verify_extension",
    "verify_head",
]

# --- constants (directory.proto header) -----------------------------------------------------

CHAIN_BYTES: Final = 32
GENESIS_CHAIN: Final = bytes(CHAIN_BYTES)
"""chain(0): 32 zero bytes (directory.proto header)."""

POSSESSION_LABEL: Final = crypto.LABEL_KEY_ROTATION
"""Label of a ROTATE's possession signature. directory.proto (LogEntry.possession_signature,
RotateKeysRequest.possession_signature) names tessera/v1/key-rotation, the same label as the
statement itself; the two are told apart by who signs (old key: statement, new key: possession)."""


@dataclass(frozen=True)
class DirectoryLimits:
    """Safety limits applied to everything parsed from the wire, as named defaults.

    They bound the work and memory an untrusted peer can cause and keep display fields sane.
    The broker and nodes must use the same values, or a node could refuse a log the broker
    accepted; raise them only together (and in a new protocol version if they ever shrink).
    """

    max_statement_bytes: int = 4096
    max_entry_bytes: int = 8192
    max_head_bytes: int = 1024
    max_id_chars: int = 128  # agency_id and region
    max_name_chars: int = 200
    max_reason_chars: int = 1000
    max_services: int = 64


DEFAULT_LIMITS: Final = DirectoryLimits()

# Identifiers (agency ids, regions) are ASCII so that look-alike characters cannot make two ids
# that a person reads as one; display text may be any Unicode except control/format characters.
_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]*", re.ASCII)
_FORBIDDEN_TEXT_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})
_NEED_PREFIX: Final = "NEED_CATEGORY_"
_SERVICE_CODES: Final[dict[int, str]] = {
    value: name.removeprefix(_NEED_PREFIX).lower()
    for name, value in common_pb.NeedCategory.items()
    if value != common_pb.NEED_CATEGORY_UNSPECIFIED
}
_SERVICE_VALUES: Final[dict[str, int]] = {code: value for value, code in _SERVICE_CODES.items()}


# --- errors ---------------------------------------------------------------------------------


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


# --- domain objects -------------------------------------------------------------------------


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
            code not in _SERVICE_VALUES for code in self.services
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


# --- the hash chain (directory.proto header) ------------------------------------------------


def leaf_hash(entry_body: bytes) -> bytes:
    """leaf(n) = digest("tessera/v1/directory-entry", b_n), b_n the LogEntry body bytes."""
    if not isinstance(entry_body, bytes):
        raise InvalidInput("a log entry body must be bytes")
    return crypto.digest(crypto.LABEL_DIRECTORY_ENTRY, entry_body)


def next_chain(prev_chain: bytes, leaf: bytes) -> bytes:
    """chain(n) = digest("tessera/v1/directory-head", chain(n-1) || leaf(n))."""
    _check_chain(prev_chain, "previous chain value")
    _check_chain(leaf, "leaf hash")
    return crypto.digest(crypto.LABEL_DIRECTORY_HEAD, prev_chain + leaf)


# --- agency side: making statements (DESIGN.md section 5) -----------------------------------


def enrol_statement(
    identity: Identity,
    agency_id: str,
    name: str,
    region: str,
    services: Iterable[str],
    now: datetime,
) -> common_pb.SignedBlob:
    """An ENROL statement for ``identity``'s keys, self-signed by its signing key.

    ``services`` are NEEDS.md codes in any order; they are sent in ascending wire order.
    The node sends it in ``EnrolRequest.statement`` together with its one-time token.
    """
    limits = DEFAULT_LIMITS
    message = directory_pb.DirectoryEntry(
        kind=directory_pb.ENTRY_KIND_ENROL,
        agency_id=check_agency_id(agency_id, "agency_id", limits),
        name=check_text(name, "name", limits.max_name_chars, required=True),
        region=check_agency_id(region, "region", limits),
        services=_services_to_wire(services),
        signing_key=identity.public.signing_key,
        encryption_key=identity.public.encryption_key,
    )
    message.valid_from.CopyFrom(to_timestamp(now, "now"))
    message.created_at.CopyFrom(to_timestamp(now, "now"))
    return sign_blob(
        identity, crypto.LABEL_KEY_ROTATION, message.SerializeToString(deterministic=True)
    )


def rotate_statement(
    old: Identity,
    new: Identity,
    current: AgencyRecord,
    now: datetime,
    *,
    name: str | None = None,
    services: Iterable[str] | None = None,
) -> tuple[common_pb.SignedBlob, bytes]:
    """A ROTATE statement moving ``current`` to ``new``'s keys, and its possession signature.

    The statement is signed by ``old`` (the agency's current key) with ``previous_signing_key``
    set to it; the possession signature is ``new``'s signature over the statement's exact body
    bytes under :data:`POSSESSION_LABEL`, proving the agency holds the new key. ``name`` and
    ``services`` restate the record (unchanged unless given). Goes in ``RotateKeysRequest``.
    """
    if not isinstance(current, AgencyRecord):
        raise InvalidInput("rotate_statement needs the agency's current record")
    if old.public.signing_key != current.identity.signing_key:
        raise InvalidInput(
            f"the old key {short_key(old.public.signing_key)} is not agency {current.agency_id}'s "
            f"current signing key {short_key(current.identity.signing_key)}"
        )
    if current.revoked:
        raise Refused(f"agency {current.agency_id} was revoked; its keys cannot be rotated")
    limits = DEFAULT_LIMITS
    message = directory_pb.DirectoryEntry(
        kind=directory_pb.ENTRY_KIND_ROTATE,
        agency_id=current.agency_id,
        name=check_text(
            current.name if name is None else name, "name", limits.max_name_chars, required=True
        ),
        region=current.region,
        services=_services_to_wire(current.services if services is None else services),
        signing_key=new.public.signing_key,
        encryption_key=new.public.encryption_key,
        previous_signing_key=old.public.signing_key,
    )
    message.valid_from.CopyFrom(to_timestamp(now, "now"))
    message.created_at.CopyFrom(to_timestamp(now, "now"))
    body = message.SerializeToString(deterministic=True)
    return sign_blob(old, crypto.LABEL_KEY_ROTATION, body), new.sign(POSSESSION_LABEL, body)


def revoke_statement(
    broker: Identity, current: AgencyRecord, reason: str, now: datetime
) -> common_pb.SignedBlob:
    """A REVOKE statement withdrawing ``current``, signed by the broker.

    It carries no keys (directory.proto), names the withdrawn key in ``previous_signing_key``,
    restates the agency's details, and sets ``valid_until`` to ``now`` (never before the
    record's ``valid_from``). ``reason`` is words, never survivor data.
    """
    if not isinstance(current, AgencyRecord):
        raise InvalidInput("revoke_statement needs the agency's current record")
    if current.revoked:
        raise Refused(f"agency {current.agency_id} is already revoked")
    limits = DEFAULT_LIMITS
    message = directory_pb.DirectoryEntry(
        kind=directory_pb.ENTRY_KIND_REVOKE,
        agency_id=current.agency_id,
        name=current.name,
        region=current.region,
        services=_services_to_wire(current.services),
        previous_signing_key=current.identity.signing_key,
        reason=check_text(reason, "reason", limits.max_reason_chars, required=False),
    )
    message.valid_from.CopyFrom(to_timestamp(current.valid_from, "valid_from"))
    message.valid_until.CopyFrom(
        to_timestamp(max(require_aware(now, "now"), current.valid_from), "now")
    )
    message.created_at.CopyFrom(to_timestamp(now, "now"))
    return sign_blob(
        broker, crypto.LABEL_KEY_ROTATION, message.SerializeToString(deterministic=True)
    )


# --- broker side: checking statements, appending, signing heads -----------------------------


def check_statement(
    statement_blob: common_pb.SignedBlob,
    current: AgencyRecord | None,
    possession: bytes,
    broker_key: bytes,
    *,
    region: str,
    sequence: int = 0,
    limits: DirectoryLimits = DEFAULT_LIMITS,
) -> AgencyRecord:
    """Validate an incoming statement against the agency's current record; return the new record.

    The broker calls this before :func:`append` (DESIGN.md section 5), with ``current`` the
    agency's latest record (``None`` if it never enrolled), ``region`` the broker's region and
    ``sequence`` the sequence it will append at (0 if not yet known). It applies exactly the
    rules nodes apply in :func:`verify_extension` and :func:`apply_to_pins`, so a log the broker
    accepts is a log nodes accept. The servicer still checks what only it knows: that an ENROL's
    ``agency_id`` and region are those its token was bound to, and who may revoke whom.

    Raises, by rule:
      InvalidInput  malformed or oversized body, a key of the wrong length, unknown service, a
                    region other than ``region``, fields not allowed for the kind
      BadSignature  the statement signature does not verify; an ENROL not self-signed; a REVOKE
                    not signed by the broker; a ROTATE without a valid possession signature
      KeyChanged    a ROTATE not signed by, or not naming, the current key; a replayed rotation
      Conflict      an ENROL for an agency already enrolled
      Refused       any statement about a revoked agency (a revoked id never comes back)
      NotFound      a ROTATE or REVOKE for an agency that never enrolled
    """
    broker_key = _check_key(broker_key, "broker_key")
    region = check_agency_id(region, "region", limits)
    if not isinstance(possession, bytes):
        raise InvalidInput("the possession signature must be bytes (empty if not a ROTATE)")
    statement = _parse_statement(statement_blob, limits)
    if statement.region != region:
        raise InvalidInput(
            f"the statement is for region {statement.region!r}; this broker serves {region!r}"
        )
    _check_authority(statement, statement_blob.body, possession, broker_key)
    agency_id = statement.agency_id
    if current is not None and current.agency_id != agency_id:
        raise InvalidInput(
            f"the statement is about agency {agency_id} but the record given is {current.agency_id}"
        )
    if current is not None and current.revoked:
        raise Refused(
            f"agency {agency_id} was revoked; a revoked agency cannot enrol, rotate or be revoked "
            "again",
            hint="enrol the agency under a new agency id with a new token",
        )
    if statement.kind is EntryKind.ENROL and current is not None:
        raise Conflict(
            f"agency {agency_id} is already enrolled; new keys need a ROTATE signed by its "
            "current key"
        )
    if statement.kind is not EntryKind.ENROL and current is None:
        raise NotFound(f"agency {agency_id} is not enrolled in this directory")
    return _transition(current, statement, sequence)


def append(
    broker: Identity,
    prev_chain: bytes,
    sequence: int,
    statement: common_pb.SignedBlob,
    possession: bytes,
    now: datetime,
) -> tuple[common_pb.SignedBlob, bytes]:
    """Wrap a checked statement in LogEntry ``sequence`` and sign it; return it and chain(sequence).

    ``prev_chain`` is chain(sequence - 1) (:data:`GENESIS_CHAIN` for sequence 1). The statement is
    copied byte for byte; call :func:`check_statement` first. The new chain value is computed
    from the exact signed body (directory.proto header).
    """
    _check_chain(prev_chain, "previous chain value")
    if not isinstance(sequence, int) or not 1 <= sequence < 1 << 63:
        raise InvalidInput("a log entry's sequence starts at 1")
    if not isinstance(statement, common_pb.SignedBlob) or not statement.body:
        raise InvalidInput("append needs the statement as a SignedBlob")
    if not isinstance(possession, bytes):
        raise InvalidInput("the possession signature must be bytes (empty if not a ROTATE)")
    entry = directory_pb.LogEntry(
        sequence=sequence, possession_signature=possession, previous_chain=prev_chain
    )
    entry.statement.CopyFrom(statement)
    entry.logged_at.CopyFrom(to_timestamp(now, "now"))
    body = entry.SerializeToString(deterministic=True)
    blob = sign_blob(broker, crypto.LABEL_DIRECTORY_ENTRY, body)
    return blob, next_chain(prev_chain, leaf_hash(body))


def sign_head(
    broker: Identity, region: str, size: int, chain: bytes, now: datetime
) -> common_pb.SignedBlob:
    """The broker's signed LogHead: ``chain`` must be chain(``size``) (directory.proto header)."""
    _check_chain(chain, "chain value")
    if not isinstance(size, int) or not 0 <= size < 1 << 63:
        raise InvalidInput("a log size is a non-negative integer")
    if size == 0 and chain != GENESIS_CHAIN:
        raise InvalidInput("the head of an empty log must carry chain(0), 32 zero bytes")
    head = directory_pb.LogHead(
        region=check_agency_id(region, "region", DEFAULT_LIMITS), size=size, chain=chain
    )
    head.signed_at.CopyFrom(to_timestamp(now, "now"))
    return sign_blob(
        broker, crypto.LABEL_DIRECTORY_HEAD, head.SerializeToString(deterministic=True)
    )


# --- node side: verifying heads, entries and extensions --------------------------------------


def verify_head(
    head_blob: common_pb.SignedBlob,
    broker_key: bytes,
    region: str,
    *,
    limits: DirectoryLimits = DEFAULT_LIMITS,
) -> VerifiedHead:
    """Verify a broker-signed LogHead against the pinned broker key and the node's region.

    BadDirectoryData if it is not signed by ``broker_key`` under tessera/v1/directory-head, is
    malformed, or names another region. Freshness is not judged here: a broker can always show
    an old head (a freeze); callers may compare ``signed_at`` with their clock.
    """
    broker_key = _check_key(broker_key, "broker_key")
    region = check_agency_id(region, "region", limits)
    try:
        body = _verified_body(
            head_blob, "head", broker_key, crypto.LABEL_DIRECTORY_HEAD, limits.max_head_bytes
        )
        head = directory_pb.LogHead()
        _parse(head, body, "head")
        if head.region != region:
            raise InvalidInput(f"it is the head of region {head.region!r}, not {region!r}")
        chain = _check_chain(head.chain, "head chain value")
        if head.size >= 1 << 63:
            raise InvalidInput("its size is out of range")
        if head.size == 0 and chain != GENESIS_CHAIN:
            raise InvalidInput("an empty log's head must carry chain(0), 32 zero bytes")
        if not head.HasField("signed_at"):
            raise InvalidInput("signed_at is missing")
        signed_at = to_datetime(head.signed_at, "signed_at")
    except (InvalidInput, BadSignature) as exc:
        raise BadDirectoryData(f"the directory head does not verify: {exc.message}") from exc
    return VerifiedHead(region=region, size=head.size, chain=chain, signed_at=signed_at)


def verify_entry(
    entry_blob: common_pb.SignedBlob,
    broker_key: bytes,
    region: str,
    *,
    limits: DirectoryLimits = DEFAULT_LIMITS,
) -> VerifiedEntry:
    """Verify one broker-signed LogEntry in isolation (e.g. from GetAgency).

    Checks the broker signature, the statement's signature and that its signer is the one its
    kind requires (ENROL: its own new key; ROTATE: the previous key it names, plus the new key's
    possession signature; REVOKE: the broker), and the region. It does not check the entry's
    place in the log: :func:`verify_extension` links it to a verified head, and
    :func:`apply_to_pins` checks it against the pinned keys. Raises BadDirectoryData.
    """
    return _verify_entry(
        entry_blob,
        _check_key(broker_key, "broker_key"),
        check_agency_id(region, "region", limits),
        limits,
        None,
    )


def verify_extension(
    broker_key: bytes,
    region: str,
    known_size: int,
    known_chain: bytes,
    entries: Sequence[common_pb.SignedBlob],
    head_blob: common_pb.SignedBlob,
    *,
    limits: DirectoryLimits = DEFAULT_LIMITS,
) -> tuple[VerifiedHead, list[VerifiedEntry]]:
    """Verify that ``entries`` extend the node's verified log to the broker-signed ``head_blob``.

    ``known_size`` and ``known_chain`` are the size and chain value of the last head this node
    verified (0 and :data:`GENESIS_CHAIN` for a new node); ``entries`` must be the LogEntry blobs
    with sequences known_size+1 .. head size, in order (GetEntries, paged as needed). Following
    the directory.proto header, this checks the head (:func:`verify_head`); every entry on its own
    (:func:`verify_entry`); that sequences run on from known_size+1 without gaps; that each
    entry's previous_chain is the chain value recomputed so far (the first must equal
    ``known_chain``); and that the chain recomputed over the entries' exact bodies equals the
    head's chain at the head's size. The node then stores the returned head and calls
    :func:`apply_to_pins` with the returned entries; if anything raises, it keeps what it had.

    Raises:
      BadDirectoryData       the head or an entry does not verify (``sequence`` names which)
      DirectoryInconsistent  the head is smaller than ``known_size`` (truncated or rolled back);
                             the entries have gaps, repeats, a wrong order, or go past the head;
                             an entry does not link to the chain value before it; or the chain
                             does not recompute to the head's (a fork: history was rewritten)
      InvalidInput           fewer entries than the head commits to (fetch the rest first)
    """
    broker_key = _check_key(broker_key, "broker_key")
    region = check_agency_id(region, "region", limits)
    known_size, known_chain = _check_known(known_size, known_chain)
    head = verify_head(head_blob, broker_key, region, limits=limits)
    _check_not_behind(head, known_size)
    expected_count = head.size - known_size
    if len(entries) > expected_count:
        raise DirectoryInconsistent(
            f"the broker sent {len(entries)} entries after sequence {known_size}, but its head "
            f"has size {head.size}: entries beyond the signed head",
            sequence=head.size + 1,
        )
    chain = known_chain
    verified: list[VerifiedEntry] = []
    for offset, blob in enumerate(entries):
        expected = known_size + 1 + offset
        entry = _verify_entry(blob, broker_key, region, limits, expected)
        if entry.sequence != expected:
            raise DirectoryInconsistent(
                f"expected log entry {expected} but the broker sent entry {entry.sequence}: "
                "entries are missing, repeated or out of order",
                sequence=expected,
            )
        if entry.previous_chain != chain:
            raise DirectoryInconsistent(
                f"log entry {expected} does not extend the log this node verified: its "
                f"previous chain value differs from chain({expected - 1}) (history rewritten)",
                sequence=expected,
            )
        chain = entry.chain
        verified.append(entry)
    if len(entries) < expected_count:
        last = known_size + len(entries)
        raise InvalidInput(
            f"the entries stop at sequence {last} but the head has size {head.size}",
            hint=f"fetch the remaining entries (GetEntries since={last}) and verify them together",
        )
    _check_chain_matches(chain, head)
    return head, verified


def verify_consistency(
    known_size: int,
    known_chain: bytes,
    leaf_hashes: Sequence[bytes],
    head: VerifiedHead,
) -> VerifiedHead:
    """Check that a verified head extends the node's known log, from leaf hashes (GetConsistency).

    ``leaf_hashes`` are leaf(n) for n = known_size+1 .. head.size; chain(head.size) is recomputed
    from the node's own ``known_chain`` (directory.proto header, GetConsistencyResponse) and must
    equal ``head.chain``. ``head`` comes from :func:`verify_head`. Returns ``head`` for storing.
    This proves the log was extended, not rewritten; it does not reveal the new entries, so pins
    stay as they are until the node fetches them (:func:`verify_extension`).

    Raises DirectoryInconsistent for a smaller head, a wrong number of leaf hashes, or a chain
    that does not recompute (fork); InvalidInput for a leaf hash of the wrong length.
    """
    known_size, known_chain = _check_known(known_size, known_chain)
    if not isinstance(head, VerifiedHead):
        raise InvalidInput("verify_consistency needs a head checked by verify_head")
    _check_not_behind(head, known_size)
    if len(leaf_hashes) != head.size - known_size:
        raise DirectoryInconsistent(
            f"the broker sent {len(leaf_hashes)} leaf hashes from size {known_size} to a head of "
            f"size {head.size}; exactly {head.size - known_size} are needed",
            sequence=known_size + 1,
        )
    chain = known_chain
    for leaf in leaf_hashes:
        chain = next_chain(chain, leaf)
    _check_chain_matches(chain, head)
    return head


def apply_to_pins(
    pins: Mapping[str, AgencyRecord], new_records: Iterable[VerifiedEntry]
) -> dict[str, AgencyRecord]:
    """Apply verified entries, in log order, to the node's pinned records; return the new pins.

    ``pins`` maps agency id to record and must have been built from the whole log from sequence
    1 (a node syncs from size 0 once, then extends). ``pins`` is not modified; on any error none
    of ``new_records`` is applied. Rules (DESIGN.md section 5, directory.proto header):

    - ENROL pins the agency's keys at first sight. An ENROL for an id already pinned, revoked or
      not, raises KeyChanged: keys change only by ROTATE, and a revoked id never comes back.
    - ROTATE replaces the keys only if its ``previous_signing_key`` (which signed it, checked by
      :func:`verify_entry`) is the pinned signing key, the agency is not revoked, and it was made
      no earlier than the pinned record's ``valid_from`` (a replayed old rotation); otherwise
      KeyChanged.
    - REVOKE (broker-signed) marks the pinned record revoked, keeping its keys; it must name the
      pinned signing key (KeyChanged otherwise) and cannot target an already revoked agency.
    - A ROTATE or REVOKE for an id never pinned, an entry at or before the pinned record's
      sequence, or a region change raises DirectoryInconsistent.
    """
    updated = dict(pins)
    for entry in new_records:
        if not isinstance(entry, VerifiedEntry):
            raise InvalidInput("apply_to_pins takes entries returned by verify_extension")
        agency_id = entry.statement.agency_id
        current = updated.get(agency_id)
        if current is not None and entry.sequence <= current.sequence:
            raise DirectoryInconsistent(
                f"log entry {entry.sequence} about agency {agency_id} is not newer than the pinned "
                f"record (sequence {current.sequence}): entries applied twice or out of order",
                sequence=entry.sequence,
            )
        updated[agency_id] = _transition(current, entry.statement, entry.sequence)
    return updated


# --- the rules shared by broker and nodes ---------------------------------------------------


def _check_authority(
    statement: AgencyStatement, body: bytes, possession: bytes, broker_key: bytes
) -> None:
    """Who may sign each kind (directory.proto EntryKind) and the ROTATE possession proof."""
    kind = statement.kind
    if kind is EntryKind.ENROL:
        if statement.signer != _new_identity(statement).signing_key:
            raise BadSignature(
                f"an ENROL statement must be self-signed by the signing key it enrols; this one "
                f"is signed by {short_key(statement.signer)}"
            )
    elif kind is EntryKind.ROTATE:
        if statement.signer != statement.previous_signing_key:
            raise KeyChanged(
                f"a ROTATE statement must be signed by the key it replaces "
                f"({short_key(statement.previous_signing_key or b'')}); this one is signed by "
                f"{short_key(statement.signer)}"
            )
        if not possession:
            raise BadSignature("a ROTATE needs a possession signature by the new signing key")
        try:
            crypto.verify(_new_identity(statement), POSSESSION_LABEL, body, possession)
        except BadSignature:
            raise BadSignature(
                "the possession signature does not verify under the new signing key"
            ) from None
    elif statement.signer != broker_key:
        raise BadSignature(
            f"a REVOKE statement must be signed by the broker; this one is signed by "
            f"{short_key(statement.signer)}"
        )
    if kind is not EntryKind.ROTATE and possession:
        raise InvalidInput(f"only a ROTATE carries a possession signature, not an {kind.name}")


def _transition(
    current: AgencyRecord | None, statement: AgencyStatement, sequence: int
) -> AgencyRecord:
    """The record after ``statement``; the one state machine both broker and nodes run."""
    agency_id = statement.agency_id
    kind = statement.kind
    if kind is EntryKind.ENROL:
        if current is not None:
            state = "was revoked" if current.revoked else "is already enrolled"
            raise KeyChanged(
                f"agency {agency_id} {state} (sequence {current.sequence}) with key "
                f"{short_key(current.identity.signing_key)}; an ENROL cannot replace its keys",
                sequence=sequence,
            )
        return AgencyRecord(
            agency_id=agency_id,
            name=statement.name,
            region=statement.region,
            services=statement.services,
            identity=_new_identity(statement),
            valid_from=statement.valid_from,
            valid_until=statement.valid_until,
            revoked=False,
            sequence=sequence,
        )
    if current is None:
        raise DirectoryInconsistent(
            f"a {kind.name} for agency {agency_id}, which never enrolled in this log",
            sequence=sequence,
        )
    if current.revoked:
        raise KeyChanged(
            f"agency {agency_id} was revoked (sequence {current.sequence}); its keys can no "
            f"longer change (a {kind.name} was refused)",
            sequence=sequence,
        )
    if statement.region != current.region:
        raise DirectoryInconsistent(
            f"a {kind.name} moves agency {agency_id} from region {current.region!r} to "
            f"{statement.region!r}",
            sequence=sequence,
        )
    pinned = current.identity.signing_key
    if statement.previous_signing_key != pinned:
        raise KeyChanged(
            f"a {kind.name} for agency {agency_id} names previous key "
            f"{short_key(statement.previous_signing_key or b'')}, not its current key "
            f"{short_key(pinned)}",
            sequence=sequence,
        )
    if kind is EntryKind.REVOKE:
        return replace(current, valid_until=statement.valid_until, revoked=True, sequence=sequence)
    if statement.created_at < current.valid_from:
        raise KeyChanged(
            f"a ROTATE for agency {agency_id} made at {statement.created_at.isoformat()} is older "
            f"than the record it would replace (valid from {current.valid_from.isoformat()}): a "
            "replayed rotation",
            sequence=sequence,
        )
    return AgencyRecord(
        agency_id=agency_id,
        name=statement.name,
        region=statement.region,
        services=statement.services,
        identity=_new_identity(statement),
        valid_from=statement.valid_from,
        valid_until=statement.valid_until,
        revoked=False,
        sequence=sequence,
    )


def _new_identity(statement: AgencyStatement) -> PublicIdentity:
    """The keys an ENROL or ROTATE statement introduces (always present after parsing)."""
    if statement.identity is None:
        raise InvalidInput(f"a {statement.kind.name} statement must carry the agency's keys")
    return statement.identity


# --- parsing and checking wire data ---------------------------------------------------------


def _parse_statement(blob: common_pb.SignedBlob, limits: DirectoryLimits) -> AgencyStatement:
    """Verify a statement's signature under its stated signer, then parse and check its fields.

    InvalidInput for anything malformed; BadSignature if the signature does not verify.
    """
    if not isinstance(blob, common_pb.SignedBlob):
        raise InvalidInput("a statement must be a SignedBlob")
    body = blob.body
    if not body or len(body) > limits.max_statement_bytes:
        raise InvalidInput(f"a statement body must be 1 to {limits.max_statement_bytes} bytes")
    signer = _check_key(blob.signer, "the statement's signer")
    try:
        crypto.verify(signer, crypto.LABEL_KEY_ROTATION, body, blob.signature)
    except BadSignature:
        raise BadSignature(
            f"the statement's signature does not verify under its signer {short_key(signer)}"
        ) from None
    message = directory_pb.DirectoryEntry()
    _parse(message, body, "statement")
    try:
        kind = EntryKind(message.kind)
    except ValueError:
        raise InvalidInput(f"unknown or unset entry kind {message.kind}") from None
    if not message.HasField("created_at"):
        raise InvalidInput("the statement's created_at is missing")
    valid_from, valid_until = _validity(message)
    identity, previous, reason = _statement_keys(message, kind, limits)
    return AgencyStatement(
        kind=kind,
        agency_id=check_agency_id(message.agency_id, "agency_id", limits),
        name=check_text(message.name, "name", limits.max_name_chars, required=True),
        region=check_agency_id(message.region, "region", limits),
        services=_services_from_wire(message.services, limits),
        identity=identity,
        previous_signing_key=previous,
        valid_from=valid_from,
        valid_until=valid_until,
        reason=reason,
        created_at=to_datetime(message.created_at, "created_at"),
        signer=signer,
    )


def _validity(message: directory_pb.DirectoryEntry) -> tuple[datetime, datetime | None]:
    """A statement's valid_from (required) and valid_until (unset: until rotated or revoked)."""
    if not message.HasField("valid_from"):
        raise InvalidInput("the statement's valid_from is missing")
    valid_from = to_datetime(message.valid_from, "valid_from")
    if not message.HasField("valid_until"):
        return valid_from, None
    valid_until = to_datetime(message.valid_until, "valid_until")
    if valid_until < valid_from:
        raise InvalidInput("the statement's valid_until is before its valid_from")
    return valid_from, valid_until


def _statement_keys(
    message: directory_pb.DirectoryEntry, kind: EntryKind, limits: DirectoryLimits
) -> tuple[PublicIdentity | None, bytes | None, str]:
    """The fields that depend on the kind (directory.proto DirectoryEntry): new keys (32 bytes
    each; none in a REVOKE), previous_signing_key (none in an ENROL), reason (REVOKE only)."""
    identity: PublicIdentity | None = None
    reason = ""
    if kind is EntryKind.REVOKE:
        if message.signing_key or message.encryption_key:
            raise InvalidInput("a REVOKE statement carries no keys")
        reason = check_text(message.reason, "reason", limits.max_reason_chars, required=False)
    else:
        identity = PublicIdentity(
            _check_key(message.signing_key, "signing_key"),
            _check_key(message.encryption_key, "encryption_key"),
        )
        if message.reason:
            raise InvalidInput("only a REVOKE statement carries a reason")
    if kind is EntryKind.ENROL:
        if message.previous_signing_key:
            raise InvalidInput("an ENROL statement has no previous_signing_key")
        return identity, None, reason
    return identity, _check_key(message.previous_signing_key, "previous_signing_key"), reason


def _verify_entry(
    blob: common_pb.SignedBlob,
    broker_key: bytes,
    region: str,
    limits: DirectoryLimits,
    position: int | None,
) -> VerifiedEntry:
    sequence = position
    try:
        body = _verified_body(
            blob, "log entry", broker_key, crypto.LABEL_DIRECTORY_ENTRY, limits.max_entry_bytes
        )
        entry = directory_pb.LogEntry()
        _parse(entry, body, "log entry")
        if sequence is None:
            sequence = entry.sequence
        if not 1 <= entry.sequence < 1 << 63:
            raise InvalidInput("its sequence is out of range (sequences start at 1)")
        previous_chain = _check_chain(entry.previous_chain, "previous_chain")
        if not entry.HasField("logged_at"):
            raise InvalidInput("logged_at is missing")
        logged_at = to_datetime(entry.logged_at, "logged_at")
        if not entry.HasField("statement"):
            raise InvalidInput("it carries no statement")
        statement = _parse_statement(entry.statement, limits)
        if statement.region != region:
            raise InvalidInput(f"its statement is for region {statement.region!r}, not {region!r}")
        _check_authority(statement, entry.statement.body, entry.possession_signature, broker_key)
    except (InvalidInput, BadSignature, KeyChanged) as exc:
        where = f"log entry {sequence}" if sequence is not None else "a log entry"
        raise BadDirectoryData(
            f"{where} does not verify: {exc.message}", sequence=sequence
        ) from exc
    leaf = leaf_hash(body)
    return VerifiedEntry(
        sequence=entry.sequence,
        statement=statement,
        logged_at=logged_at,
        previous_chain=previous_chain,
        leaf=leaf,
        chain=next_chain(previous_chain, leaf),
    )


def _verified_body(
    blob: common_pb.SignedBlob, what: str, broker_key: bytes, label: bytes, max_bytes: int
) -> bytes:
    """The body of a broker-signed blob, after checking it is the pinned broker's signature."""
    if not isinstance(blob, common_pb.SignedBlob):
        raise InvalidInput(f"a {what} must be a SignedBlob")
    if not blob.body or len(blob.body) > max_bytes:
        raise InvalidInput(f"its body must be 1 to {max_bytes} bytes")
    if blob.signer != broker_key:
        raise BadSignature(
            f"it is signed by key {short_key(blob.signer)}, not the pinned broker key "
            f"{short_key(broker_key)}"
        )
    try:
        crypto.verify(broker_key, label, blob.body, blob.signature)
    except BadSignature:
        raise BadSignature(f"the broker's signature on this {what} does not verify") from None
    return blob.body


def _check_not_behind(head: VerifiedHead, known_size: int) -> None:
    if head.size < known_size:
        raise DirectoryInconsistent(
            f"the broker's head has size {head.size}, smaller than the {known_size} entries this "
            "node already verified: the log was truncated or rolled back",
            sequence=head.size + 1,
        )


def _check_chain_matches(chain: bytes, head: VerifiedHead) -> None:
    if chain != head.chain:
        raise DirectoryInconsistent(
            f"chain({head.size}) recomputed from this node's verified log differs from the "
            "broker's signed head: the log has been rewritten (fork)",
            sequence=head.size,
        )


def _check_known(known_size: int, known_chain: bytes) -> tuple[int, bytes]:
    if not isinstance(known_size, int) or known_size < 0:
        raise InvalidInput("the known log size is a non-negative integer")
    _check_chain(known_chain, "known chain value")
    if known_size == 0 and known_chain != GENESIS_CHAIN:
        raise InvalidInput("the chain value of an empty log is chain(0), 32 zero bytes")
    return known_size, known_chain


def _parse(
    message: directory_pb.DirectoryEntry | directory_pb.LogEntry | directory_pb.LogHead,
    body: bytes,
    what: str,
) -> None:
    try:
        message.ParseFromString(body)
    except DecodeError:
        raise InvalidInput(f"the {what} body is not a valid protobuf message") from None


def _check_key(value: bytes, name: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != crypto.KEY_BYTES:
        got = len(value) if isinstance(value, bytes) else type(value).__name__
        raise InvalidInput(f"{name} must be {crypto.KEY_BYTES} bytes (got {got})")
    return value


def _check_chain(value: bytes, name: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != CHAIN_BYTES:
        raise InvalidInput(f"a {name} must be {CHAIN_BYTES} bytes")
    return value


def check_agency_id(value: str, name: str, limits: DirectoryLimits) -> str:
    """``value`` if it is a well-formed agency (or case) id under ``limits``; InvalidInput naming
    ``name`` otherwise. Used wherever an agency id is read from outside."""
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= limits.max_id_chars
        or _ID_PATTERN.fullmatch(value) is None
    ):
        raise InvalidInput(
            f"{name} must be 1 to {limits.max_id_chars} ASCII letters, digits or ._:@- "
            "starting with a letter or digit"
        )
    return value


def check_text(value: str, name: str, max_chars: int, *, required: bool) -> str:
    """``value`` if it is display text a person may safely be shown (bounded, no control or
    format characters such as a right-to-left override); InvalidInput naming ``name``."""
    if not isinstance(value, str) or len(value) > max_chars:
        raise InvalidInput(f"{name} must be text of at most {max_chars} characters")
    if required and not value.strip():
        raise InvalidInput(f"{name} is required")
    if any(unicodedata.category(char) in _FORBIDDEN_TEXT_CATEGORIES for char in value):
        raise InvalidInput(f"{name} contains control or formatting characters")
    return value


def _services_to_wire(codes: Iterable[str]) -> list[common_pb.NeedCategory.ValueType]:
    if isinstance(codes, str):
        raise InvalidInput("services must be a list of NEEDS.md codes, not one string")
    values: set[int] = set()
    for code in codes:
        value = _SERVICE_VALUES.get(code) if isinstance(code, str) else None
        if value is None:
            raise InvalidInput(
                f"unknown service {code!r}", hint=f"one of: {', '.join(_SERVICE_VALUES)}"
            )
        if value in values:
            raise InvalidInput(f"service {code!r} is listed twice")
        values.add(value)
    return [common_pb.NeedCategory.ValueType(value) for value in sorted(values)]


def _services_from_wire(values: Iterable[int], limits: DirectoryLimits) -> tuple[str, ...]:
    """NEEDS.md codes, after checking ascending order without duplicates (directory.proto).

    A value this version does not know (added by a later tessera.v1) is skipped, not refused,
    so that adding a category does not stop older nodes from syncing the directory.
    """
    values = list(values)
    if len(values) > limits.max_services:
        raise InvalidInput(f"a statement lists at most {limits.max_services} services")
    if any(value <= common_pb.NEED_CATEGORY_UNSPECIFIED for value in values):
        raise InvalidInput("a statement's services may not include an unset category")
    if any(later <= earlier for earlier, later in itertools.pairwise(values)):
        raise InvalidInput("a statement's services must be in ascending order without duplicates")
    return tuple(_SERVICE_CODES[value] for value in values if value in _SERVICE_CODES)


def sign_blob(signer: Identity, label: bytes, body: bytes) -> common_pb.SignedBlob:
    """``body`` as a SignedBlob signed by ``signer`` under ``label`` (common.proto, rule 2)."""
    return common_pb.SignedBlob(
        body=body, signature=signer.sign(label, body), signer=signer.public.signing_key
    )


def short_key(key: bytes) -> str:
    """A short, unambiguous-enough rendering of a public key for error messages."""
    return key[:8].hex() + "…" if key else "(none)"
