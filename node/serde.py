"""Conversions between the node's protobuf messages and its domain objects: the only module of
the node (besides the servicer and the client) that touches ``_pb2`` types (STYLE.md habit 1)."""

from __future__ import annotations

import datetime as dt
import enum
import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from node.domain import (
    AuditEntry,
    Case,
    CaseState,
    CaseSummary,
    DuplicatePolicy,
    MatchRule,
    Need,
    RowAction,
    RowOutcome,
    StaffMember,
    StaffRole,
)
from node.htcds import FIELD_NAMES, NeedCategory, NeedStatus
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
    SignedReceipt,
)
from tessera.errors import InvalidInput
from tessera.timestamps import to_timestamp
from tessera.v1 import common_pb2 as common_pb
from tessera.v1 import consent_pb2 as consent_pb
from tessera.v1 import node_pb2 as node_pb
from tessera.v1 import referral_pb2 as referral_pb

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import _EnumTypeWrapper

    from node.referrals.flows import Shown
    from tessera.directory import AgencyRecord

_FIELD_ORDER = {name: index for index, name in enumerate(FIELD_NAMES)}
_V = TypeVar("_V", bound=int)
_E = TypeVar("_E", bound=enum.StrEnum)


def timestamp(value: dt.datetime | None) -> Timestamp | None:
    """A protobuf Timestamp for an aware datetime (None stays None)."""
    return None if value is None else to_timestamp(value)


def wire_enum(wire: _EnumTypeWrapper[_V], prefix: str, code: str) -> _V:
    """The wire enum value that names a domain code: ``prefix`` + the code upper-cased
    (``NEED_CATEGORY_`` and "medical" give NEED_CATEGORY_MEDICAL)."""
    return wire.Value(f"{prefix}{code.upper()}")


def wire_code(wire: _EnumTypeWrapper[Any], prefix: str, value: int) -> str:
    """The lower-case domain code a wire enum value names, without ``prefix``; "" for a number
    the wire enum does not define. Callers check the code against their domain enum and refuse
    anything else (UNSPECIFIED included) in their own words."""
    try:
        name = wire.Name(value)
    except ValueError:
        return ""
    return name.removeprefix(prefix).lower()


def domain_enum(kind: type[_E], wire: _EnumTypeWrapper[Any], prefix: str, value: int) -> _E | None:
    """The member of ``kind`` a wire enum value names; None for UNSPECIFIED or a number or name
    this version does not know (callers refuse in their own words)."""
    code = wire_code(wire, prefix, value)
    return kind(code) if code in kind.__members__.values() else None


def need_category_pb(category: NeedCategory) -> common_pb.NeedCategory.ValueType:
    """The wire enum value for a need category code."""
    return wire_enum(common_pb.NeedCategory, "NEED_CATEGORY_", category.value)


def need_category(value: int) -> NeedCategory:
    """The need category code for a wire enum value; InvalidInput when unset or unknown."""
    code = wire_code(common_pb.NeedCategory, "NEED_CATEGORY_", value)
    if code in NeedCategory.__members__.values():
        return NeedCategory(code)
    raise InvalidInput(
        "a need category is required", hint=f"one of: {', '.join(c.value for c in NeedCategory)}"
    )


def need_status_pb(status: NeedStatus) -> common_pb.NeedStatus.ValueType:
    """The wire enum value for a need status code."""
    return wire_enum(common_pb.NeedStatus, "NEED_STATUS_", status.value)


def need_status(value: int) -> NeedStatus:
    """The need status code for a wire enum value; InvalidInput when unset or unknown."""
    code = wire_code(common_pb.NeedStatus, "NEED_STATUS_", value)
    if code in NeedStatus.__members__.values():
        return NeedStatus(code)
    raise InvalidInput(
        "a need status is required", hint=f"one of: {', '.join(s.value for s in NeedStatus)}"
    )


def case_state_pb(state: CaseState) -> node_pb.CaseStatus.ValueType:
    """Wire enum for the node's case lifecycle state."""
    return node_pb.CASE_STATUS_OPEN if state is CaseState.OPEN else node_pb.CASE_STATUS_CLOSED


