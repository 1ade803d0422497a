"""The node's answers as staff read them (node.client): wire to the client's view objects
(node.serde)."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from node.domain import (
    AgencyView,
    AuditCheck,
    AuditRecord,
    BackupMade,
    BudgetCharge,
    BudgetPeriod,
    CaseState,
    CaseView,
    Disclosure,
    ErasedCase,
    ImportReport,
    NeedView,
    NodeStatus,
    RowError,
    StaffView,
)
from node.referrals.model import (
    ConsentMethod,
    ConsentRecord,
    ConsentState,
    ReferralDetail,
    ReferralRecord,
    RevokedConsent,
)
from node.serde.referrals import (
    referral_state,
)
from node.serde.wire import (
    _E,
    domain_enum,
    need_category,
    need_status,
    row_outcome,
    staff_role,
    wire_code,
)
from tessera.errors import InvalidInput
from tessera.timestamps import to_datetime
from tessera.v1 import common_pb2 as common_pb
from tessera.v1 import consent_pb2 as consent_pb
from tessera.v1 import node_pb2 as node_pb
from tessera.v1 import referral_pb2 as referral_pb

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import _EnumTypeWrapper

__all__ = [
    "agency_view",
    "audit_check",
    "audit_record",
    "backup_made",
    "budget_period",
    "case_view",
    "consent_record",
    "disclosure",
    "erased_case",
    "import_report",
    "need_view",
    "node_status",
    "referral_detail",
    "referral_record",
    "revoked_consent",
    "staff_view",
]

# --- what the client reads (node.client): the node's answers as staff see them ------------------


def _known(kind: type[_E], wire: _EnumTypeWrapper[Any], prefix: str, value: int) -> _E:
    """A member of ``kind`` from the node's answer; InvalidInput (upgrade) if this version
    does not know it."""
    member = domain_enum(kind, wire, prefix, value)
    if member is None:
        raise InvalidInput(
            f"the node answered with a {kind.__name__} this version does not know ({value})",
            hint="upgrade tessera on this machine to the node's version",
        )
    return member


def _when(message: Any, name: str) -> dt.datetime | None:
    """A message's optional Timestamp field as a datetime (None when unset)."""
    return to_datetime(getattr(message, name)) if message.HasField(name) else None


def node_status(reply: node_pb.GetStatusResponse, address: str) -> NodeStatus:
    """GetStatus's answer, with the address the client reached the node at."""
    return NodeStatus(
        name=reply.name,
        region=reply.region,
        version=reply.version,
        address=address,
        fingerprint=reply.key_fingerprint,
        storage=reply.storage,
        open_cases=reply.open_cases,
        you=reply.caller_staff_id,
        your_role=staff_role(reply.caller_role),
        escrow=wire_code(node_pb.EscrowState, "ESCROW_STATE_", reply.escrow_state),
        escrow_detail=reply.escrow_detail,
        escrowed_tombstones=reply.escrow_size,
        tombstones_waiting=reply.escrow_pending,
        escrow_confirmed_at=_when(reply, "escrow_confirmed_at"),
        last_checkpoint_at=_when(reply, "checkpointed_at"),
    )


def staff_view(member: node_pb.Staff) -> StaffView:
    """A staff record from the wire, without its key."""
    return StaffView(
        staff_id=member.staff_id,
        name=member.name,
        role=staff_role(member.role),
        added_at=to_datetime(member.added_at),
        removed_at=_when(member, "removed_at"),
    )


def audit_check(reply: node_pb.VerifyAuditResponse) -> AuditCheck:
    """VerifyAudit's answer; the checkpoint described as `node audit verify` prints it."""
    return AuditCheck(
        intact=reply.intact,
        entries=reply.entries,
        problems=tuple(reply.problems),
        checkpoint=(
            f"#{reply.checkpoint_number} (entry {reply.checkpoint_sequence}, "
            f"{to_datetime(reply.checkpointed_at):%Y-%m-%d %H:%M:%S} UTC, "
            f"from the {reply.checkpoint_source})"
            if reply.checkpoint_number
            else "none"
        ),
        notes=tuple(reply.notes),
    )


def audit_record(entry: node_pb.AuditRecord) -> AuditRecord:
    """One audit entry from the wire (its detail kept as the node's JSON text)."""
    return AuditRecord(
        seq=entry.sequence,
        at=to_datetime(entry.at),
        actor=entry.actor,
        action=entry.action,
        case_id=entry.case_id,
        detail=entry.detail_json,
    )


def backup_made(result: node_pb.BackupResult) -> BackupMade:
    """A backup's path, size and digest (hex) from the wire."""
    return BackupMade(path=result.path, size=result.size, digest=result.digest.hex())


def need_view(need: node_pb.Need) -> NeedView:
    """One need of a case from the wire."""
    return NeedView(
        category=need_category(need.category), status=need_status(need.status), since=need.status_on
    )


def case_view(case: node_pb.Case) -> CaseView:
    """A case from the wire, with what fields the node sent."""
    return CaseView(
        case_id=case.case_id,
        version=case.version,
        state=CaseState.OPEN if case.status == node_pb.CASE_STATUS_OPEN else CaseState.CLOSED,
        name=case.display_name,
        fields={f.name: f.value for f in case.fields},
        notes=case.notes,
        needs=tuple(need_view(n) for n in case.needs),
        created_at=to_datetime(case.created_at),
        updated_at=to_datetime(case.updated_at),
    )


