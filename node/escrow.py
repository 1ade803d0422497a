"""The node's side of the escrow: erasures that outlive the home, and audit checkpoints
(DESIGN.md sections 5 and 6; issue 14; docs/storage.md, "Erasures that outlive the home").

Every erasure and staff removal is queued, in the transaction that makes it, as a tombstone the
node seals to itself (node.tombstones, node.store.anchors); :class:`EscrowWorker` deposits the
queue at the broker, and keeps the node's audit head checkpointed there. On every start and
every restore, :func:`reconcile` fetches the node's whole escrow, checks it against the signed
head and the anchors the node keeps, re-applies every tombstone, and compares the audit log with
the latest checkpoint.

The rule that makes this sound is :class:`EscrowGate`'s: **a node opens no case until it has
confirmed, since it started, that its database holds every escrowed erasure.** Nothing kept on
the node's own machine can tell a normal restart from a restart on a copy of the whole machine
(database, ledger and anchors alike) taken before an erasure: only the broker holds something
that copy does not. So while the broker cannot be reached after a start, the node serves only
its status and the audit check; once confirmed, it knows every erasure and removal there is (the
ones escrowed before, and the ones it makes itself), remembers them in memory so a database
rolled back underneath it cannot bring them back, and keeps serving through broker outages. A
database older than the audit log the node checkpointed (an older copy put in place without
`tessera node restore`) is refused too, until an administrator accepts it with a restore, which
records the rewind in the audit log.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import enum
import json
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from node import directory_sync
from node.domain import CheckpointRef, StaffMember
from node.store.anchors import QueuedTombstone
from node.store.cases import AUDIT_HEAD_FILE, NodeStore
from node.store.escrow import EscrowStore
from node.tombstones import (
    AuditPosition,
    Tombstone,
    TombstoneKind,
    open_position,
    open_tombstone,
    seal_position,
)
from tessera import crypto, escrow, rpc
from tessera.config import Limits
from tessera.errors import (
    BadSignature,
    NotFound,
    RolledBack,
    TesseraError,
    Unavailable,
    WrongRecipient,
)
from tessera.files import atomic_write
from tessera.logs import fields
from tessera.v1 import common_pb2 as common_pb
from tessera.v1 import escrow_pb2 as escrow_pb
from tessera.v1 import escrow_pb2_grpc as escrow_grpc

log = logging.getLogger(__name__)

# Files in the node's home, outside the database (both hold only broker-signed public data).
ANCHOR_FILE = "escrow-anchor"  # the largest escrow head the node confirmed
CHECKPOINT_FILE = "audit-checkpoint"  # the latest broker checkpoint the node saw
ESCROW_ACTOR = "system:escrow"
CALL_TIMEOUT = 10.0
POLL_SECONDS = 2.0
CHECKPOINT_SECONDS = 3600.0
_PAGE = 500
_DEPOSIT_BATCH = 100


class EscrowState(enum.Enum):
    """Whether the node may open cases, as far as erasures and rollbacks go."""

    CONFIRMED = "confirmed"
    UNCONFIRMED = "unconfirmed"
    ROLLED_BACK = "rolled_back"
    NOT_ENROLLED = "not_enrolled"


# What the node still answers while it may not open cases (node.proto, GetStatus and friends).
# Erasing opens nothing and only removes: a survivor can always be erased.
_WHILE_UNCONFIRMED = frozenset({"GetStatus", "VerifyAudit", "ListStaff", "EraseCase"})
_WHILE_ROLLED_BACK = _WHILE_UNCONFIRMED | {"ShowAudit", "Backup"}
_ACCEPT_HINT = (
    "put the newest database back; or, to accept this older copy, take a backup of it "
    "(`tessera node backup`), stop the node and restore that backup (`tessera node restore`), "
    "which records the rewind in the audit log"
)


class EscrowGate:
    """What the running node knows beyond its database (node.store.anchors.CaseGuard).

    Thread-safe: store calls run in worker threads.
    """

    def __init__(self, enrolled: bool, broker: str = "the broker") -> None:
        self._lock = threading.Lock()
        self._broker = broker
        self.state = EscrowState.UNCONFIRMED if enrolled else EscrowState.NOT_ENROLLED
        self.detail = (
            f"not yet confirmed with {broker}"
            if enrolled
            else "not enrolled: erasures are kept only in this home's ledger"
        )
        self.size = 0
        self.confirmed_at: dt.datetime | None = None
        self.checkpointed_at: dt.datetime | None = None
        self._erased: set[str] = set()
        self._removed: set[bytes] = set()

    # --- what it knows ---------------------------------------------------------------------

    def note_erased(self, case_id: str) -> None:
        with self._lock:
            self._erased.add(case_id)

    def note_removed(self, signing_key: bytes) -> None:
        with self._lock:
            self._removed.add(bytes(signing_key))

    def learn(self, erased: Iterable[str], removed: Iterable[bytes]) -> None:
        """Remember erasures and removals the database or the escrow holds."""
        with self._lock:
            self._erased.update(erased)
            self._removed.update(bytes(k) for k in removed)

    def staff_view(self, member: StaffMember | None) -> StaffMember | None:
        """``member`` as the gate sees it: removed if the node knows it was, whatever the
        database says now (a database rolled back under the running node)."""
        if member is None or not member.active:
            return member
        with self._lock:
            removed = member.signing_key in self._removed
        return dataclasses.replace(member, removed_at=_now()) if removed else member

    # --- transitions ---------------------------------------------------------------------

    def confirmed(self, size: int, checkpointed_at: dt.datetime | None) -> None:
        with self._lock:
            if self.state is EscrowState.ROLLED_BACK:
                return  # only a restore, which restarts the node, clears that
            self.state = EscrowState.CONFIRMED
            self.size = size
            self.confirmed_at = _now()
            self.detail = f"every escrowed erasure is applied ({size} tombstones at {self._broker})"
            if checkpointed_at is not None:
                self.checkpointed_at = checkpointed_at

    def unconfirmed(self, reason: str) -> None:
        with self._lock:
            if self.state is EscrowState.UNCONFIRMED:
                self.detail = reason

    def rolled_back(self, reason: str) -> None:
        with self._lock:
            if self.state is not EscrowState.ROLLED_BACK:
                log.error("escrow.rollback_detected", extra=fields(reason=reason[:300]))
            self.state = EscrowState.ROLLED_BACK
            self.detail = f"the database is older than what the node last recorded: {reason}"

    def escrowed(self, size: int) -> None:
        """The broker now holds ``size`` tombstones (after a deposit)."""
        with self._lock:
            self.size = max(self.size, size)

    def checkpointed(self, at: dt.datetime) -> None:
        with self._lock:
            self.checkpointed_at = at

    # --- checks ----------------------------------------------------------------------------

    def _refusal(self) -> TesseraError | None:
        if self.state is EscrowState.UNCONFIRMED:
            return Unavailable(
                "this node has not confirmed its erasures with its broker since it started "
                f"({self.detail}), so it opens no case: one of them might have been erased in "
                "a copy of the node that was lost",
                hint="the node retries on its own; check that its broker is reachable "
                "(`tessera node status`)",
            )
        if self.state is EscrowState.ROLLED_BACK:
            return RolledBack(f"this node opens no case: {self.detail}", hint=_ACCEPT_HINT)
        return None

    def opens_cases(self) -> bool:
        """Whether the node may open any case now."""
        return self._refusal() is None

    def check_cases(self, case_ids: Sequence[str]) -> None:
        """Raise unless the node may open these cases now (empty: whether any may be opened)."""
        refusal = self._refusal()
        if refusal is not None:
            raise refusal
        with self._lock:
            erased = next((c for c in case_ids if c in self._erased), None)
        if erased is not None:
            raise NotFound(f"case {erased} was erased")

    def check_call(self, method: str) -> None:
        """Raise unless a staff call of ``method`` (its short name) may be served now."""
        refusal = self._refusal()
        if refusal is None:
            return
        allowed = (
            _WHILE_ROLLED_BACK if self.state is EscrowState.ROLLED_BACK else _WHILE_UNCONFIRMED
        )
        if method not in allowed:
            raise refusal


# --- the broker's escrow service, as a client ---------------------------------------------------


class EscrowClient:
    """Signed, synchronous calls to the broker's Escrow service for one node (thread-safe)."""

    def __init__(
        self, link: directory_sync.BrokerLink, identities: Sequence[crypto.Identity]
    ) -> None:
        # The first identity signs and seals; every one (retired ones too) opens.
        identity = identities[0]
        self._identities = tuple(identities)
        self.link = link
        self._identity = identity
        self._channel = rpc.open_channel(
            link.address, link.certificate, identity, Limits().max_message_bytes
        )
        self._stub = escrow_grpc.EscrowStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> EscrowClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            raise rpc.error_from_rpc(exc, f"the broker at {self.link.address}") from None

    def deposit(self, items: Sequence[QueuedTombstone]) -> escrow.EscrowHead:
        """Deposit queued tombstones; the broker's verified head after it."""
        reply = self._call(
            self._stub.DepositTombstones,
            escrow_pb.DepositTombstonesRequest(
                tombstones=[
                    escrow_pb.SealedTombstone(tombstone_id=i.tombstone_id, sealed=i.sealed)
                    for i in items
                ]
            ),
        )
        if len(reply.sequences) != len(items):
            raise Unavailable("the broker did not answer for every tombstone deposited")
        return escrow.verify_head(reply.head, self.link.broker_key, self.link.agency_id)

    def tombstones(self) -> tuple[list[Tombstone], escrow.EscrowHead]:
        """The node's whole escrow, verified against the broker's signed head, and opened."""
        entries: list[escrow_pb.EscrowEntry] = []
        while True:
            reply = self._call(
                self._stub.ListTombstones,
                escrow_pb.ListTombstonesRequest(since=len(entries), limit=_PAGE),
            )
            head = escrow.verify_head(reply.head, self.link.broker_key, self.link.agency_id)
            entries.extend(reply.entries)
            if len(entries) >= head.size or not reply.entries:
                break
        escrow.verify_entries(entries[: head.size], head)
        opened = [
            open_tombstone(self._identities, e.tombstone.tombstone_id, bytes(e.tombstone.sealed))
            for e in entries[: head.size]
        ]
        return opened, head

    def checkpoint(self, position: AuditPosition) -> tuple[CheckpointRef, common_pb.SignedBlob]:
        """Checkpoint the audit head at the broker; the checkpoint, opened and as signed."""
        reply = self._call(
            self._stub.Checkpoint,
            escrow_pb.CheckpointRequest(sealed_position=seal_position(self._identity, position)),
        )
        return self._ref(reply.checkpoint), reply.checkpoint

    def latest_checkpoint(self) -> tuple[CheckpointRef, common_pb.SignedBlob] | None:
        """The node's latest checkpoint at the broker, opened and as signed; None if none."""
        reply = self._call(self._stub.LatestCheckpoint, escrow_pb.LatestCheckpointRequest())
        if not reply.HasField("checkpoint"):
            return None
        return self._ref(reply.checkpoint), reply.checkpoint

    def _ref(self, blob: common_pb.SignedBlob) -> CheckpointRef:
        return checkpoint_ref(blob, self.link, self._identities, "broker")


