"""The referral lifecycle's vocabulary and its one transition rule (DESIGN.md section 6).

This is the only place a referral status, a state or a decline reason is defined; the wire names
them ``REFERRAL_STATUS_<CODE>``, ``REFERRAL_STATE_<CODE>``, ``DECLINE_REASON_<CODE>`` and the
answers ``REFERRAL_ANSWER_<VERB>``, and ``node.serde`` converts by those names. Adding a status is
a change here (the enums and :data:`RULES`) and in the protos, nothing else.

Pure and light (no crypto, no protobuf, no database): the CLI imports it when it starts, for its
choices.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Final

from node.referral_checks import check_uuid
from tessera.errors import InvalidInput
from tessera.needs import NeedCategory, NeedStatus

if TYPE_CHECKING:
    from node.consent import Consent

__all__ = [
    "ANSWERS",
    "RELAY_ACTOR",
    "Answer",
    "ConsentMethod",
    "ConsentRecord",
    "ConsentState",
    "ConsentView",
    "DeclineReason",
    "Direction",
    "IncomingReferral",
    "OutboxItem",
    "OutboxKind",
    "OutgoingEnvelope",
    "OutgoingReferral",
    "ReferralContent",
    "ReferralDetail",
    "ReferralRecord",
    "ReferralState",
    "ReferralStatus",
    "ReferralStep",
    "RevokedConsent",
    "SignedReceipt",
    "answer_for",
    "check_decline",
    "check_key",
    "check_uuid",
    "consent_state",
    "moves_forward",
    "need_after",
    "status_code",
]

#: Who the audit log names for what the relay worker does.
RELAY_ACTOR: Final = "system:relay"
#: The largest sealed envelope (the broker's default ``max_envelope_bytes``, tessera.config).
MAX_SEALED_BYTES: Final = 1024 * 1024
MAX_KEY_CHARS: Final = 128


# --- the enums ----------------------------------------------------------------------------------


class ReferralStatus(enum.StrEnum):
    """A referral's status as the receiving agency reports it (referral.proto)."""

    DELIVERED = "delivered"
    ACCEPTED = "accepted"
    DECLINED = "declined"
    COMPLETED = "completed"


class ReferralState(enum.StrEnum):
    """Where a referral stands as this node knows it (node.proto ``ReferralState``).

    Outgoing: ``queued`` (in the outbox) → ``sent`` (the broker accepted it) → ``delivered`` →
    ``accepted`` | ``declined``; ``accepted`` → ``completed``; after a revocation ``revoked`` →
    ``purged``. Incoming: ``delivered`` (stored here) → ``accepted`` | ``declined``;
    ``accepted`` → ``completed``; any → ``purged``. Each status is also the state it leads to.
    """

    QUEUED = "queued"
    SENT = "sent"
    DELIVERED = "delivered"
    ACCEPTED = "accepted"
    DECLINED = "declined"
    COMPLETED = "completed"
    REVOKED = "revoked"
    PURGED = "purged"


class DeclineReason(enum.StrEnum):
    """Why a referral was declined (referral.proto)."""

    NO_CAPACITY = "no_capacity"
    NOT_ELIGIBLE = "not_eligible"
    SERVICE_UNAVAILABLE = "service_unavailable"
    SURVIVOR_UNREACHABLE = "survivor_unreachable"
    OTHER = "other"


class OutboxKind(enum.StrEnum):
    """What an outbox row carries: an ``EnvelopeContent`` payload for an agency, or a request
    to the broker (``consent_purge``: purge the envelopes under a revoked consent)."""

    REFERRAL = "referral"
    STATUS_UPDATE = "status_update"
    REVOCATION = "revocation"
    PURGE_CONFIRMATION = "purge_confirmation"
    CONSENT_PURGE = "consent_purge"