def case_state(value: int) -> CaseState | None:
    """Case lifecycle state from the wire; None for UNSPECIFIED (any)."""
    if value == node_pb.CASE_STATUS_OPEN:
        return CaseState.OPEN
    if value == node_pb.CASE_STATUS_CLOSED:
        return CaseState.CLOSED
    return None


def fields_of(entries: Iterable[common_pb.Field]) -> dict[str, str]:
    """Field list from the wire as a dict; a repeated name is refused."""
    result: dict[str, str] = {}
    for entry in entries:
        if entry.name in result:
            raise InvalidInput(f"field {entry.name} is given twice")
        result[entry.name] = entry.value
    return result


def fields_pb(fields: Mapping[str, str]) -> list[common_pb.Field]:
    """Fields for the wire, in HTCDS column order."""
    ordered = sorted(fields.items(), key=lambda item: _FIELD_ORDER.get(item[0], len(_FIELD_ORDER)))
    return [common_pb.Field(name=name, value=value) for name, value in ordered if value]


def need_pb(need: Need) -> node_pb.Need:
    """One need for the wire."""
    return node_pb.Need(
        category=need_category_pb(need.category),
        status=need_status_pb(need.status),
        identified_on=need.identified_on.isoformat(),
        status_on=need.updated_at.date().isoformat(),
        updated_at=timestamp(need.updated_at),
    )


def case_pb(
    case: Case, include: Iterable[str] | None = None, with_notes: bool = True
) -> node_pb.Case:
    """A case for the wire; ``include`` limits the fields sent (None sends all)."""
    wanted = (
        case.fields
        if include is None
        else {name: case.fields[name] for name in include if name in case.fields}
    )
    return node_pb.Case(
        case_id=case.case_id,
        version=case.version,
        fields=fields_pb(wanted),
        needs=[need_pb(n) for n in case.needs],
        status=case_state_pb(case.state),
        created_at=timestamp(case.created_at),
        updated_at=timestamp(case.updated_at),
        notes=case.notes if with_notes else "",
        display_name=display_name(case.fields) if include is not None else "",
    )


def summary_pb(summary: CaseSummary) -> node_pb.Case:
    """Case metadata for the wire, with no survivor field."""
    return node_pb.Case(
        case_id=summary.case_id,
        version=summary.version,
        needs=[need_pb(n) for n in summary.needs],
        status=case_state_pb(summary.state),
        created_at=timestamp(summary.created_at),
        updated_at=timestamp(summary.updated_at),
        display_name=summary.display_name,
    )


def display_name(fields: Mapping[str, str]) -> str:
    """A short label for a case from its name fields (empty if it has none)."""
    return " ".join(v for v in (fields.get("prs_FirstName"), fields.get("prs_SecondName")) if v)


def staff_role_pb(role: StaffRole) -> node_pb.StaffRole.ValueType:
    """Wire enum for a staff role."""
    return node_pb.STAFF_ROLE_ADMIN if role is StaffRole.ADMIN else node_pb.STAFF_ROLE_CASEWORKER


def staff_role(value: int) -> StaffRole:
    """A staff role from the wire; InvalidInput when unset."""
    if value == node_pb.STAFF_ROLE_ADMIN:
        return StaffRole.ADMIN
    if value == node_pb.STAFF_ROLE_CASEWORKER:
        return StaffRole.CASEWORKER
    raise InvalidInput("a staff role is required", hint="admin or caseworker")


def staff_pb(member: StaffMember) -> node_pb.Staff:
    """A staff record for the wire."""
    return node_pb.Staff(
        staff_id=member.staff_id,
        name=member.name,
        role=staff_role_pb(member.role),
        signing_key=member.signing_key,
        added_at=timestamp(member.added_at),
        removed_at=timestamp(member.removed_at),
    )


