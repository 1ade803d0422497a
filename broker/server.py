"""Running a broker: open its database, rebuild its directory view, serve Directory and Relay."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import resource
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field

from broker import access
from broker import identity as broker_identity
from broker.escrow import EscrowServicer
from broker.group_commit import GroupCommitter
from broker.service import DirectoryServicer, DirectoryView, RelayServicer
from broker.stats import StatsServicer
from broker.store.database import open_database
from broker.store.notify import listen_for_mail
from broker.store.relay import BrokerStore
from tessera import crypto, metrics, replay, rpc, tls
from tessera.config import Settings
from tessera.credential import RUN_FILE
from tessera.db import database_answers
from tessera.errors import TesseraError
from tessera.logs import fields
from tessera.v1 import directory_pb2 as directory_pb
from tessera.v1 import directory_pb2_grpc as directory_grpc
from tessera.v1 import escrow_pb2 as escrow_pb
from tessera.v1 import escrow_pb2_grpc as escrow_grpc
from tessera.v1 import relay_pb2 as relay_pb
from tessera.v1 import relay_pb2_grpc as relay_grpc
from tessera.v1 import stats_pb2 as stats_pb
from tessera.v1 import stats_pb2_grpc as stats_grpc

log = logging.getLogger(__name__)
SERVICES = [
    directory_pb.DESCRIPTOR.services_by_name["Directory"].full_name,
    relay_pb.DESCRIPTOR.services_by_name["Relay"].full_name,
    stats_pb.DESCRIPTOR.services_by_name["Stats"].full_name,
    escrow_pb.DESCRIPTOR.services_by_name["Escrow"].full_name,
]
_HOUSEKEEPING_SECONDS = 30.0
_HEALTH_INTERVAL = 5.0


@dataclass
class RunningBroker:
    """A started broker: server, store and the address clients reach it at."""

    settings: Settings
    server: rpc.RunningServer
    store: BrokerStore
    identity: crypto.Identity
    address: str
    relay: RelayServicer
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    metrics: metrics.MetricsServer | None = None

    async def stop(self, grace: float = 2.0) -> None:
        """Stop serving, release this process's leases, close the database."""
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.server.stop(grace)
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)
            self.metrics = None
        await asyncio.to_thread(self.store.release, self.relay.owner)
        self.store.engine.dispose()
        (self.settings.home / RUN_FILE).unlink(missing_ok=True)