class ConsentMethod(enum.StrEnum):
    """How the survivor gave consent (consent.proto ``ConsentMethod``)."""

    VERBAL = "verbal"  # said aloud to a staff member, who witnesses it
    WRITTEN = "written"  # signed on paper; the paper stays with the sending agency
    ELECTRONIC = "electronic"  # given through an electronic form or message


class ConsentState(enum.StrEnum):
    """Where a consent stands at a moment (node.proto ``ConsentState``)."""

    ACTIVE = "active"
    EXPIRED = "expired"
    REVOKED = "revoked"


class Direction(enum.StrEnum):
    """Which way a referral went (the ``referral_event.direction`` column)."""

    OUTGOING = "out"
    INCOMING = "in"


# --- the transition rule ------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """A status the receiving caseworker may give: the CLI verb, the states it may follow."""

    verb: str
    after: tuple[ReferralState, ...]
    help: str


@dataclass(frozen=True)
class _Rule:
    rank: int  # how far along; a reported status applies only if it moves a referral forward
    need: NeedStatus | None = None  # what the status means for the need (DESIGN.md section 2)
    answer: Answer | None = None


#: One line per status: its rank on the sending side, the need status it leads to, and whether
#: (and when) the receiving caseworker gives it.
RULES: Final[Mapping[ReferralStatus, _Rule]] = MappingProxyType(
    {
        ReferralStatus.DELIVERED: _Rule(2),
        ReferralStatus.ACCEPTED: _Rule(
            3,
            NeedStatus.IN_PROGRESS,
            Answer(
                "accept",
                (ReferralState.DELIVERED,),
                "Accept a received referral (the sender is told).",
            ),
        ),
        ReferralStatus.DECLINED: _Rule(
            3,
            NeedStatus.UNMET,
            Answer(
                "decline", (ReferralState.DELIVERED,), "Decline a received referral with a reason."
            ),
        ),
        ReferralStatus.COMPLETED: _Rule(
            4,
            NeedStatus.MET,
            Answer(
                "complete",
                (ReferralState.ACCEPTED,),
                "Record that the service was provided (after accepting; the sender is told).",
            ),
        ),
    }
)
_RANK: Final = {
    ReferralState.QUEUED: 0,
    ReferralState.SENT: 1,
    **{ReferralState(status.value): rule.rank for status, rule in RULES.items()},
}
_FINAL: Final = frozenset(
    {ReferralState.DECLINED, ReferralState.COMPLETED, ReferralState.REVOKED, ReferralState.PURGED}
)
#: The answers a receiving caseworker may give, by status.
ANSWERS: Final[Mapping[ReferralStatus, Answer]] = MappingProxyType(
    {status: rule.answer for status, rule in RULES.items() if rule.answer is not None}
)


def moves_forward(current: ReferralState, target: ReferralState) -> bool:
    """Statuses only move a referral forward (docs/referrals.md): never out of a final state,
    never back, and accepted/declined never replace each other."""
    if current in _FINAL or target not in _RANK:
        return False
    return _RANK[target] > _RANK[current]


def need_after(status: ReferralStatus) -> NeedStatus | None:
    """What a referral's status means for the need it was for (None: nothing changes)."""
    return RULES[status].need


def answer_for(verb: str) -> ReferralStatus:
    """The status a caseworker's answer verb gives (``accept`` → accepted)."""
    for status, answer in ANSWERS.items():
        if answer.verb == verb:
            return status
    raise InvalidInput(
        f"unknown answer {verb!r}", hint=f"one of: {', '.join(a.verb for a in ANSWERS.values())}"
    )


def status_code(value: object) -> ReferralStatus:
    """``value`` (a status or its code) as a ReferralStatus; InvalidInput otherwise."""
    try:
        return ReferralStatus(str(value))
    except ValueError:
        raise InvalidInput(
            f"unknown referral status {value!r}",
            hint=f"one of: {', '.join(s.value for s in ReferralStatus)}",
        ) from None


