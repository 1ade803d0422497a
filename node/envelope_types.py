"""What sealed envelopes between agencies are and what opening one returns (``node.envelopes``
builds, seals and opens them): the limits sender and receiver share, the four kinds and their seal
labels, and the frozen results of :func:`node.envelopes.open_envelope`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import ClassVar, Final, TypeAlias

from node.consent import VerifiedReceipt
from node.htcds.validate import MAX_TEXT_CHARS
from node.referrals.model import MAX_SEALED_BYTES, DeclineReason, ReferralStatus
from tessera import crypto, labels
from tessera.needs import NeedCategory

__all__ = [
    "DEFAULT_LIMITS",
    "SEAL_OVERHEAD",
    "EnvelopeKind",
    "EnvelopeLimits",
    "OpenedEnvelope",
    "ReceivedPurgeConfirmation",
    "ReceivedReferral",
    "ReceivedRevocation",
    "ReceivedStatus",
    "label_for",
]


# --- limits ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnvelopeLimits:
    """Safety limits on envelopes, as named defaults; sender and receiver use the same ones.

    ``max_sealed_bytes`` matches the broker's default ``max_envelope_bytes`` (tessera.config).
    """

    max_sealed_bytes: int = MAX_SEALED_BYTES
    max_id_chars: int = 128
    max_value_chars: int = MAX_TEXT_CHARS  # one HTCDS value, as htcds accepts on import
    max_note_chars: int = 10_000
    max_contact_chars: int = 200
    max_decline_text_chars: int = 1_000


DEFAULT_LIMITS: Final = EnvelopeLimits()

# Bytes seal() adds around the content: the sealed box (32-byte ephemeral key, 16-byte tag) and
# the 64-byte signature.
SEAL_OVERHEAD: Final = 32 + 16 + crypto.SIGNATURE_BYTES


# --- domain vocabulary ----------------------------------------------------------------------


class EnvelopeKind(enum.Enum):
    """The four payloads of ``EnvelopeContent`` (value: the oneof field name)."""

    REFERRAL = "referral"
    STATUS_UPDATE = "status_update"
    REVOCATION = "revocation"
    PURGE_CONFIRMATION = "purge_confirmation"


def label_for(kind: EnvelopeKind) -> bytes:
    """The seal label of a kind (referral.proto header): envelope for a Referral, status for the
    three others."""
    return labels.LABEL_ENVELOPE if kind is EnvelopeKind.REFERRAL else labels.LABEL_STATUS


# --- what open_envelope returns -------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedReferral:
    """A referral that opened, verified and passed every check of :func:`open_envelope`.

    ``fields`` (read-only, HTCDS column order) and ``note`` are survivor data; ``receipt`` is the
    verified consent receipt it travelled under. Apply ``message_id`` at most once.
    """

    message_id: str
    sender_agency_id: str
    created_at: datetime
    referral_id: str
    need: NeedCategory
    fields: Mapping[str, str] = field(repr=False)
    note: str = field(repr=False)
    sender_contact: str
    sent_at: datetime
    receipt: VerifiedReceipt

    kind: ClassVar[EnvelopeKind] = EnvelopeKind.REFERRAL

    @property
    def commitment(self) -> bytes:
        """The consent commitment of the receipt; must equal ``Delivery.consent_commitment``."""
        return self.receipt.commitment


@dataclass(frozen=True)
class ReceivedStatus:
    """A status of a referral this node sent, from its recipient. ``decline_reason`` and
    ``decline_text`` are set only for DECLINED. Statuses only move forward: the caller ignores a
    stale or repeated one, and applies ``message_id`` at most once."""

    message_id: str
    sender_agency_id: str
    created_at: datetime
    referral_id: str
    status: ReferralStatus
    decline_reason: DeclineReason | None
    decline_text: str
    status_at: datetime

    kind: ClassVar[EnvelopeKind] = EnvelopeKind.STATUS_UPDATE


@dataclass(frozen=True)
class ReceivedRevocation:
    """The survivor withdrew consent ``consent_id``: purge the referral's personal data and answer
    with a purge confirmation. Apply ``message_id`` at most once."""

    message_id: str
    sender_agency_id: str
    created_at: datetime
    referral_id: str
    consent_id: str
    revoked_at: datetime

    kind: ClassVar[EnvelopeKind] = EnvelopeKind.REVOCATION


@dataclass(frozen=True)
class ReceivedPurgeConfirmation:
    """The recipient of a revoked referral confirms its data is gone. ``purged_fields`` are
    HTCDS field names, ascending (never values)."""

    message_id: str
    sender_agency_id: str
    created_at: datetime
    referral_id: str
    consent_id: str
    purged_at: datetime
    purged_fields: tuple[str, ...]

    kind: ClassVar[EnvelopeKind] = EnvelopeKind.PURGE_CONFIRMATION


OpenedEnvelope: TypeAlias = (
    ReceivedReferral | ReceivedStatus | ReceivedRevocation | ReceivedPurgeConfirmation
)
