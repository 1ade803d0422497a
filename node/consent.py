"""A survivor's consent to one referral, and the gate every referral passes (DESIGN.md section 6).

DESIGN.md section 6 is the contract this module implements:

- a consent record at the sending node names the survivor, the receiving agency, the purpose (a
  need category), the data categories that may be shared, how consent was given and who witnessed
  it, and its expiry; it can be revoked at any time (:class:`Consent`);
- ``tessera referral send`` refuses without a valid consent covering that recipient, purpose and
  every field being sent (:func:`check_covers`), and only consented fields are ever serialised
  (:func:`minimise`);
- the envelope carries a signed consent receipt (:func:`receipt_blob`) that the receiving node
  verifies (:func:`verify_receipt`); the broker holds only a commitment (hash) of it
  (:func:`commitment`).

The wire form is ``ConsentReceipt`` in ``proto/tessera/v1/consent.proto``: a ``SignedBlob``
signed by the sending agency under ``tessera/v1/consent-receipt``, whose ``data_categories`` lists
the exact HTCDS *field names* covered (ascending, no duplicates, no wildcards). A
:class:`Consent` names data *categories* (``node.htcds.DATA_CATEGORIES``); the receipt carries
the fields those categories expand to. The survivor appears only as an opaque pseudonym, never
a name, case id or HTCDS value.

Everything here is pure: no database, no network, no clock (callers pass ``now``), no randomness
(callers choose ids and pseudonyms). Keys are touched only through :mod:`tessera.crypto`. Failures
are the typed errors of :mod:`tessera.errors`; a refusal by policy is a :class:`ConsentRefused`
whose ``reason`` says which check failed, so no caller ever matches on message text.
docs/referrals.md is the reviewer's summary.
"""

from __future__ import annotations

import enum
import itertools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Final, TypeAlias

from google.protobuf.message import DecodeError

from node import serde
from node.htcds.catalogue import (
    DATA_CATEGORIES,
    FIELD_CATEGORY,
    canonical_field,
    fields_in,
)
from node.referral_checks import (
    FIELD_ORDER,
    check_purpose,
    check_trusted,
    check_uuid,
    field_list,
    iso,
    member,
)
from node.referrals.model import ConsentMethod
from tessera import crypto, labels
from tessera import directory as directory_core
from tessera.crypto import Identity, PublicIdentity
from tessera.directory import AgencyRecord
from tessera.errors import BadSignature, InvalidInput, Refused
from tessera.needs import NeedCategory
from tessera.timestamps import require_aware, to_datetime, to_timestamp
from tessera.v1 import common_pb2 as common_pb
from tessera.v1 import consent_pb2 as consent_pb

__all__ = [
    "DEFAULT_LIMITS",
    "GRANT_COMMAND",
    "Consent",
    "ConsentLimits",
    "ConsentMethod",
    "ConsentRefused",
    "ReceiptBlob",
    "Refusal",
    "VerifiedReceipt",
    "check_covers",
    "commitment",
    "minimise",
    "receipt_blob",
    "verify_receipt",
]


#: A consent receipt as it travels: the signed body, the signature, the signer's key.
ReceiptBlob: TypeAlias = common_pb.SignedBlob


# --- limits (python-tuf habit: named defaults, not literals in code) ---------------------------


@dataclass(frozen=True)
class ConsentLimits:
    """Safety limits for consents and receipts, as named defaults.

    Sender and receiver must agree on them, or a receiver could refuse a receipt its sender
    signed; raise them only together.
    """

    max_id_chars: int = 128  # consent, case and agency ids
    min_pseudonym_chars: int = 16  # an opaque random token, too long to be a typed name
    max_pseudonym_chars: int = 128
    max_witness_chars: int = 200
    max_receipt_bytes: int = 16 * 1024
    # How far a receipt's granted_at may lie in the receiver's future (clocks differ).
    clock_skew: timedelta = timedelta(minutes=5)


DEFAULT_LIMITS: Final = ConsentLimits()