def check_decline(
    status: ReferralStatus, reason: DeclineReason | None, text: object, max_chars: int
) -> None:
    """referral.proto's DeclineReason / decline_text rules: a reason exactly with DECLINED, a
    text only with DECLINED and required with OTHER, at most ``max_chars`` characters."""
    if not isinstance(text, str):
        raise InvalidInput("decline_text must be text")
    if len(text) > max_chars:
        raise InvalidInput(f"decline_text is at most {max_chars:,} characters")
    if status is ReferralStatus.DECLINED:
        if reason is None:
            raise InvalidInput(
                "a DECLINED status needs a decline reason",
                hint=f"one of: {', '.join(r.value for r in DeclineReason)}",
            )
        if reason is DeclineReason.OTHER and not text.strip():
            raise InvalidInput("decline reason 'other' needs a decline text saying why")
    elif reason is not None or text:
        raise InvalidInput(
            f"only a DECLINED status carries a decline reason or text (this one is {status.value})"
        )


def consent_state(consent: Consent, now: dt.datetime) -> ConsentState:
    """``revoked``, ``expired`` or ``active`` at ``now``."""
    if consent.revoked:
        return ConsentState.REVOKED
    if now >= consent.expires_at:
        return ConsentState.EXPIRED
    return ConsentState.ACTIVE


# --- the records --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferralStep:
    """One state a referral reached, and when."""

    state: ReferralState
    at: dt.datetime


@dataclass(frozen=True)
class OutgoingEnvelope:
    """A sealed envelope (built by ``node.envelopes``) to queue for the relay worker.

    ``message_id`` is the envelope's message id and the relay idempotency key. The stores check
    its size and ids when they queue it.
    """

    recipient_id: str
    message_id: str
    sealed: bytes = field(repr=False)

    def __post_init__(self) -> None:
        check_key(self.recipient_id, "recipient_id")
        check_uuid(self.message_id, "message_id")
        if not isinstance(self.sealed, bytes) or not self.sealed:
            raise InvalidInput("a sealed envelope must be non-empty bytes")
        if len(self.sealed) > MAX_SEALED_BYTES:
            raise InvalidInput(f"a sealed envelope is at most {MAX_SEALED_BYTES:,} bytes")


@dataclass(frozen=True)
class OutgoingReferral:
    """A referral this node sent. ``fields`` are HTCDS field *names* in column order."""

    referral_id: str
    case_id: str
    consent_id: str
    recipient_id: str
    recipient_name: str
    need: NeedCategory
    fields: tuple[str, ...]
    state: ReferralState
    decline_reason: DeclineReason | None
    decline_text: str = field(repr=False)
    message_id: str
    idempotency_key: str
    consent_commitment: bytes = field(repr=False)
    relay_receipt: bytes = field(repr=False)
    created_at: dt.datetime
    updated_at: dt.datetime
    history: tuple[ReferralStep, ...] = ()