def disclosure_pb(entry: AuditEntry) -> node_pb.Disclosure:
    """One audit entry about a disclosure, for the accounting of disclosures."""
    detail = entry.detail
    events = {
        "referral.sent": node_pb.DISCLOSURE_EVENT_REFERRAL_SENT,
        "referral.delivered": node_pb.DISCLOSURE_EVENT_REFERRAL_DELIVERED,
        "revocation.sent": node_pb.DISCLOSURE_EVENT_REVOCATION_SENT,
        "purge.confirmed": node_pb.DISCLOSURE_EVENT_PURGE_CONFIRMED,
    }
    purpose = detail.get("purpose")
    return node_pb.Disclosure(
        audit_sequence=entry.seq,
        at=timestamp(entry.at),
        event=events.get(entry.action, node_pb.DISCLOSURE_EVENT_UNSPECIFIED),
        recipient=common_pb.AgencyRef(
            agency_id=str(detail.get("recipient_id", "")),
            name=str(detail.get("recipient_name", "")),
        ),
        referral_id=str(detail.get("referral_id", "")),
        consent_id=str(detail.get("consent_id", "")),
        purpose=need_category_pb(NeedCategory(purpose))
        if purpose
        else common_pb.NEED_CATEGORY_UNSPECIFIED,
        fields=[str(f) for f in detail.get("fields", [])],
        staff_id=entry.actor,
    )


def audit_record_pb(entry: AuditEntry) -> node_pb.AuditRecord:
    """One audit entry as `tessera node audit show` receives it (no survivor field is in it)."""
    return node_pb.AuditRecord(
        sequence=entry.seq,
        at=timestamp(entry.at),
        actor=entry.actor,
        action=entry.action,
        case_id=entry.case_id or "",
        detail_json=json.dumps(dict(entry.detail), sort_keys=True, separators=(",", ":")),
    )


def escrow_state_pb(state: str) -> node_pb.EscrowState.ValueType:
    """A node.escrow.EscrowState value ("confirmed", ...) as the wire enum."""
    return wire_enum(node_pb.EscrowState, "ESCROW_STATE_", state)


def duplicate_policy(value: int) -> DuplicatePolicy:
    """The import's duplicate policy from the wire; UNSPECIFIED is SKIP (the safe choice)."""
    if value == node_pb.ON_DUPLICATE_UNSPECIFIED:
        return DuplicatePolicy.SKIP
    code = wire_code(node_pb.OnDuplicate, "ON_DUPLICATE_", value)
    if code in DuplicatePolicy.__members__.values():
        return DuplicatePolicy(code)
    raise InvalidInput(
        f"unknown on_duplicate value {value}",
        hint=f"one of: {', '.join(p.value for p in DuplicatePolicy)}",
    )


def duplicate_policy_pb(policy: DuplicatePolicy) -> node_pb.OnDuplicate.ValueType:
    """The wire enum value for a duplicate policy."""
    return wire_enum(node_pb.OnDuplicate, "ON_DUPLICATE_", policy.value)


def row_outcome_pb(outcome: RowOutcome) -> node_pb.RowOutcome:
    """One row of an import's report for the wire."""
    return node_pb.RowOutcome(
        row=outcome.row,
        action=wire_enum(node_pb.RowAction, "ROW_ACTION_", outcome.action.value),
        case_id=outcome.case_id,
        matched_case_ids=list(outcome.matched_cases),
        matched_row=outcome.matched_row,
        match=(
            wire_enum(node_pb.MatchRule, "MATCH_RULE_", outcome.match.value)
            if outcome.match
            else node_pb.MATCH_RULE_UNSPECIFIED
        ),
        changed_fields=list(outcome.changed_fields),
        note=outcome.note,
    )


def row_outcome(message: node_pb.RowOutcome) -> RowOutcome:
    """One row of an import's report from the wire; InvalidInput for an action or rule this
    version does not know."""
    action = wire_code(node_pb.RowAction, "ROW_ACTION_", message.action)
    rule = wire_code(node_pb.MatchRule, "MATCH_RULE_", message.match)
    if action not in RowAction.__members__.values() or (
        message.match and rule not in MatchRule.__members__.values()
    ):
        raise InvalidInput(
            f"the node reported row {message.row} in a way this version does not know",
            hint="upgrade tessera on this machine to the node's version",
        )
    return RowOutcome(
        row=message.row,
        action=RowAction(action),
        case_id=message.case_id,
        matched_cases=tuple(message.matched_case_ids),
        matched_row=message.matched_row,
        match=MatchRule(rule) if message.match else None,
        changed_fields=tuple(message.changed_fields),
        note=message.note,
    )


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