#: How a caseworker records a (new or wider) consent; used in the hints of refusals. A signed
#: receipt cannot be widened: extending a consent means recording a new one.
GRANT_COMMAND: Final = (
    "tessera consent grant --case {case_id} --to {recipient} --purpose {purpose} "
    "--categories {categories} --method verbal|written|electronic --expires YYYY-MM-DD"
)

_PSEUDONYM_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)


# --- typed refusals -----------------------------------------------------------------------------


class Refusal(enum.Enum):
    """Which consent check refused (DESIGN.md section 6); carried by :class:`ConsentRefused`."""

    REVOKED = "revoked"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    OTHER_RECIPIENT = "other_recipient"
    OTHER_SENDER = "other_sender"
    OTHER_PURPOSE = "other_purpose"
    FIELD_NOT_COVERED = "field_not_covered"
    NOTE_NOT_COVERED = "note_not_covered"


class ConsentRefused(Refused):
    """A consent does not cover what was asked of it. ``reason`` names the failed check;
    ``fields`` names the uncovered HTCDS fields (names only, never values)."""

    def __init__(
        self,
        message: str,
        *,
        reason: Refusal,
        hint: str | None = None,
        fields: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message, hint=hint)
        self.reason = reason
        self.fields = fields


# --- the consent record (DESIGN.md section 6, first bullet) -------------------------------------


@dataclass(frozen=True)
class Consent:
    """A survivor's consent as the sending node records it; valid by construction.

    ``categories`` are data category names of ``node.htcds.DATA_CATEGORIES`` (``identity``,
    ``contact``, ...); :attr:`fields` are the HTCDS fields they cover. ``purpose`` and ``method``
    may be given as their codes (``"medical"``, ``"verbal"``) and are stored as the enums.
    ``survivor_pseudonym`` is an opaque random token (16 to 128 of ``A-Z a-z 0-9 _ -``) that only
    this node can map back to the case; derive it outside, never from a name.
    """

    consent_id: str
    case_id: str
    recipient_agency_id: str
    purpose: NeedCategory
    categories: frozenset[str]
    method: ConsentMethod
    witnessed_by: str
    granted_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    survivor_pseudonym: str

    def __post_init__(self) -> None:
        limits = DEFAULT_LIMITS
        check_uuid(self.consent_id, "consent_id")
        _check_id(self.case_id, "case_id", limits)
        _check_id(self.recipient_agency_id, "recipient_agency_id", limits)
        object.__setattr__(self, "purpose", check_purpose(self.purpose))
        object.__setattr__(self, "method", member(ConsentMethod, self.method, "consent method"))
        object.__setattr__(self, "categories", _categories(self.categories))
        _check_text(self.witnessed_by, "witnessed_by", limits.max_witness_chars)
        require_aware(self.granted_at, "granted_at")
        require_aware(self.expires_at, "expires_at")
        if self.expires_at <= self.granted_at:
            raise InvalidInput(
                f"consent {self.consent_id}: expires_at ({iso(self.expires_at)}) must be after "
                f"granted_at ({iso(self.granted_at)})",
                hint="consent is never open-ended: give an expiry date after today",
            )
        if self.revoked_at is not None:
            require_aware(self.revoked_at, "revoked_at")
            if self.revoked_at < self.granted_at:
                raise InvalidInput(
                    f"consent {self.consent_id}: revoked_at is before granted_at",
                )
        _check_pseudonym(self.survivor_pseudonym, limits)

    @property
    def fields(self) -> frozenset[str]:
        """The HTCDS field names this consent covers (its categories expanded)."""
        return fields_in(self.categories)

    @property
    def revoked(self) -> bool:
        """True once the survivor has withdrawn this consent."""
        return self.revoked_at is not None

    def active(self, now: datetime) -> bool:
        """True when a referral may be sent under it at ``now`` (not revoked, in its window)."""
        require_aware(now, "now")
        return not self.revoked and self.granted_at <= now < self.expires_at


# --- the gate of `tessera referral send` (DESIGN.md section 6, second bullet) -------------------


