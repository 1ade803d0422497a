"""The plaintext inside sealed envelopes between agencies: build it, seal it, open it, check it.

Implements DESIGN.md sections 5 ("Envelopes: a referral (or a status update, or a revocation) is
signed by the sending agency and then sealed to the receiving agency's X25519 key") and 6 (the
consent-gated, closed-loop referral), exactly as ``proto/tessera/v1/referral.proto`` specifies:

- the content is an ``EnvelopeContent`` whose ``payload`` oneof holds one ``Referral``,
  ``StatusUpdate``, ``Revocation`` or ``PurgeConfirmation``;
- it is sealed with :func:`tessera.crypto.seal` under ``tessera/v1/envelope`` for a Referral and
  ``tessera/v1/status`` for the three other kinds;
- the recipient opens it with the key it has pinned for the sender, trying the envelope label and
  then the status label, refuses a payload whose kind does not match the label that verified,
  checks that the sender and recipient ids inside name the sender and itself, and only then acts
  on it; for a Referral it also verifies the embedded consent receipt (``node.consent``) and that
  every field carried is one the receipt covers.

Everything here is pure: bytes and domain objects in, sealed bytes or frozen results out; no
database, no network, no clock (``now`` is a parameter), no random ids (callers choose them).
The builders refuse what the opener would refuse, so a node never sends what its peer must drop.
What the caller must still do with state (deduplicate message ids, match a status to a referral
it sent, apply statuses only forwards) is listed in docs/referrals.md.

The vocabulary (limits, kinds and labels, what opening returns) lives in ``node.envelope_types``
and is re-exported here; the checks shared with ``node.consent`` live in ``node.referral_checks``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from types import MappingProxyType
from typing import TypeAlias, TypedDict

from google.protobuf.message import DecodeError

from node import serde
from node.consent import (
    ConsentRefused,
    Refusal,
    VerifiedReceipt,
    verify_receipt,
)
from node.envelope_types import (
    DEFAULT_LIMITS,
    SEAL_OVERHEAD,
    EnvelopeKind,
    EnvelopeLimits,
    OpenedEnvelope,
    ReceivedPurgeConfirmation,
    ReceivedReferral,
    ReceivedRevocation,
    ReceivedStatus,
    label_for,
)
from node.htcds.catalogue import FIELD_CATEGORY
from node.referral_checks import (
    FIELD_ORDER,
    check_purpose,
    check_trusted,
    check_uuid,
    field_list,
    member,
)
from node.referrals.model import DeclineReason, ReferralStatus, check_decline
from tessera import crypto, labels
from tessera.crypto import Identity
from tessera.directory import AgencyRecord
from tessera.errors import BadSignature, InvalidInput, Refused, WrongRecipient
from tessera.needs import NeedCategory
from tessera.timestamps import require_aware, to_datetime, to_timestamp
from tessera.v1 import common_pb2 as common_pb
from tessera.v1 import referral_pb2 as referral_pb

__all__ = [
    "DEFAULT_LIMITS",
    "DeclineReason",
    "EnvelopeKind",
    "EnvelopeLimits",
    "OpenedEnvelope",
    "ReceivedPurgeConfirmation",
    "ReceivedReferral",
    "ReceivedRevocation",
    "ReceivedStatus",
    "ReferralStatus",
    "label_for",
    "open_envelope",
    "purge_confirmation_envelope",
    "referral_envelope",
    "revocation_envelope",
    "status_envelope",
]


# What each EnvelopeKind carries on the wire, in the same order.
_Payload: TypeAlias = (
    referral_pb.Referral
    | referral_pb.StatusUpdate
    | referral_pb.Revocation
    | referral_pb.PurgeConfirmation
)


# --- builders (the sending side) ------------------------------------------------------------


def referral_envelope(
    sender: Identity,
    sender_id: str,
    recipient: AgencyRecord,
    referral_id: str,
    need: NeedCategory,
    fields: Mapping[str, str],
    note: str,
    receipt_blob: common_pb.SignedBlob,
    now: datetime,
    message_id: str,
    *,
    sender_contact: str = "",
    limits: EnvelopeLimits = DEFAULT_LIMITS,
) -> bytes:
    """A Referral sealed to ``recipient`` under ``tessera/v1/envelope``.

    Before anything is serialised, the receipt is verified exactly as the recipient will verify
    it (signed by ``sender``, naming ``sender_id`` and the recipient, valid at ``now``, purpose =
    ``need``) and every field must be one it covers (DESIGN.md section 6: only consented fields
    are ever serialised); ConsentRefused otherwise. Fields travel in HTCDS column order; empty
    values are left out. Whether the *consent* is still unrevoked is the caller's check
    (``node.consent.check_covers``); the receipt cannot say.
    """
    _check_parties(sender, sender_id, recipient, now, limits)
    need = check_purpose(need)
    receipt = verify_receipt(
        receipt_blob, sender.public, sender_id, recipient.agency_id, now, expected_purpose=need
    )
    wire_fields = _fields_for_wire(fields, receipt, limits)
    referral = referral_pb.Referral(
        referral_id=check_uuid(referral_id, "referral_id"),
        need=serde.need_category_pb(need),
        fields=wire_fields,
        note=_check_text(note, "note", limits.max_note_chars),
        consent_receipt=receipt.to_blob(),
        sender_contact=_check_text(sender_contact, "sender_contact", limits.max_contact_chars),
        sent_at=to_timestamp(now, "now"),
    )
    return _seal(
        sender, sender_id, recipient, now, message_id, EnvelopeKind.REFERRAL, referral, limits
    )


def status_envelope(
    sender: Identity,
    sender_id: str,
    recipient: AgencyRecord,
    referral_id: str,
    status: ReferralStatus,
    decline_reason: DeclineReason | None,
    decline_text: str,
    now: datetime,
    message_id: str,
    *,
    status_at: datetime | None = None,
    limits: EnvelopeLimits = DEFAULT_LIMITS,
) -> bytes:
    """A StatusUpdate (from the receiving agency back to the referring one), sealed under
    ``tessera/v1/status``. ``decline_reason`` is required for DECLINED and must be None
    otherwise; ``decline_text`` only with DECLINED, required with OTHER, never survivor details.
    ``status_at`` (when it took effect) defaults to ``now``."""
    _check_parties(sender, sender_id, recipient, now, limits)
    status = member(ReferralStatus, status, "referral status")
    reason = (
        None if decline_reason is None else member(DeclineReason, decline_reason, "decline reason")
    )
    _check_decline(status, reason, decline_text, limits)
    update = referral_pb.StatusUpdate(
        referral_id=check_uuid(referral_id, "referral_id"),
        status=serde.referral_status_pb(status),
        decline_reason=serde.decline_reason_pb(reason),
        decline_text=decline_text,
        status_at=to_timestamp(now if status_at is None else status_at, "status_at"),
    )
    return _seal(
        sender, sender_id, recipient, now, message_id, EnvelopeKind.STATUS_UPDATE, update, limits
    )


def revocation_envelope(
    sender: Identity,
    sender_id: str,
    recipient: AgencyRecord,
    referral_id: str,
    consent_id: str,
    revoked_at: datetime,
    now: datetime,
    message_id: str,
    *,
    limits: EnvelopeLimits = DEFAULT_LIMITS,
) -> bytes:
    """A Revocation (from the referring agency), sealed under ``tessera/v1/status``: the survivor
    withdrew ``consent_id`` and the recipient must purge ``referral_id``'s personal data."""
    _check_parties(sender, sender_id, recipient, now, limits)
    revocation = referral_pb.Revocation(
        referral_id=check_uuid(referral_id, "referral_id"),
        consent_id=check_uuid(consent_id, "consent_id"),
        revoked_at=to_timestamp(revoked_at, "revoked_at"),
    )
    return _seal(
        sender, sender_id, recipient, now, message_id, EnvelopeKind.REVOCATION, revocation, limits
    )


