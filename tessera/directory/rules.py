"""The rules broker and nodes share: who may sign each kind of statement, the one state machine
an agency's record follows, the broker's check of an incoming statement and a node's pins.

The broker runs :func:`check_statement` before appending and every node runs
:func:`apply_to_pins` on what it verified, over the same :func:`_transition`, so a log the broker
accepts is a log nodes accept (DESIGN.md section 5).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

from tessera import crypto
from tessera.crypto import PublicIdentity
from tessera.directory.fields import (
    DEFAULT_LIMITS,
    POSSESSION_LABEL,
    DirectoryLimits,
    check_agency_id,
    check_key,
    short_key,
)
from tessera.directory.model import (
    AgencyRecord,
    AgencyStatement,
    DirectoryInconsistent,
    EntryKind,
    KeyChanged,
    VerifiedEntry,
)
from tessera.directory.statements import parse_statement
from tessera.errors import BadSignature, Conflict, InvalidInput, NotFound, Refused
from tessera.v1 import common_pb2 as common_pb

# --- broker side: checking an incoming statement; node side: the pins -------------------------


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
    broker_key = check_key(broker_key, "broker_key")
    region = check_agency_id(region, "region", limits)
    if not isinstance(possession, bytes):
        raise InvalidInput("the possession signature must be bytes (empty if not a ROTATE)")
    statement = parse_statement(statement_blob, limits)
    if statement.region != region:
        raise InvalidInput(
            f"the statement is for region {statement.region!r}; this broker serves {region!r}"
        )
    check_authority(statement, statement_blob.body, possession, broker_key)
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


# --- the rules shared by broker and nodes -----------------------------------------------------


def check_authority(
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