def checkpoint_ref(
    blob: common_pb.SignedBlob,
    link: directory_sync.BrokerLink,
    identities: Sequence[crypto.Identity],
    source: str,
) -> CheckpointRef:
    """A broker-signed checkpoint of this node, verified and opened."""
    checkpoint = escrow.verify_checkpoint(blob, link.broker_key, link.agency_id)
    position = open_position(identities, checkpoint.sealed_position)
    return CheckpointRef(
        number=checkpoint.number,
        seq=position.seq,
        entry_hash=position.entry_hash,
        at=checkpoint.checkpointed_at,
        source=source,
    )


# --- anchors in the home --------------------------------------------------------------------


def forget_agency(home: Path) -> None:
    """Drop the home's record of the escrow and checkpoint of the agency this node was (it is
    enrolled under another id now, whose escrow starts afresh)."""
    for name in (ANCHOR_FILE, CHECKPOINT_FILE):
        (home / name).unlink(missing_ok=True)


def read_anchor_size(home: Path) -> int:
    """The largest escrow size the node confirmed, per its home (0 if none)."""
    try:
        return int(json.loads((home / ANCHOR_FILE).read_text("utf-8"))["size"])
    except (OSError, ValueError, KeyError):
        return 0


def _save_anchor(home: Path, head: escrow.EscrowHead) -> None:
    # Only forward: an older head must never lower what the node knows the escrow holds.
    if head.size >= read_anchor_size(home):
        document = {"size": head.size, "chain": head.chain.hex(), "at": head.signed_at.isoformat()}
        atomic_write(home / ANCHOR_FILE, json.dumps(document).encode())