def purge_confirmation_envelope(
    sender: Identity,
    sender_id: str,
    recipient: AgencyRecord,
    referral_id: str,
    consent_id: str,
    purged_fields: Iterable[str],
    purged_at: datetime,
    now: datetime,
    message_id: str,
    *,
    limits: EnvelopeLimits = DEFAULT_LIMITS,
) -> bytes:
    """A PurgeConfirmation (from the receiving agency), sealed under ``tessera/v1/status``.
    ``purged_fields`` are HTCDS field names (sorted here); values are never echoed."""
    _check_parties(sender, sender_id, recipient, now, limits)
    if isinstance(purged_fields, str):
        raise InvalidInput("purged_fields must be a list of HTCDS field names, not one string")
    names = sorted(set(purged_fields))
    _check_field_names(names, "purged_fields")
    confirmation = referral_pb.PurgeConfirmation(
        referral_id=check_uuid(referral_id, "referral_id"),
        consent_id=check_uuid(consent_id, "consent_id"),
        purged_at=to_timestamp(purged_at, "purged_at"),
        purged_fields=names,
    )
    return _seal(
        sender,
        sender_id,
        recipient,
        now,
        message_id,
        EnvelopeKind.PURGE_CONFIRMATION,
        confirmation,
        limits,
    )


