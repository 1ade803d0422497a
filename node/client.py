"""The CLI's client for a node: signed calls over TLS, typed errors back, plain data out.

Every call is signed with the staff member's own key (tessera.rpc), and any failure comes back as
the same typed error the node raised (``rpc.error_from_rpc``), so the CLI maps it to an exit code
in one place. Results are plain dicts and lists ready to render: ``_pb2`` types stop here.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc

from node import serde
from node.domain import DuplicatePolicy, StaffRole
from node.htcds import NeedCategory, NeedStatus
from node.referrals.model import DeclineReason, answer_for
from tessera import credential, rpc
from tessera.config import Limits
from tessera.errors import InvalidInput, Refused
from tessera.timestamps import to_datetime, to_timestamp
from tessera.v1 import common_pb2 as common_pb
from tessera.v1 import consent_pb2 as consent_pb
from tessera.v1 import node_pb2 as node_pb
from tessera.v1 import node_pb2_grpc as node_grpc
from tessera.v1 import referral_pb2 as referral_pb

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

    def status(self) -> dict[str, Any]:
        """The node's name, region, key fingerprint, storage and the caller's role."""
        reply = self._call(self._stub.GetStatus, node_pb.GetStatusRequest())
        return {
            "name": reply.name,
            "region": reply.region,
            "version": reply.version,
            "address": self.address,
            "fingerprint": reply.key_fingerprint,
            "storage": reply.storage,
            "open_cases": reply.open_cases,
            "you": reply.caller_staff_id,
            "your_role": serde.staff_role(reply.caller_role).value,
            "escrow": _code(node_pb.EscrowState.Name(reply.escrow_state), "ESCROW_STATE_"),
            "escrow_detail": reply.escrow_detail,
            "escrowed_tombstones": reply.escrow_size,
            "tombstones_waiting": reply.escrow_pending,
            "escrow_confirmed_at": (
                to_datetime(reply.escrow_confirmed_at)
                if reply.HasField("escrow_confirmed_at")
                else None
            ),
            "last_checkpoint_at": (
                to_datetime(reply.checkpointed_at) if reply.HasField("checkpointed_at") else None
            ),
        }

    def add_staff(self, name: str, role: StaffRole, signing_key: bytes) -> dict[str, Any]:
        """Register a staff member's public key."""
        reply = self._call(
            self._stub.AddStaff,
            node_pb.AddStaffRequest(
                name=name, role=serde.staff_role_pb(role), signing_key=signing_key
            ),
        )
        return _staff(reply.staff)

    def list_staff(self, include_removed: bool = False) -> list[dict[str, Any]]:
        """Staff members."""
        reply = self._call(
            self._stub.ListStaff, node_pb.ListStaffRequest(include_removed=include_removed)
        )
        return [_staff(s) for s in reply.staff]

    def remove_staff(self, name: str) -> dict[str, Any]:
        """Remove the active staff member called ``name``."""
        matches = [s for s in self.list_staff() if s["name"] == name]
        if not matches:
            raise InvalidInput(
                f"no active staff member called {name!r}",
                hint="`tessera node staff list` shows who there is",
            )
        reply = self._call(
            self._stub.RemoveStaff, node_pb.RemoveStaffRequest(staff_id=matches[0]["staff_id"])
        )
        return _staff(reply.staff)

    def verify_audit(self) -> dict[str, Any]:
        """Whether the audit chain is intact, and what is wrong if not."""
        reply = self._call(self._stub.VerifyAudit, node_pb.VerifyAuditRequest(), timeout=600)
        return {
            "intact": reply.intact,
            "entries": reply.entries,
            "problems": list(reply.problems),
            "checkpoint": (
                f"#{reply.checkpoint_number} (entry {reply.checkpoint_sequence}, "
                f"{to_datetime(reply.checkpointed_at):%Y-%m-%d %H:%M:%S} UTC, "
                f"from the {reply.checkpoint_source})"
                if reply.checkpoint_number
                else "none"
            ),
            "notes": list(reply.notes),
        }

    def audit_entries(
        self,
        case_id: str = "",
        actor: str = "",
        since: dt.datetime | None = None,
        actions: Sequence[str] = (),
        limit: int = 0,
    ) -> list[dict[str, Any]]:
        """Audit log entries, oldest first, filtered as asked (every page, up to ``limit``)."""
        request = node_pb.ShowAuditRequest(
            case_id=case_id, actor=actor, actions=list(actions), page_size=min(limit or 1000, 1000)
        )
        if since is not None:
            request.since.CopyFrom(to_timestamp(since))
        rows: list[dict[str, Any]] = []
        while True:
            reply = self._call(self._stub.ShowAudit, request)
            rows.extend(
                {
                    "seq": e.sequence,
                    "at": to_datetime(e.at),
                    "actor": e.actor,
                    "action": e.action,
                    "case_id": e.case_id,
                    "detail": e.detail_json,
                }
                for e in reply.entries
            )
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

    def backup(self, destination: Path | None) -> dict[str, Any]:
        """Write a backup on the node's host; returns its path, size and digest."""
        result: dict[str, Any] = {}
        request = node_pb.BackupRequest(destination=str(destination) if destination else "")
        for event in self._stream(self._stub.Backup, request):
            if event.HasField("result"):
                result = {
                    "path": event.result.path,
                    "size": event.result.size,
                    "digest": event.result.digest.hex(),
                }
        return result

    # --- cases -----------------------------------------------------------------------------

    def create_case(
        self,
        fields: Mapping[str, str],
        notes: str = "",
        needs: Sequence[tuple[NeedCategory, NeedStatus]] = (),
    ) -> dict[str, Any]:
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
        return _case(self._call(self._stub.CreateCase, request).case)

    def get_case(self, case_id: str) -> dict[str, Any]:
        """One case, decrypted by the node."""
        return _case(self._call(self._stub.GetCase, node_pb.GetCaseRequest(case_id=case_id)).case)

    def update_case(
        self,
        case_id: str,
        expected_version: int,
        set_fields: Mapping[str, str],
        clear_fields: Sequence[str],
        notes: str | None,
    ) -> dict[str, Any]:
        """Change a case, refusing if someone changed it since ``expected_version``."""
        request = node_pb.UpdateCaseRequest(
            case_id=case_id,
            expected_version=expected_version,
            set_fields=serde.fields_pb(set_fields),
            clear_fields=list(clear_fields),
        )
        if notes is not None:
            request.notes = notes
        return _case(self._call(self._stub.UpdateCase, request).case)

    def list_cases(
        self,
        state: str | None,
        need: NeedCategory | None,
        need_status: NeedStatus | None,
        names: bool,
        limit: int,
    ) -> list[dict[str, Any]]:
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
        return [_case(c) for c in self._call(self._stub.ListCases, request).cases]

    def find_cases(self, identifiers: Mapping[str, str]) -> list[dict[str, Any]]:
        """Cases matching survivor identifiers, through the node's blind index."""
        request = node_pb.FindCasesRequest(
            identifiers=serde.fields_pb(identifiers), fields=["prs_FirstName", "prs_SecondName"]
        )
        return [_case(c) for c in self._call(self._stub.FindCases, request).cases]

    def close_case(self, case_id: str) -> dict[str, Any]:
        """Close a case (at its current version)."""
        version = self.get_case(case_id)["version"]
        request = node_pb.CloseCaseRequest(case_id=case_id, expected_version=version)
        return _case(self._call(self._stub.CloseCase, request).case)

    def erase_case(self, case_id: str, reason: str) -> dict[str, Any]:
        """Crypto-shred a survivor's case."""
        reply = self._call(
            self._stub.EraseCase, node_pb.EraseCaseRequest(case_id=case_id, reason=reason)
        )
        return {
            "case_id": reply.case_id,
            "erased_at": to_datetime(reply.erased_at),
            "same_survivor": list(reply.same_survivor_case_ids),
        }

    def set_need(self, case_id: str, category: NeedCategory, status: NeedStatus) -> dict[str, Any]:
        """Add a need to a case or change its status."""
        request = node_pb.SetNeedRequest(
            case_id=case_id,
            need=node_pb.Need(
                category=serde.need_category_pb(category), status=serde.need_status_pb(status)
            ),
        )
        return _case(self._call(self._stub.SetNeed, request).case)

    def import_cases(
        self,
        path: Path,
        skip_bad_rows: bool,
        on_progress: Callable[[int, int, int], None],
        on_duplicate: DuplicatePolicy = DuplicatePolicy.SKIP,
    ) -> dict[str, Any]:
        """Send an HTCDS file to the node; ``on_progress(checked, written, total)``. The result's
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
        result: dict[str, Any] = {}
        for event in self._stream(self._stub.ImportCases, request):
            if event.HasField("progress"):
                p = event.progress
                on_progress(p.rows_checked, p.rows_written, p.rows_total)
            else:
                r = event.result
                result = {
                    "imported": r.imported,
                    "rejected": r.rejected,
                    "problems": [(p.row, p.field, p.reason) for p in r.problems],
                    "case_ids": list(r.case_ids),
                    "rows": [serde.row_outcome(o) for o in r.rows],
                }
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

    def agencies(self, include_revoked: bool = False) -> list[dict[str, Any]]:
        """Agencies in the node's verified directory (synced with the broker first)."""
        reply = self._call(
            self._stub.ListAgencies, node_pb.ListAgenciesRequest(include_revoked=include_revoked)
        )
        return [_agency(a) for a in reply.agencies]

    def verify_agency(self, agency_id: str, fingerprint: str) -> dict[str, Any]:
        """Mark an agency verified after comparing its fingerprint out of band."""
        reply = self._call(
            self._stub.VerifyAgency,
            node_pb.VerifyAgencyRequest(agency_id=agency_id, key_fingerprint=fingerprint),
        )
        return _agency(reply.agency)

    def budget(self, period: str = "") -> list[dict[str, Any]]:
        """The privacy budget ledger: one dict per period, oldest first, with every charge."""
        reply = self._call(self._stub.BudgetStatus, node_pb.BudgetStatusRequest(period=period))
        return [
            {
                "period": p.period,
                "cap": p.cap,
                "spent": p.spent,
                "remaining": p.remaining,
                "charges": [
                    {
                        "round_id": c.round_id,
                        "attempt": c.attempt,
                        "table": c.table,
                        "epsilon": c.epsilon,
                        "charged_at": to_datetime(c.charged_at),
                    }
                    for c in p.charges
                ],
            }
            for p in reply.periods
        ]

    def disclosures(self, case_id: str) -> list[dict[str, Any]]:
        """Who received what about this survivor, and when."""
        reply = self._call(
            self._stub.ListDisclosures, node_pb.ListDisclosuresRequest(case_id=case_id)
        )
        return [
            {
                "at": to_datetime(d.at),
                "event": node_pb.DisclosureEvent.Name(d.event),
                "recipient": d.recipient.name or d.recipient.agency_id,
                "purpose": common_pb.NeedCategory.Name(d.purpose),
                "fields": list(d.fields),
                "by": d.staff_id,
            }
            for d in reply.disclosures
        ]

    # --- consent and referrals ---------------------------------------------------------------

    def grant_consent(
        self,
        case_id: str,
        recipient: str,
        purpose: NeedCategory,
        categories: Sequence[str],
        expires: dt.date,
        method: str,
    ) -> dict[str, Any]:
        """Record a survivor's consent (witnessed by the caller); expires at the start of
        ``expires`` (UTC)."""
        method_pb = consent_pb.ConsentMethod.Value(f"CONSENT_METHOD_{method.upper()}")
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
        return _consent(reply.consent)

    def consents(self, case_id: str = "") -> list[dict[str, Any]]:
        """Consents (of one case), newest first."""
        reply = self._call(self._stub.ListConsents, node_pb.ListConsentsRequest(case_id=case_id))
        return [_consent(c) for c in reply.consents]

    def revoke_consent(self, consent_id: str) -> dict[str, Any]:
        """Withdraw a consent; the broker purges its envelopes, recipients are told to purge."""
        reply = self._call(
            self._stub.RevokeConsent, node_pb.RevokeConsentRequest(consent_id=consent_id)
        )
        return {
            **_consent(reply.consent),
            "envelopes_purged": reply.envelopes_purged,
            "revoked_referrals": list(reply.revoked_referral_ids),
        }

    def send_referral(
        self,
        case_id: str,
        recipient: str,
        need: NeedCategory,
        consent_id: str = "",
        note: str = "",
        fields: Sequence[str] = (),
        idempotency_key: str = "",
    ) -> dict[str, Any]:
        """Send a referral under a consent (the case's active consent for that recipient and
        need if none is named)."""
        if not consent_id:
            matches = [
                c
                for c in self.consents(case_id)
                if c["state"] == "active" and c["recipient"] == recipient and c["purpose"] == need
            ]
            if not matches:
                raise Refused(
                    f"case {case_id} has no active consent for a {need.value} referral to "
                    f"{recipient}",
                    hint=f"record one first: tessera consent grant {case_id} --to {recipient} "
                    f"--purpose {need.value} --share CATEGORY --expires YYYY-MM-DD "
                    "--method verbal",
                )
            consent_id = matches[0]["consent_id"]
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
        return _referral(reply.referral)

    def referrals(
        self, direction: str = "", case_id: str = "", limit: int = 100
    ) -> list[dict[str, Any]]:
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
        return [_referral(r) for r in reply.referrals]

    def inbox(self, include_answered: bool = False) -> list[dict[str, Any]]:
        """Referrals received here, oldest first."""
        reply = self._call(
            self._stub.Inbox, node_pb.InboxRequest(include_answered=include_answered)
        )
        return [_referral(r) for r in reply.referrals]

    def show_referral(self, referral_id: str) -> dict[str, Any]:
        """One referral with its fields (the read is audited)."""
        reply = self._call(
            self._stub.ShowReferral, node_pb.ShowReferralRequest(referral_id=referral_id)
        )
        return {
            **_referral(reply.referral),
            "fields": {f.name: f.value for f in reply.fields},
            "note": reply.note,
            "sender_contact": reply.sender_contact,
            "consented_fields": list(reply.consent.data_categories),
        }

    def answer_referral(
        self, referral_id: str, answer: str, reason: str = "", text: str = ""
    ) -> dict[str, Any]:
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
        return _referral(reply.referral)


