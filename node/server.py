"""Running a node: open its keyring and database, start its gRPC server, keep health current.

``start_node`` is what ``tessera node serve``, the demo and the tests all call, so every one of
them exercises the same real server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from node import access, directory_sync, escrow, rotation
from node.backup import finish_interrupted_restore, reapply_ledger
from node.keyring import Keyring, open_keyring
from node.referrals.flows import Referrals
from node.relay_worker import RelayWorker, start_worker
from node.service import NodeServicer
from node.store.cases import NodeStore
from node.store.database import open_database
from node.store.escrow import EscrowStore
from tessera import metrics, replay, rpc, tls
from tessera.config import Settings
from tessera.credential import RUN_FILE, RunLock, hold_serving_lock
from tessera.db import database_answers
from tessera.errors import TesseraError
from tessera.logs import fields
from tessera.v1 import node_pb2 as node_pb
from tessera.v1 import node_pb2_grpc as node_grpc

log = logging.getLogger(__name__)
NODE_SERVICE = node_pb.DESCRIPTOR.services_by_name["Node"].full_name
_HEALTH_INTERVAL = 5.0
_ENROLMENT_POLL = 2.0


@dataclass
class RunningNode:
    """A started node: its server, store and the address clients reach it at."""

    settings: Settings
    server: rpc.RunningServer
    store: NodeStore
    keyring: Keyring
    address: str
    _health_task: asyncio.Task[None] | None = None
    relay: RelayWorker | None = None
    metrics: metrics.MetricsServer | None = None
    _enrolment_task: asyncio.Task[None] | None = None
    gate: escrow.EscrowGate | None = None
    escrow: escrow.EscrowWorker | None = None
    run_lock: RunLock | None = None

    async def stop(self, grace: float = 2.0) -> None:
        """Stop serving and relaying, close the database, forget the run file."""
        if self._enrolment_task is not None:
            self._enrolment_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._enrolment_task
        if self.relay is not None:
            await self.relay.stop()
            self.relay = None
        if self.escrow is not None:
            await self.escrow.stop()
            self.escrow = None
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        await self.server.stop(grace)
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)
            self.metrics = None
        self.store.engine.dispose()
        (self.settings.home / RUN_FILE).unlink(missing_ok=True)
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None


async def start_node(
    settings: Settings,
    passphrase: str | None,
    health_interval: float = _HEALTH_INTERVAL,
    enrolment_poll: float = _ENROLMENT_POLL,
    escrow_poll: float = escrow.POLL_SECONDS,
    checkpoint_seconds: float = escrow.CHECKPOINT_SECONDS,
) -> RunningNode:
    """Open the keyring (Argon2id runs once, here), migrate the database, re-apply every
    erasure the node knows of (its ledger, its escrow at the broker), start the server.

    ``health_interval`` is how often (seconds) the database is checked for the health service;
    with ``metrics_port`` set, Prometheus metrics are served on 127.0.0.1 at that port. A node
    not yet enrolled looks for its broker link every ``enrolment_poll`` seconds and starts its
    relay worker once the link is there. An enrolled node opens no case until it has confirmed
    its escrow with the broker (node.escrow); it tries once before serving, then every
    ``escrow_poll`` seconds, and checkpoints its audit head at least every
    ``checkpoint_seconds``.
    """
    # Held for as long as this node serves (the kernel drops it if the process dies): it tells
    # `node restore` whether a node really serves here, and keeps one from starting mid-restore.
    run_lock = hold_serving_lock(settings.home)
    try:
        running = await _start(
            settings, passphrase, health_interval, enrolment_poll, escrow_poll, checkpoint_seconds
        )
    except BaseException:
        run_lock.release()
        raise
    running.run_lock = run_lock
    return running


async def _start(
    settings: Settings,
    passphrase: str | None,
    health_interval: float,
    enrolment_poll: float,
    escrow_poll: float,
    checkpoint_seconds: float,
) -> RunningNode:
    keyring = await asyncio.to_thread(open_keyring, settings.home, passphrase)
    rotation.refuse_pending(keyring)  # a half-done key rotation is finished first
    engine = await asyncio.to_thread(open_database, settings.effective_database_url, keyring)
    # A restore killed halfway is finished before anything reads a case (node.backup).
    await asyncio.to_thread(finish_interrupted_restore, settings.home, engine, keyring)
    store = NodeStore(engine, keyring, settings.home)
    gate, worker = await _open_escrow(store, settings, keyring, escrow_poll, checkpoint_seconds)

    def refused(actor: str, method: str, reason: str) -> None:
        store.audit(actor, "access.refused", None, {"method": method, "reason": reason})

    staff = access.make_authenticator(lambda key: gate.staff_view(store.staff_by_key(key)), refused)

    async def authenticate(signer: bytes, method: str) -> rpc.Caller:
        caller = await staff(signer, method)
        # While the node cannot know every erasure, it serves only its status and audit check.
        gate.check_call(method.removeprefix(access.SERVICE))
        return caller

    interceptor = rpc.TesseraServerInterceptor(
        authenticate,
        replay.ReplayGuard(settings.limits.replay_window_seconds),
        on_refused=refused,
    )
    referrals = Referrals(store, settings.home)
    servicer = NodeServicer(settings, store, keyring, referrals, gate=gate)
    server = await rpc.start_server(
        listen=settings.listen,
        add_services=[lambda s: node_grpc.add_NodeServicer_to_server(servicer, s)],
        service_names=[NODE_SERVICE],
        cert_pem=tls.read_pem(settings.cert_path),
        key_pem=tls.read_pem(settings.key_path),
        interceptor=interceptor,
        max_message_bytes=settings.limits.max_message_bytes,
    )
    address, exporter = await rpc.announce(server, settings, engine.dispose)
    running = RunningNode(
        settings, server, store, keyring, address, metrics=exporter, gate=gate, escrow=worker
    )

    def start_escrow() -> None:
        if running.escrow is None:
            running.escrow = escrow.EscrowWorker(
                store,
                settings.home,
                escrow.EscrowClient(directory_sync.load_link(settings.home), keyring.identities),
                gate,
                escrow_poll,
                checkpoint_seconds,
            )
        running.escrow.start()
        servicer.escrow = running.escrow

    if worker is not None:
        start_escrow()
    await asyncio.to_thread(_database_ok, store)  # the gauges are current from the first scrape
    running._health_task = asyncio.create_task(
        rpc.watch_health(server, lambda: _database_ok(store), health_interval, "node")
    )

    def start_relay() -> bool:
        running.relay = start_worker(
            store, referrals, keyring, settings.home, settings.limits, settings.stats
        )
        if running.relay is None:
            return False
        servicer.relay = running.relay
        if running.escrow is None:
            start_escrow()  # enrolled while serving: escrow what was queued until now
        return True

    if not start_relay():
        # Not enrolled yet: `tessera node enrol` may run while the node serves; start relaying
        # as soon as it has linked the node to a broker, without a restart.
        running._enrolment_task = asyncio.create_task(
            _relay_once_enrolled(settings.home, start_relay, enrolment_poll)
        )
    log.info(
        "node.started",
        extra=fields(
            address=address,
            storage=engine.dialect.name,
            metrics=exporter.address if exporter else "off",
        ),
    )
    return running


async def serve_until_signalled(
    settings: Settings, passphrase: str | None, ready: asyncio.Event | None = None
) -> None:
    """Run a node until SIGINT or SIGTERM, then shut down gracefully."""
    running = await start_node(settings, passphrase)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("node.stopping")
    await running.stop()


async def _relay_once_enrolled(home: Path, start_relay: Callable[[], bool], poll: float) -> None:
    """Wait for ``broker.json`` (written by ``tessera node enrol``), then start relaying."""
    link = home / directory_sync.LINK_FILE
    while True:
        await asyncio.sleep(poll)
        if not link.exists():
            continue
        try:
            if start_relay():
                log.info("node.relay_started", extra=fields(reason="enrolled"))
                return
        except Exception as exc:  # a link being written right now: try again next time
            log.warning("node.relay_not_started", extra=fields(error=str(exc)[:200]))


async def _open_escrow(
    store: NodeStore,
    settings: Settings,
    keyring: Keyring,
    poll: float,
    checkpoint_seconds: float,
) -> tuple[escrow.EscrowGate, escrow.EscrowWorker | None]:
    """Re-apply the home's ledger, seal cases written before seals existed, and, for an enrolled
    node, try once to confirm the escrow (node.escrow) before serving anything."""
    home = settings.home
    escrow_store = EscrowStore(store)
    await asyncio.to_thread(reapply_ledger, home, store)
    sealed = await asyncio.to_thread(escrow_store.backfill_seals, "system:start")
    if sealed:
        log.info("node.records_sealed", extra=fields(cases=sealed))
    enrolled = (home / directory_sync.LINK_FILE).exists()
    link = directory_sync.load_link(home) if enrolled else None
    gate = escrow.EscrowGate(enrolled, f"the broker at {link.address}" if link else "the broker")
    gate.learn(
        await asyncio.to_thread(store.erased_ids),
        await asyncio.to_thread(escrow_store.removed_keys),
    )
    store.guard = gate
    if link is None:
        return gate, None
    worker = escrow.EscrowWorker(
        store, home, escrow.EscrowClient(link, keyring.identities), gate, poll, checkpoint_seconds
    )
    try:
        await asyncio.to_thread(worker.step)
    except TesseraError as exc:
        log.warning(
            "escrow.unconfirmed", extra=fields(reason=gate.detail[:300], error=str(exc)[:200])
        )
    return gate, worker


def _database_ok(store: NodeStore) -> bool:
    """Whether the database answers; also refreshes the case-count gauge."""
    if not database_answers(store.engine):
        return False
    try:
        metrics.NODE_CASES.set(store.count_cases())
    except Exception:  # the database went away between the two queries
        return False
    return True