# --- opening (the receiving side) -----------------------------------------------------------


def open_envelope(
    recipient: Identity,
    my_agency_id: str,
    sender: AgencyRecord,
    sealed: bytes,
    now: datetime,
    *,
    delivery_commitment: bytes | None = None,
    limits: EnvelopeLimits = DEFAULT_LIMITS,
    retired: Sequence[Identity] = (),
) -> OpenedEnvelope:
    """Open, verify and check one envelope from ``sender`` (the directory record pinned for
    ``Delivery.sender_agency_id``), following the steps of referral.proto's header in order.

    1. The sender is not revoked and its keys have not lapsed (Refused).
    2. The envelope opens with this node's key (WrongRecipient) and its signature verifies under
       the sender's pinned key with the envelope label or else the status label (BadSignature).
    3. The content parses with exactly one payload (InvalidInput), whose kind matches the label
       that verified: a Referral under envelope, anything else under status (BadSignature).
    4. ``sender_agency_id`` inside names the sender (BadSignature) and ``recipient_agency_id``
       names this node (WrongRecipient).
    5. For a Referral: its consent receipt verifies (``node.consent.verify_receipt``: signed by
       the same sender, naming this node, not expired, purpose = the referral's need) and every
       field carried is one the receipt lists (ConsentRefused); with ``delivery_commitment``,
       the receipt's commitment must equal it. Other kinds must travel with an empty commitment.

    ``retired`` are this node's identities from before a key rotation: an envelope sealed to
    one of them (sent before the sender synced the rotation) still opens.

    Returns a frozen result carrying ``message_id`` for idempotent processing.
    """
    # 1. Inputs, and a sender the directory still trusts.
    _check_open_inputs(recipient, my_agency_id, sender, sealed, now, limits)
    # 2. Decrypt and verify: envelope label first, then status label.
    label, payload = _open_with_any((recipient, *retired), sender, sealed)
    # 3. Parse, and match the kind to the label.
    content, kind = _parse_content(payload, label, sender)
    # 4. The ids inside name the transport sender and this node.
    common = _check_addresses(content, sender, my_agency_id)
    # 5. The payload.
    if kind is EnvelopeKind.REFERRAL:
        received = _received_referral(common, content.referral, sender, my_agency_id, now, limits)
        if delivery_commitment is not None and delivery_commitment != received.commitment:
            raise Refused(
                f"referral {received.referral_id} travelled under a consent commitment that is "
                "not its receipt's",
                hint="the broker could not purge it on revocation; do not store it, and report "
                f"it to {sender.agency_id}",
            )
        return received
    if delivery_commitment:
        raise InvalidInput(f"a {kind.value} travels with an empty consent commitment (relay.proto)")
    if kind is EnvelopeKind.STATUS_UPDATE:
        return _received_status(common, content.status_update, limits)
    if kind is EnvelopeKind.REVOCATION:
        return _received_revocation(common, content.revocation)
    return _received_purge(common, content.purge_confirmation)


# --- internals: sending ---------------------------------------------------------------------


def _check_parties(
    sender: Identity,
    sender_id: str,
    recipient: AgencyRecord,
    now: datetime,
    limits: EnvelopeLimits,
) -> None:
    if not isinstance(sender, Identity):
        raise InvalidInput("a sender must be this node's Identity")
    _check_id(sender_id, "sender_id", limits)
    require_aware(now, "now")
    if not isinstance(recipient, AgencyRecord):
        raise InvalidInput("a recipient must be its directory record")
    if recipient.agency_id == sender_id:
        raise InvalidInput("an agency does not send envelopes to itself")
    check_trusted(
        recipient,
        now,
        if_revoked="nothing is sent to it",
        hint="contact the broker operator if this is unexpected",
    )