def _code(name: str, prefix: str) -> str:
    return name.removeprefix(prefix).lower()


def _consent(consent: node_pb.Consent) -> dict[str, Any]:
    receipt = consent.receipt
    return {
        "consent_id": receipt.consent_id,
        "case_id": consent.case_id,
        "recipient": receipt.receiving_agency_id,
        "purpose": serde.need_category(receipt.purpose),
        "fields": list(receipt.data_categories),
        "method": _code(consent_pb.ConsentMethod.Name(receipt.method), "CONSENT_METHOD_"),
        "witnessed_by": receipt.witnessed_by,
        "granted_at": to_datetime(receipt.granted_at),
        "expires_at": to_datetime(receipt.expires_at),
        "state": _code(node_pb.ConsentState.Name(consent.state), "CONSENT_STATE_"),
        "revoked_at": to_datetime(consent.revoked_at) if consent.HasField("revoked_at") else None,
        "referrals": list(consent.referral_ids),
    }


def _referral(referral: node_pb.ReferralRecord) -> dict[str, Any]:
    updated = to_datetime(referral.updated_at)
    reason = referral.decline_reason
    return {
        "referral_id": referral.referral_id,
        "direction": _code(
            node_pb.ReferralDirection.Name(referral.direction), "REFERRAL_DIRECTION_"
        ),
        "case_id": referral.case_id,
        "agency": referral.counterpart.name or referral.counterpart.agency_id,
        "agency_id": referral.counterpart.agency_id,
        "need": _code(common_pb.NeedCategory.Name(referral.need), "NEED_CATEGORY_"),
        "state": _code(node_pb.ReferralState.Name(referral.state), "REFERRAL_STATE_"),
        "decline_reason": _code(referral_pb.DeclineReason.Name(reason), "DECLINE_REASON_")
        if reason
        else "",
        "consent_id": referral.consent_id,
        "created_at": to_datetime(referral.created_at),
        "updated_at": updated,
        "waiting": str(dt.datetime.now(dt.UTC) - updated).split(".")[0],
    }


