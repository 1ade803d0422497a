"""The broker's gRPC servicers: the key directory and the store-and-forward relay.

Thin, as everywhere: validate, call the store and the directory core (tessera.directory), convert.
Authentication and the error mapping live in the interceptor (tessera.rpc, broker.access).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc.aio
from google.protobuf.message import DecodeError

import tessera
from broker import serde
from broker.domain import AcceptedEnvelope, EnvelopePut, StoredEnvelope, StoredLogEntry
from broker.group_commit import GroupCommitter
from broker.store.relay import BrokerStore
from tessera import crypto, directory, labels, rpc
from tessera.config import Settings
from tessera.errors import (
    Conflict,
    Exhausted,
    InvalidInput,
    NotFound,
    PermissionDenied,
    TesseraError,
)
from tessera.logs import fields
from tessera.timestamps import to_datetime, to_timestamp
from tessera.v1 import common_pb2 as common_pb
from tessera.v1 import directory_pb2 as directory_pb
from tessera.v1 import directory_pb2_grpc as directory_grpc
from tessera.v1 import relay_pb2 as relay_pb
from tessera.v1 import relay_pb2_grpc as relay_grpc

T = TypeVar("T")
log = logging.getLogger(__name__)
Context = grpc.aio.ServicerContext[Any, Any]
_APPEND_RETRIES = 5
_POLL_SECONDS = 0.5
# An idle stream's fallback poll backs off to this (never beyond the delivery lease): each poll is
# a write transaction, and 1,000 idle streams polling every 0.5 s took a broker's whole core.
_IDLE_POLL_SECONDS = 5.0
_CLAIM_BATCH = 100  # envelopes leased to a Receive stream at a time
_REFRESH_PAGE = 10_000  # directory log entries a refresh reads at a time


async def run_blocking(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking store call in a worker thread (shared by the broker's servicers)."""
    return await asyncio.to_thread(func, *args, **kwargs)


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class DirectoryView:
    """The broker's own verified view of its log: size, chain and every agency's record.

    Rebuilt from the database at start and brought up to date before each use, so several broker
    processes on one PostgreSQL agree (an append that loses a race is retried on the new head).
    """

    def __init__(
        self,
        store: BrokerStore,
        identity: crypto.Identity,
        region: str,
        page: int = _REFRESH_PAGE,
    ) -> None:
        self._store = store
        self._identity = identity
        self._region = region
        self._page = page  # log entries read and verified at a time
        self._lock = threading.Lock()
        self.size = 0
        self.chain = directory.GENESIS_CHAIN
        self.records: dict[str, directory.AgencyRecord] = {}
        self._by_signing_key: dict[bytes, directory.AgencyRecord] = {}

    def refresh(self) -> None:
        """Read and verify entries appended since the view's size (by any broker process).

        Reads a page of entries at a time until the log's end, however far behind the view is.
        With nothing new it costs one indexed read that returns no rows.
        """
        with self._lock:
            while True:
                entries = self._store.log_entries(self.size, self._page)
                if not entries:
                    return
                blobs = [self.blob(e) for e in entries]
                size = entries[-1].sequence
                head = directory.sign_head(
                    self._identity, self._region, size, entries[-1].chain, utc_now()
                )
                _verified, verified_entries = directory.verify_extension(
                    self._identity.public.signing_key,
                    self._region,
                    self.size,
                    self.chain,
                    blobs,
                    head,
                )
                self.records = directory.apply_to_pins(self.records, verified_entries)
                self._by_signing_key = {r.identity.signing_key: r for r in self.records.values()}
                self.size, self.chain = size, entries[-1].chain
                if len(entries) < self._page:
                    return

    def catch_up(self, log_size: int | None) -> None:
        """Refresh only if the log has more than the view's entries; ``log_size`` is the log's
        size read by the caller (None: unknown, so refresh).

        For callers that learn the size for free inside a transaction of their own (the nonce
        batches on PostgreSQL): a view already that large is not read again.
        """
        if log_size is None or log_size > self.size:
            self.refresh()

    def agency_by_signing_key(self, signing_key: bytes) -> directory.AgencyRecord | None:
        """The agency whose current (or, if revoked, last) signing key this is, as of the view.

        In memory: the broker authenticates every request with it, without a database read.
        """
        return self._by_signing_key.get(signing_key)

    def blob(self, entry: StoredLogEntry) -> common_pb.SignedBlob:
        """A stored log entry as the SignedBlob the wire carries."""
        return serde.signed_blob(entry.body, entry.signature, self._identity.public.signing_key)

    def head(self, at: StoredLogEntry | None = None) -> common_pb.SignedBlob:
        """A freshly signed head for the current size, or for the log as of entry ``at``."""
        if at is not None:
            return directory.sign_head(
                self._identity, self._region, at.sequence, at.chain, utc_now()
            )
        return directory.sign_head(self._identity, self._region, self.size, self.chain, utc_now())

    def append(
        self,
        statement: common_pb.SignedBlob,
        possession: bytes,
        check_agency: Callable[[directory.AgencyRecord | None], None],
    ) -> common_pb.SignedBlob:
        """Check a statement against the current record and append it; retried on a race."""
        for _attempt in range(_APPEND_RETRIES):
            self.refresh()
            record = directory.check_statement(
                statement,
                self._current_for(statement),
                possession,
                self._identity.public.signing_key,
                region=self._region,
            )
            check_agency(self.records.get(record.agency_id))
            entry, chain = directory.append(
                self._identity, self.chain, self.size + 1, statement, possession, utc_now()
            )
            try:
                self._store.append_log_entry(
                    self.size,
                    entry.body,
                    entry.signature,
                    chain,
                    record.agency_id,
                    record.identity.signing_key,
                    record.identity.encryption_key,
                    record.revoked,
                    region=record.region,
                )
            except Conflict:
                continue  # another broker process appended first: refresh and try again
            self.refresh()
            return entry
        raise Conflict("the directory is busy", hint="retry in a moment")

    def _current_for(self, statement: common_pb.SignedBlob) -> directory.AgencyRecord | None:
        try:
            body = directory_pb.DirectoryEntry.FromString(statement.body)
        except DecodeError:
            raise InvalidInput(
                "the statement's body is not a DirectoryEntry",
                hint="build the statement with the node's `rotate-keys` (tessera.directory)",
            ) from None
        return self.records.get(body.agency_id)


