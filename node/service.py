"""The node's gRPC servicer: validate, call the store, convert (STYLE.md habit 9).

Authentication, authorisation and the mapping of typed errors to status codes happen in the
interceptor (tessera.rpc with node.access); handlers only read who is calling. Store calls are
blocking (SQLModel), so they run in worker threads to keep the event loop free.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc.aio

import tessera
from node import backup, directory_sync, envelopes, escrow, htcds, serde, stats
from node import consent as consent_mod
from node.dedup import CASE_ID_COLUMN
from node.domain import CaseState, DuplicatePolicy, StaffRole
from node.envelopes import DeclineReason, ReferralStatus
from node.keyring import KekSpec, Keyring, rotate
from node.store import imports
from node.store.budget import BudgetStore
from node.store.cases import NewCase, NodeStore
from node.store.escrow import EscrowStore
from node.store.referrals import (
    IncomingReferral,
    OutgoingEnvelope,
    OutgoingReferral,
    ReferralState,
    ReferralStore,
)
from tessera import crypto, directory, rpc
from tessera.config import KekSource, Settings
from tessera.errors import InvalidInput, NotFound, Refused
from tessera.logs import fields
from tessera.timestamps import to_datetime, to_timestamp
from tessera.v1 import common_pb2 as common_pb
from tessera.v1 import consent_pb2 as consent_pb
from tessera.v1 import node_pb2 as node_pb
from tessera.v1 import node_pb2_grpc as node_grpc
from tessera.v1 import referral_pb2 as referral_pb
from tessera.v1 import relay_pb2 as relay_pb
from tessera.v1 import relay_pb2_grpc as relay_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")
_CHUNK = 256 * 1024
_DEFAULT_PAGE = 100
_MAX_PAGE = 1000
# Which HTCDS fields feed each blind-index kind, for FindCases (node.store.cases indexes them).
_IDENTIFIER_KINDS: dict[frozenset[str], str] = {
    frozenset({"prs_FirstName", "prs_SecondName"}): "name",
    frozenset({"prs_Email"}): "email",
    frozenset({"prs_MobilePhone"}): "phone",
    frozenset({"prs_HomePhone"}): "phone",
}

Context = grpc.aio.ServicerContext[Any, Any]


async def _run(func: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(func, *args)


def _actor() -> str:
    return rpc.current_caller().principal


def _checked_fields(raw: dict[str, str], *, allow_empty: bool = False) -> dict[str, str]:
    """Validate HTCDS fields; one InvalidInput naming every bad field (values never echoed)."""
    present = {k: v for k, v in raw.items() if v or not allow_empty}
    clean, errors = htcds.validate_record(present)
    if errors:
        raise InvalidInput(
            "; ".join(str(e) for e in errors),
            hint="field names and value codes are listed in docs/data-model.md",
        )
    return clean


class NodeServicer(node_grpc.NodeServicer):
    """Implements tessera.v1.Node for the node's own staff (cases, needs, staff, keys, audit)."""

    def __init__(
        self,
        settings: Settings,
        store: NodeStore,
        keyring: Keyring,
        referrals: ReferralStore | None = None,
        gate: escrow.EscrowGate | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._keyring = keyring
        self._referrals = referrals or ReferralStore(store)
        self._gate = gate
        #: Set by start_node to the relay worker's wake (push the outbox now).
        self.wake_relay: Callable[[], None] = lambda: None
        #: Set by start_node once the node is enrolled: deposits tombstones, checkpoints.
        self.escrow: escrow.EscrowWorker | None = None

    def _wake_escrow(self) -> None:
        if self.escrow is not None:
            self.escrow.wake()

    # --- status ----------------------------------------------------------------------------

    async def GetStatus(
        self, request: node_pb.GetStatusRequest, context: Context
    ) -> node_pb.GetStatusResponse:
        caller = rpc.current_caller()
        open_cases = await _run(self._store.count_cases, CaseState.OPEN)
        pending = await _run(EscrowStore(self._store).count_pending)
        gate = self._gate
        reply = node_pb.GetStatusResponse(
            name=self._settings.name,
            region=self._settings.region,
            version=tessera.__version__,
            broker_address=self._settings.broker,
            key_fingerprint=self._keyring.identity.public.fingerprint(),
            storage=self._store.engine.dialect.name,
            open_cases=open_cases,
            caller_staff_id=caller.principal,
            caller_role=serde.staff_role_pb(StaffRole(caller.role)),
            now=serde.timestamp(dt.datetime.now(dt.UTC)),
            escrow_pending=pending,
        )
        if gate is not None:
            reply.escrow_state = serde.escrow_state_pb(gate.state.value)
            reply.escrow_detail = gate.detail
            reply.escrow_size = gate.size
            if gate.confirmed_at is not None:
                reply.escrow_confirmed_at.CopyFrom(to_timestamp(gate.confirmed_at))
            if gate.checkpointed_at is not None:
                reply.checkpointed_at.CopyFrom(to_timestamp(gate.checkpointed_at))
        return reply

    # --- cases -----------------------------------------------------------------------------

    async def CreateCase(
        self, request: node_pb.CreateCaseRequest, context: Context
    ) -> node_pb.CreateCaseResponse:
        fields = _checked_fields(serde.fields_of(request.fields))
        needs = tuple(
            (serde.need_category(n.category), serde.need_status(n.status)) for n in request.needs
        )
        if len({category for category, _ in needs}) != len(needs):
            # Found by fuzzing (issue 16): the store's unique need index answered INTERNAL.
            raise InvalidInput(
                "a need category appears twice; a case has at most one need of each category",
                hint="give each category once, with its current status",
            )
        case = await _run(
            self._store.create_case,
            _actor(),
            NewCase(fields=fields, notes=request.notes, needs=needs),
            request.idempotency_key[:128],
        )
        return node_pb.CreateCaseResponse(case=serde.case_pb(case))

    async def GetCase(
        self, request: node_pb.GetCaseRequest, context: Context
    ) -> node_pb.GetCaseResponse:
        case = await _run(self._store.get_case, _actor(), _case_id(request.case_id))
        return node_pb.GetCaseResponse(case=serde.case_pb(case))

    async def UpdateCase(
        self, request: node_pb.UpdateCaseRequest, context: Context
    ) -> node_pb.UpdateCaseResponse:
        changes = _checked_fields(serde.fields_of(request.set_fields))
        for name in request.clear_fields:
            if htcds.canonical_field(name) is None:
                raise InvalidInput(f"unknown field {name!r}", hint="see docs/data-model.md")
            changes[htcds.canonical_field(name) or name] = ""
        notes = request.notes if request.HasField("notes") else None
        case = await _run(
            self._store.update_case,
            _actor(),
            _case_id(request.case_id),
            request.expected_version,
            changes,
            notes,
        )
        return node_pb.UpdateCaseResponse(case=serde.case_pb(case))

    async def ListCases(
        self, request: node_pb.ListCasesRequest, context: Context
    ) -> node_pb.ListCasesResponse:
        size = min(request.page_size or _DEFAULT_PAGE, _MAX_PAGE)
        offset = _page_offset(request.page_token)
        need = serde.need_category(request.need) if request.need else None
        need_status = serde.need_status(request.need_status) if request.need_status else None
        include = _field_names(request.fields)
        if include:
            cases = await _run(
                self._store.list_cases_with_fields,
                _actor(),
                serde.case_state(request.status),
                need,
                need_status,
                size,
                offset,
            )
            items = [serde.case_pb(c, include=include, with_notes=False) for c in cases]
        else:
            summaries = await _run(
                self._store.list_cases,
                serde.case_state(request.status),
                size,
                offset,
                need,
                need_status,
            )
            items = [serde.summary_pb(s) for s in summaries]
        token = str(offset + size) if len(items) == size else ""
        return node_pb.ListCasesResponse(cases=items, next_page_token=token)

    async def FindCases(
        self, request: node_pb.FindCasesRequest, context: Context
    ) -> node_pb.FindCasesResponse:
        given = {k: v for k, v in serde.fields_of(request.identifiers).items() if v}
        kind = _IDENTIFIER_KINDS.get(frozenset(given))
        if kind is None:
            raise InvalidInput(
                "search by name (prs_FirstName and prs_SecondName), prs_Email, prs_MobilePhone "
                "or prs_HomePhone",
                hint="the node keeps keyed blind indexes for exactly these identifiers",
            )
        value = (
            " ".join(given[n] for n in ("prs_FirstName", "prs_SecondName") if n in given)
            if kind == "name"
            else next(iter(given.values()))
        )
        include = _field_names(request.fields)
        found = await _run(self._store.find_cases, _actor(), kind, value)
        if include:
            cases = [await _run(self._store.get_case, _actor(), s.case_id) for s in found]
            return node_pb.FindCasesResponse(
                cases=[serde.case_pb(c, include=include, with_notes=False) for c in cases]
            )
        return node_pb.FindCasesResponse(cases=[serde.summary_pb(s) for s in found])

    async def CloseCase(
        self, request: node_pb.CloseCaseRequest, context: Context
    ) -> node_pb.CloseCaseResponse:
        summary = await _run(
            self._store.close_case, _actor(), _case_id(request.case_id), request.expected_version
        )
        return node_pb.CloseCaseResponse(case=serde.summary_pb(summary))

    async def EraseCase(
        self, request: node_pb.EraseCaseRequest, context: Context
    ) -> node_pb.EraseCaseResponse:
        case_id = _case_id(request.case_id)
        # Found before the erasure takes the case's identifiers with it; named, never erased.
        # A node that may open no case (escrow unconfirmed) still erases, naming none.
        opens = self._gate is None or self._gate.opens_cases()
        others = await _run(imports.same_survivor_cases, self._store, case_id) if opens else []
        await _run(self._store.erase_case, _actor(), case_id)
        self._wake_escrow()  # the tombstone leaves for the broker now
        return node_pb.EraseCaseResponse(
            case_id=case_id,
            erased_at=serde.timestamp(dt.datetime.now(dt.UTC)),
            same_survivor_case_ids=others,
        )

    async def SetNeed(
        self, request: node_pb.SetNeedRequest, context: Context
    ) -> node_pb.SetNeedResponse:
        identified = _date(request.need.identified_on) if request.need.identified_on else None
        await _run(
            self._store.set_need,
            _actor(),
            _case_id(request.case_id),
            serde.need_category(request.need.category),
            serde.need_status(request.need.status),
            identified,
        )
        summary = await _run(self._store.summary, request.case_id)
        return node_pb.SetNeedResponse(case=serde.summary_pb(summary))

    # --- import and export -----------------------------------------------------------------

    async def ImportCases(
        self, request: node_pb.ImportCasesRequest, context: Context
    ) -> AsyncIterator[node_pb.ImportCasesEvent]:
        suffix = {node_pb.FILE_FORMAT_CSV: ".csv", node_pb.FILE_FORMAT_XLSX: ".xlsx"}.get(
            request.format
        )
        if suffix is None:
            raise InvalidInput("the file format is required", hint="csv or xlsx")
        policy = serde.duplicate_policy(request.on_duplicate)
        events: asyncio.Queue[node_pb.ImportCasesEvent | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(event: node_pb.ImportCasesEvent | None) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        actor = _actor()
        job = asyncio.ensure_future(
            asyncio.to_thread(self._import, actor, request, suffix, policy, emit)
        )
        job.add_done_callback(lambda _f: emit(None))
        while (event := await events.get()) is not None:
            yield event
        result = await job  # re-raises a failure of the import as its typed error
        yield node_pb.ImportCasesEvent(result=result)

    def _import(
        self,
        actor: str,
        request: node_pb.ImportCasesRequest,
        suffix: str,
        policy: DuplicatePolicy,
        emit: Callable[[node_pb.ImportCasesEvent | None], None],
    ) -> node_pb.ImportResult:
        def progress(checked: int = 0, written: int = 0, total: int = 0) -> None:
            emit(
                node_pb.ImportCasesEvent(
                    progress=node_pb.ImportProgress(
                        rows_checked=checked, rows_written=written, rows_total=total
                    )
                )
            )

        with self._scratch_file(request.content, suffix) as path:
            total = htcds.count_rows(path) or 0
            report = htcds.validate_file(
                path, lambda n: progress(n, 0, total) if n % 500 == 0 else None
            )
        problems = [
            node_pb.RowProblem(row=n, field=e.field, reason=e.reason)
            for n, errors in report.bad
            for e in errors
        ]
        if report.bad and not request.skip_bad_rows:
            return node_pb.ImportResult(imported=0, rejected=len(report.bad), problems=problems)
        progress(report.rows, 0, report.rows)
        outcome = imports.import_cases(
            self._store,
            actor,
            report.good,
            policy,
            detail={"file": request.file_name[:200], "rejected": len(report.bad)},
            on_progress=lambda written: progress(report.rows, written, report.rows),
            idempotency_key=request.idempotency_key[:128],
        )
        return node_pb.ImportResult(
            imported=len(outcome.case_ids),
            rejected=len(report.bad),
            problems=problems,
            case_ids=outcome.case_ids,
            rows=[serde.row_outcome_pb(o) for o in outcome.rows],
        )

    async def ExportCases(
        self, request: node_pb.ExportCasesRequest, context: Context
    ) -> AsyncIterator[node_pb.ExportCasesChunk]:
        writer = {
            node_pb.FILE_FORMAT_CSV: (htcds.write_csv, ".csv"),
            node_pb.FILE_FORMAT_XLSX: (htcds.write_xlsx, ".xlsx"),
        }.get(request.format)
        if writer is None:
            raise InvalidInput("the file format is required", hint="csv or xlsx")
        write, suffix = writer
        actor = _actor()
        state = serde.case_state(request.status)

        def produce() -> tuple[bytes, int]:
            records = [
                {**case.fields, CASE_ID_COLUMN: case.case_id}
                for case in self._store.export_cases(actor, state)
            ]
            with self._scratch_file(b"", suffix) as path:
                write(path, records, (CASE_ID_COLUMN,))
                return path.read_bytes(), len(records)

        content, total = await _run(produce)
        for start in range(0, max(len(content), 1), _CHUNK):
            yield node_pb.ExportCasesChunk(
                data=content[start : start + _CHUNK], cases_done=total, cases_total=total
            )

    def _scratch_file(self, content: bytes, suffix: str) -> Any:
        """A private temporary file inside the node's home, removed on exit (even on error)."""
        return _Scratch(self._settings.home / "tmp", content, suffix)

    # --- audit -----------------------------------------------------------------------------

    async def VerifyAudit(
        self, request: node_pb.VerifyAuditRequest, context: Context
    ) -> node_pb.VerifyAuditResponse:
        client = self.escrow.client if self.escrow is not None else None
        checkpoint = await _run(
            escrow.latest_checkpoint, self._settings.home, self._keyring.identity, client
        )
        report = await _run(self._store.verify_audit, checkpoint)
        reply = node_pb.VerifyAuditResponse(
            intact=report.ok,
            entries=report.entries,
            problems=list(report.problems),
            notes=list(report.notes),
        )
        if report.checkpoint is not None:
            reply.checkpoint_number = report.checkpoint.number
            reply.checkpoint_sequence = report.checkpoint.seq
            reply.checkpointed_at.CopyFrom(to_timestamp(report.checkpoint.at))
            reply.checkpoint_source = report.checkpoint.source
        return reply

    async def ShowAudit(
        self, request: node_pb.ShowAuditRequest, context: Context
    ) -> node_pb.ShowAuditResponse:
        size = min(request.page_size or _DEFAULT_PAGE, _MAX_PAGE)
        after = _page_offset(request.page_token)
        since = to_datetime(request.since) if request.HasField("since") else None
        entries = await _run(
            lambda: self._store.audit_entries(
                _case_id(request.case_id) if request.case_id else None,
                tuple(a.strip() for a in request.actions if a.strip()),
                actor=request.actor.strip() or None,
                since=since,
                after=after,
                limit=size,
            )
        )
        token = str(entries[-1].seq) if len(entries) == size else ""
        return node_pb.ShowAuditResponse(
            entries=[serde.audit_record_pb(e) for e in entries], next_page_token=token
        )

    async def ListDisclosures(
        self, request: node_pb.ListDisclosuresRequest, context: Context
    ) -> node_pb.ListDisclosuresResponse:
        entries = await _run(self._store.disclosures, _case_id(request.case_id))
        return node_pb.ListDisclosuresResponse(
            disclosures=[serde.disclosure_pb(e) for e in entries]
        )

    # --- staff and keys --------------------------------------------------------------------

    async def AddStaff(
        self, request: node_pb.AddStaffRequest, context: Context
    ) -> node_pb.AddStaffResponse:
        name = request.name.strip()
        if not name or len(name) > 128:
            raise InvalidInput("a staff member needs a name of 1 to 128 characters")
        if len(request.signing_key) != 32:
            raise InvalidInput("signing_key must be a 32-byte Ed25519 public key")
        member = await _run(
            self._store.add_staff,
            _actor(),
            name,
            serde.staff_role(request.role),
            request.signing_key,
        )
        return node_pb.AddStaffResponse(staff=serde.staff_pb(member))

    async def RemoveStaff(
        self, request: node_pb.RemoveStaffRequest, context: Context
    ) -> node_pb.RemoveStaffResponse:
        member = await _run(self._store.remove_staff, _actor(), request.staff_id)
        self._wake_escrow()
        return node_pb.RemoveStaffResponse(staff=serde.staff_pb(member))

    async def ListStaff(
        self, request: node_pb.ListStaffRequest, context: Context
    ) -> node_pb.ListStaffResponse:
        members = await _run(self._store.list_staff)
        shown = [m for m in members if m.active or request.include_removed]
        return node_pb.ListStaffResponse(staff=[serde.staff_pb(m) for m in shown])

    async def RotateKeyEncryptionKey(
        self, request: node_pb.RotateKeyEncryptionKeyRequest, context: Context
    ) -> node_pb.RotateKeyEncryptionKeyResponse:
        from node.keyring import new_kek_spec

        which = request.WhichOneof("new_key")
        if which == "new_passphrase":
            spec: KekSpec = new_kek_spec(KekSource.PASSPHRASE, self._settings.argon2, None)
            secret: str | None = request.new_passphrase
        elif which == "new_key_file":
            if not request.new_key_file.strip() or "\x00" in request.new_key_file:
                # Found by fuzzing (issue 16): a NUL byte in the path answered INTERNAL.
                raise InvalidInput("the new key file needs a path without NUL characters")
            spec = new_kek_spec(
                KekSource.KEY_FILE, self._settings.argon2, Path(request.new_key_file).resolve()
            )
            secret = None
        else:
            raise InvalidInput("give a new passphrase or a new key file")
        # A weak new passphrase is refused there (tessera.passphrases), before anything changes.
        words = (self._settings.name, self._settings.region)
        await _run(rotate, self._settings.home, self._keyring, spec, secret, words)
        await _run(
            self._store.audit, _actor(), "keys.rotate_kek", None, {"source": spec.source.value}
        )
        return node_pb.RotateKeyEncryptionKeyResponse(
            keys_rewrapped=2, rotated_at=serde.timestamp(dt.datetime.now(dt.UTC))
        )

    async def Backup(
        self, request: node_pb.BackupRequest, context: Context
    ) -> AsyncIterator[node_pb.BackupEvent]:
        destination = backup.backup_folder(self._settings.backups_path, request.destination)
        made = await _run(
            backup.create_backup, self._store, self._settings.home, destination, _actor()
        )
        yield node_pb.BackupEvent(
            progress=node_pb.BackupProgress(bytes_done=made.size, bytes_total=made.size)
        )
        yield node_pb.BackupEvent(
            result=node_pb.BackupResult(
                path=str(made.path),
                size=made.size,
                digest=made.digest,
                taken_at=serde.timestamp(made.taken_at),
            )
        )

    # --- later issues ----------------------------------------------------------------------

    # --- consent and referrals (DESIGN.md section 6) ---------------------------------------

    async def GrantConsent(
        self, request: node_pb.GrantConsentRequest, context: Context
    ) -> node_pb.GrantConsentResponse:
        case_id = _case_id(request.case_id)
        recipient = _agency_id(request.receiving_agency_id)
        purpose = serde.need_category(request.purpose)
        categories = frozenset(request.data_categories)
        unknown = sorted(c for c in categories if c not in htcds.DATA_CATEGORIES)
        if not categories or unknown:
            raise InvalidInput(
                f"unknown data categories: {', '.join(unknown)}"
                if unknown
                else "name at least one data category to share",
                hint=f"one or more of: {', '.join(htcds.DATA_CATEGORIES)}",
            )
        if not request.HasField("expires_at"):
            raise InvalidInput("a consent needs an expiry date", hint="--expires YYYY-MM-DD")
        method = _consent_method(request.method)
        actor = _actor()
        witness = request.witnessed_by.strip() or actor
        key = request.idempotency_key[:128] or str(uuid.uuid4())
        consent_id = self._keyed_uuid(b"tessera/v1/consent-id", key)

        def grant() -> consent_mod.Consent:
            with contextlib.suppress(NotFound):
                return self._referrals.consent(consent_id)  # a retried request
            self._recipient(recipient)  # the recipient must be in the directory
            consent = consent_mod.Consent(
                consent_id=consent_id,
                case_id=case_id,
                recipient_agency_id=recipient,
                purpose=purpose,
                categories=categories,
                method=method,
                witnessed_by=witness,
                granted_at=dt.datetime.now(dt.UTC),
                expires_at=to_datetime(request.expires_at),
                revoked_at=None,
                survivor_pseudonym=self._referrals.survivor_pseudonym(case_id, recipient),
            )
            return self._referrals.grant_consent(actor, consent)

        consent = await _run(grant)
        return node_pb.GrantConsentResponse(consent=await _run(self._consent_pb, consent))

    async def ListConsents(
        self, request: node_pb.ListConsentsRequest, context: Context
    ) -> node_pb.ListConsentsResponse:
        case_id = _case_id(request.case_id) if request.case_id else None
        consents = await _run(self._referrals.consents, case_id)
        now = dt.datetime.now(dt.UTC)
        wanted = request.state
        items = [
            await _run(self._consent_pb, c)
            for c in consents
            if wanted == node_pb.CONSENT_STATE_UNSPECIFIED or _consent_state(c, now) == wanted
        ]
        return node_pb.ListConsentsResponse(consents=items)

    async def RevokeConsent(
        self, request: node_pb.RevokeConsentRequest, context: Context
    ) -> node_pb.RevokeConsentResponse:
        consent_id = request.consent_id.strip()
        if not consent_id:
            raise InvalidInput("a consent id is required", hint="`tessera consent list CASE`")
        actor = _actor()
        now = dt.datetime.now(dt.UTC)
        consent, referrals = await _run(self._referrals.revoke_consent, actor, consent_id, now)
        link = await _run(directory_sync.load_link, self._settings.home)
        receipt = consent_mod.receipt_blob(
            self._keyring.identity, link.agency_id, dataclasses.replace(consent, revoked_at=None)
        )
        purged = 0
        channel = rpc.open_aio_channel(
            link.address,
            link.certificate,
            self._keyring.identity,
            self._settings.limits.max_message_bytes,
        )
        try:
            reply = await relay_grpc.RelayStub(channel).PurgeConsent(
                relay_pb.PurgeConsentRequest(consent_commitment=consent_mod.commitment(receipt)),
                timeout=15,
            )
            purged = reply.purged
        except grpc.aio.AioRpcError as exc:  # the revocations below still reach the recipient
            log.warning("consent.purge_failed", extra=fields(error=str(exc.details())[:200]))
        finally:
            await channel.close()
        revoked_at = consent.revoked_at or now

        def revoke_each() -> list[str]:
            done = []
            for referral in referrals:
                record = self._recipient(referral.recipient_id)
                message_id = str(uuid.uuid4())
                sealed = envelopes.revocation_envelope(
                    self._keyring.identity,
                    link.agency_id,
                    record,
                    referral.referral_id,
                    consent.consent_id,
                    revoked_at,
                    dt.datetime.now(dt.UTC),
                    message_id,
                )
                self._referrals.record_revocation_sent(
                    actor, referral.referral_id, sealed, message_id
                )
                done.append(referral.referral_id)
            return done

        revoked_ids = await _run(revoke_each)
        self.wake_relay()
        return node_pb.RevokeConsentResponse(
            consent=await _run(self._consent_pb, consent),
            envelopes_purged=purged,
            revoked_referral_ids=revoked_ids,
        )

    async def SendReferral(
        self, request: node_pb.SendReferralRequest, context: Context
    ) -> node_pb.SendReferralResponse:
        case_id = _case_id(request.case_id)
        consent_id = request.consent_id.strip()
        if not consent_id:
            raise InvalidInput(
                "a referral is sent under a consent", hint="`tessera consent list CASE`"
            )
        recipient = _agency_id(request.recipient_agency_id)
        need = serde.need_category(request.need)
        requested = _field_names(request.fields)
        note = request.note
        actor = _actor()
        key = request.idempotency_key[:128] or str(uuid.uuid4())
        referral_id = self._keyed_uuid(b"tessera/v1/referral-id", key)
        message_id = self._keyed_uuid(b"tessera/v1/referral-message-id", key)

        def send() -> OutgoingReferral:
            with contextlib.suppress(NotFound):
                return self._referrals.outgoing_by_id(referral_id)  # a retried request
            consent = self._referrals.consent(consent_id)
            if consent.case_id != case_id:
                raise Refused(
                    f"consent {consent_id} belongs to another case",
                    hint="send under a consent recorded for this case",
                )
            now = dt.datetime.now(dt.UTC)
            # The gate: nothing is read or serialised unless the consent covers it.
            consent_mod.check_covers(consent, recipient, need, requested, now, note=note)
            case = self._store.get_case(actor, case_id)
            allowed = consent_mod.minimise(case.fields, consent)
            chosen = (
                {name: allowed[name] for name in requested if name in allowed}
                if requested
                else allowed
            )
            consent_mod.check_covers(consent, recipient, need, chosen, now, note=note)
            link = directory_sync.load_link(self._settings.home)
            record = self._recipient(recipient)
            receipt = consent_mod.receipt_blob(self._keyring.identity, link.agency_id, consent)
            sealed = envelopes.referral_envelope(
                self._keyring.identity,
                link.agency_id,
                record,
                referral_id,
                need,
                chosen,
                note,
                receipt,
                now,
                message_id,
                sender_contact=request.sender_contact,
            )
            return self._referrals.record_sent(
                actor,
                referral_id,
                case_id,
                consent,
                recipient,
                record.name,
                need,
                list(chosen),
                key,
                sealed,
                message_id,
                consent_commitment=consent_mod.commitment(receipt),
                note=note,
                now=now,
            )

        referral = await _run(send)
        self.wake_relay()
        return node_pb.SendReferralResponse(referral=_outgoing_pb(referral))

    async def ListReferrals(
        self, request: node_pb.ListReferralsRequest, context: Context
    ) -> node_pb.ListReferralsResponse:
        size = min(request.page_size or _DEFAULT_PAGE, _MAX_PAGE)
        offset = _page_offset(request.page_token)
        states = [_referral_state(request.state)] if request.state else None
        case_id = _case_id(request.case_id) if request.case_id else None
        items: list[node_pb.ReferralRecord] = []
        if request.direction != node_pb.REFERRAL_DIRECTION_INCOMING:
            sent = await _run(
                lambda: self._referrals.outgoing(case_id, states=states, limit=size, offset=offset)
            )
            items.extend(_outgoing_pb(r) for r in sent)
        if request.direction != node_pb.REFERRAL_DIRECTION_OUTGOING and case_id is None:
            got = await _run(lambda: self._referrals.inbox(states, limit=size, offset=offset))
            names = await _run(self._agency_names)
            items.extend(_incoming_pb(r, names) for r in got)
        items.sort(key=lambda r: to_datetime(r.updated_at), reverse=True)
        token = str(offset + size) if len(items) >= size else ""
        return node_pb.ListReferralsResponse(referrals=items, next_page_token=token)

    async def Inbox(self, request: node_pb.InboxRequest, context: Context) -> node_pb.InboxResponse:
        size = min(request.page_size or _DEFAULT_PAGE, _MAX_PAGE)
        offset = _page_offset(request.page_token)
        states = None if request.include_answered else [ReferralState.DELIVERED]
        got = await _run(lambda: self._referrals.inbox(states, limit=size, offset=offset))
        names = await _run(self._agency_names)
        token = str(offset + size) if len(got) == size else ""
        return node_pb.InboxResponse(
            referrals=[_incoming_pb(r, names) for r in got], next_page_token=token
        )

    async def ShowReferral(
        self, request: node_pb.ShowReferralRequest, context: Context
    ) -> node_pb.ShowReferralResponse:
        referral_id = request.referral_id.strip()
        if not referral_id:
            raise InvalidInput("a referral id is required", hint="`tessera referral list`")
        actor = _actor()
        try:
            incoming = await _run(self._referrals.incoming, referral_id, actor)
        except NotFound:
            outgoing = await _run(self._referrals.outgoing_by_id, referral_id)
            consent = await _run(self._referrals.consent, outgoing.consent_id)
            consent_pb = await _run(self._consent_pb, consent)
            await _run(
                self._store.audit,
                actor,
                "referral.read",
                outgoing.case_id,
                {"referral_id": referral_id, "recipient_id": outgoing.recipient_id},
            )
            return node_pb.ShowReferralResponse(
                referral=_outgoing_pb(outgoing),
                fields=[common_pb.Field(name=n) for n in outgoing.fields],
                consent=consent_pb.receipt,
            )
        names = await _run(self._agency_names)
        reply = node_pb.ShowReferralResponse(referral=_incoming_pb(incoming, names))
        content = incoming.content
        if content is not None:
            reply.fields.extend(serde.fields_pb(dict(content.fields)))
            reply.note = content.note
            reply.sender_contact = content.sender_contact
            reply.consent.ParseFromString(content.receipt_body)
        return reply

    async def AnswerReferral(
        self, request: node_pb.AnswerReferralRequest, context: Context
    ) -> node_pb.AnswerReferralResponse:
        referral_id = request.referral_id.strip()
        if not referral_id:
            raise InvalidInput("a referral id is required", hint="`tessera referral inbox`")
        status = {
            node_pb.REFERRAL_ANSWER_ACCEPT: ReferralStatus.ACCEPTED,
            node_pb.REFERRAL_ANSWER_DECLINE: ReferralStatus.DECLINED,
            node_pb.REFERRAL_ANSWER_COMPLETE: ReferralStatus.COMPLETED,
        }.get(request.answer)
        if status is None:
            raise InvalidInput("the answer is required", hint="accept, decline or complete")
        reason = _decline_reason(request.decline_reason)
        text = request.decline_text
        actor = _actor()

        def answer() -> IncomingReferral:
            sender_id = self._referrals.incoming_sender(referral_id)
            link = directory_sync.load_link(self._settings.home)
            record = self._recipient(sender_id)
            message_id = str(uuid.uuid4())
            now = dt.datetime.now(dt.UTC)
            sealed = envelopes.status_envelope(
                self._keyring.identity,
                link.agency_id,
                record,
                referral_id,
                status,
                reason,
                text,
                now,
                message_id,
            )
            return self._referrals.answer(
                actor,
                referral_id,
                status,
                reason,
                text,
                reply=OutgoingEnvelope(sender_id, message_id, sealed),
            )

        answered = await _run(answer)
        self.wake_relay()
        names = await _run(self._agency_names)
        return node_pb.AnswerReferralResponse(referral=_incoming_pb(answered, names))

    # --- helpers for consent and referrals ----------------------------------------------------

    def _keyed_uuid(self, label: bytes, key: str) -> str:
        """An unguessable UUID that the same idempotency key always maps to (retries)."""
        digest = crypto.blind_index(crypto.derive_key(self._keyring.record_key, label), key)
        return str(uuid.UUID(hex=digest[:32], version=4))

    def _recipient(self, agency_id: str) -> directory.AgencyRecord:
        """The pinned record of an agency, syncing the directory once if it is not known."""
        record = directory_sync.load_cache(self._settings.home).records.get(agency_id)
        if record is None:
            record = self._synced_directory().records.get(agency_id)
        if record is None:
            raise InvalidInput(
                f"no agency {agency_id!r} in the directory",
                hint="`tessera agency list` shows the agencies there are",
            )
        return record

    def _agency_names(self) -> dict[str, str]:
        cache = directory_sync.load_cache(self._settings.home)
        return {agency_id: r.name for agency_id, r in cache.records.items()}

    def _consent_pb(self, consent: consent_mod.Consent) -> node_pb.Consent:
        link = directory_sync.load_link(self._settings.home)
        blob = consent_mod.receipt_blob(
            self._keyring.identity, link.agency_id, dataclasses.replace(consent, revoked_at=None)
        )
        referral_ids = [
            r.referral_id for r in self._referrals.outgoing(consent_id=consent.consent_id)
        ]
        message = node_pb.Consent(
            signed_receipt=blob,
            case_id=consent.case_id,
            state=_consent_state(consent, dt.datetime.now(dt.UTC)),
            referral_ids=referral_ids,
        )
        message.receipt.ParseFromString(blob.body)
        if consent.revoked_at is not None:
            message.revoked_at.CopyFrom(to_timestamp(consent.revoked_at))
        return message

    async def ListAgencies(
        self, request: node_pb.ListAgenciesRequest, context: Context
    ) -> node_pb.ListAgenciesResponse:
        cache = await _run(self._synced_directory)
        wanted = serde.need_category(request.service).value if request.service else None
        agencies = [
            _agency_pb(record, record.agency_id in cache.verified)
            for agency_id, record in sorted(cache.records.items())
            if (request.include_revoked or not record.revoked)
            and (wanted is None or wanted in record.services)
        ]
        return node_pb.ListAgenciesResponse(agencies=agencies)

    async def VerifyAgency(
        self, request: node_pb.VerifyAgencyRequest, context: Context
    ) -> node_pb.VerifyAgencyResponse:
        cache = await _run(self._synced_directory)
        record = cache.records.get(request.agency_id)
        if record is None:
            raise InvalidInput(
                f"no agency {request.agency_id!r} in the directory",
                hint="`tessera agency list` shows the agencies there are",
            )

        def plain(text: str) -> str:
            return "".join(ch for ch in text.upper() if ch.isalnum())

        if plain(request.key_fingerprint) != plain(record.identity.fingerprint()):
            raise Refused(
                f"the fingerprint read out does not match the one pinned for {record.name}",
                hint="do not trust this agency's key; call them back on a number you know",
            )
        await _run(directory_sync.mark_verified, self._settings.home, record.agency_id)
        await _run(
            self._store.audit, _actor(), "agency.verified", None, {"agency": record.agency_id}
        )
        return node_pb.VerifyAgencyResponse(agency=_agency_pb(record, True))

    def _synced_directory(self) -> directory_sync.DirectoryCache:
        link = directory_sync.load_link(self._settings.home)
        return directory_sync.sync(self._settings.home, self._keyring.identity, link)

    async def BudgetStatus(
        self, request: node_pb.BudgetStatusRequest, context: Context
    ) -> node_pb.BudgetStatusResponse:
        budget = BudgetStore(self._store, default_cap=self._settings.stats.budget_cap)
        if request.period:
            periods = [await _run(budget.period, request.period)]
        else:
            current = stats.period_of(dt.datetime.now(dt.UTC))
            periods = await _run(budget.periods, current)
        return node_pb.BudgetStatusResponse(
            periods=[
                node_pb.BudgetPeriod(
                    period=p.period,
                    cap=p.cap,
                    spent=p.spent,
                    remaining=p.remaining,
                    charges=[
                        node_pb.BudgetCharge(
                            round_id=c.round_id,
                            attempt=c.attempt,
                            table=c.table,
                            epsilon=c.epsilon,
                            charged_at=serde.timestamp(c.charged_at),
                        )
                        for c in p.charges
                    ],
                )
                for p in periods
            ]
        )


def _agency_pb(record: directory.AgencyRecord, verified: bool) -> node_pb.Agency:
    return node_pb.Agency(
        agency=common_pb.AgencyRef(agency_id=record.agency_id, name=record.name),
        region=record.region,
        services=[serde.need_category_pb(htcds.NeedCategory(c)) for c in record.services],
        key_fingerprint=record.identity.fingerprint(),
        verified=verified,
        pinned_at=serde.timestamp(record.valid_from),
        revoked=record.revoked,
    )


class _Scratch:
    """Context manager for a 0600 file in a 0700 folder of the node's home; always removed."""

    def __init__(self, folder: Path, content: bytes, suffix: str) -> None:
        self._folder = folder
        self._content = content
        self._suffix = suffix
        self._path: Path | None = None

    def __enter__(self) -> Path:
        self._folder.mkdir(mode=0o700, exist_ok=True)
        fd, name = tempfile.mkstemp(suffix=self._suffix, dir=self._folder)
        with os.fdopen(fd, "wb") as handle:
            handle.write(self._content)
        self._path = Path(name)
        return self._path

    def __exit__(self, *exc: object) -> None:
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            self._path.with_name(self._path.name + ".tmp").unlink(missing_ok=True)


def _agency_id(value: str) -> str:
    value = value.strip()
    if not value or len(value) > 128:
        raise InvalidInput("an agency id is required", hint="`tessera agency list` shows them")
    return value


def _consent_method(value: int) -> consent_mod.ConsentMethod:
    code = serde.wire_code(consent_pb.ConsentMethod, "CONSENT_METHOD_", value)
    if code not in {m.value for m in consent_mod.ConsentMethod}:
        raise InvalidInput(
            "how consent was given is required", hint="verbal, written or electronic"
        )
    return consent_mod.ConsentMethod(code)


def _consent_state(
    consent: consent_mod.Consent, now: dt.datetime
) -> node_pb.ConsentState.ValueType:
    if consent.revoked:
        return node_pb.CONSENT_STATE_REVOKED
    if now >= consent.expires_at:
        return node_pb.CONSENT_STATE_EXPIRED
    return node_pb.CONSENT_STATE_ACTIVE


def _referral_state_pb(state: ReferralState) -> node_pb.ReferralState.ValueType:
    return serde.wire_enum(node_pb.ReferralState, "REFERRAL_STATE_", state.value)


def _referral_state(value: int) -> ReferralState:
    code = serde.wire_code(node_pb.ReferralState, "REFERRAL_STATE_", value)
    if code not in {s.value for s in ReferralState}:
        raise InvalidInput("unknown referral state", hint=", ".join(s.value for s in ReferralState))
    return ReferralState(code)


def _decline_reason(value: int) -> DeclineReason | None:
    if value == referral_pb.DECLINE_REASON_UNSPECIFIED:
        return None
    code = serde.wire_code(referral_pb.DeclineReason, "DECLINE_REASON_", value)
    if not code:
        raise InvalidInput("unknown decline reason")
    return DeclineReason(code)


def _decline_reason_pb(reason: DeclineReason | None) -> referral_pb.DeclineReason.ValueType:
    if reason is None:
        return referral_pb.DECLINE_REASON_UNSPECIFIED
    return serde.wire_enum(referral_pb.DeclineReason, "DECLINE_REASON_", reason.value)


def _steps_pb(steps: Any) -> list[node_pb.ReferralStep]:
    return [
        node_pb.ReferralStep(state=_referral_state_pb(s.state), at=serde.timestamp(s.at))
        for s in steps
    ]


def _outgoing_pb(referral: OutgoingReferral) -> node_pb.ReferralRecord:
    return node_pb.ReferralRecord(
        referral_id=referral.referral_id,
        direction=node_pb.REFERRAL_DIRECTION_OUTGOING,
        case_id=referral.case_id,
        counterpart=common_pb.AgencyRef(
            agency_id=referral.recipient_id, name=referral.recipient_name
        ),
        need=serde.need_category_pb(referral.need),
        state=_referral_state_pb(referral.state),
        decline_reason=_decline_reason_pb(referral.decline_reason),
        decline_text=referral.decline_text,
        consent_id=referral.consent_id,
        created_at=serde.timestamp(referral.created_at),
        updated_at=serde.timestamp(referral.updated_at),
        history=_steps_pb(referral.history),
    )


def _incoming_pb(referral: IncomingReferral, names: dict[str, str]) -> node_pb.ReferralRecord:
    return node_pb.ReferralRecord(
        referral_id=referral.referral_id,
        direction=node_pb.REFERRAL_DIRECTION_INCOMING,
        counterpart=common_pb.AgencyRef(
            agency_id=referral.sender_id, name=names.get(referral.sender_id, "")
        ),
        need=(
            serde.need_category_pb(referral.need)
            if referral.need is not None
            else common_pb.NEED_CATEGORY_UNSPECIFIED
        ),
        state=_referral_state_pb(referral.state),
        decline_reason=_decline_reason_pb(referral.decline_reason),
        decline_text=referral.decline_text,
        consent_id=referral.consent_id,
        created_at=serde.timestamp(referral.received_at),
        updated_at=serde.timestamp(referral.updated_at),
        history=_steps_pb(referral.history),
    )


def _case_id(value: str) -> str:
    value = value.strip()
    if not value or len(value) > 36:
        raise InvalidInput("a case id is required", hint="`tessera case list` shows case ids")
    return value


def _date(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise InvalidInput(f"{value!r} is not a date (YYYY-MM-DD)") from None


def _page_offset(token: str) -> int:
    if not token:
        return 0
    # ASCII digits only, and few of them (found by fuzzing, issue 16): int() refused a token of
    # other Unicode digits, and an offset past SQLite's 64-bit integers failed in the query.
    if not (token.isascii() and token.isdigit()) or len(token) > 15:
        raise InvalidInput("that page token is not one this node issued")
    return int(token)


def _field_names(names: Any) -> list[str]:
    result = []
    for name in names:
        canonical = htcds.canonical_field(name)
        if canonical is None:
            raise InvalidInput(f"unknown field {name!r}", hint="see docs/data-model.md")
        result.append(canonical)
    return result