def _fields_for_wire(
    fields: Mapping[str, str], receipt: VerifiedReceipt, limits: EnvelopeLimits
) -> list[common_pb.Field]:
    """The fields as Field messages in HTCDS column order, after checking each is consented."""
    if not isinstance(fields, Mapping):
        raise InvalidInput("fields must be a mapping of HTCDS field names to values")
    names = [name for name, value in fields.items() if value != ""]
    _check_field_names(names, "fields")
    outside = [name for name in names if not receipt.covers(name)]
    if outside:
        raise ConsentRefused(
            f"consent {receipt.consent_id} does not cover {field_list(outside)}; nothing was sent",
            reason=Refusal.FIELD_NOT_COVERED,
            fields=tuple(outside),
            hint="send only the consented fields (node.consent.minimise)",
        )
    checked = {name: _check_value(name, fields[name], limits) for name in names}
    return serde.fields_pb(checked)  # HTCDS column order; every value here is non-empty


def _seal(
    sender: Identity,
    sender_id: str,
    recipient: AgencyRecord,
    now: datetime,
    message_id: str,
    kind: EnvelopeKind,
    message: _Payload,
    limits: EnvelopeLimits,
) -> bytes:
    """``message`` as the ``kind`` payload of an EnvelopeContent from ``sender_id`` to
    ``recipient``, signed and sealed under the kind's label; InvalidInput over the size limit."""
    content = referral_pb.EnvelopeContent(
        message_id=check_uuid(message_id, "message_id"),
        sender_agency_id=sender_id,
        recipient_agency_id=recipient.agency_id,
        created_at=to_timestamp(now, "now"),
    )
    getattr(content, kind.value).CopyFrom(message)  # a kind's value is its oneof field name
    payload = content.SerializeToString(deterministic=True)
    if len(payload) + SEAL_OVERHEAD > limits.max_sealed_bytes:
        raise InvalidInput(
            f"the {kind.value} is {len(payload):,} bytes; a sealed envelope is at most "
            f"{limits.max_sealed_bytes:,}",
            hint="send fewer or shorter fields, or a shorter note",
        )
    return crypto.seal(sender, recipient.identity, label_for(kind), payload)


# --- internals: receiving -------------------------------------------------------------------


class _Common(TypedDict):
    """The checked ``EnvelopeContent`` fields every kind of result starts with."""

    message_id: str
    sender_agency_id: str
    created_at: datetime


def _check_open_inputs(
    recipient: Identity,
    my_agency_id: str,
    sender: AgencyRecord,
    sealed: bytes,
    now: datetime,
    limits: EnvelopeLimits,
) -> None:
    if not isinstance(recipient, Identity):
        raise InvalidInput("open_envelope needs this node's Identity")
    _check_id(my_agency_id, "my_agency_id", limits)
    require_aware(now, "now")
    if not isinstance(sender, AgencyRecord):
        raise InvalidInput("open_envelope needs the sender's directory record")
    check_trusted(
        sender,
        now,
        if_revoked="its envelopes are refused",
        hint="acknowledge and drop it; contact the broker operator if this is unexpected",
    )
    if not isinstance(sealed, bytes) or not sealed:
        raise InvalidInput("a sealed envelope must be non-empty bytes")
    if len(sealed) > limits.max_sealed_bytes:
        raise InvalidInput(f"a sealed envelope is at most {limits.max_sealed_bytes:,} bytes")


def _parse_content(
    payload: bytes, label: bytes, sender: AgencyRecord
) -> tuple[referral_pb.EnvelopeContent, EnvelopeKind]:
    """The parsed content and its kind, refusing a kind the verified label does not allow."""
    content = referral_pb.EnvelopeContent()
    try:
        content.ParseFromString(payload)
    except DecodeError:
        raise InvalidInput("the envelope content is not an EnvelopeContent") from None
    which = content.WhichOneof("payload")
    if which is None:
        raise InvalidInput("the envelope carries no payload")
    kind = EnvelopeKind(which)
    if label_for(kind) != label:
        raise BadSignature(
            f"a {kind.value} was signed under label {label.decode()}, which is not its label "
            f"{label_for(kind).decode()}: refused (kind/label mismatch)",
            hint=f"report it to {sender.agency_id}: its node sent a malformed envelope",
        )
    return content, kind