def erased_case(reply: node_pb.EraseCaseResponse) -> ErasedCase:
    """EraseCase's answer."""
    return ErasedCase(
        case_id=reply.case_id,
        erased_at=to_datetime(reply.erased_at),
        same_survivor=tuple(reply.same_survivor_case_ids),
    )


def import_report(result: node_pb.ImportResult) -> ImportReport:
    """An import's result from the wire, every row's outcome included."""
    return ImportReport(
        imported=result.imported,
        rejected=result.rejected,
        problems=tuple(RowError(p.row, p.field, p.reason) for p in result.problems),
        case_ids=tuple(result.case_ids),
        rows=tuple(row_outcome(o) for o in result.rows),
    )


def agency_view(agency: node_pb.Agency) -> AgencyView:
    """A directory entry as the node shows it, from the wire."""
    return AgencyView(
        agency_id=agency.agency.agency_id,
        name=agency.agency.name,
        region=agency.region,
        services=tuple(need_category(s) for s in agency.services),
        fingerprint=agency.key_fingerprint,
        verified=agency.verified,
        revoked=agency.revoked,
    )


def budget_period(period: node_pb.BudgetPeriod) -> BudgetPeriod:
    """One period of the privacy budget ledger, with every charge."""
    return BudgetPeriod(
        period=period.period,
        cap=period.cap,
        spent=period.spent,
        remaining=period.remaining,
        charges=tuple(
            BudgetCharge(
                round_id=c.round_id,
                attempt=c.attempt,
                table=c.table,
                epsilon=c.epsilon,
                charged_at=to_datetime(c.charged_at),
            )
            for c in period.charges
        ),
    )


def disclosure(entry: node_pb.Disclosure) -> Disclosure:
    """One entry of the accounting of disclosures, from the wire."""
    return Disclosure(
        at=to_datetime(entry.at),
        event=node_pb.DisclosureEvent.Name(entry.event),
        recipient=entry.recipient.name or entry.recipient.agency_id,
        purpose=common_pb.NeedCategory.Name(entry.purpose),
        fields=tuple(entry.fields),
        by=entry.staff_id,
    )


def _consent_terms(consent: node_pb.Consent) -> dict[str, Any]:
    receipt = consent.receipt
    return {
        "consent_id": receipt.consent_id,
        "case_id": consent.case_id,
        "recipient": receipt.receiving_agency_id,
        "purpose": need_category(receipt.purpose),
        "fields": tuple(receipt.data_categories),
        "method": _known(
            ConsentMethod, consent_pb.ConsentMethod, "CONSENT_METHOD_", receipt.method
        ),
        "witnessed_by": receipt.witnessed_by,
        "granted_at": to_datetime(receipt.granted_at),
        "expires_at": to_datetime(receipt.expires_at),
        "state": _known(ConsentState, node_pb.ConsentState, "CONSENT_STATE_", consent.state),
        "revoked_at": _when(consent, "revoked_at"),
        "referrals": tuple(consent.referral_ids),
    }


def consent_record(consent: node_pb.Consent) -> ConsentRecord:
    """A consent from the wire, as staff see it."""
    return ConsentRecord(**_consent_terms(consent))


def revoked_consent(reply: node_pb.RevokeConsentResponse) -> RevokedConsent:
    """RevokeConsent's answer."""
    return RevokedConsent(
        **_consent_terms(reply.consent),
        envelopes_purged=reply.envelopes_purged,
        revoked_referrals=tuple(reply.revoked_referral_ids),
    )


def _referral_terms(referral: node_pb.ReferralRecord, now: dt.datetime | None) -> dict[str, Any]:
    updated = to_datetime(referral.updated_at)
    return {
        "referral_id": referral.referral_id,
        "direction": wire_code(
            node_pb.ReferralDirection, "REFERRAL_DIRECTION_", referral.direction
        ),
        "case_id": referral.case_id,
        "agency": referral.counterpart.name or referral.counterpart.agency_id,
        "agency_id": referral.counterpart.agency_id,
        "need": wire_code(common_pb.NeedCategory, "NEED_CATEGORY_", referral.need),
        "state": referral_state(referral.state),
        "decline_reason": wire_code(
            referral_pb.DeclineReason, "DECLINE_REASON_", referral.decline_reason
        )
        if referral.decline_reason
        else "",
        "consent_id": referral.consent_id,
        "created_at": to_datetime(referral.created_at),
        "updated_at": updated,
        "waiting": str((now or dt.datetime.now(dt.UTC)) - updated).split(".")[0],
    }


def referral_record(
    referral: node_pb.ReferralRecord, now: dt.datetime | None = None
) -> ReferralRecord:
    """A referral from the wire; ``waiting`` is counted to ``now`` (default: now)."""
    return ReferralRecord(**_referral_terms(referral, now))


def referral_detail(
    reply: node_pb.ShowReferralResponse, now: dt.datetime | None = None
) -> ReferralDetail:
    """ShowReferral's answer: the referral with its fields, note and consented fields."""
    return ReferralDetail(
        **_referral_terms(reply.referral, now),
        fields={f.name: f.value for f in reply.fields},
        note=reply.note,
        sender_contact=reply.sender_contact,
        consented_fields=tuple(reply.consent.data_categories),
    )