def check_covers(
    consent: Consent,
    recipient_agency_id: str,
    purpose: NeedCategory,
    fields_to_send: Iterable[str],
    now: datetime,
    *,
    note: str = "",
) -> None:
    """Refuse unless ``consent`` covers sending ``fields_to_send`` to ``recipient_agency_id`` for
    ``purpose`` at ``now``. DESIGN.md section 6: "refuses without a valid consent covering that
    recipient, purpose and every field being sent".

    Raises :class:`ConsentRefused` (a ``Refused``) naming what failed and what to do: revoked,
    expired, not yet valid, another recipient, another purpose, or fields outside the consented
    categories (each named with its category). ``InvalidInput`` for a name that is not an HTCDS
    field. If ``note`` (the referral's free text, which may describe the survivor) is not empty,
    the consent must also cover the ``notes`` category.
    """
    if not isinstance(consent, Consent):
        raise InvalidInput("check_covers needs a Consent")
    require_aware(now, "now")
    purpose = check_purpose(purpose)
    names = _field_names(fields_to_send)
    regrant = _grant_hint(consent, consent.categories)
    # 1. A revoked consent never covers anything ("It can be revoked at any time").
    if consent.revoked_at is not None:
        raise ConsentRefused(
            f"consent {consent.consent_id} was revoked at {iso(consent.revoked_at)}; nothing "
            "may be sent under it",
            reason=Refusal.REVOKED,
            hint="only if the survivor gives consent again, record a new consent: " + regrant,
        )
    # 2. Its validity window: granted_at <= now < expires_at.
    if now < consent.granted_at:
        raise ConsentRefused(
            f"consent {consent.consent_id} is valid only from {iso(consent.granted_at)}",
            reason=Refusal.NOT_YET_VALID,
            hint="check the consent's grant time and this node's clock",
        )
    if now >= consent.expires_at:
        raise ConsentRefused(
            f"consent {consent.consent_id} expired at {iso(consent.expires_at)}",
            reason=Refusal.EXPIRED,
            hint="if the survivor agrees, record a new consent with a later expiry: " + regrant,
        )
    # 3. The one recipient the survivor agreed to.
    if recipient_agency_id != consent.recipient_agency_id:
        other = _grant_hint(consent, consent.categories, recipient=recipient_agency_id)
        raise ConsentRefused(
            f"consent {consent.consent_id} covers referrals to agency "
            f"{consent.recipient_agency_id} only, not to {recipient_agency_id!r}",
            reason=Refusal.OTHER_RECIPIENT,
            hint=f"send to {consent.recipient_agency_id}, or, if the survivor agrees to "
            f"{recipient_agency_id!r} receiving their data, record a consent for it: {other}",
        )
    # 4. The purpose: the need the referral is for.
    if purpose is not consent.purpose:
        other = _grant_hint(consent, consent.categories, purpose=purpose)
        raise ConsentRefused(
            f"consent {consent.consent_id} is for purpose {consent.purpose.value}, not "
            f"{purpose.value}",
            reason=Refusal.OTHER_PURPOSE,
            hint=f"refer for {consent.purpose.value}, or, if the survivor agrees to a referral "
            f"for {purpose.value}, record a consent for it: {other}",
        )
    # 5. Every field being sent, by exact name (consent.proto: no wildcards).
    covered = consent.fields
    outside = [name for name in names if name not in covered]
    if outside:
        wanted = sorted({FIELD_CATEGORY[name] for name in outside})
        wider = _grant_hint(consent, consent.categories | set(wanted))
        raise ConsentRefused(
            f"consent {consent.consent_id} does not cover {field_list(outside)}; it covers the "
            f"categories {_category_list(consent.categories)}",
            reason=Refusal.FIELD_NOT_COVERED,
            fields=tuple(outside),
            hint="leave those fields out, or, if the survivor agrees to share "
            f"{', '.join(repr(c) for c in wanted)} too, record a new consent: {wider}",
        )
    if note and "notes" not in consent.categories:
        raise ConsentRefused(
            f"consent {consent.consent_id} does not cover a free-text note (category 'notes')",
            reason=Refusal.NOTE_NOT_COVERED,
            hint="send without a note, or, if the survivor agrees, record a new consent: "
            + _grant_hint(consent, consent.categories | {"notes"}),
        )