class DirectoryServicer(directory_grpc.DirectoryServicer):
    """tessera.v1.Directory: enrolment, rotation, revocation, and the signed log."""

    def __init__(
        self, settings: Settings, store: BrokerStore, identity: crypto.Identity, view: DirectoryView
    ) -> None:
        self._settings = settings
        self._store = store
        self._identity = identity
        self._view = view

    async def GetBrokerInfo(
        self, request: directory_pb.GetBrokerInfoRequest, context: Context
    ) -> directory_pb.GetBrokerInfoResponse:
        return directory_pb.GetBrokerInfoResponse(
            region=self._settings.region,
            signing_key=self._identity.public.signing_key,
            version=tessera.__version__,
            api_versions=["tessera.v1"],
        )

    async def IssueEnrolmentToken(
        self, request: directory_pb.IssueEnrolmentTokenRequest, context: Context
    ) -> directory_pb.IssueEnrolmentTokenResponse:
        region = request.region or self._settings.region
        if region != self._settings.region:
            raise InvalidInput(f"this broker serves region {self._settings.region!r}")
        if not request.agency_id:
            raise InvalidInput("an agency id is required")
        expires = (
            to_datetime(request.expires_at, "expires_at")
            if request.HasField("expires_at")
            else utc_now() + dt.timedelta(days=7)
        )
        token = await run_blocking(self._store.issue_token, request.agency_id, region, expires)
        return directory_pb.IssueEnrolmentTokenResponse(
            token=token,
            agency_id=request.agency_id,
            region=region,
            expires_at=to_timestamp(expires),
        )

    async def Enrol(
        self, request: directory_pb.EnrolRequest, context: Context
    ) -> directory_pb.EnrolResponse:
        agency_id, region = await run_blocking(self._store.consume_token, request.token, utc_now())
        body = directory_pb.DirectoryEntry.FromString(request.statement.body)
        if body.agency_id != agency_id or body.region != region:
            raise PermissionDenied("the statement names another agency or region than the token")

        def must_be_new(current: directory.AgencyRecord | None) -> None:
            if current is not None:
                raise Conflict(f"agency {agency_id} is already enrolled")

        entry = await run_blocking(self._view.append, request.statement, b"", must_be_new)
        return directory_pb.EnrolResponse(entry=entry, head=self._view.head())

    async def RotateKeys(
        self, request: directory_pb.RotateKeysRequest, context: Context
    ) -> directory_pb.RotateKeysResponse:
        caller = rpc.current_caller()

        def must_be_caller(current: directory.AgencyRecord | None) -> None:
            if current is None or current.agency_id != caller.principal:
                raise PermissionDenied("an agency may rotate only its own keys")

        entry = await run_blocking(
            self._view.append, request.statement, request.possession_signature, must_be_caller
        )
        return directory_pb.RotateKeysResponse(entry=entry, head=self._view.head())

    async def Revoke(
        self, request: directory_pb.RevokeRequest, context: Context
    ) -> directory_pb.RevokeResponse:
        caller = rpc.current_caller()
        if caller.role == "agency" and caller.principal != request.agency_id:
            raise PermissionDenied("an agency may revoke only itself")
        await run_blocking(self._view.refresh)
        current = self._view.records.get(request.agency_id)
        if current is None:
            raise NotFound(f"no agency {request.agency_id!r} in the directory")
        statement = directory.revoke_statement(self._identity, current, request.reason, utc_now())
        entry = await run_blocking(self._view.append, statement, b"", lambda _c: None)
        await run_blocking(self._store.purge_agency, request.agency_id)
        return directory_pb.RevokeResponse(entry=entry, head=self._view.head())

    async def GetHead(
        self, request: directory_pb.GetHeadRequest, context: Context
    ) -> directory_pb.GetHeadResponse:
        await run_blocking(self._view.refresh)
        return directory_pb.GetHeadResponse(head=self._view.head())

    async def GetEntries(
        self, request: directory_pb.GetEntriesRequest, context: Context
    ) -> directory_pb.GetEntriesResponse:
        await run_blocking(self._view.refresh)
        if request.since > self._view.size:
            raise InvalidInput(
                f"since {request.since} is past the end of the log ({self._view.size} entries)",
                hint="ask GetHead for the log's size; a pinned log longer than the broker's is"
                " an alarm (docs/directory.md)",
            )
        limit = min(request.limit or 1000, 1000)
        entries = await run_blocking(self._store.log_entries, request.since, limit)
        head = self._view.head(entries[-1] if entries else None)
        return directory_pb.GetEntriesResponse(
            entries=[self._view.blob(e) for e in entries], head=head
        )

    async def GetConsistency(
        self, request: directory_pb.GetConsistencyRequest, context: Context
    ) -> directory_pb.GetConsistencyResponse:
        await run_blocking(self._view.refresh)
        to_size = request.to_size or self._view.size
        if not request.from_size <= to_size <= self._view.size:
            raise InvalidInput(
                f"sizes {request.from_size}..{to_size} are not within the log's"
                f" {self._view.size} entries, in order",
                hint="ask for from_size <= to_size <= the size GetHead reports",
            )
        bodies = await run_blocking(self._store.leaf_bodies, request.from_size, to_size)
        last = await run_blocking(self._store.log_entry, to_size) if to_size else None
        head = self._view.head(last)
        return directory_pb.GetConsistencyResponse(
            leaf_hashes=[directory.leaf_hash(b) for b in bodies], head=head
        )

    async def GetAgency(
        self, request: directory_pb.GetAgencyRequest, context: Context
    ) -> directory_pb.GetAgencyResponse:
        await run_blocking(self._view.refresh)
        record = self._view.records.get(request.agency_id)
        if record is None:
            raise NotFound(f"no agency {request.agency_id!r} in the directory")
        entry = await run_blocking(self._store.log_entry, record.sequence)
        if entry is None:
            raise NotFound(f"no log entry {record.sequence}")
        return directory_pb.GetAgencyResponse(entry=self._view.blob(entry), head=self._view.head())


