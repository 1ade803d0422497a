"""The node's gRPC servicer: validate, call the store, convert (STYLE.md habit 9).

Authentication, authorisation and the mapping of typed errors to status codes happen in the
interceptor (tessera.rpc with node.access); handlers only read who is calling. Store calls are
blocking (SQLModel), so they run in worker threads to keep the event loop free.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import tessera
from node import backup, escrow, htcds, serde, stats
from node.dedup import CASE_ID_COLUMN
from node.domain import CaseState, DuplicatePolicy, StaffRole
from node.edge import DEFAULT_PAGE as _DEFAULT_PAGE
from node.edge import MAX_PAGE as _MAX_PAGE
from node.edge import Context
from node.edge import actor as _actor
from node.edge import case_id as _case_id
from node.edge import field_names as _field_names
from node.edge import page_offset as _page_offset
from node.edge import run as _run
from node.keyring import KekSpec, Keyring, rotate
from node.referral_service import ReferralService
from node.referrals.flows import OFFLINE, Courier, Referrals
from node.store import imports
from node.store.budget import BudgetStore
from node.store.cases import NewCase, NodeStore
from node.store.escrow import EscrowStore
from tessera import rpc
from tessera.config import KekSource, Settings
from tessera.errors import InvalidInput
from tessera.timestamps import to_datetime, to_timestamp
from tessera.v1 import node_pb2 as node_pb

log = logging.getLogger(__name__)
T = TypeVar("T")
_CHUNK = 256 * 1024
# Which HTCDS fields feed each blind-index kind, for FindCases (node.store.cases indexes them).
_IDENTIFIER_KINDS: dict[frozenset[str], str] = {
    frozenset({"prs_FirstName", "prs_SecondName"}): "name",
    frozenset({"prs_Email"}): "email",
    frozenset({"prs_MobilePhone"}): "phone",
    frozenset({"prs_HomePhone"}): "phone",
}


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


class NodeServicer(ReferralService):
    """Implements tessera.v1.Node for the node's own staff (cases, needs, staff, keys, audit)."""

    def __init__(
        self,
        settings: Settings,
        store: NodeStore,
        keyring: Keyring,
        referrals: Referrals | None = None,
        gate: escrow.EscrowGate | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._keyring = keyring
        self.referrals = referrals or Referrals(store, settings.home)
        self._gate = gate
        #: Set by start_node to the relay worker, once the node is enrolled.
        self.relay: Courier = OFFLINE
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
            escrow.latest_checkpoint, self._settings.home, self._keyring.identities, client
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
        from node.keyring import check_current_secret as keyring_check
        from node.keyring import new_kek_spec

        # Proof the caller knows the secret in force, not only an administrator's credential;
        # checked before anything (a new key file included) is written.
        await _run(keyring_check, self._settings.home, request.current_passphrase or None)
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


def _date(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise InvalidInput(f"{value!r} is not a date (YYYY-MM-DD)") from None