def save_checkpoint(home: Path, blob: common_pb.SignedBlob) -> None:
    """Keep the latest checkpoint in the home, for `audit verify` when the broker is away."""
    document = {
        name: base64.b64encode(bytes(getattr(blob, name))).decode()
        for name in ("body", "signature", "signer")
    }
    atomic_write(home / CHECKPOINT_FILE, json.dumps(document).encode())


def home_checkpoint(
    home: Path, link: directory_sync.BrokerLink, identities: Sequence[crypto.Identity]
) -> CheckpointRef | None:
    """The checkpoint kept in the home, verified; None if there is none."""
    try:
        document = json.loads((home / CHECKPOINT_FILE).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    blob = common_pb.SignedBlob(**{k: base64.b64decode(v) for k, v in document.items()})
    return checkpoint_ref(blob, link, identities, "home")


def home_head(home: Path) -> AuditPosition | None:
    """The audit head the node last recorded in its home (node.store.audit_log)."""
    try:
        data = json.loads((home / AUDIT_HEAD_FILE).read_text())
        return AuditPosition(int(data["seq"]), bytes.fromhex(data["hash"]))
    except (OSError, ValueError, KeyError):
        return None


def client_for(home: Path, identities: Sequence[crypto.Identity]) -> EscrowClient | None:
    """A client for the node's broker, or None if the node is not enrolled."""
    if not (home / directory_sync.LINK_FILE).exists():
        return None
    return EscrowClient(directory_sync.load_link(home), identities)


# --- reconciling with the escrow ----------------------------------------------------------------

# The whole escrow, its verified head and the latest checkpoint, as fetched.
Fetched = tuple[list[Tombstone], escrow.EscrowHead, CheckpointRef | None]


@dataclass(frozen=True)
class Reconciled:
    """What a reconcile found and did."""

    size: int
    erased_again: int
    removed_again: int
    checkpoint: CheckpointRef | None
    problem: str | None  # the database is older than the node's anchors: why


def fetch(home: Path, client: EscrowClient) -> Fetched:
    """The whole escrow and the latest checkpoint, kept in the home too (raises if the broker
    cannot be reached)."""
    tombstones, head = client.tombstones()
    latest = client.latest_checkpoint()
    if latest is None:
        return tombstones, head, None
    checkpoint, blob = latest
    save_checkpoint(home, blob)
    return tombstones, head, checkpoint


def split(tombstones: Iterable[Tombstone]) -> tuple[list[str], list[bytes]]:
    """Erased case ids and removed staff keys."""
    items = list(tombstones)
    erased = [t.subject for t in items if t.kind is TombstoneKind.ERASURE]
    removed = [bytes.fromhex(t.subject) for t in items if t.kind is TombstoneKind.STAFF_REMOVAL]
    return erased, removed


def reconcile(
    store: NodeStore, home: Path, client: EscrowClient, gate: EscrowGate | None = None
) -> Reconciled:
    """Fetch the whole escrow, re-apply it, and compare the database with the node's anchors.

    The tombstones are applied first, whatever else is found: an erased survivor is gone before
    anyone could ask for them. ``problem`` names what shows this database to be older than the
    node's own record of itself (the latest broker checkpoint, or the audit head in the home)
    and was not recorded by a restore.
    """
    tombstones, head, checkpoint = fetch(home, client)
    escrow_store = EscrowStore(store)
    known = max(escrow_store.anchor().size, read_anchor_size(home))
    if head.size < known:
        # The broker holds fewer tombstones than the node confirmed before (its database was
        # restored): deposit again every one this database knows; ids make this idempotent.
        requeued = escrow_store.requeue_all()
        log.warning(
            "escrow.broker_behind",
            extra=fields(broker_size=head.size, known_size=known, requeued=requeued),
        )
    erased, removed = split(tombstones)
    if gate is not None:
        gate.learn(erased, removed)
    erased_again = store.reapply_erasures(ESCROW_ACTOR, erased, queue=False)
    removed_again = store.reapply_staff_removals(ESCROW_ACTOR, removed, queue=False)
    escrow_store.set_anchor(head.size, head.chain, _now())
    _save_anchor(home, head)
    problem = escrow_store.check_checkpoint(checkpoint) if checkpoint is not None else None
    recorded = home_head(home)
    if problem is None and recorded is not None and not escrow_store.extends(recorded):
        problem = (
            f"its audit log does not hold entry {recorded.seq}, which the node recorded in its home"
        )
    if erased_again or removed_again:
        log.warning(
            "escrow.reapplied",
            extra=fields(erasures=erased_again, staff_removals=removed_again),
        )
    return Reconciled(head.size, erased_again, removed_again, checkpoint, problem)


def apply_to_gate(gate: EscrowGate, result: Reconciled) -> None:
    """Open or close the gate after a reconcile."""
    if result.problem is not None:
        gate.rolled_back(result.problem)
    else:
        gate.confirmed(result.size, result.checkpoint.at if result.checkpoint else None)
        log.info("escrow.confirmed", extra=fields(tombstones=result.size))


def latest_checkpoint(
    home: Path, identities: Sequence[crypto.Identity], client: EscrowClient | None
) -> CheckpointRef | None:
    """The latest checkpoint: from the broker, else (unreachable) the copy in the home."""
    if client is None:
        return None
    try:
        found = client.latest_checkpoint()
    except TesseraError as exc:
        log.warning("escrow.checkpoint_unavailable", extra=fields(error=str(exc)[:200]))
        return home_checkpoint(home, client.link, identities)
    if found is None:
        return None
    save_checkpoint(home, found[1])
    return found[0]


# --- the worker -------------------------------------------------------------------------------


class EscrowWorker:
    """Deposits queued tombstones, confirms the escrow while unconfirmed, checkpoints the audit
    head (after sensitive events and every ``checkpoint_seconds``), and watches that the
    database never goes back under the running node."""

    def __init__(
        self,
        store: NodeStore,
        home: Path,
        client: EscrowClient,
        gate: EscrowGate,
        poll: float = POLL_SECONDS,
        checkpoint_seconds: float = CHECKPOINT_SECONDS,
    ) -> None:
        self._store = store
        self._escrow = EscrowStore(store)
        self._home = home
        self.client = client
        self.gate = gate
        self._poll = poll
        self._checkpoint_seconds = checkpoint_seconds
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stepping: asyncio.Future[None] | None = None
        self._last_head: AuditPosition | None = None
        self._checkpointed_seq = -1
        self._checkpointed_at = 0.0
        self._step_lock = threading.Lock()

    def start(self) -> None:
        """Run in the current event loop until stopped."""
        self._task = asyncio.create_task(self._run(), name="escrow")

    def wake(self) -> None:
        """Deposit and checkpoint now (something sensitive just happened)."""
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._stepping is not None:
            # A cancelled await does not stop the thread: let its step finish (and give back
            # its database connection) before the caller disposes of the engine.
            with contextlib.suppress(Exception):
                await self._stepping
            self._stepping = None
        self.client.close()

    def note_checkpoint(self, checkpoint: CheckpointRef | None) -> None:
        """What the latest checkpoint holds (after a reconcile), so it is not made again."""
        if checkpoint is not None:
            self._checkpointed_seq = checkpoint.seq
            self._checkpointed_at = time.monotonic()
            self.gate.checkpointed(checkpoint.at)

    async def _run(self) -> None:
        backoff = self._poll
        while True:
            self._wake.clear()
            try:
                self._stepping = asyncio.ensure_future(asyncio.to_thread(self.step))
                await asyncio.shield(self._stepping)
                backoff = self._poll
                wait = self._poll
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker or the database: retry with back-off
                log.warning("escrow.step_failed", extra=fields(error=str(exc)[:200]))
                wait = backoff
                backoff = min(backoff * 2, 30.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=wait)

    def step(self) -> None:
        """One round of the worker's duties (blocking; also called directly by tests)."""
        with self._step_lock:
            if self.gate.state is EscrowState.UNCONFIRMED:
                self.confirm()
            self._watch_head()
            self.deposit()
            if self.gate.state is EscrowState.CONFIRMED:
                self.checkpoint_if_due()

    def confirm(self) -> None:
        """Reconcile now; the gate opens or stays closed with the reason."""
        try:
            result = reconcile(self._store, self._home, self.client, self.gate)
        except TesseraError as exc:
            self.gate.unconfirmed(_unconfirmed_reason(self._store, self._home, exc))
            raise
        apply_to_gate(self.gate, result)
        self.note_checkpoint(result.checkpoint)

    def _watch_head(self) -> None:
        # A database put back under the running node (a point-in-time restore, a file copied
        # in) no longer holds the head this process last saw.
        head = self._escrow.audit_head()
        last = self._last_head
        if last is not None and not self._escrow.extends(last):
            self.gate.rolled_back(
                f"its audit log no longer holds entry {last.seq}, which it held while the node "
                "was running: the database was rolled back under the running node"
            )
            return
        self._last_head = head

    def deposit(self) -> int:
        """Deposit every queued tombstone; how many."""
        done = 0
        while True:
            items = self._escrow.pending(_DEPOSIT_BATCH)
            if not items:
                return done
            ids = [i.tombstone_id for i in items]
            try:
                head = self.client.deposit(items)
            except TesseraError as exc:
                self._escrow.deposit_failed(ids, str(exc))
                raise
            self._escrow.deposited(ids)
            _save_anchor(self._home, head)
            if self.gate.state is EscrowState.CONFIRMED:
                # Confirmed, this database had applied the whole escrow; what was just added is
                # its own erasures: it has applied the new head too (else a restart with the
                # broker away would take it for an older database).
                self._escrow.set_anchor(head.size, head.chain, _now())
            self.gate.escrowed(head.size)
            done += len(items)
            log.info("escrow.deposited", extra=fields(tombstones=len(items), size=head.size))

    def checkpoint_if_due(self) -> CheckpointRef | None:
        """Checkpoint the head if something sensitive happened since the last checkpoint, or
        the periodic one is due."""
        head = self._escrow.audit_head()
        periodic = time.monotonic() - self._checkpointed_at >= self._checkpoint_seconds
        if head.seq == self._checkpointed_seq and not periodic:
            return None
        if not periodic and not self._escrow.sensitive_since(max(self._checkpointed_seq, 0)):
            return None
        return self.checkpoint_now()

    def checkpoint_now(self) -> CheckpointRef | None:
        """Checkpoint the head now, unless the log no longer extends the latest checkpoint (then
        the gate closes and the evidence at the broker stays as it is)."""
        latest = self.client.latest_checkpoint()
        if latest is not None:
            problem = self._escrow.check_checkpoint(latest[0])
            if problem is not None:
                self.gate.rolled_back(problem)
                return None
        made = make_checkpoint(self._escrow, self._home, self.client)
        self.note_checkpoint(made)
        return made


def make_checkpoint(escrow_store: EscrowStore, home: Path, client: EscrowClient) -> CheckpointRef:
    """Checkpoint the current audit head at the broker and keep the checkpoint in the home."""
    made, blob = client.checkpoint(escrow_store.audit_head())
    save_checkpoint(home, blob)
    log.info("audit.checkpointed", extra=fields(number=made.number))
    return made


def _unconfirmed_reason(store: NodeStore, home: Path, exc: TesseraError) -> str:
    if isinstance(exc, (RolledBack, BadSignature, WrongRecipient)):
        # The broker answered, with an escrow that does not verify: not an outage.
        return (
            f"the broker's escrow does not verify ({exc.message}): report it to the broker "
            "operator; the node opens no case until it does"
        )
    reason = f"cannot reach the broker: {exc.message}"
    applied, confirmed = EscrowStore(store).anchor().size, read_anchor_size(home)
    if applied < confirmed:
        reason += (
            f"; this database has applied {applied} of the {confirmed} tombstones the node "
            "confirmed before: an older database is in place"
        )
    return reason


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