def minimise(case_fields: Mapping[str, str], consent: Consent) -> dict[str, str]:
    """Only the fields of ``case_fields`` that ``consent`` covers, in HTCDS column order.

    Data minimisation in code (DESIGN.md section 6: "only consented fields are ever
    serialised"): anything else, including Tessera's own ``tessera_*`` columns and names that are
    not HTCDS fields, is dropped, and so are empty values. This does not check that the consent
    is valid now; :func:`check_covers` does.
    """
    if not isinstance(consent, Consent):
        raise InvalidInput("minimise needs a Consent")
    covered = consent.fields
    kept = {
        name: value
        for name, value in case_fields.items()
        if name in covered and isinstance(value, str) and value
    }
    return {name: kept[name] for name in sorted(kept, key=FIELD_ORDER.__getitem__)}


# --- receipts (DESIGN.md section 6, third bullet; consent.proto) --------------------------------


def receipt_blob(
    sender_identity: Identity, sending_agency_id: str, consent: Consent
) -> common_pb.SignedBlob:
    """The signed ``ConsentReceipt`` of ``consent``, as the sending agency signs it.

    The body lists the HTCDS field names the consent's categories cover (ascending) and names the
    survivor only by ``consent.survivor_pseudonym``; the case id never leaves the node. Signed
    under ``tessera/v1/consent-receipt`` (common.proto convention 3). A revoked consent gets no
    receipt.
    """
    if not isinstance(consent, Consent):
        raise InvalidInput("receipt_blob needs a Consent")
    if not isinstance(sender_identity, Identity):
        raise InvalidInput("receipt_blob needs the sending agency's Identity")
    _check_id(sending_agency_id, "sending_agency_id", DEFAULT_LIMITS)
    if sending_agency_id == consent.recipient_agency_id:
        raise InvalidInput("a consent cannot name the sending agency as its recipient")
    if consent.revoked_at is not None:
        raise ConsentRefused(
            f"consent {consent.consent_id} is revoked; no receipt is signed for it",
            reason=Refusal.REVOKED,
        )
    receipt = consent_pb.ConsentReceipt(
        consent_id=consent.consent_id,
        sending_agency_id=sending_agency_id,
        receiving_agency_id=consent.recipient_agency_id,
        purpose=serde.need_category_pb(consent.purpose),
        data_categories=sorted(consent.fields),
        method=serde.consent_method_pb(consent.method),
        witnessed_by=consent.witnessed_by,
        granted_at=to_timestamp(consent.granted_at, "granted_at"),
        expires_at=to_timestamp(consent.expires_at, "expires_at"),
        survivor_pseudonym=consent.survivor_pseudonym,
    )
    body = receipt.SerializeToString(deterministic=True)
    if len(body) > DEFAULT_LIMITS.max_receipt_bytes:
        raise InvalidInput(f"a consent receipt is at most {DEFAULT_LIMITS.max_receipt_bytes} bytes")
    return directory_core.sign_blob(sender_identity, labels.LABEL_CONSENT_RECEIPT, body)


def commitment(receipt: common_pb.SignedBlob | VerifiedReceipt) -> bytes:
    """The consent commitment: ``digest("tessera/v1/consent-commitment", receipt.body)``.

    32 bytes over the exact signed body (consent.proto header): the only thing the broker ever
    sees of a consent. Unguessable because the body holds a random 128-bit consent id.
    """
    if isinstance(receipt, VerifiedReceipt):
        return receipt.commitment
    if not isinstance(receipt, common_pb.SignedBlob) or not receipt.body:
        raise InvalidInput("a commitment is computed over a signed consent receipt")
    return crypto.digest(labels.LABEL_CONSENT_COMMITMENT, receipt.body)