@dataclass(frozen=True)
class ReferralContent:
    """The decrypted content of an incoming referral: survivor data, kept out of ``repr``.

    ``receipt_*`` are the exact bytes of the consent receipt it travelled with, verified when it
    was received (node.consent.verify_receipt); parse ``receipt_body`` as a ConsentReceipt.
    """

    fields: Mapping[str, str] = field(repr=False)
    note: str = field(repr=False)
    sender_contact: str = field(repr=False)
    sent_at: dt.datetime
    receipt_body: bytes = field(repr=False)
    receipt_signature: bytes = field(repr=False)
    receipt_signer: bytes = field(repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", MappingProxyType(dict(self.fields)))


@dataclass(frozen=True)
class IncomingReferral:
    """A referral received here. ``content`` is set only by ``IncomingStore.read`` (decrypted,
    audited) and is None once purged; ``need`` is None only for the tombstone of a referral
    revoked before it arrived."""

    referral_id: str
    sender_id: str
    consent_id: str
    need: NeedCategory | None
    state: ReferralState
    decline_reason: DeclineReason | None
    received_at: dt.datetime
    updated_at: dt.datetime
    purged_at: dt.datetime | None
    purged_fields: tuple[str, ...]
    history: tuple[ReferralStep, ...] = ()
    content: ReferralContent | None = None
    decline_text: str = field(default="", repr=False)


@dataclass(frozen=True)
class SignedReceipt:
    """A consent receipt as signed: the exact body, its signature and the signer's key."""

    body: bytes
    signature: bytes = field(repr=False)
    signer: bytes = field(repr=False)


@dataclass(frozen=True)
class ConsentView:
    """A consent as the node shows it: its signed receipt, its state now, its referrals."""

    consent: Consent
    receipt: SignedReceipt
    state: ConsentState
    referral_ids: tuple[str, ...]


@dataclass(frozen=True)
class OutboxItem:
    """What waits for the relay worker: ciphertext and routing only. For ``consent_purge``,
    ``referral_id`` holds the consent id, ``recipient_id`` is empty (the broker is the
    recipient) and ``sealed`` is empty."""

    id: int
    kind: OutboxKind
    referral_id: str
    recipient_id: str
    idempotency_key: str
    consent_commitment: bytes = field(repr=False)
    sealed: bytes = field(repr=False)
    attempts: int
    last_error: str
    created_at: dt.datetime
    last_attempt_at: dt.datetime | None


# --- what staff see (node.client's answers, from the wire by node.serde) -------------------------
# Each field is a column the CLI prints under that name, in this order (cli.output).


@dataclass(frozen=True)
class ConsentRecord:
    """A consent as staff see it: the receipt's terms, its state now, the referrals under it."""

    consent_id: str
    case_id: str
    recipient: str
    purpose: NeedCategory
    fields: tuple[str, ...]  # data category names
    method: ConsentMethod
    witnessed_by: str
    granted_at: dt.datetime
    expires_at: dt.datetime
    state: ConsentState
    revoked_at: dt.datetime | None
    referrals: tuple[str, ...]


@dataclass(frozen=True)
class RevokedConsent(ConsentRecord):
    """A consent just revoked: the envelopes purged at the broker, the referrals revoked."""

    envelopes_purged: int
    revoked_referrals: tuple[str, ...]


@dataclass(frozen=True)
class ReferralRecord:
    """A referral sent or received, as staff see it. ``direction`` is "outgoing" or "incoming";
    ``agency`` the counterpart's name (its id if unnamed); ``need`` a need category code
    ("unspecified" for the tombstone of a referral revoked before it arrived);
    ``decline_reason`` a DeclineReason code or ""; ``waiting`` how long since it last changed
    (H:MM:SS, as of when it was read)."""

    referral_id: str
    direction: str
    case_id: str
    agency: str
    agency_id: str
    need: str
    state: ReferralState
    decline_reason: str
    consent_id: str
    created_at: dt.datetime
    updated_at: dt.datetime
    waiting: str


@dataclass(frozen=True)
class ReferralDetail(ReferralRecord):
    """One referral shown with its content: survivor data for a received one (until purged),
    the field names for a sent one."""

    fields: Mapping[str, str] = field(repr=False)
    note: str = field(repr=False)
    sender_contact: str = field(repr=False)
    consented_fields: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", MappingProxyType(dict(self.fields)))


# --- small checks -------------------------------------------------------------------------------


def check_key(value: object, name: str) -> str:
    """An id or key of 1 to :data:`MAX_KEY_CHARS` characters."""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_KEY_CHARS:
        raise InvalidInput(f"{name} must be 1 to {MAX_KEY_CHARS} characters")
    return value


@dataclass(frozen=True)
class Shown:
    """One referral shown to staff: incoming (with its content) or outgoing (with its
    consent)."""

    incoming: IncomingReferral | None = None
    outgoing: OutgoingReferral | None = None
    consent: ConsentView | None = None