def _agency(agency: node_pb.Agency) -> dict[str, Any]:
    return {
        "agency_id": agency.agency.agency_id,
        "name": agency.agency.name,
        "region": agency.region,
        "services": [serde.need_category(s).value for s in agency.services],
        "fingerprint": agency.key_fingerprint,
        "verified": agency.verified,
        "revoked": agency.revoked,
    }


def _staff(member: node_pb.Staff) -> dict[str, Any]:
    return {
        "staff_id": member.staff_id,
        "name": member.name,
        "role": serde.staff_role(member.role).value,
        "added_at": to_datetime(member.added_at),
        "removed_at": to_datetime(member.removed_at) if member.HasField("removed_at") else None,
    }


def _case(case: node_pb.Case) -> dict[str, Any]:
    return {
        "case_id": case.case_id,
        "version": case.version,
        "state": "open" if case.status == node_pb.CASE_STATUS_OPEN else "closed",
        "name": case.display_name,
        "fields": {f.name: f.value for f in case.fields},
        "notes": case.notes,
        "needs": [
            {
                "category": serde.need_category(n.category).value,
                "status": serde.need_status(n.status).value,
                "since": n.status_on,
            }
            for n in case.needs
        ],
        "created_at": to_datetime(case.created_at),
        "updated_at": to_datetime(case.updated_at),
    }