_VERIFIED: Final = object()  # only verify_receipt holds it


@dataclass(frozen=True)
class VerifiedReceipt:
    """A ``ConsentReceipt`` whose signature verified under the sender's pinned key and whose
    agencies, validity and fields were checked; only :func:`verify_receipt` makes one (an
    unverified receipt is just a ``SignedBlob``). ``fields`` are the covered HTCDS field names,
    ascending. ``body``, ``signature`` and ``signer`` are the exact signed bytes, to store or
    forward as they are."""

    consent_id: str
    sending_agency_id: str
    receiving_agency_id: str
    purpose: NeedCategory
    fields: tuple[str, ...]
    method: ConsentMethod
    witnessed_by: str
    granted_at: datetime
    expires_at: datetime
    survivor_pseudonym: str
    body: bytes = field(repr=False)
    signature: bytes = field(repr=False)
    signer: bytes = field(repr=False)
    _token: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._token is not _VERIFIED:
            raise InvalidInput("a VerifiedReceipt is made only by verify_receipt")

    @property
    def commitment(self) -> bytes:
        """``digest("tessera/v1/consent-commitment", body)``: see :func:`commitment`."""
        return crypto.digest(labels.LABEL_CONSENT_COMMITMENT, self.body)

    def covers(self, field_name: str) -> bool:
        """True if the survivor agreed that this exact HTCDS field may be shared."""
        return field_name in self.fields

    def to_blob(self) -> common_pb.SignedBlob:
        """The receipt as it travelled: a fresh ``SignedBlob`` of the exact signed bytes."""
        return common_pb.SignedBlob(body=self.body, signature=self.signature, signer=self.signer)


def verify_receipt(
    blob: common_pb.SignedBlob,
    sender: AgencyRecord | PublicIdentity,
    expected_sender_id: str,
    expected_recipient_id: str,
    now: datetime,
    *,
    expected_purpose: NeedCategory | None = None,
    limits: ConsentLimits = DEFAULT_LIMITS,
) -> VerifiedReceipt:
    """Verify a consent receipt as the receiving node does (DESIGN.md section 6: "the envelope
    carries a signed consent receipt; the receiving node verifies it").

    Steps, in order (docs/wire.md, "the signing rule"): the blob is signed by the key pinned for
    the sender (``blob.signer`` must be that key, never trusted for itself) under
    ``tessera/v1/consent-receipt``; only then is the body parsed and checked; it names
    ``expected_sender_id`` and ``expected_recipient_id``; ``now`` lies in
    [granted_at - clock_skew, expires_at); and, if given, its purpose is ``expected_purpose``.

    BadSignature for a bad signature or another signer; ConsentRefused for a receipt of other
    agencies, another purpose, expired or not yet valid; Refused for a revoked sender record;
    InvalidInput for a malformed receipt.
    """
    require_aware(now, "now")
    pinned = _pinned_key(sender, expected_sender_id, now)
    if not isinstance(blob, common_pb.SignedBlob):
        raise InvalidInput("a consent receipt must be a SignedBlob")
    body = blob.body
    if not body or len(body) > limits.max_receipt_bytes:
        raise InvalidInput(f"a consent receipt body must be 1 to {limits.max_receipt_bytes} bytes")
    # 1. The signer is the key pinned for the sending agency (common.proto SignedBlob.signer).
    if blob.signer != pinned:
        raise BadSignature(
            f"the consent receipt is signed by key {directory_core.short_key(blob.signer)}, not by "
            f"the key pinned for {expected_sender_id} ({directory_core.short_key(pinned)})",
            hint="the receipt was not made by the sending agency; do not use the referral",
        )
    try:
        crypto.verify(pinned, labels.LABEL_CONSENT_RECEIPT, body, blob.signature)
    except BadSignature:
        raise BadSignature(
            f"the consent receipt's signature does not verify under {expected_sender_id}'s key "
            "(forged or altered)",
            hint="the receipt was altered or forged; do not use the referral",
        ) from None
    # 2. Parse only verified bytes, and check every field of the receipt.
    receipt = consent_pb.ConsentReceipt()
    try:
        receipt.ParseFromString(body)
    except DecodeError:
        raise InvalidInput("the consent receipt body is not a ConsentReceipt") from None
    verified = _parsed_receipt(receipt, blob, limits)
    # 3. The agencies: made by this sender, for this recipient.
    if verified.sending_agency_id != expected_sender_id:
        raise ConsentRefused(
            f"the consent receipt {verified.consent_id} was recorded by agency "
            f"{verified.sending_agency_id!r}, not by the sender {expected_sender_id}",
            reason=Refusal.OTHER_SENDER,
        )
    if verified.receiving_agency_id != expected_recipient_id:
        raise ConsentRefused(
            f"the consent receipt {verified.consent_id} covers agency "
            f"{verified.receiving_agency_id!r}, not {expected_recipient_id}",
            reason=Refusal.OTHER_RECIPIENT,
            hint="the survivor did not agree that this agency receives their data",
        )
    # 4. Its validity window ("sending after this instant is refused").
    if now >= verified.expires_at:
        raise ConsentRefused(
            f"the consent receipt {verified.consent_id} expired at {iso(verified.expires_at)}",
            reason=Refusal.EXPIRED,
            hint=f"ask {expected_sender_id} to send again under a current consent",
        )
    if now + limits.clock_skew < verified.granted_at:
        raise ConsentRefused(
            f"the consent receipt {verified.consent_id} is valid only from "
            f"{iso(verified.granted_at)}",
            reason=Refusal.NOT_YET_VALID,
            hint="check this node's clock",
        )
    # 5. The purpose (referral.proto: Referral.need must equal the receipt's purpose).
    if expected_purpose is not None:
        purpose = check_purpose(expected_purpose)
        if verified.purpose is not purpose:
            raise ConsentRefused(
                f"the consent receipt {verified.consent_id} is for purpose "
                f"{verified.purpose.value}, not {purpose.value}",
                reason=Refusal.OTHER_PURPOSE,
            )
    return verified


