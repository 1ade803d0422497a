"""The CLI's client for a node: signed calls over TLS, typed errors back, plain data out.

Every call is signed with the staff member's own key (tessera.rpc), and any failure comes back as
the same typed error the node raised (``rpc.error_from_rpc``), so the CLI maps it to an exit code
in one place. Results are the frozen dataclasses of ``node.domain`` and ``node.referrals.model``
(what the node shows its staff), converted by ``node.serde``: ``_pb2`` types stop here.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc

from node import serde
from node.domain import (
    AgencyView,
    AuditCheck,
    AuditRecord,
    BackupMade,
    BudgetPeriod,
    CaseView,
    Disclosure,
    DuplicatePolicy,
    ErasedCase,
    ImportReport,
    NodeStatus,
    StaffRole,
    StaffView,
)
from node.htcds import NeedCategory, NeedStatus
from node.referrals.model import (
    ConsentMethod,
    ConsentRecord,
    DeclineReason,
    ReferralDetail,
    ReferralRecord,
    RevokedConsent,
    answer_for,
)
from tessera import credential, rpc
from tessera.config import Limits
from tessera.errors import InvalidInput, Unavailable
from tessera.timestamps import to_timestamp
from tessera.v1 import common_pb2 as common_pb
from tessera.v1 import node_pb2 as node_pb
from tessera.v1 import node_pb2_grpc as node_grpc

T = TypeVar("T")
_FORMATS = {"csv": node_pb.FILE_FORMAT_CSV, "xlsx": node_pb.FILE_FORMAT_XLSX}


class NodeClient:
    """A staff member's connection to their node."""

    def __init__(
        self, home: Path, limits: Limits | None = None, unlock: credential.Unlock | None = None
    ) -> None:
        # ``unlock()`` gives the credential's passphrase, asked only if it is locked by one.
        self._credential = credential.read(home, unlock)
        self._limits = limits or Limits()
        self.address = credential.resolve_address(home, self._credential)
        self._channel = rpc.open_channel(
            self.address,
            self._credential.node_certificate,
            self._credential.identity,
            self._limits.max_message_bytes,
        )
        self._stub = node_grpc.NodeStub(self._channel)

    @property
    def credential(self) -> credential.Credential:
        """The staff credential this client signs with (unlocked)."""
        return self._credential

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> NodeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Callable[..., T], request: Any, timeout: float | None = None) -> T:
        try:
            return method(request, timeout=timeout or self._limits.rpc_deadline_seconds)
        except grpc.RpcError as exc:
            raise rpc.error_from_rpc(exc, f"the node at {self.address}") from None

    def _stream(self, method: Callable[..., Any], request: Any) -> Iterator[Any]:
        try:
            yield from method(request, timeout=3600)
        except grpc.RpcError as exc:
            raise rpc.error_from_rpc(exc, f"the node at {self.address}") from None

    # --- status and staff ------------------------------------------------------------------

    def status(self) -> NodeStatus:
        """The node's name, region, key fingerprint, storage and the caller's role."""
        reply = self._call(self._stub.GetStatus, node_pb.GetStatusRequest())
        return serde.node_status(reply, self.address)

    def add_staff(self, name: str, role: StaffRole, signing_key: bytes) -> StaffView:
        """Register a staff member's public key."""
        reply = self._call(
            self._stub.AddStaff,
            node_pb.AddStaffRequest(
                name=name, role=serde.staff_role_pb(role), signing_key=signing_key
            ),
        )
        return serde.staff_view(reply.staff)

    def list_staff(self, include_removed: bool = False) -> list[StaffView]:
        """Staff members."""
        reply = self._call(
            self._stub.ListStaff, node_pb.ListStaffRequest(include_removed=include_removed)
        )
        return [serde.staff_view(s) for s in reply.staff]

    def remove_staff(self, name: str) -> StaffView:
        """Remove the active staff member called ``name``."""
        matches = [s for s in self.list_staff() if s.name == name]
        if not matches:
            raise InvalidInput(
                f"no active staff member called {name!r}",
                hint="`tessera node staff list` shows who there is",
            )
        reply = self._call(
            self._stub.RemoveStaff, node_pb.RemoveStaffRequest(staff_id=matches[0].staff_id)
        )
        return serde.staff_view(reply.staff)

    def verify_audit(self) -> AuditCheck:
        """Whether the audit chain is intact, and what is wrong if not."""
        reply = self._call(self._stub.VerifyAudit, node_pb.VerifyAuditRequest(), timeout=600)
        return serde.audit_check(reply)

    def audit_entries(
        self,
        case_id: str = "",
        actor: str = "",
        since: dt.datetime | None = None,
        actions: Sequence[str] = (),
        limit: int = 0,
    ) -> list[AuditRecord]:
        """Audit log entries, oldest first, filtered as asked (every page, up to ``limit``)."""
        request = node_pb.ShowAuditRequest(
            case_id=case_id, actor=actor, actions=list(actions), page_size=min(limit or 1000, 1000)
        )
        if since is not None:
            request.since.CopyFrom(to_timestamp(since))
        rows: list[AuditRecord] = []
        while True:
            reply = self._call(self._stub.ShowAudit, request)
            rows.extend(serde.audit_record(e) for e in reply.entries)
            if not reply.next_page_token or (limit and len(rows) >= limit):
                return rows[:limit] if limit else rows
            request.page_token = reply.next_page_token

    def rotate_kek(
        self, new_passphrase: str | None, new_key_file: Path | None, current: str | None = None
    ) -> int:
        """Re-wrap the node's keyring under a new passphrase or key file; ``current`` is the
        node's passphrase in force (for a node protected by one)."""
        request = (
            node_pb.RotateKeyEncryptionKeyRequest(new_passphrase=new_passphrase)
            if new_passphrase is not None
            else node_pb.RotateKeyEncryptionKeyRequest(new_key_file=str(new_key_file))
        )
        request.current_passphrase = current or ""
        return int(
            self._call(self._stub.RotateKeyEncryptionKey, request, timeout=120).keys_rewrapped
        )

    def backup(self, destination: Path | None) -> BackupMade:
        """Write a backup on the node's host; returns its path, size and digest."""
        result: BackupMade | None = None
        request = node_pb.BackupRequest(destination=str(destination) if destination else "")
        for event in self._stream(self._stub.Backup, request):
            if event.HasField("result"):
                result = serde.backup_made(event.result)
        if result is None:
            raise Unavailable(f"the node at {self.address} ended the backup without a result")
        return result

    # --- cases -----------------------------------------------------------------------------

    def create_case(
        self,
        fields: Mapping[str, str],
        notes: str = "",
        needs: Sequence[tuple[NeedCategory, NeedStatus]] = (),
    ) -> CaseView:
        """Record a new case."""
        request = node_pb.CreateCaseRequest(
            fields=serde.fields_pb(fields),
            notes=notes,
            idempotency_key=str(uuid.uuid4()),
            needs=[
                node_pb.Need(category=serde.need_category_pb(c), status=serde.need_status_pb(s))
                for c, s in needs
            ],
        )
        return serde.case_view(self._call(self._stub.CreateCase, request).case)

    def get_case(self, case_id: str) -> CaseView:
        """One case, decrypted by the node."""
        reply = self._call(self._stub.GetCase, node_pb.GetCaseRequest(case_id=case_id))
        return serde.case_view(reply.case)

    def update_case(
        self,
        case_id: str,
        expected_version: int,
        set_fields: Mapping[str, str],
        clear_fields: Sequence[str],
        notes: str | None,
    ) -> CaseView:
        """Change a case, refusing if someone changed it since ``expected_version``."""
        request = node_pb.UpdateCaseRequest(
            case_id=case_id,
            expected_version=expected_version,
            set_fields=serde.fields_pb(set_fields),
            clear_fields=list(clear_fields),
        )
        if notes is not None:
            request.notes = notes
        return serde.case_view(self._call(self._stub.UpdateCase, request).case)

    def list_cases(
        self,
        state: str | None,
        need: NeedCategory | None,
        need_status: NeedStatus | None,
        names: bool,
        limit: int,
    ) -> list[CaseView]:
        """A page of cases (with names only when asked for)."""
        request = node_pb.ListCasesRequest(
            status={"open": node_pb.CASE_STATUS_OPEN, "closed": node_pb.CASE_STATUS_CLOSED}.get(
                state or "", node_pb.CASE_STATUS_UNSPECIFIED
            ),
            need=serde.need_category_pb(need) if need else common_pb.NEED_CATEGORY_UNSPECIFIED,
            need_status=serde.need_status_pb(need_status)
            if need_status
            else common_pb.NEED_STATUS_UNSPECIFIED,
            fields=["prs_FirstName", "prs_SecondName"] if names else [],
            page_size=limit,
        )
        return [serde.case_view(c) for c in self._call(self._stub.ListCases, request).cases]

    def find_cases(self, identifiers: Mapping[str, str]) -> list[CaseView]:
        """Cases matching survivor identifiers, through the node's blind index."""
        request = node_pb.FindCasesRequest(
            identifiers=serde.fields_pb(identifiers), fields=["prs_FirstName", "prs_SecondName"]
        )
        return [serde.case_view(c) for c in self._call(self._stub.FindCases, request).cases]

    def close_case(self, case_id: str) -> CaseView:
        """Close a case (at its current version)."""
        version = self.get_case(case_id).version
        request = node_pb.CloseCaseRequest(case_id=case_id, expected_version=version)
        return serde.case_view(self._call(self._stub.CloseCase, request).case)

    def erase_case(self, case_id: str, reason: str) -> ErasedCase:
        """Crypto-shred a survivor's case."""
        reply = self._call(
            self._stub.EraseCase, node_pb.EraseCaseRequest(case_id=case_id, reason=reason)
        )
        return serde.erased_case(reply)

    def set_need(self, case_id: str, category: NeedCategory, status: NeedStatus) -> CaseView:
        """Add a need to a case or change its status."""
        request = node_pb.SetNeedRequest(
            case_id=case_id,
            need=node_pb.Need(
                category=serde.need_category_pb(category), status=serde.need_status_pb(status)
            ),
        )
        return serde.case_view(self._call(self._stub.SetNeed, request).case)

    def import_cases(
        self,
        path: Path,
        skip_bad_rows: bool,
        on_progress: Callable[[int, int, int], None],
        on_duplicate: DuplicatePolicy = DuplicatePolicy.SKIP,
    ) -> ImportReport:
        """Send an HTCDS file to the node; ``on_progress(checked, written, total)``. The report's
        ``rows`` says what the node did with each good row (node.domain.RowOutcome)."""
        fmt = _FORMATS.get(path.suffix.lower().lstrip("."))
        if fmt is None:
            raise InvalidInput(f"{path.name}: only .csv and .xlsx files can be imported")
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise InvalidInput(f"cannot read {path}: {exc.strerror}") from None
        if len(content) > self._limits.max_message_bytes - 1024:
            raise InvalidInput(
                f"{path.name} is larger than the node accepts in one import", hint="split the file"
            )
        request = node_pb.ImportCasesRequest(
            content=content,
            format=fmt,
            skip_bad_rows=skip_bad_rows,
            file_name=path.name,
            idempotency_key=str(uuid.uuid4()),
            on_duplicate=serde.duplicate_policy_pb(on_duplicate),
        )
        result: ImportReport | None = None
        for event in self._stream(self._stub.ImportCases, request):
            if event.HasField("progress"):
                p = event.progress
                on_progress(p.rows_checked, p.rows_written, p.rows_total)
            else:
                result = serde.import_report(event.result)
        if result is None:
            raise Unavailable(f"the node at {self.address} ended the import without a result")
        return result

    def export_cases(self, fmt: str, state: str | None) -> Iterator[tuple[bytes, int]]:
        """The export file in chunks, with the number of cases."""
        request = node_pb.ExportCasesRequest(
            format=_FORMATS[fmt],
            status={"open": node_pb.CASE_STATUS_OPEN, "closed": node_pb.CASE_STATUS_CLOSED}.get(
                state or "", node_pb.CASE_STATUS_UNSPECIFIED
            ),
        )
        for chunk in self._stream(self._stub.ExportCases, request):
            yield chunk.data, chunk.cases_total

    def agencies(self, include_revoked: bool = False) -> list[AgencyView]:
        """Agencies in the node's verified directory (synced with the broker first)."""
        reply = self._call(
            self._stub.ListAgencies, node_pb.ListAgenciesRequest(include_revoked=include_revoked)
        )
        return [serde.agency_view(a) for a in reply.agencies]

    def verify_agency(self, agency_id: str, fingerprint: str) -> AgencyView:
        """Mark an agency verified after comparing its fingerprint out of band."""
        reply = self._call(
            self._stub.VerifyAgency,
            node_pb.VerifyAgencyRequest(agency_id=agency_id, key_fingerprint=fingerprint),
        )
        return serde.agency_view(reply.agency)

    def budget(self, period: str = "") -> list[BudgetPeriod]:
        """The privacy budget ledger: one entry per period, oldest first, with every charge."""
        reply = self._call(self._stub.BudgetStatus, node_pb.BudgetStatusRequest(period=period))
        return [serde.budget_period(p) for p in reply.periods]

    def disclosures(self, case_id: str) -> list[Disclosure]:
        """Who received what about this survivor, and when."""
        reply = self._call(
            self._stub.ListDisclosures, node_pb.ListDisclosuresRequest(case_id=case_id)
        )
        return [serde.disclosure(d) for d in reply.disclosures]

    # --- consent and referrals ---------------------------------------------------------------

    def grant_consent(
        self,
        case_id: str,
        recipient: str,
        purpose: NeedCategory,
        categories: Sequence[str],
        expires: dt.date,
        method: str,
    ) -> ConsentRecord:
        """Record a survivor's consent (witnessed by the caller); expires at the start of
        ``expires`` (UTC)."""
        method_pb = serde.consent_method_pb(ConsentMethod(method))
        expiry = dt.datetime.combine(expires, dt.time(), tzinfo=dt.UTC)
        reply = self._call(
            self._stub.GrantConsent,
            node_pb.GrantConsentRequest(
                case_id=case_id,
                receiving_agency_id=recipient,
                purpose=serde.need_category_pb(purpose),
                data_categories=list(categories),
                method=method_pb,
                expires_at=serde.timestamp(expiry),
                idempotency_key=str(uuid.uuid4()),
            ),
        )
        return serde.consent_record(reply.consent)

    def consents(self, case_id: str = "") -> list[ConsentRecord]:
        """Consents (of one case), newest first."""
        reply = self._call(self._stub.ListConsents, node_pb.ListConsentsRequest(case_id=case_id))
        return [serde.consent_record(c) for c in reply.consents]

    def revoke_consent(self, consent_id: str) -> RevokedConsent:
        """Withdraw a consent; the broker purges its envelopes, recipients are told to purge."""
        reply = self._call(
            self._stub.RevokeConsent, node_pb.RevokeConsentRequest(consent_id=consent_id)
        )
        return serde.revoked_consent(reply)

    def send_referral(
        self,
        case_id: str,
        recipient: str,
        need: NeedCategory,
        consent_id: str = "",
        note: str = "",
        fields: Sequence[str] = (),
        idempotency_key: str = "",
    ) -> ReferralRecord:
        """Send a referral under a consent (the node picks the case's active consent for that
        recipient and need if none is named)."""
        reply = self._call(
            self._stub.SendReferral,
            node_pb.SendReferralRequest(
                case_id=case_id,
                consent_id=consent_id,
                recipient_agency_id=recipient,
                need=serde.need_category_pb(need),
                fields=list(fields),
                note=note,
                idempotency_key=idempotency_key or str(uuid.uuid4()),
            ),
        )
        return serde.referral_record(reply.referral)

    def referrals(
        self, direction: str = "", case_id: str = "", limit: int = 100
    ) -> list[ReferralRecord]:
        """Referrals both ways (or one), most recently changed first."""
        reply = self._call(
            self._stub.ListReferrals,
            node_pb.ListReferralsRequest(
                direction={
                    "outgoing": node_pb.REFERRAL_DIRECTION_OUTGOING,
                    "incoming": node_pb.REFERRAL_DIRECTION_INCOMING,
                }.get(direction, node_pb.REFERRAL_DIRECTION_UNSPECIFIED),
                case_id=case_id,
                page_size=limit,
            ),
        )
        return [serde.referral_record(r) for r in reply.referrals]

    def inbox(self, include_answered: bool = False) -> list[ReferralRecord]:
        """Referrals received here, oldest first."""
        reply = self._call(
            self._stub.Inbox, node_pb.InboxRequest(include_answered=include_answered)
        )
        return [serde.referral_record(r) for r in reply.referrals]

    def show_referral(self, referral_id: str) -> ReferralDetail:
        """One referral with its fields (the read is audited)."""
        reply = self._call(
            self._stub.ShowReferral, node_pb.ShowReferralRequest(referral_id=referral_id)
        )
        return serde.referral_detail(reply)

    def answer_referral(
        self, referral_id: str, answer: str, reason: str = "", text: str = ""
    ) -> ReferralRecord:
        """accept, decline (with a reason) or complete a received referral."""
        reply = self._call(
            self._stub.AnswerReferral,
            node_pb.AnswerReferralRequest(
                referral_id=referral_id,
                answer=serde.referral_answer_pb(answer_for(answer)),
                decline_reason=serde.decline_reason_pb(DeclineReason(reason) if reason else None),
                decline_text=text,
            ),
        )
        return serde.referral_record(reply.referral)