class RateBucket:
    """A token bucket: ``per_minute`` sends a minute on average, bursts up to that many.

    Kept per agency in each broker process (several processes each apply the limit).
    """

    def __init__(self, per_minute: int) -> None:
        self._capacity = float(per_minute)
        self._tokens = float(per_minute)
        self._rate = per_minute / 60.0
        self._at: float | None = None

    def take(self, now: float) -> bool:
        """Spend one token if there is one; False when the agency is over its rate."""
        if self._at is not None:
            self._tokens = min(self._capacity, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class RelayServicer(relay_grpc.RelayServicer):
    """tessera.v1.Relay: durable store-and-forward of sealed envelopes, ack-then-delete."""

    def __init__(
        self, settings: Settings, store: BrokerStore, identity: crypto.Identity, view: DirectoryView
    ) -> None:
        self._settings = settings
        self._store = store
        self._identity = identity
        self._view = view
        self._owner = f"broker-{uuid.uuid4()}"
        self._wakeups: dict[str, asyncio.Event] = {}
        self._buckets: dict[str, RateBucket] = {}
        self._background: set[asyncio.Task[int]] = set()
        # Sends arriving together share one transaction and one commit (broker.group_commit).
        self._puts: GroupCommitter[EnvelopePut, AcceptedEnvelope] = GroupCommitter(
            lambda puts: store.put_envelopes(puts, utc_now()),
            size=lambda put: len(put.ciphertext),
        )

    @property
    def owner(self) -> str:
        """This process's lease owner name (leases are released when it stops)."""
        return self._owner

    async def Send(self, request: relay_pb.SendRequest, context: Context) -> relay_pb.SendResponse:
        sender = rpc.current_caller().principal
        self._check_envelope(sender, request)
        if not self._enrolled(request.recipient_agency_id):
            # Only an unknown recipient costs a directory refresh (it may have just enrolled).
            await run_blocking(self._view.refresh)
        put = self._put(sender, request)
        accepted = await self._puts.submit(put)
        self.wake(put.recipient_id)
        return self._response(accepted)

    async def SendBatch(
        self, request: relay_pb.SendBatchRequest, context: Context
    ) -> relay_pb.SendBatchResponse:
        sender = rpc.current_caller().principal
        count, most = len(request.envelopes), self._settings.limits.max_send_batch
        if not 1 <= count <= most:
            raise InvalidInput(
                f"a batch holds 1 to {most:,} envelopes; this one holds {count:,}",
                hint="split the outbox into smaller batches",
            )
        # Each envelope is checked and stored as a Send of it alone would be (its rate token
        # first); the refusals of some do not refuse the others.
        checked: list[relay_pb.SendRequest | TesseraError] = []
        for envelope in request.envelopes:
            try:
                self._check_envelope(sender, envelope)
                checked.append(envelope)
            except TesseraError as exc:
                checked.append(exc)
        # An unknown recipient costs one directory refresh per call, not one per envelope.
        if any(
            isinstance(item, relay_pb.SendRequest) and not self._enrolled(item.recipient_agency_id)
            for item in checked
        ):
            await run_blocking(self._view.refresh)
        admitted: list[EnvelopePut | TesseraError] = []
        for envelope_or_error in checked:
            try:
                admitted.append(
                    envelope_or_error
                    if isinstance(envelope_or_error, TesseraError)
                    else self._put(sender, envelope_or_error)
                )
            except TesseraError as exc:
                admitted.append(exc)
        puts = [item for item in admitted if isinstance(item, EnvelopePut)]
        outcomes = await self._puts.submit_many(puts)
        # Wake recipients of whatever was stored, even if a later transaction of the call failed.
        for put, outcome in zip(puts, outcomes, strict=True):
            if isinstance(outcome, AcceptedEnvelope):
                self.wake(put.recipient_id)
        stored = iter(outcomes)
        results: list[relay_pb.SendResult] = []
        for put_or_error in admitted:
            outcome = next(stored) if isinstance(put_or_error, EnvelopePut) else put_or_error
            if isinstance(outcome, AcceptedEnvelope):
                results.append(relay_pb.SendResult(accepted=self._response(outcome)))
            elif isinstance(outcome, TesseraError):
                # The call succeeds, so the interceptor logs nothing: say what was refused here
                # (the kind of refusal only; never anything of the envelope).
                log.info(
                    "relay.envelope_refused",
                    extra=fields(
                        sender=sender, kind=outcome.kind.name, error=type(outcome).__name__
                    ),
                )
                results.append(serde.send_refusal(outcome))
            else:
                raise outcome  # a transaction itself failed: the whole call fails (retry it)
        return relay_pb.SendBatchResponse(results=results)

    def _enrolled(self, agency_id: str) -> bool:
        record = self._view.records.get(agency_id)
        return record is not None and not record.revoked

    def _check_envelope(self, sender: str, request: relay_pb.SendRequest) -> None:
        """Spend one of ``sender``'s rate tokens on the envelope and check its fields; raises
        the typed error that refuses it (nothing is stored then)."""
        limits = self._settings.limits
        bucket = self._buckets.setdefault(sender, RateBucket(limits.sends_per_minute))
        if not bucket.take(time.monotonic()):
            raise Exhausted(
                f"agency {sender} is sending more than {limits.sends_per_minute} envelopes a "
                "minute",
                hint="slow down and retry in a few seconds; nothing was stored",
            )
        if not request.sealed_envelope:
            raise InvalidInput("the envelope is empty")
        if len(request.sealed_envelope) > limits.max_envelope_bytes:
            raise Exhausted(
                f"the envelope is {len(request.sealed_envelope):,} bytes; the limit "
                f"is {limits.max_envelope_bytes:,}",
                hint="send less data",
            )
        if not request.idempotency_key or len(request.idempotency_key) > 128:
            raise InvalidInput("an idempotency key of 1 to 128 characters is required")
        if len(request.consent_commitment) not in (0, 32):
            raise InvalidInput("a consent commitment is 32 bytes (or empty for a status)")

    def _put(self, sender: str, request: relay_pb.SendRequest) -> EnvelopePut:
        """The checked envelope as the store takes it; NotFound if its recipient is not an
        enrolled, unrevoked agency in the directory view."""
        if not self._enrolled(request.recipient_agency_id):
            raise NotFound(
                f"no enrolled agency {request.recipient_agency_id!r}",
                hint="check the agency id with `tessera agency list`",
            )
        return serde.envelope_put(sender, request)

    def wake(self, recipient_id: str) -> None:
        """New mail for ``recipient_id``: wake its Receive stream in this process, if any."""
        event = self._wakeups.get(recipient_id)
        if event is not None:
            event.set()

    def _response(self, accepted: AcceptedEnvelope) -> relay_pb.SendResponse:
        return serde.send_response(self._receipt(accepted), accepted.duplicate)

    def _receipt(self, accepted: AcceptedEnvelope) -> common_pb.SignedBlob:
        body = serde.relay_receipt_body(accepted)
        signature = self._identity.sign(labels.LABEL_RECEIPT, body)
        return serde.signed_blob(body, signature, self._identity.public.signing_key)

    async def Receive(
        self, request: relay_pb.ReceiveRequest, context: Context
    ) -> AsyncIterator[relay_pb.Delivery]:
        async for batch in self._leased(rpc.current_caller().principal, request):
            for envelope in batch:
                yield serde.delivery_pb(envelope)

    async def ReceiveBatches(
        self, request: relay_pb.ReceiveRequest, context: Context
    ) -> AsyncIterator[relay_pb.DeliveryBatch]:
        most = self._settings.limits.max_message_bytes // 2
        async for batch in self._leased(rpc.current_caller().principal, request):
            deliveries: list[relay_pb.Delivery] = []
            size = 0
            for envelope in batch:
                if deliveries and size + len(envelope.ciphertext) > most:
                    yield relay_pb.DeliveryBatch(deliveries=deliveries)
                    deliveries, size = [], 0
                deliveries.append(serde.delivery_pb(envelope))
                size += len(envelope.ciphertext)
            if deliveries:
                yield relay_pb.DeliveryBatch(deliveries=deliveries)

    async def _leased(
        self, recipient: str, request: relay_pb.ReceiveRequest
    ) -> AsyncIterator[list[StoredEnvelope]]:
        """The recipient's deliverable envelopes, leased to this process a batch at a time, as
        Receive and ReceiveBatches hand them out (relay.proto)."""
        wanted = request.max_deliveries or 0
        sent = 0
        event = self._wakeups.setdefault(recipient, asyncio.Event())

        def claim(handed_out: int) -> asyncio.Task[list[StoredEnvelope]]:
            # Clear before claiming: a Send committing during the claim then still wakes us.
            event.clear()
            limit = min(_CLAIM_BATCH, wanted - handed_out) if wanted else _CLAIM_BATCH
            return asyncio.create_task(
                run_blocking(
                    self._store.claim,
                    recipient,
                    self._owner,
                    limit,
                    self._settings.limits.delivery_lease_seconds,
                    utc_now(),
                )
            )

        claiming: asyncio.Task[list[StoredEnvelope]] | None = claim(0)
        most = min(_IDLE_POLL_SECONDS, self._settings.limits.delivery_lease_seconds)
        poll = _POLL_SECONDS
        try:
            while claiming is not None:
                # Shielded: a stream cancelled meanwhile leaves the claim to finish, and the
                # finally below hands what it leased back.
                batch = await asyncio.shield(claiming)
                # Mail announced by a wake-up is claimed at once; the poll only catches what
                # nothing announces (an expired lease, a missed notification), so while the
                # stream stays idle it polls less often, jittered so streams do not align.
                poll = _POLL_SECONDS if batch else min(poll * 2, max(most, _POLL_SECONDS))
                # A full batch means more may be waiting: lease the next batch while this one is
                # streamed, so the stream never waits for the database between batches.
                after = sent + len(batch)
                more = len(batch) == _CLAIM_BATCH and not (wanted and after >= wanted)
                claiming = claim(after) if more else None
                if batch:
                    yield batch
                sent = after
                if wanted and sent >= wanted:
                    return
                if claiming is None:
                    if not request.follow:
                        return  # a poll: everything there was has been handed out
                    # Caught up: wait for new mail (a Send here, or on PostgreSQL a notification
                    # from another broker process), polling as a fallback.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            event.wait(),
                            poll * random.uniform(0.8, 1.0),  # noqa: S311 (jitter, not a secret)
                        )
                    claiming = claim(sent)
        finally:
            if claiming is not None:
                # The stream ended with a claim in flight (a prefetch, or a wait cut short): once
                # it is done, hand its envelopes back rather than hold them for a whole lease.
                claiming.add_done_callback(self._unclaim)

    def _unclaim(self, claimed: asyncio.Task[list[StoredEnvelope]]) -> None:
        if claimed.cancelled() or claimed.exception() is not None or not claimed.result():
            return
        ids = [envelope.envelope_id for envelope in claimed.result()]
        task = asyncio.create_task(run_blocking(self._store.unclaim, self._owner, ids))
        self._background.add(task)  # keep a reference until it is done
        task.add_done_callback(self._background.discard)

    async def Acknowledge(
        self, request: relay_pb.AcknowledgeRequest, context: Context
    ) -> relay_pb.AcknowledgeResponse:
        recipient = rpc.current_caller().principal
        deleted = await run_blocking(self._store.acknowledge, recipient, list(request.delivery_ids))
        return relay_pb.AcknowledgeResponse(deleted_ids=deleted)

    async def PurgeConsent(
        self, request: relay_pb.PurgeConsentRequest, context: Context
    ) -> relay_pb.PurgeConsentResponse:
        sender = rpc.current_caller().principal
        if len(request.consent_commitment) != 32:
            raise InvalidInput("a consent commitment is 32 bytes")
        result = await run_blocking(
            self._store.purge_consent, sender, request.consent_commitment, utc_now()
        )
        return relay_pb.PurgeConsentResponse(
            purged=result.purged, already_delivered=result.already_delivered
        )