# --- receipt parsing helpers ----------------------------------------------------------------------


def _parsed_receipt(
    receipt: consent_pb.ConsentReceipt, blob: common_pb.SignedBlob, limits: ConsentLimits
) -> VerifiedReceipt:
    """The checked content of a receipt whose signature has verified."""
    method = serde.consent_method(receipt.method)
    if method is None:
        raise InvalidInput("the consent receipt's method is unset or unknown")
    for name in ("granted_at", "expires_at"):
        if not receipt.HasField(name):
            raise InvalidInput(f"the consent receipt's {name} is missing")
    granted_at = to_datetime(receipt.granted_at, "granted_at")
    expires_at = to_datetime(receipt.expires_at, "expires_at")
    if expires_at <= granted_at:
        raise InvalidInput("the consent receipt expires before it was granted")
    names = list(receipt.data_categories)
    if any(later <= earlier for earlier, later in itertools.pairwise(names)):
        raise InvalidInput(
            "the consent receipt's data_categories must be ascending without duplicates"
        )
    unknown = [name for name in names if name not in FIELD_CATEGORY]
    if unknown:
        raise InvalidInput(
            f"the consent receipt lists names that are not HTCDS fields: {', '.join(unknown[:5])}"
        )
    check_uuid(receipt.consent_id, "the receipt's consent_id")
    _check_pseudonym(receipt.survivor_pseudonym, limits)
    return VerifiedReceipt(
        consent_id=receipt.consent_id,
        sending_agency_id=_check_id(receipt.sending_agency_id, "sending_agency_id", limits),
        receiving_agency_id=_check_id(receipt.receiving_agency_id, "receiving_agency_id", limits),
        purpose=serde.need_category(receipt.purpose),
        fields=tuple(names),
        method=method,
        witnessed_by=_check_text(receipt.witnessed_by, "witnessed_by", limits.max_witness_chars),
        granted_at=granted_at,
        expires_at=expires_at,
        survivor_pseudonym=receipt.survivor_pseudonym,
        body=blob.body,
        signature=blob.signature,
        signer=blob.signer,
        _token=_VERIFIED,
    )


