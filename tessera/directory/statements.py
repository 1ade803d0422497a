"""Agency statements (``DirectoryEntry`` in a ``SignedBlob``): making ENROL, ROTATE and REVOKE
statements, and parsing one after its signature verified under its stated signer.

Whether the signer is the one the statement's kind requires is :mod:`tessera.directory.rules`.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from tessera import crypto, labels
from tessera.crypto import Identity, PublicIdentity
from tessera.directory.fields import (
    DEFAULT_LIMITS,
    POSSESSION_LABEL,
    DirectoryLimits,
    check_agency_id,
    check_key,
    check_text,
    parse_body,
    services_from_wire,
    services_to_wire,
    short_key,
    sign_blob,
)
from tessera.directory.model import AgencyRecord, AgencyStatement, EntryKind
from tessera.errors import BadSignature, InvalidInput, Refused
from tessera.timestamps import require_aware, to_datetime, to_timestamp
from tessera.v1 import common_pb2 as common_pb
from tessera.v1 import directory_pb2 as directory_pb

# --- agency side: making statements (DESIGN.md section 5) -------------------------------------


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
        services=services_to_wire(services),
        signing_key=identity.public.signing_key,
        encryption_key=identity.public.encryption_key,
    )
    message.valid_from.CopyFrom(to_timestamp(now, "now"))
    message.created_at.CopyFrom(to_timestamp(now, "now"))
    return sign_blob(
        identity, labels.LABEL_KEY_ROTATION, message.SerializeToString(deterministic=True)
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
        services=services_to_wire(current.services if services is None else services),
        signing_key=new.public.signing_key,
        encryption_key=new.public.encryption_key,
        previous_signing_key=old.public.signing_key,
    )
    message.valid_from.CopyFrom(to_timestamp(now, "now"))
    message.created_at.CopyFrom(to_timestamp(now, "now"))
    body = message.SerializeToString(deterministic=True)
    return sign_blob(old, labels.LABEL_KEY_ROTATION, body), new.sign(POSSESSION_LABEL, body)


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
        services=services_to_wire(current.services),
        previous_signing_key=current.identity.signing_key,
        reason=check_text(reason, "reason", limits.max_reason_chars, required=False),
    )
    message.valid_from.CopyFrom(to_timestamp(current.valid_from, "valid_from"))
    message.valid_until.CopyFrom(
        to_timestamp(max(require_aware(now, "now"), current.valid_from), "now")
    )
    message.created_at.CopyFrom(to_timestamp(now, "now"))
    return sign_blob(
        broker, labels.LABEL_KEY_ROTATION, message.SerializeToString(deterministic=True)
    )


# --- parsing a statement ----------------------------------------------------------------------


def parse_statement(blob: common_pb.SignedBlob, limits: DirectoryLimits) -> AgencyStatement:
    """Verify a statement's signature under its stated signer, then parse and check its fields.

    InvalidInput for anything malformed; BadSignature if the signature does not verify.
    """
    if not isinstance(blob, common_pb.SignedBlob):
        raise InvalidInput("a statement must be a SignedBlob")
    body = blob.body
    if not body or len(body) > limits.max_statement_bytes:
        raise InvalidInput(f"a statement body must be 1 to {limits.max_statement_bytes} bytes")
    signer = check_key(blob.signer, "the statement's signer")
    try:
        crypto.verify(signer, labels.LABEL_KEY_ROTATION, body, blob.signature)
    except BadSignature:
        raise BadSignature(
            f"the statement's signature does not verify under its signer {short_key(signer)}"
        ) from None
    message = directory_pb.DirectoryEntry()
    parse_body(message, body, "statement")
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
        services=services_from_wire(message.services, limits),
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
            check_key(message.signing_key, "signing_key"),
            check_key(message.encryption_key, "encryption_key"),
        )
        if message.reason:
            raise InvalidInput("only a REVOKE statement carries a reason")
    if kind is EntryKind.ENROL:
        if message.previous_signing_key:
            raise InvalidInput("an ENROL statement has no previous_signing_key")
        return identity, None, reason
    return identity, check_key(message.previous_signing_key, "previous_signing_key"), reason