def _check_addresses(
    content: referral_pb.EnvelopeContent, sender: AgencyRecord, my_agency_id: str
) -> _Common:
    if content.sender_agency_id != sender.agency_id:
        raise BadSignature(
            f"the envelope signed by {sender.agency_id}'s key claims to come from "
            f"{content.sender_agency_id!r}",
            hint="do not act on it; report it to the broker operator",
        )
    if content.recipient_agency_id != my_agency_id:
        raise WrongRecipient(
            f"the envelope from {sender.agency_id} is addressed to "
            f"{content.recipient_agency_id!r}, not to this node ({my_agency_id})",
            hint=f"do not act on it; report it to {sender.agency_id}",
        )
    message_id = check_uuid(content.message_id, "message_id")
    if not content.HasField("created_at"):
        raise InvalidInput("the envelope's created_at is missing")
    return _Common(
        message_id=message_id,
        sender_agency_id=sender.agency_id,
        created_at=to_datetime(content.created_at, "created_at"),
    )


def _open_with_any(
    recipients: Sequence[Identity], sender: AgencyRecord, sealed: bytes
) -> tuple[bytes, bytes]:
    # The current identity first; a retired one only if the envelope is not sealed to it.
    for recipient in recipients[:-1]:
        try:
            return _open_either(recipient, sender, sealed)
        except WrongRecipient:
            continue
    return _open_either(recipients[-1], sender, sealed)


def _open_either(recipient: Identity, sender: AgencyRecord, sealed: bytes) -> tuple[bytes, bytes]:
    """(label that verified, payload): envelope label first, then status label (referral.proto).
    WrongRecipient (not sealed to this node, or altered) propagates from the first attempt."""
    for label in (labels.LABEL_ENVELOPE, labels.LABEL_STATUS):
        try:
            return label, crypto.open_sealed(recipient, sender.identity, label, sealed)
        except BadSignature:
            continue
    raise BadSignature(
        f"the envelope is not signed by {sender.agency_id}'s pinned key under either label "
        "(forged, altered, or sent by another agency)",
        hint="do not act on it; if the agency rotated its keys, sync the directory first",
    )


def _received_referral(
    common: _Common,
    referral: referral_pb.Referral,
    sender: AgencyRecord,
    my_agency_id: str,
    now: datetime,
    limits: EnvelopeLimits,
) -> ReceivedReferral:
    referral_id = check_uuid(referral.referral_id, "referral_id")
    need = serde.need_category(referral.need)
    if not referral.HasField("consent_receipt"):
        raise InvalidInput(f"referral {referral_id} carries no consent receipt")
    if not referral.HasField("sent_at"):
        raise InvalidInput(f"referral {referral_id}'s sent_at is missing")
    # The receipt: same sender, this node, valid now, purpose = need (referral.proto, Referral).
    # The sender's record was checked in step 1 of open_envelope, so its key is passed as is.
    receipt = verify_receipt(
        referral.consent_receipt,
        sender.identity,
        sender.agency_id,
        my_agency_id,
        now,
        expected_purpose=need,
    )
    # Every field carried must be listed in the receipt: a sender cannot smuggle extra fields.
    names = [entry.name for entry in referral.fields]
    _check_field_names(names, "the referral's fields")
    if any(
        FIELD_ORDER[later] <= FIELD_ORDER[earlier] for earlier, later in itertools.pairwise(names)
    ):
        raise InvalidInput(
            f"referral {referral_id}'s fields must be in HTCDS column order without repeats"
        )
    outside = [name for name in names if not receipt.covers(name)]
    if outside:
        raise ConsentRefused(
            f"referral {referral_id} from {sender.agency_id} carries {field_list(outside)}, "
            f"which its consent receipt {receipt.consent_id} does not cover",
            reason=Refusal.FIELD_NOT_COVERED,
            fields=tuple(outside),
            hint="do not store it; report it to the sending agency",
        )
    values = {
        entry.name: _check_value(entry.name, entry.value, limits) for entry in referral.fields
    }
    return ReceivedReferral(
        **common,
        referral_id=referral_id,
        need=need,
        fields=MappingProxyType(values),
        note=_check_text(referral.note, "note", limits.max_note_chars),
        sender_contact=_check_text(
            referral.sender_contact, "sender_contact", limits.max_contact_chars
        ),
        sent_at=to_datetime(referral.sent_at, "sent_at"),
        receipt=receipt,
    )


