"""Wire conversions of the referral lifecycle (node.referrals.model) and of agencies
(node.serde)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from node.htcds import NeedCategory
from node.referrals.model import (
    ANSWERS,
    ConsentMethod,
    ConsentState,
    ConsentView,
    DeclineReason,
    IncomingReferral,
    OutgoingReferral,
    ReferralState,
    ReferralStatus,
    ReferralStep,
    Shown,
    SignedReceipt,
)
from node.serde.wire import (
    domain_enum,
    fields_pb,
    need_category_pb,
    timestamp,
    wire_code,
    wire_enum,
)
from tessera.errors import InvalidInput
from tessera.timestamps import to_timestamp
from tessera.v1 import common_pb2 as common_pb
from tessera.v1 import consent_pb2 as consent_pb
from tessera.v1 import node_pb2 as node_pb
from tessera.v1 import referral_pb2 as referral_pb

if TYPE_CHECKING:
    from tessera.directory import AgencyRecord


__all__ = [
    "agency_pb",
    "consent_method",
    "consent_method_pb",
    "consent_state",
    "consent_state_pb",
    "consent_view_pb",
    "decline_reason",
    "decline_reason_pb",
    "incoming_pb",
    "outgoing_pb",
    "referral_answer",
    "referral_answer_pb",
    "referral_state",
    "referral_state_pb",
    "referral_status",
    "referral_status_pb",
    "shown_pb",
    "signed_blob_pb",
    "steps_pb",
]

# --- referrals and consents (node.referrals.model) -----------------------------------------------
# Every enum converts by name: the model's code upper-cased after the wire prefix, so a status
# added to the model and the protos needs nothing here.


def referral_status_pb(status: ReferralStatus) -> referral_pb.ReferralStatus.ValueType:
    """The wire value of a referral status."""
    return wire_enum(referral_pb.ReferralStatus, "REFERRAL_STATUS_", status.value)


def referral_status(value: int) -> ReferralStatus | None:
    """A referral status from the wire; None when unset or unknown."""
    return domain_enum(ReferralStatus, referral_pb.ReferralStatus, "REFERRAL_STATUS_", value)


def decline_reason_pb(reason: DeclineReason | None) -> referral_pb.DeclineReason.ValueType:
    """The wire value of a decline reason (UNSPECIFIED for none)."""
    if reason is None:
        return referral_pb.DECLINE_REASON_UNSPECIFIED
    return wire_enum(referral_pb.DeclineReason, "DECLINE_REASON_", reason.value)


def decline_reason(value: int, what: str = "decline reason") -> DeclineReason | None:
    """A decline reason from the wire: None for UNSPECIFIED, InvalidInput if unknown."""
    if value == referral_pb.DECLINE_REASON_UNSPECIFIED:
        return None
    reason = domain_enum(DeclineReason, referral_pb.DeclineReason, "DECLINE_REASON_", value)
    if reason is None:
        raise InvalidInput(
            f"{what} is unknown", hint=f"one of: {', '.join(r.value for r in DeclineReason)}"
        )
    return reason


def referral_state_pb(state: ReferralState) -> node_pb.ReferralState.ValueType:
    """The wire value of a referral state."""
    return wire_enum(node_pb.ReferralState, "REFERRAL_STATE_", state.value)


def referral_state(value: int) -> ReferralState:
    """A referral state from the wire; InvalidInput when unset or unknown."""
    state = domain_enum(ReferralState, node_pb.ReferralState, "REFERRAL_STATE_", value)
    if state is None:
        raise InvalidInput("unknown referral state", hint=", ".join(s.value for s in ReferralState))
    return state


def referral_answer_pb(status: ReferralStatus) -> node_pb.ReferralAnswer.ValueType:
    """The wire value of a caseworker's answer (``REFERRAL_ANSWER_<VERB>``)."""
    return wire_enum(node_pb.ReferralAnswer, "REFERRAL_ANSWER_", ANSWERS[status].verb)


def referral_answer(value: int) -> ReferralStatus:
    """The status a caseworker's answer gives; InvalidInput when unset or unknown."""
    verb = wire_code(node_pb.ReferralAnswer, "REFERRAL_ANSWER_", value)
    for status, answer in ANSWERS.items():
        if answer.verb == verb:
            return status
    raise InvalidInput("the answer is required", hint=", ".join(a.verb for a in ANSWERS.values()))


def consent_method_pb(method: ConsentMethod) -> consent_pb.ConsentMethod.ValueType:
    """The wire value of how consent was given."""
    return wire_enum(consent_pb.ConsentMethod, "CONSENT_METHOD_", method.value)


def consent_method(value: int) -> ConsentMethod | None:
    """How consent was given, from the wire; None when unset or unknown."""
    return domain_enum(ConsentMethod, consent_pb.ConsentMethod, "CONSENT_METHOD_", value)