def _pinned_key(sender: AgencyRecord | PublicIdentity, sender_id: str, now: datetime) -> bytes:
    """The signing key pinned for the sender; a revoked or lapsed agency's key is not trusted."""
    if isinstance(sender, PublicIdentity):
        return sender.signing_key
    if not isinstance(sender, AgencyRecord):
        raise InvalidInput("the sender must be an AgencyRecord or a PublicIdentity")
    if sender.agency_id != sender_id:
        raise InvalidInput(
            f"the directory record given is for {sender.agency_id}, not the sender {sender_id}"
        )
    check_trusted(
        sender,
        now,
        if_revoked="nothing it signed is trusted",
        hint="contact the broker operator if this is unexpected",
    )
    return sender.identity.signing_key


# --- small checks and conversions ---------------------------------------------------------------


def _categories(value: object) -> frozenset[str]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise InvalidInput("a consent's categories must be a set of data category names")
    names = frozenset(value)
    if not names:
        raise InvalidInput(
            "a consent must name at least one data category",
            hint=f"one or more of: {_category_list(DATA_CATEGORIES)}",
        )
    unknown = sorted(str(name) for name in names if name not in DATA_CATEGORIES)
    if unknown:
        raise InvalidInput(
            f"unknown data categor{'y' if len(unknown) == 1 else 'ies'}: {', '.join(unknown)}",
            hint=f"one or more of: {_category_list(DATA_CATEGORIES)}",
        )
    return names


def _field_names(fields: Iterable[str]) -> list[str]:
    """HTCDS field names, checked, without repeats, in the order given."""
    if isinstance(fields, str):
        raise InvalidInput("fields to send must be a list of HTCDS field names, not one string")
    names: list[str] = []
    for name in fields:
        if not isinstance(name, str) or name not in FIELD_CATEGORY:
            canonical = canonical_field(name) if isinstance(name, str) else None
            hint = (
                f"did you mean {canonical}?"
                if canonical
                else "use the exact HTCDS field names (docs/data-model.md)"
            )
            raise InvalidInput(f"{name!r} is not an HTCDS field name", hint=hint)
        if name not in names:
            names.append(name)
    return names


def _grant_hint(
    consent: Consent,
    categories: Iterable[str],
    *,
    recipient: str | None = None,
    purpose: NeedCategory | None = None,
) -> str:
    return GRANT_COMMAND.format(
        case_id=consent.case_id,
        recipient=recipient if recipient is not None else consent.recipient_agency_id,
        purpose=(purpose or consent.purpose).value,
        categories=",".join(sorted(categories)),
    )


def _category_list(categories: Iterable[str]) -> str:
    return ", ".join(sorted(categories))


def _check_id(value: str, name: str, limits: ConsentLimits) -> str:
    # The directory's rule for ids, not a copy of it: the agency ids a receipt names must be ones
    # the directory can hold, and case ids follow the same rule.
    id_limits = replace(directory_core.DEFAULT_LIMITS, max_id_chars=limits.max_id_chars)
    return directory_core.check_agency_id(value, name, id_limits)


def _check_text(value: str, name: str, max_chars: int) -> str:
    # Required display text, by the directory's rule (no control or formatting characters).
    return directory_core.check_text(value, name, max_chars, required=True)


def _check_pseudonym(value: object, limits: ConsentLimits) -> str:
    if (
        not isinstance(value, str)
        or not limits.min_pseudonym_chars <= len(value) <= limits.max_pseudonym_chars
        or _PSEUDONYM_PATTERN.fullmatch(value) is None
    ):
        raise InvalidInput(
            f"survivor_pseudonym must be an opaque random token of {limits.min_pseudonym_chars} "
            f"to {limits.max_pseudonym_chars} characters A-Z a-z 0-9 _ -",
            hint="derive it at random per consent (for example a UUID); never use a name",
        )
    return value