def _received_status(
    common: _Common, update: referral_pb.StatusUpdate, limits: EnvelopeLimits
) -> ReceivedStatus:
    status = serde.referral_status(update.status)
    if status is None:
        raise InvalidInput("the status update's status is unset or unknown")
    reason = serde.decline_reason(update.decline_reason, "the status update's decline reason")
    _check_decline(status, reason, update.decline_text, limits)
    if not update.HasField("status_at"):
        raise InvalidInput("the status update's status_at is missing")
    return ReceivedStatus(
        **common,
        referral_id=check_uuid(update.referral_id, "referral_id"),
        status=status,
        decline_reason=reason,
        decline_text=update.decline_text,
        status_at=to_datetime(update.status_at, "status_at"),
    )


def _received_revocation(common: _Common, revocation: referral_pb.Revocation) -> ReceivedRevocation:
    if not revocation.HasField("revoked_at"):
        raise InvalidInput("the revocation's revoked_at is missing")
    return ReceivedRevocation(
        **common,
        referral_id=check_uuid(revocation.referral_id, "referral_id"),
        consent_id=check_uuid(revocation.consent_id, "consent_id"),
        revoked_at=to_datetime(revocation.revoked_at, "revoked_at"),
    )


def _received_purge(
    common: _Common, confirmation: referral_pb.PurgeConfirmation
) -> ReceivedPurgeConfirmation:
    if not confirmation.HasField("purged_at"):
        raise InvalidInput("the purge confirmation's purged_at is missing")
    names = list(confirmation.purged_fields)
    _check_field_names(names, "purged_fields")
    if any(later <= earlier for earlier, later in itertools.pairwise(names)):
        raise InvalidInput("purged_fields must be ascending without repeats")
    return ReceivedPurgeConfirmation(
        **common,
        referral_id=check_uuid(confirmation.referral_id, "referral_id"),
        consent_id=check_uuid(confirmation.consent_id, "consent_id"),
        purged_at=to_datetime(confirmation.purged_at, "purged_at"),
        purged_fields=tuple(names),
    )


# --- small checks and conversions (shared by both sides) ------------------------------------


def _check_decline(
    status: ReferralStatus, reason: DeclineReason | None, text: str, limits: EnvelopeLimits
) -> None:
    """referral.proto DeclineReason / decline_text rules (node.referrals.model.check_decline)."""
    check_decline(status, reason, text, limits.max_decline_text_chars)


def _check_field_names(names: Iterable[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if not isinstance(name, str) or name not in FIELD_CATEGORY:
            raise InvalidInput(f"{what}: {name!r} is not an HTCDS field name")
        if name in seen:
            raise InvalidInput(f"{what}: {name} is given twice")
        seen.add(name)


def _check_value(name: str, value: object, limits: EnvelopeLimits) -> str:
    # Never quote the value: it is survivor data.
    if not isinstance(value, str):
        raise InvalidInput(f"the value of {name} must be text")
    if len(value) > limits.max_value_chars:
        raise InvalidInput(f"the value of {name} is over {limits.max_value_chars:,} characters")
    return value


def _check_text(value: object, name: str, max_chars: int) -> str:
    """Optional free text: a string of at most ``max_chars`` characters (may be empty)."""
    if not isinstance(value, str):
        raise InvalidInput(f"{name} must be text")
    if len(value) > max_chars:
        raise InvalidInput(f"{name} is at most {max_chars:,} characters")
    return value


def _check_id(value: object, name: str, limits: EnvelopeLimits) -> str:
    if not isinstance(value, str) or not value or len(value) > limits.max_id_chars:
        raise InvalidInput(f"{name} must be 1 to {limits.max_id_chars} characters")
    return value