def consent_state_pb(state: ConsentState) -> node_pb.ConsentState.ValueType:
    """The wire value of a consent's state."""
    return wire_enum(node_pb.ConsentState, "CONSENT_STATE_", state.value)


def consent_state(value: int) -> ConsentState | None:
    """A consent state from the wire; None for UNSPECIFIED (any) or unknown."""
    return domain_enum(ConsentState, node_pb.ConsentState, "CONSENT_STATE_", value)


def signed_blob_pb(receipt: SignedReceipt) -> common_pb.SignedBlob:
    """A signed consent receipt for the wire."""
    return common_pb.SignedBlob(
        body=receipt.body, signature=receipt.signature, signer=receipt.signer
    )


def consent_view_pb(view: ConsentView) -> node_pb.Consent:
    """A consent for the wire: its signed receipt (and the receipt parsed), state, referrals."""
    consent = view.consent
    message = node_pb.Consent(
        signed_receipt=signed_blob_pb(view.receipt),
        case_id=consent.case_id,
        state=consent_state_pb(view.state),
        referral_ids=list(view.referral_ids),
    )
    message.receipt.ParseFromString(view.receipt.body)
    if consent.revoked_at is not None:
        message.revoked_at.CopyFrom(to_timestamp(consent.revoked_at))
    return message


def steps_pb(steps: Iterable[ReferralStep]) -> list[node_pb.ReferralStep]:
    """A referral's history for the wire."""
    return [
        node_pb.ReferralStep(state=referral_state_pb(s.state), at=timestamp(s.at)) for s in steps
    ]


def outgoing_pb(referral: OutgoingReferral) -> node_pb.ReferralRecord:
    """A referral this node sent, for the wire."""
    return node_pb.ReferralRecord(
        referral_id=referral.referral_id,
        direction=node_pb.REFERRAL_DIRECTION_OUTGOING,
        case_id=referral.case_id,
        counterpart=common_pb.AgencyRef(
            agency_id=referral.recipient_id, name=referral.recipient_name
        ),
        need=need_category_pb(referral.need),
        state=referral_state_pb(referral.state),
        decline_reason=decline_reason_pb(referral.decline_reason),
        decline_text=referral.decline_text,
        consent_id=referral.consent_id,
        created_at=timestamp(referral.created_at),
        updated_at=timestamp(referral.updated_at),
        history=steps_pb(referral.history),
    )


def incoming_pb(referral: IncomingReferral, names: Mapping[str, str]) -> node_pb.ReferralRecord:
    """A referral received here, for the wire; ``names`` maps agency ids to names."""
    return node_pb.ReferralRecord(
        referral_id=referral.referral_id,
        direction=node_pb.REFERRAL_DIRECTION_INCOMING,
        counterpart=common_pb.AgencyRef(
            agency_id=referral.sender_id, name=names.get(referral.sender_id, "")
        ),
        need=(
            need_category_pb(referral.need)
            if referral.need is not None
            else common_pb.NEED_CATEGORY_UNSPECIFIED
        ),
        state=referral_state_pb(referral.state),
        decline_reason=decline_reason_pb(referral.decline_reason),
        decline_text=referral.decline_text,
        consent_id=referral.consent_id,
        created_at=timestamp(referral.received_at),
        updated_at=timestamp(referral.updated_at),
        history=steps_pb(referral.history),
    )


def agency_pb(record: AgencyRecord, verified: bool) -> node_pb.Agency:
    """A directory entry as the node shows it."""
    return node_pb.Agency(
        agency=common_pb.AgencyRef(agency_id=record.agency_id, name=record.name),
        region=record.region,
        services=[need_category_pb(NeedCategory(c)) for c in record.services],
        key_fingerprint=record.identity.fingerprint(),
        verified=verified,
        pinned_at=timestamp(record.valid_from),
        revoked=record.revoked,
    )


def shown_pb(shown: Shown, names: Mapping[str, str]) -> node_pb.ShowReferralResponse:
    """One referral shown to staff: a received one with its content (until purged), or a sent
    one with the field names and the consent it went under."""
    if shown.outgoing is not None:
        assert shown.consent is not None
        outgoing = shown.outgoing
        return node_pb.ShowReferralResponse(
            referral=outgoing_pb(outgoing),
            fields=[common_pb.Field(name=n) for n in outgoing.fields],
            consent=consent_view_pb(shown.consent).receipt,
        )
    assert shown.incoming is not None
    reply = node_pb.ShowReferralResponse(referral=incoming_pb(shown.incoming, names))
    content = shown.incoming.content
    if content is not None:
        reply.fields.extend(fields_pb(dict(content.fields)))
        reply.note = content.note
        reply.sender_contact = content.sender_contact
        reply.consent.ParseFromString(content.receipt_body)
    return reply
