"""The node's relay worker: pushes the outbox to the broker and opens what the broker delivers
(DESIGN.md section 6; the use cases it adapts are node.referrals.flows).

Two asyncio tasks, started by ``node.server.start_node`` once the node is enrolled:

- the outbox pusher sends the queued envelopes with ``Relay.SendBatch`` (up to
  :data:`tessera.config.OUTBOX_BATCH` and 4 MiB in one signed call; each envelope's idempotency
  key makes a retry harmless) and the queued purges of revoked consents with
  ``Relay.PurgeConsent``, and marks each done only after the broker accepted it; a refusal or
  failure is counted on the row and retried with back-off. :meth:`RelayWorker.wake` pushes at
  once; :meth:`RelayWorker.purge_now` pushes one purge while its revocation waits for the count.
- the receiver follows ``Relay.ReceiveBatches``, opens and verifies every delivery against the
  sender's pinned directory record, applies it (``node.referrals.flows.Referrals.receive``: each
  message takes effect once), and
  only then acknowledges it (one Acknowledge per batch the broker streamed), so the broker
  deletes nothing the node has not stored. An envelope that fails verification is audited
  ``envelope.refused`` and acknowledged (dropped): nothing from it is stored, and it is not
  redelivered for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from node import directory_sync
from node.envelopes import OpenedEnvelope, open_envelope
from node.keyring import Keyring
from node.referrals.flows import Referrals
from node.referrals.model import RELAY_ACTOR, OutboxItem, OutboxKind
from node.rounds import ROUND_POLL, RoundTaker
from node.store.budget import BudgetStore
from node.store.cases import NodeStore
from tessera import directory, rpc
from tessera.config import OUTBOX_BATCH, Limits, StatsPolicy
from tessera.errors import StorageError, TesseraError, Unavailable
from tessera.logs import fields
from tessera.v1 import relay_pb2 as relay_pb
from tessera.v1 import relay_pb2_grpc as relay_grpc

log = logging.getLogger(__name__)

_IDLE_POLL = 5.0
_MIN_BACKOFF = 0.2
_MAX_BACKOFF = 10.0
_CALL_TIMEOUT = 15.0
_PUSH_BYTES = 4 * 1024 * 1024  # envelope bytes in one SendBatch call (one call, one deadline)
_MAX_REMEMBERED = 1000  # purge counts kept for purge_now


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class RelayWorker:
    """The outbox pusher and the receiver of one enrolled node."""

    def __init__(
        self,
        store: NodeStore,
        referrals: Referrals,
        keyring: Keyring,
        home: Path,
        link: directory_sync.BrokerLink,
        limits: Limits | None = None,
        policy: StatsPolicy | None = None,
        round_poll: float = ROUND_POLL,
        budget: BudgetStore | None = None,
    ) -> None:
        self._store = store
        # Statistics rounds ride on the same broker channel (node.rounds).
        self.rounds = RoundTaker(store, keyring, home, link, policy, budget)
        self._round_poll = round_poll
        self._referrals = referrals
        self._outbox = referrals.stores.outbox
        self._keyring = keyring
        self._link = link
        self._limits = limits or Limits()
        self._home = home
        self._wake = asyncio.Event()
        self._pushing = asyncio.Lock()  # one pusher at a time: the loop, or purge_now
        self._purged: dict[int, int] = {}  # purges the loop pushed, until purge_now asks
        self._channel: grpc.aio.Channel | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def agency_id(self) -> str:
        return self._link.agency_id

    def start(self) -> None:
        """Open the broker channel and start both tasks (inside the running loop)."""
        self._channel = rpc.open_aio_channel(
            self._link.address,
            self._link.certificate,
            self._keyring.identity,
            self._limits.max_message_bytes,
        )
        self.rounds.attach(self._channel)
        self._tasks = [
            asyncio.create_task(self._push_loop(), name="relay-outbox"),
            asyncio.create_task(self._receive_loop(), name="relay-receiver"),
            asyncio.create_task(self.rounds.run(self._round_poll), name="stats-rounds"),
        ]

    def wake(self) -> None:
        """Push the outbox now (something was just queued)."""
        self._wake.set()

    async def stop(self) -> None:
        """Cancel both tasks and close the channel."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def _stub(self) -> Any:
        """The Relay stub on the asyncio channel (its calls are awaitable; typed Any)."""
        assert self._channel is not None
        return relay_grpc.RelayStub(self._channel)

    # --- the outbox pusher -------------------------------------------------------------------

    async def _push_loop(self) -> None:
        backoff = _MIN_BACKOFF
        while True:
            self._wake.clear()
            try:
                ok = await self.push_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database or the broker: retry with back-off
                log.warning("relay.outbox_failed", extra=fields(error=str(exc)[:200]))
                ok = False
            if ok:
                backoff = _MIN_BACKOFF
                wait = _IDLE_POLL
            else:
                wait = backoff
                backoff = min(backoff * 2, _MAX_BACKOFF)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=wait)

    async def push_once(self) -> bool:
        """Push every pending item once: purges with ``Relay.PurgeConsent``, envelopes in
        ``Relay.SendBatch`` calls; False if any of them failed."""
        async with self._pushing:
            items = await asyncio.to_thread(self._outbox.pending, OUTBOX_BATCH)
            ok = True
            envelopes = []
            for item in items:
                if item.kind is OutboxKind.CONSENT_PURGE:
                    purged = await self._purge(item)
                    if purged is None:
                        ok = False
                    elif len(self._purged) < _MAX_REMEMBERED:
                        self._purged[item.id] = purged
                else:
                    envelopes.append(item)
            most = min(_PUSH_BYTES, self._limits.max_message_bytes // 2)
            for chunk in split_by_size(envelopes, most):
                ok = await self._push(chunk) and ok
            return ok

    async def purge_now(self, item_id: int) -> int:
        """Push one queued purge now; how many envelopes the broker purged. 0 if it failed (it
        stays queued and the loop retries it) or was pushed already with nothing to purge."""
        async with self._pushing:
            if item_id in self._purged:
                return self._purged.pop(item_id)
            item = await asyncio.to_thread(self._outbox.item, item_id)
            if item is None or item.kind is not OutboxKind.CONSENT_PURGE:
                return 0
            return await self._purge(item) or 0

    async def _purge(self, item: OutboxItem) -> int | None:
        """Ask the broker to purge a revoked consent's envelopes; the count, or None (counted
        on the row, retried later) if it failed."""
        request = relay_pb.PurgeConsentRequest(consent_commitment=item.consent_commitment)
        try:
            reply = await self._stub().PurgeConsent(request, timeout=_CALL_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            error = rpc.error_from_rpc(exc, f"the broker at {self._link.address}")
            log.warning("relay.purge_failed", extra=fields(error=str(error)[:200]))
            await asyncio.to_thread(self._outbox.failed, item.id, str(error))
            return None
        await asyncio.to_thread(self._outbox.mark_sent, item.id, b"")
        return int(reply.purged)

    async def _push(self, items: list[OutboxItem]) -> bool:
        request = relay_pb.SendBatchRequest(
            envelopes=[
                relay_pb.SendRequest(
                    recipient_agency_id=item.recipient_id,
                    idempotency_key=item.idempotency_key,
                    consent_commitment=item.consent_commitment,
                    sealed_envelope=item.sealed,
                )
                for item in items
            ]
        )
        try:
            reply = await self._stub().SendBatch(request, timeout=_CALL_TIMEOUT)
            if len(reply.results) != len(items):
                raise TesseraError(
                    f"the broker answered {len(reply.results)} of {len(items)} envelopes"
                )
        except (grpc.aio.AioRpcError, TesseraError) as exc:
            error = (
                rpc.error_from_rpc(exc, f"the broker at {self._link.address}")
                if isinstance(exc, grpc.aio.AioRpcError)
                else exc
            )
            await asyncio.to_thread(self._settle, [], [(item.id, str(error)) for item in items])
            return False
        sent: list[tuple[int, bytes]] = []
        failed: list[tuple[int, str]] = []
        for item, result in zip(items, reply.results, strict=True):
            if result.HasField("accepted"):
                sent.append(
                    (item.id, result.accepted.receipt.SerializeToString(deterministic=True))
                )
            else:
                refusal = result.refused
                error = rpc.error_from_refusal(
                    refusal.code, refusal.message, refusal.hint, refusal.kind
                )
                failed.append((item.id, str(error)))
        await asyncio.to_thread(self._settle, sent, failed)
        return not failed

    def _settle(self, sent: list[tuple[int, bytes]], failed: list[tuple[int, str]]) -> None:
        """Record the broker's answers: accepted envelopes leave the outbox, refused ones are
        counted and retried later."""
        for item_id, receipt in sent:
            self._outbox.mark_sent(item_id, receipt)
        for item_id, error in failed:
            self._outbox.failed(item_id, error)

    # --- the receiver ------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        backoff = _MIN_BACKOFF
        while True:
            call = self._stub().ReceiveBatches(relay_pb.ReceiveRequest(follow=True))
            try:
                async for batch in call:
                    backoff = _MIN_BACKOFF
                    await self.handle(*batch.deliveries)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a dropped stream, the database: reconnect with back-off
                log.warning("relay.receive_failed", extra=fields(error=str(exc)[:200]))
            finally:
                # A stream left open would keep leasing deliveries that nobody reads.
                call.cancel()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF)

    async def handle(self, *deliveries: relay_pb.Delivery) -> None:
        """Open, verify and apply each delivery in order, then acknowledge them in one call.

        A failure that is not about the envelope (the database) stops the batch: what was
        stored before it is acknowledged, the rest stays at the broker and is delivered again.
        """
        stored: list[str] = []
        queued = False
        senders = _Senders(self._home, self._keyring, self._link)
        for delivery in deliveries:
            try:
                queued = await self._take(delivery, senders) or queued
            except Exception:
                if queued:
                    self.wake()  # replies queued before the failure go out now
                if stored:
                    await self._acknowledge(stored)
                raise
            stored.append(delivery.delivery_id)
        if stored:
            await self._acknowledge(stored)
        if queued:
            self.wake()

    async def _take(self, delivery: relay_pb.Delivery, senders: _Senders) -> bool:
        """Open, verify and apply one delivery, or refuse (drop) it; True if a reply was queued."""
        sender_id = delivery.sender_agency_id
        record = await asyncio.to_thread(senders.record, sender_id)
        if record is None:
            await self._refuse(delivery, f"agency {sender_id!r} is not in the directory")
            return False
        try:
            opened = self._open(record, delivery)
        except Exception as exc:  # forged, tampered, misaddressed, malformed: drop it
            await self._refuse(delivery, f"{type(exc).__name__}: {exc}")
            return False
        try:
            return await asyncio.to_thread(self._apply, record, opened, delivery)
        except (StorageError, Unavailable):
            # The database or the disk failed, not the envelope: no acknowledgement, so the
            # broker keeps it and offers it again (acknowledging would lose it for good).
            raise
        except TesseraError as exc:
            # Not about anything of ours, or not from the agency it concerns: drop it.
            await self._refuse(delivery, f"{type(exc).__name__}: {exc}")
            return False

    async def _acknowledge(self, delivery_ids: list[str]) -> None:
        await self._stub().Acknowledge(
            relay_pb.AcknowledgeRequest(delivery_ids=delivery_ids), timeout=_CALL_TIMEOUT
        )

    def _open(self, sender: directory.AgencyRecord, delivery: relay_pb.Delivery) -> OpenedEnvelope:
        """Open and verify one delivery (node.envelopes.open_envelope); raises if it fails."""
        return open_envelope(
            self._keyring.identity,
            self.agency_id,
            sender,
            bytes(delivery.sealed_envelope),
            _now(),
            delivery_commitment=bytes(delivery.consent_commitment),
            retired=self._keyring.retired,
        )

    def _apply(
        self,
        sender: directory.AgencyRecord,
        opened: OpenedEnvelope,
        delivery: relay_pb.Delivery,
    ) -> bool:
        """Apply one verified envelope; True if a reply was queued."""
        return self._referrals.receive(sender, opened, delivery.delivery_id)

    async def _refuse(self, delivery: relay_pb.Delivery, reason: str) -> None:
        detail: dict[str, Any] = {
            "sender_id": delivery.sender_agency_id,
            "delivery_id": delivery.delivery_id,
            "reason": reason[:300],
        }
        log.warning("relay.envelope_refused", extra=fields(**detail))
        await asyncio.to_thread(self._store.audit, RELAY_ACTOR, "envelope.refused", None, detail)


class _Senders:
    """The pinned directory records of the senders of one streamed batch.

    The directory is synced once per batch, before the first envelope of it is opened: a
    revocation (a lost laptop) then takes effect for every envelope delivered after it, even one
    sent before it and kept at the broker, and an agency enrolled a moment ago is known. Once per
    batch, not per delivery: a sync fetches the whole directory.
    """

    def __init__(self, home: Path, keyring: Keyring, link: directory_sync.BrokerLink) -> None:
        self._home = home
        self._keyring = keyring
        self._link = link
        self._cache: directory_sync.DirectoryCache | None = None

    def record(self, sender_id: str) -> directory.AgencyRecord | None:
        """The sender's pinned record, or None if the directory does not list it."""
        if self._cache is None:
            # A transport failure raises here: the batch stays at the broker for later.
            self._cache = directory_sync.sync(self._home, self._keyring.identity, self._link)
        return self._cache.records.get(sender_id)


def start_worker(
    store: NodeStore,
    referrals: Referrals,
    keyring: Keyring,
    home: Path,
    limits: Limits,
    policy: StatsPolicy | None = None,
) -> RelayWorker | None:
    """A started worker if the node is enrolled (``broker.json`` exists), else None."""
    if not (home / directory_sync.LINK_FILE).exists():
        return None
    link = directory_sync.load_link(home)
    worker = RelayWorker(store, referrals, keyring, home, link, limits, policy)
    worker.start()
    return worker


def split_by_size(items: list[OutboxItem], max_bytes: int) -> list[list[OutboxItem]]:
    """``items`` in order, split so that no chunk's envelopes exceed ``max_bytes`` in all (one
    envelope always fits: the broker's envelope limit is far below a message's)."""
    chunks: list[list[OutboxItem]] = []
    size = 0
    for item in items:
        if not chunks or size + len(item.sealed) > max_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += len(item.sealed)
    return chunks