async def start_broker(
    settings: Settings, health_interval: float = _HEALTH_INTERVAL
) -> RunningBroker:
    """Migrate the database, verify the directory log, start the TLS gRPC server.

    ``health_interval`` is how often (seconds) the database is checked for the health service;
    with ``metrics_port`` set, Prometheus metrics are served on 127.0.0.1 at that port.
    """
    identity = broker_identity.load_identity(settings.home)
    engine = await asyncio.to_thread(open_database, settings.effective_database_url)
    store = BrokerStore(engine)
    view = DirectoryView(store, identity, settings.region)
    await asyncio.to_thread(view.refresh)  # refuses to start on a log that does not verify

    def agency_by_key(key: bytes) -> tuple[str, bool] | None:
        record = view.agency_by_signing_key(key)
        return (record.agency_id, record.revoked) if record else None

    async def refresh_view() -> None:
        await asyncio.to_thread(view.refresh)

    window = settings.limits.replay_window_seconds

    # Request nonces are kept in the database, written by group commit: replicas on PostgreSQL
    # share them, and a restarted process (SQLite too) still refuses a request it accepted
    # before it stopped. Each batch then brings this process's directory view up to date, so a
    # request is authenticated against every revocation committed (by any replica) before its
    # nonce; the log's size comes with the batch's own transaction, so the view is read again
    # only when some process appended to the log.
    def remember(seen: Sequence[tuple[bytes, bytes, dt.datetime]]) -> list[bool | TesseraError]:
        outcomes, log_size = store.remember_nonces_and_log_size(seen, window)
        view.catch_up(log_size)
        return outcomes

    nonces: GroupCommitter[tuple[bytes, bytes, dt.datetime], bool] = GroupCommitter(remember)

    async def shared_nonces(signer: bytes, nonce: bytes, signed_at: dt.datetime) -> bool:
        return await nonces.submit((signer, nonce, signed_at))

    interceptor = rpc.TesseraServerInterceptor(
        access.make_authenticator(
            agency_by_key, lambda: broker_identity.load_operators(settings.home), refresh_view
        ),
        replay.ReplayGuard(window),
        public_methods=access.PUBLIC,
        shared_nonces=shared_nonces,
    )
    directory_servicer = DirectoryServicer(settings, store, identity, view)
    relay = RelayServicer(settings, store, identity, view)
    stats = StatsServicer(settings, engine, identity, view)
    escrow_servicer = EscrowServicer(engine, identity)
    server = await rpc.start_server(
        listen=settings.listen,
        add_services=[
            lambda s: directory_grpc.add_DirectoryServicer_to_server(directory_servicer, s),
            lambda s: relay_grpc.add_RelayServicer_to_server(relay, s),
            lambda s: stats_grpc.add_StatsServicer_to_server(stats, s),
            lambda s: escrow_grpc.add_EscrowServicer_to_server(escrow_servicer, s),
        ],
        service_names=SERVICES,
        cert_pem=tls.read_pem(settings.cert_path),
        key_pem=tls.read_pem(settings.key_path),
        interceptor=interceptor,
        max_message_bytes=settings.limits.max_message_bytes,
        max_request_bytes=settings.limits.max_request_bytes,
    )
    address, exporter = await rpc.announce(server, settings, engine.dispose)
    running = RunningBroker(settings, server, store, identity, address, relay, metrics=exporter)
    running._tasks.append(asyncio.create_task(_housekeeping(running)))
    if engine.dialect.name == "postgresql":
        running._tasks.append(
            asyncio.create_task(listen_for_mail(settings.effective_database_url, relay.wake))
        )
    running._tasks.append(
        asyncio.create_task(
            rpc.watch_health(
                server, lambda: database_answers(store.engine), health_interval, "broker"
            )
        )
    )
    log.info(
        "broker.started",
        extra=fields(
            address=address,
            region=settings.region,
            metrics=exporter.address if exporter else "off",
        ),
    )
    return running


def raise_open_files_limit() -> int:
    """Lift this process's soft limit on open files to its hard limit; returns the soft limit.

    Every node holds a connection (one socket) to its broker, and a soft limit of 1,024 (the
    default under systemd and many shells) would refuse connections from the thousandth node
    on. The hard limit is the administrator's; raising the soft one up to it needs no privilege.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


async def serve_until_signalled(settings: Settings) -> None:
    """Run a broker until SIGINT or SIGTERM, then shut down gracefully."""
    open_files = raise_open_files_limit()
    if open_files != resource.RLIM_INFINITY and open_files < 4096:
        log.warning(
            "broker.open_files_limit",
            extra=fields(limit=open_files, hint="raise LimitNOFILE: each node holds a socket"),
        )
    running = await start_broker(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await running.stop()


async def _housekeeping(running: RunningBroker) -> None:
    """Expire envelopes past retention and keep the waiting-envelopes gauge current."""
    retention = dt.timedelta(days=running.settings.limits.envelope_retention_days)
    while True:
        try:
            expired = await asyncio.to_thread(
                running.store.expire, dt.datetime.now(dt.UTC), retention
            )
            await asyncio.to_thread(running.store.prune_nonces, dt.datetime.now(dt.UTC))
            waiting = await asyncio.to_thread(running.store.waiting_count, None)
            metrics.ENVELOPES_WAITING.set(waiting)
            if expired:
                log.warning("relay.expired", extra=fields(envelopes=expired))
        except Exception:  # housekeeping must never take the server down
            log.exception("broker.housekeeping_failed")
        await asyncio.sleep(_HOUSEKEEPING_SECONDS)
