"""A bounded soak of one broker: N agencies each holding a Receive stream, thousands of referrals
between random pairs, statistics rounds at the same time (issue 16 item 6).

One real broker (``tessera --home H broker serve`` in its own process; SQLite, and PostgreSQL in a
throwaway database when asked) on loopback. N fresh identities are enrolled for real through the
Directory service (an enrolment token from the operator, then ``Enrol``), as ``bench/stats.py``
does. Each agency then does in this process what a node's relay worker does
(``node/relay_worker.py``), over its own signed asyncio TLS channel (:func:`tessera.rpc`'s signing
interceptors; its own TCP connection, ``grpc.use_local_subchannel_pool``, as a node in its own
process would have):

* it follows its mailbox with ``ReceiveBatches(follow=True)``; for each batch the broker streams it
  checks every delivery (sender, recipient, the exact sealed bytes; with ``open_envelopes`` it also
  opens and verifies each envelope, as a node does) and only then acknowledges the batch in one
  ``Acknowledge`` call, before reading the next batch;
* it pushes its outbox with signed ``SendBatch`` calls (every tenth push as one ``Send`` call per
  envelope instead, so both calls are exercised).

Phases, in order:

1. **Baselines** (same run, same machine): the bare ``grpc.aio`` echo server of ``bench/relay.py``
   (one 2 KiB payload a call, 32 in flight), and a **single stream**: a fresh broker, one sender,
   one recipient holding the only stream, driven by this harness with pushes of the soak's mean
   size and the same number of calls in flight.
2. **Rest**: the soak broker with its N agencies enrolled and warmed up by two agencies
   exchanging a few referrals over short-lived streams, no stream open: RSS sampled.
3. **Idle**: all N streams open, each proven live by one referral delivered to it; then idle for
   a few seconds: broker RSS (median of samples), its CPU (what N idle streams cost), its open file
   descriptors and threads, and its open-files limit.
4. **Soak**: the referrals (sealed ~2 KiB envelopes between random distinct pairs, in random
   order, grouped into pushes per sender in windows of :data:`WINDOW`), a bounded number of calls
   in flight; with ``rounds``, PRIVATE statistics rounds of up to :data:`ROUND_PARTICIPANTS`
   agencies run back to back meanwhile (``bench/stats.py``'s round: OpenRound, every share
   built and submitted, the release fetched). Broker RSS is sampled every
   :data:`SAMPLE_SECONDS`; the soak ends when every referral was delivered and acknowledged.

Figures: throughput (envelopes delivered and acknowledged per second over the soak) against the
echo and the single stream; p50/p99 send→delivered latency against the single stream's; memory
per idle stream ((RSS idle with N streams - RSS at rest) / N); the RSS slope over the second half
of the soak (MiB per minute, and as a share of the mean RSS per minute).

Correctness is checked in every run, and :class:`Report` carries it for ``tests/test_soak_small``:
every referral delivered exactly once, to its recipient, from its sender, byte for byte; no
stream ended; no call failed (any gRPC status other than OK is recorded and fails the run).

``python -m bench soak``: sizes from the environment, ``TESSERA_SOAK_STREAMS`` (default 1000),
``TESSERA_SOAK_REFERRALS`` (default 5000), ``TESSERA_SOAK_IN_FLIGHT`` (32),
``TESSERA_SOAK_ROUNDS`` (1: statistics rounds on), ``TESSERA_SOAK_REPLAY_WINDOW`` (30 s),
``TESSERA_SOAK_POSTGRES`` (1: also on PostgreSQL, in a throwaway database at
``TESSERA_BENCH_POSTGRES_URL``); or ``python -m bench.soak --streams 200 --referrals 2000
[--postgres] [--no-rounds]``. ``make soak`` runs the full size (1,000 streams, 12,000 referrals).

The soak's brokers run with a 30 s replay window (default 300 s): a broker remembers each
request's nonce for the window, so under steady load its memory grows for one window's length
and then levels off; with the short window a soak of a few minutes shows the level, and a
slope that stays up past it would be a leak.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from bench import stats as stats_bench
from bench.common import Figure, percentile
from bench.relay import (
    DEFAULT_POSTGRES,
    ENVELOPE_BYTES,
    ServerProcess,
    broker_process,
    make_broker_home,
    measure_echo,
    postgres_reachable,
    throwaway_database,
)
from tessera import config as tessera_config
from tessera import credential, crypto, dp, labels, rpc, tls
from tessera.config import OUTBOX_BATCH, Limits
from tessera.v1 import directory_pb2 as directory_pb
from tessera.v1 import directory_pb2_grpc as directory_grpc
from tessera.v1 import relay_pb2 as relay_pb
from tessera.v1 import relay_pb2_grpc as relay_grpc
from tessera.v1 import stats_pb2_grpc as stats_grpc

MAX_MESSAGE = Limits().max_message_bytes
CALL_TIMEOUT = 60.0
SOAK_TIMEOUT = 900.0  # the whole soak phase, at most
LIVE_TIMEOUT = 180.0  # every stream proven live, at most
WINDOW = 500  # referrals grouped into pushes per sender at a time (a node pushes what is queued)
UNARY_EVERY = 10  # every tenth push goes as one Send per envelope
SAMPLE_SECONDS = 0.5
IDLE_SECONDS = 15.0  # idle streams back their poll off to 5 s; measure past that
ROUND_PARTICIPANTS = 50
ROUND_PAUSE = 0.5  # between two statistics rounds
CONNECT_IN_FLIGHT = 64  # streams opened at once
REST_SAMPLES = 6


def _say(text: str) -> None:
    print(f"  soak: {text}", flush=True)


# --- the broker process, seen from /proc ---------------------------------------------------------


def rss(pid: int) -> int:
    """Resident memory of ``pid`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def threads(pid: int) -> int:
    """Threads of ``pid``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise RuntimeError("no Threads")


def open_files(pid: int) -> tuple[int, int]:
    """(file descriptors open, sockets among them) of ``pid``."""
    fds = list(Path(f"/proc/{pid}/fd").iterdir())
    sockets = 0
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(fd).startswith("socket:"):
                sockets += 1
    return len(fds), sockets


def open_files_limit(pid: int) -> str:
    """The soft and hard ``Max open files`` of ``pid``."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return f"{soft}/{hard}"
    return "?"


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far."""
    return stats_bench._broker_cpu(pid)


def slope_per_minute(samples: Sequence[tuple[float, int]]) -> float:
    """Least-squares slope of RSS (bytes) against time (s), in bytes per minute."""
    if len(samples) < 2:
        return 0.0
    xs = [t for t, _ in samples]
    ys = [float(v) for _, v in samples]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:
        return 0.0
    return 60 * sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread


def raise_own_open_files(needed: int) -> None:
    """Lift this (client) process's soft open-files limit toward its hard limit if ``needed``
    descriptors would not fit (every agency's channel is a socket here)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


# --- agencies and referrals ----------------------------------------------------------------------


def broker_home(home: Path, config: Config, database_url: str = "") -> Path:
    """bench/relay.py's broker home (send rate limit lifted) with ``config``'s replay window."""
    make_broker_home(home, database_url)
    with (home / tessera_config.CONFIG_FILE).open("a", encoding="utf-8") as handle:
        handle.write(f"replay_window_seconds = {config.replay_window}\n")  # in [limits]
    return home


def open_channel(address: str, cert: bytes, identity: crypto.Identity) -> grpc.aio.Channel:
    """The node's signed asyncio channel (:func:`tessera.rpc.open_aio_channel`'s credentials,
    options and signing interceptors) on a TCP connection of its own: in one process, gRPC would
    otherwise share one connection among channels of the same target and options, where each
    node, in its own process, has its own."""
    return grpc.aio.secure_channel(
        address,
        grpc.ssl_channel_credentials(root_certificates=cert),
        options=[*rpc.channel_options(MAX_MESSAGE), ("grpc.use_local_subchannel_pool", 1)],
        interceptors=[rpc.AsyncUnarySigner(identity), rpc.AsyncStreamSigner(identity)],
    )


@dataclass(frozen=True)
class Referral:
    """One sealed envelope on its way from ``sender`` to ``recipient``."""

    sender: int
    recipient: int
    request: relay_pb.SendRequest
    digest: bytes  # of the sealed bytes


def seal_referrals(
    identities: Sequence[crypto.Identity],
    pairs: Sequence[tuple[int, int]],
    tag: str,
) -> list[Referral]:
    """One ~2 KiB sealed envelope per (sender, recipient) pair, each with its own idempotency key
    and consent commitment."""
    if not pairs:
        return []
    overhead = len(crypto.seal(identities[0], identities[-1].public, labels.LABEL_ENVELOPE, b""))
    referrals = []
    for index, (sender, recipient) in enumerate(pairs):
        sealed = crypto.seal(
            identities[sender],
            identities[recipient].public,
            labels.LABEL_ENVELOPE,
            os.urandom(ENVELOPE_BYTES - overhead),
        )
        key = f"soak-{tag}-{index}"
        request = relay_pb.SendRequest(
            recipient_agency_id=agency_id(recipient),
            idempotency_key=key,
            consent_commitment=crypto.digest(labels.LABEL_CONSENT_COMMITMENT, key.encode()),
            sealed_envelope=sealed,
        )
        referrals.append(Referral(sender, recipient, request, hashlib.sha256(sealed).digest()))
    return referrals


def agency_id(index: int) -> str:
    """The id bench/stats.py's ``enrol_all`` gives agency ``index``."""
    return f"agency-{index:03d}"


def random_pairs(agencies: int, count: int, rng: random.Random) -> list[tuple[int, int]]:
    """``count`` (sender, recipient) pairs of distinct agencies, uniformly at random."""
    pairs = []
    for _ in range(count):
        sender = rng.randrange(agencies)
        recipient = rng.randrange(agencies - 1)
        pairs.append((sender, recipient + (recipient >= sender)))
    return pairs


def pushes(referrals: Sequence[Referral], window: int = WINDOW) -> list[list[Referral]]:
    """The referrals as senders push them: within each window of ``window`` referrals, each
    sender's in one push (at most OUTBOX_BATCH a push), in order of first appearance."""
    out: list[list[Referral]] = []
    for start in range(0, len(referrals), window):
        by_sender: dict[int, list[Referral]] = {}
        for referral in referrals[start : start + window]:
            by_sender.setdefault(referral.sender, []).append(referral)
        for queued in by_sender.values():
            out += [queued[i : i + OUTBOX_BATCH] for i in range(0, len(queued), OUTBOX_BATCH)]
    return out


def fixed_pushes(referrals: Sequence[Referral], size: int) -> list[list[Referral]]:
    """The referrals in pushes of ``size``."""
    return [list(referrals[i : i + size]) for i in range(0, len(referrals), size)]


# --- the ledger: what was sent, what arrived ------------------------------------------------------


@dataclass
class Ledger:
    """Every referral expected, every delivery seen, every failure; shared by all agencies."""

    identities: Sequence[crypto.Identity]
    open_envelopes: bool = False
    expected: dict[bytes, Referral] = field(default_factory=dict)  # by consent commitment
    sent_at: dict[bytes, float] = field(default_factory=dict)
    delivered_at: dict[bytes, float] = field(default_factory=dict)
    deliveries: dict[bytes, int] = field(default_factory=dict)
    acked: set[bytes] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    _waiting: set[bytes] = field(default_factory=set)
    _done: asyncio.Event = field(default_factory=asyncio.Event)

    def expect(self, referrals: Sequence[Referral]) -> None:
        """Wait for these referrals too (before they are sent)."""
        for referral in referrals:
            commitment = bytes(referral.request.consent_commitment)
            self.expected[commitment] = referral
            self._waiting.add(commitment)
        if self._waiting:
            self._done.clear()

    def delivered(self, recipient: int, delivery: relay_pb.Delivery, now: float) -> None:
        """One delivery reached ``recipient``'s stream: check it against what was sent."""
        commitment = bytes(delivery.consent_commitment)
        referral = self.expected.get(commitment)
        count = self.deliveries.get(commitment, 0) + 1
        self.deliveries[commitment] = count
        if referral is None:
            self.errors.append(f"{agency_id(recipient)} got an envelope nobody sent it")
            return
        if count == 1:
            self.delivered_at[commitment] = now
        sealed = bytes(delivery.sealed_envelope)
        if (
            referral.recipient != recipient
            or delivery.sender_agency_id != agency_id(referral.sender)
            or hashlib.sha256(sealed).digest() != referral.digest
        ):
            self.errors.append(f"{delivery.delivery_id}: not the envelope sent (or not to us)")
        elif self.open_envelopes:
            crypto.open_sealed(
                self.identities[recipient],
                self.identities[referral.sender].public,
                labels.LABEL_ENVELOPE,
                sealed,
            )

    def acknowledged(self, commitments: Sequence[bytes]) -> None:
        """The broker deleted these deliveries."""
        for commitment in commitments:
            self.acked.add(commitment)
            self._waiting.discard(commitment)
        if not self._waiting:
            self._done.set()

    def failed(self, what: str) -> None:
        """A call failed or a stream ended: wakes the waiter, which reports it."""
        self.errors.append(what)
        self._done.set()

    async def all_acknowledged(self, timeout: float) -> None:
        """Until every expected referral was delivered and acknowledged (or something failed)."""
        while self._waiting and not self.errors:
            await asyncio.wait_for(self._done.wait(), timeout)
            self._done.clear()
        if self.errors:
            raise RuntimeError(f"{len(self.errors)} failures, the first: {self.errors[0]}")


class Agency:
    """One enrolled agency doing what a node's relay worker does over its own channel."""

    def __init__(
        self, index: int, identity: crypto.Identity, address: str, cert: bytes, ledger: Ledger
    ) -> None:
        self.index = index
        self.agency_id = agency_id(index)
        self.channel = open_channel(address, cert, identity)
        self.stub: Any = relay_grpc.RelayStub(self.channel)  # awaitable calls
        self._ledger = ledger
        self._commitment_of: dict[str, bytes] = {}
        self._task: asyncio.Task[None] | None = None
        self.live = asyncio.Event()  # a delivery reached this stream
        self.batches = 0

    def follow(self) -> None:
        """Open the mailbox stream (ReceiveBatches, follow=True)."""
        self._task = asyncio.create_task(self._receive(), name=f"receive-{self.agency_id}")

    @property
    def following(self) -> bool:
        """True while the stream is open."""
        return self._task is not None and not self._task.done()

    async def _receive(self) -> None:
        call = self.stub.ReceiveBatches(relay_pb.ReceiveRequest(follow=True))
        try:
            async for batch in call:
                now = time.perf_counter()
                self.batches += 1
                ids = []
                for delivery in batch.deliveries:
                    self._ledger.delivered(self.index, delivery, now)
                    self._commitment_of[delivery.delivery_id] = bytes(delivery.consent_commitment)
                    ids.append(delivery.delivery_id)
                self.live.set()
                reply = await self.stub.Acknowledge(
                    relay_pb.AcknowledgeRequest(delivery_ids=ids), timeout=CALL_TIMEOUT
                )
                self._ledger.acknowledged(
                    [
                        self._commitment_of.pop(i)
                        for i in reply.deleted_ids
                        if i in self._commitment_of
                    ]
                )
            self._ledger.failed(f"the broker ended {self.agency_id}'s stream")
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            self._ledger.failed(f"{self.agency_id}'s stream: {exc.code().name} {exc.details()}")
        except Exception as exc:
            self._ledger.failed(f"{self.agency_id}'s stream: {type(exc).__name__}: {exc}")
        finally:
            call.cancel()

    async def push(self, batch: Sequence[Referral], unary: bool) -> None:
        """Hand ``batch`` to the broker: one SendBatch, or one Send per envelope."""
        now = time.perf_counter()
        for referral in batch:
            self._ledger.sent_at[bytes(referral.request.consent_commitment)] = now
        try:
            if unary:
                for referral in batch:
                    await self.stub.Send(referral.request, timeout=CALL_TIMEOUT)
                return
            reply = await self.stub.SendBatch(
                relay_pb.SendBatchRequest(envelopes=[r.request for r in batch]),
                timeout=CALL_TIMEOUT,
            )
        except grpc.aio.AioRpcError as exc:
            self._ledger.failed(f"{self.agency_id} sending: {exc.code().name} {exc.details()}")
            return
        refused = [r.refused.message for r in reply.results if r.HasField("refused")]
        if refused or len(reply.results) != len(batch):
            self._ledger.failed(f"{self.agency_id} sending: refused {refused[:1]}")

    async def stop(self) -> None:
        """Close the stream and the channel."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.channel.close()


async def drive(
    agencies: Sequence[Agency], batches: Sequence[list[Referral]], in_flight: int
) -> None:
    """Push every batch from its sender, ``in_flight`` calls at a time; every UNARY_EVERY-th push
    as Send calls."""
    indexes = iter(range(len(batches)))

    async def worker() -> None:
        for index in indexes:  # shared: each push is taken by one worker
            batch = batches[index]
            await agencies[batch[0].sender].push(
                batch, unary=index % UNARY_EVERY == UNARY_EVERY - 1
            )

    await asyncio.gather(*(worker() for _ in range(min(in_flight, len(batches)))))


async def gather_bounded(limit: int, jobs: Sequence[Any]) -> None:
    """Await every coroutine of ``jobs``, at most ``limit`` at once."""
    gate = asyncio.Semaphore(limit)

    async def one(job: Any) -> None:
        async with gate:
            await job

    await asyncio.gather(*(one(job) for job in jobs))


# --- results ------------------------------------------------------------------------------------


@dataclass
class Report:
    """One soak: its correctness and its figures."""

    database: str
    streams: int
    referrals: int
    delivered: int = 0  # distinct referrals delivered
    duplicates: int = 0  # deliveries beyond the first of a referral
    acknowledged: int = 0
    dropped_streams: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    rest_rss: int = 0
    connected_rss: int = 0  # every agency connected, no stream yet
    idle_rss: int = 0
    idle_cpu: float = 0.0  # cores the broker used with N idle streams
    idle_fds: tuple[int, int] = (0, 0)
    idle_threads: int = 0
    fd_limit: str = ""
    samples: list[tuple[float, int]] = field(default_factory=list)  # (s into the soak, RSS)
    rounds: int = 0
    round_errors: list[str] = field(default_factory=list)
    broker_cpu: float = 0.0  # cores over the soak
    mean_push: float = 0.0

    @property
    def throughput(self) -> float:
        """Referrals delivered and acknowledged per second over the soak."""
        return self.referrals / self.seconds if self.seconds else 0.0

    def latency_ms(self, fraction: float) -> float:
        """A send→delivered percentile in ms."""
        return percentile(self.latencies, fraction) * 1000 if self.latencies else 0.0

    @property
    def per_stream(self) -> float:
        """Broker memory per idle stream in bytes."""
        return (self.idle_rss - self.rest_rss) / self.streams if self.streams else 0.0

    def second_half(self) -> list[tuple[float, int]]:
        """The RSS samples of the soak's second half."""
        if not self.samples:
            return []
        middle = self.samples[-1][0] / 2
        return [s for s in self.samples if s[0] >= middle]

    @property
    def slope(self) -> float:
        """RSS slope over the second half, bytes per minute."""
        return slope_per_minute(self.second_half())

    @property
    def ok(self) -> bool:
        """Every referral delivered exactly once and acknowledged, no stream ended, no failure."""
        return (
            self.delivered == self.referrals
            and self.duplicates == 0
            and self.acknowledged == self.referrals
            and self.dropped_streams == 0
            and not self.errors
            and not self.round_errors
        )

    def summary(self) -> str:
        """One line."""
        half = self.second_half()
        mean = statistics.fmean(v for _, v in half) if half else 1.0
        return (
            f"soak {self.database}: {self.streams} streams, {self.referrals:,} referrals "
            f"{'OK' if self.ok else 'FAILED'} ({self.duplicates} duplicates, "
            f"{self.dropped_streams} streams dropped, {len(self.errors)} errors), "
            f"{self.throughput:,.0f}/s, p50 {self.latency_ms(0.5):.0f} ms, p99 "
            f"{self.latency_ms(0.99):.0f} ms, {self.per_stream / 1024:.1f} KiB per idle stream, "
            f"RSS slope 2nd half {self.slope / 2**20:+.2f} MiB/min "
            f"({100 * self.slope / mean:+.2f}%/min), {self.rounds} stats rounds"
        )


# --- phases ---------------------------------------------------------------------------------------


class Sampler:
    """Broker RSS every SAMPLE_SECONDS while running."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self.samples: list[tuple[float, int]] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start sampling (t = 0 now)."""
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        started = time.perf_counter()
        while True:
            self.samples.append((time.perf_counter() - started, rss(self._pid)))
            await asyncio.sleep(SAMPLE_SECONDS)

    async def stop(self) -> list[tuple[float, int]]:
        """Stop and return the samples."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return self.samples


async def median_rss(pid: int, count: int = REST_SAMPLES) -> int:
    """The median of ``count`` RSS samples, SAMPLE_SECONDS apart."""
    values = []
    for _ in range(count):
        values.append(rss(pid))
        await asyncio.sleep(SAMPLE_SECONDS)
    return int(statistics.median(values))


async def rounds_loop(setup: stats_bench.Setup, participants: int, report: Report) -> None:
    """PRIVATE statistics rounds back to back until cancelled; counts the released ones."""
    while True:
        try:
            await stats_bench.run_round(setup, stats_bench.PRIVATE, participants)
            report.rounds += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            report.round_errors.append(f"{type(exc).__name__}: {exc}")
            return
        await asyncio.sleep(ROUND_PAUSE)


@dataclass(frozen=True)
class Config:
    """The size of one soak."""

    streams: int
    referrals: int
    in_flight: int = 32
    rounds: bool = True
    open_envelopes: bool = False
    idle_seconds: float = IDLE_SECONDS
    seed: int = 16
    # The broker remembers every request's nonce for its replay window (300 s by default), in
    # memory and in the database, so its memory grows for a window's length under steady load
    # before it levels off; a short window lets a soak of a few minutes reach that level.
    replay_window: int = 30


async def soak_broker(broker: ServerProcess, home: Path, config: Config, database: str) -> Report:
    """Enrol, rest, idle and soak against the running ``broker`` of ``home``."""
    report = Report(database, config.streams, config.referrals)
    address = broker.address
    held = credential.read(home)
    cert = held.node_certificate
    started = time.perf_counter()
    nodes = await stats_bench.enrol_all(address, cert, held.identity, config.streams)
    identities = [node.identity for node in nodes]
    _say(
        f"{database}: {len(nodes)} agencies enrolled through the Directory service in "
        f"{time.perf_counter() - started:.1f} s"
    )
    rng = random.Random(config.seed)
    ledger = Ledger(identities, config.open_envelopes)
    agencies: list[Agency] = []
    operator: grpc.aio.Channel | None = None
    rounds: asyncio.Task[None] | None = None
    measured: set[bytes] = set()  # the soak's own referrals (not the warm-up, not the probes)
    try:
        # Warm-up (code paths, caches, the database) by two agencies over short-lived streams.
        warm = [Agency(i, identities[i], address, cert, ledger) for i in (0, 1)]
        for agency in warm:
            agency.follow()
        warm_referrals = seal_referrals(identities, [(0, 1), (1, 0)] * 50, "warm")
        ledger.expect(warm_referrals)
        await drive(warm, pushes(warm_referrals, 20), 4)
        await ledger.all_acknowledged(CALL_TIMEOUT)
        for agency in warm:
            await agency.stop()
        await asyncio.sleep(1.0)
        report.rest_rss = await median_rss(broker.pid)
        rest_fds = open_files(broker.pid)
        _say(
            f"{database}: at rest (no stream): RSS {report.rest_rss / 2**20:.1f} MiB, "
            f"{rest_fds[0]} fds ({rest_fds[1]} sockets), {threads(broker.pid)} threads"
        )

        # Every agency follows its mailbox; one referral to each proves its stream live.
        raise_own_open_files(2 * config.streams + 256)
        started = time.perf_counter()
        agencies = [Agency(i, identities[i], address, cert, ledger) for i in range(config.streams)]
        await gather_bounded(CONNECT_IN_FLIGHT, [a.channel.channel_ready() for a in agencies])
        await asyncio.sleep(1.0)
        report.connected_rss = await median_rss(broker.pid)
        _say(
            f"{database}: {config.streams} connections (TLS, no call yet): RSS "
            f"{report.connected_rss / 2**20:.1f} MiB "
            f"({(report.connected_rss - report.rest_rss) / config.streams / 1024:.1f} KiB each)"
        )
        for agency in agencies:
            agency.follow()
        probes = seal_referrals(
            identities,
            [((i + 1) % config.streams, i) for i in range(config.streams)],
            "live",
        )
        ledger.expect(probes)
        await gather_bounded(
            CONNECT_IN_FLIGHT, [agencies[p.sender].push([p], unary=False) for p in probes]
        )
        await ledger.all_acknowledged(LIVE_TIMEOUT)
        _say(
            f"{database}: {config.streams} streams open and live in "
            f"{time.perf_counter() - started:.1f} s"
        )
        await asyncio.sleep(1.0)
        cpu_before, wall_before = cpu_seconds(broker.pid), time.perf_counter()
        await asyncio.sleep(config.idle_seconds)
        report.idle_cpu = (cpu_seconds(broker.pid) - cpu_before) / (
            time.perf_counter() - wall_before
        )
        report.idle_rss = await median_rss(broker.pid)
        report.idle_fds = open_files(broker.pid)
        report.idle_threads = threads(broker.pid)
        report.fd_limit = open_files_limit(broker.pid)
        _say(
            f"{database}: {config.streams} idle streams: RSS {report.idle_rss / 2**20:.1f} MiB "
            f"(+{(report.idle_rss - report.rest_rss) / 2**20:.1f} MiB, "
            f"{report.per_stream / 1024:.1f} KiB a stream), broker CPU {report.idle_cpu:.2f} "
            f"cores, {report.idle_fds[0]} fds ({report.idle_fds[1]} sockets, open-files "
            f"limit {report.fd_limit}), {report.idle_threads} threads"
        )

        # The soak: random pairs, pushes per sender, statistics rounds meanwhile.
        referrals = seal_referrals(
            identities, random_pairs(config.streams, config.referrals, rng), "soak"
        )
        plan = pushes(referrals)
        report.mean_push = len(referrals) / len(plan)
        if config.rounds:
            operator = rpc.open_aio_channel(address, cert, held.identity, MAX_MESSAGE)
            info = await directory_grpc.DirectoryStub(operator).GetBrokerInfo(
                directory_pb.GetBrokerInfoRequest(), timeout=CALL_TIMEOUT
            )
            participants = min(ROUND_PARTICIPANTS, config.streams)
            for node, agency in zip(nodes, agencies, strict=True):
                node.channel = agency.channel
                node.stub = stats_grpc.StatsStub(agency.channel)
            cells = dp.default_needs_table().size
            setup = stats_bench.Setup(
                broker=broker,
                operator=stats_grpc.StatsStub(operator),
                broker_key=bytes(info.signing_key),
                nodes=nodes[:participants],
                publics={node.agency_id: node.identity.public for node in nodes},
                identities={node.agency_id: node.identity for node in nodes},
                counts={
                    node.agency_id: [rng.randrange(stats_bench.MAX_COUNT) for _ in range(cells)]
                    for node in nodes[:participants]
                },
            )
        measured = {bytes(r.request.consent_commitment) for r in referrals}
        ledger.expect(referrals)
        sampler = Sampler(broker.pid)
        sampler.start()
        cpu_before = cpu_seconds(broker.pid)
        started = time.perf_counter()
        if config.rounds:
            rounds = asyncio.create_task(rounds_loop(setup, participants, report))
        await drive(agencies, plan, config.in_flight)
        await ledger.all_acknowledged(SOAK_TIMEOUT)
        report.seconds = time.perf_counter() - started
        report.broker_cpu = (cpu_seconds(broker.pid) - cpu_before) / report.seconds
        report.samples = await sampler.stop()
        if rounds is not None:
            # At least one round overlapping the soak must be released (a short soak can end
            # before the first one does).
            deadline = time.monotonic() + CALL_TIMEOUT
            while report.rounds == 0 and not rounds.done() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            rounds.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await rounds
            rounds = None
        commitments = [bytes(r.request.consent_commitment) for r in referrals]
        report.latencies = [ledger.delivered_at[c] - ledger.sent_at[c] for c in commitments]
    except Exception as exc:
        report.errors.append(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if rounds is not None:
            rounds.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await rounds
        report.dropped_streams = sum(1 for agency in agencies if not agency.following)
        report.delivered = sum(1 for c in measured if ledger.deliveries.get(c, 0) >= 1)
        # Duplicates of any referral count, the warm-up's and the probes' too.
        report.duplicates = sum(max(0, n - 1) for n in ledger.deliveries.values())
        report.acknowledged = len(ledger.acked & measured)
        report.errors += ledger.errors
        for agency in agencies:
            await agency.stop()
        if operator is not None:
            await operator.close()
    return report


def describe(report: Report) -> str:
    """Progress lines of one soak: its summary, then its RSS samples."""
    samples = ", ".join(f"{t:.1f}s {v / 2**20:.1f}" for t, v in report.samples)
    return (
        f"{report.summary()}\n    {report.seconds:.1f} s, mean push {report.mean_push:.2f} "
        f"envelopes, broker CPU {report.broker_cpu:.2f} cores; idle: "
        f"{report.idle_cpu:.2f} cores, {report.idle_fds[0]} fds, {report.idle_threads} threads\n"
        f"    RSS samples (MiB): {samples}"
    )


async def soak(config: Config, database_url: str = "", folder: Path | None = None) -> Report:
    """One soak against a fresh broker (SQLite, or the PostgreSQL database ``database_url``)."""
    with contextlib.ExitStack() as stack:
        if folder is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tessera-soak-")))
        database = "PostgreSQL" if database_url else "SQLite"
        home = broker_home(folder / f"broker-{database.lower()}", config, database_url)
        broker = broker_process(home, f"broker ({database})")
        stack.callback(broker.stop)
        broker.start()
        _say(f"broker ({database}) listening on {broker.address}, pid {broker.pid}")
        try:
            return await soak_broker(broker, home, config, database)
        except Exception:
            _say(f"the broker's log ends:\n{broker.log_tail()}")
            raise
    raise AssertionError("unreachable")


# --- baselines ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Baselines:
    """What the soak is compared with, measured in the same run."""

    echo: float  # calls/s
    single: Report  # one stream, same harness


async def baselines(folder: Path, config: Config, mean_push: float) -> Baselines:
    """The echo server, then a fresh broker with one sender and one stream."""
    home = folder / "echo"
    cert_path = home / "tls" / "server.crt"
    tls.create_self_signed(cert_path, home / "tls" / "server.key", "echo")
    cert = tls.read_pem(cert_path)
    server = ServerProcess(
        "echo server",
        [sys.executable, "-m", "bench.relay", "echo-server", str(home)],
        home,
        folder / "echo-server.log",
    )
    try:
        address = server.start()
        identity = crypto.Identity.generate()
        payloads = [
            r.request.sealed_envelope
            for r in seal_referrals([identity, identity], [(0, 1)] * 3200, "echo")
        ]
        echo = await measure_echo(address, cert, payloads, 200, 32, {server.name: server.pid})
    finally:
        server.stop()

    count = min(config.referrals, 3000)
    single_home = broker_home(folder / "broker-single", config)
    broker = broker_process(single_home, "broker (single stream)")
    try:
        broker.start()
        single = await single_stream(broker, single_home, count, config, max(1, round(mean_push)))
    finally:
        broker.stop()
    _say(
        f"single stream: {count:,} referrals in pushes of {max(1, round(mean_push))}: "
        f"{single.throughput:,.0f}/s, p50 {single.latency_ms(0.5):.0f} ms, p99 "
        f"{single.latency_ms(0.99):.0f} ms, broker CPU {single.broker_cpu:.2f} cores"
    )
    return Baselines(echo.throughput, single)


async def single_stream(
    broker: ServerProcess, home: Path, count: int, config: Config, push_size: int
) -> Report:
    """Agency 0 sends ``count`` referrals to agency 1, the only stream, in pushes of
    ``push_size``, ``config.in_flight`` calls in flight."""
    held = credential.read(home)
    nodes = await stats_bench.enrol_all(broker.address, held.node_certificate, held.identity, 2)
    identities = [node.identity for node in nodes]
    ledger = Ledger(identities)
    agencies = [
        Agency(i, identities[i], broker.address, held.node_certificate, ledger) for i in (0, 1)
    ]
    report = Report("single stream", 1, count)
    try:
        for agency in agencies:
            agency.follow()
        warm = seal_referrals(identities, [(0, 1)] * 200, "warm")
        ledger.expect(warm)
        await drive(agencies, fixed_pushes(warm, push_size), config.in_flight)
        await ledger.all_acknowledged(CALL_TIMEOUT)
        referrals = seal_referrals(identities, [(0, 1)] * count, "single")
        ledger.expect(referrals)
        cpu_before = cpu_seconds(broker.pid)
        started = time.perf_counter()
        await drive(agencies, fixed_pushes(referrals, push_size), config.in_flight)
        await ledger.all_acknowledged(SOAK_TIMEOUT)
        report.seconds = time.perf_counter() - started
        report.broker_cpu = (cpu_seconds(broker.pid) - cpu_before) / report.seconds
        commitments = [bytes(r.request.consent_commitment) for r in referrals]
        report.latencies = [ledger.delivered_at[c] - ledger.sent_at[c] for c in commitments]
    finally:
        for agency in agencies:
            await agency.stop()
    return report


# --- the benchmark ------------------------------------------------------------------------------


def config_from_env() -> Config:
    """The soak's size from TESSERA_SOAK_* (full size by default)."""
    env = os.environ.get
    return Config(
        streams=int(env("TESSERA_SOAK_STREAMS", "1000")),
        referrals=int(env("TESSERA_SOAK_REFERRALS", "5000")),
        in_flight=int(env("TESSERA_SOAK_IN_FLIGHT", "32")),
        rounds=env("TESSERA_SOAK_ROUNDS", "1") != "0",
        replay_window=int(env("TESSERA_SOAK_REPLAY_WINDOW", "30")),
    )


def _figures(report: Report, base: Baselines) -> list[Figure]:
    tag = f"soak {report.database.lower()}"
    note = (
        f"soak: {report.streams} agencies each following its mailbox (ReceiveBatches) over its own "
        f"connection, {report.referrals:,} referrals between random pairs (mean push "
        f"{report.mean_push:.2f} envelopes; every {UNARY_EVERY}th push as Send calls), "
        f"{report.rounds} statistics rounds meanwhile; 'single stream' = a fresh broker, one "
        "sender and one recipient, pushes of the same size, same calls in flight. Memory per "
        "stream: (RSS with every stream idle - RSS at rest) / streams. Slope: least squares over "
        "the soak's second half (ratio: mean RSS over the half / (mean + slope x one minute))."
    )
    single = base.single
    half = report.second_half()
    mean = statistics.fmean(v for _, v in half) if half else 1.0
    return [
        Figure(
            tag,
            "delivered+acked/s",
            report.throughput,
            "echo calls/s",
            base.echo,
            "msg/s",
            note=note,
        ),
        Figure(
            tag,
            "delivered+acked/s",
            report.throughput,
            "single stream",
            single.throughput,
            "msg/s",
            note=note,
        ),
        Figure(
            tag,
            "p50 send→delivered",
            report.latency_ms(0.5),
            "single stream p50",
            single.latency_ms(0.5),
            "ms",
            higher_is_better=False,
            note=note,
        ),
        Figure(
            tag,
            "p99 send→delivered",
            report.latency_ms(0.99),
            "single stream p99",
            single.latency_ms(0.99),
            "ms",
            higher_is_better=False,
            note=note,
        ),
        Figure(
            tag,
            f"RSS with {report.streams} idle streams",
            report.idle_rss / 2**20,
            "at rest (no stream)",
            report.rest_rss / 2**20,
            "MiB",
            higher_is_better=False,
            note=note,
        ),
        Figure(
            tag,
            "RSS, mean + 1 min of 2nd-half slope",
            (mean + report.slope) / 2**20,
            "mean RSS, 2nd half",
            mean / 2**20,
            "MiB",
            higher_is_better=False,
            note=note,
        ),
    ]


def run(config: Config | None = None, postgres: bool | None = None) -> list[Figure]:
    """The soak (SQLite, and PostgreSQL when asked) against its same-run baselines."""
    config = config or config_from_env()
    if postgres is None:
        postgres = os.environ.get("TESSERA_SOAK_POSTGRES", "0") not in ("", "0")
    postgres_url = os.environ.get("TESSERA_BENCH_POSTGRES_URL", DEFAULT_POSTGRES)
    reports: list[Report] = []
    with tempfile.TemporaryDirectory(prefix="tessera-bench-soak-") as tmp:
        folder = Path(tmp)
        _say(
            f"{config.streams} streams, {config.referrals:,} referrals, {config.in_flight} calls "
            f"in flight, rounds {'on' if config.rounds else 'off'}; {os.cpu_count()} CPU cores "
            "shared by the broker, every agency and the baselines"
        )
        shape = random_pairs(config.streams, config.referrals, random.Random(config.seed))
        windows = range(0, len(shape), WINDOW)
        mean_push = len(shape) / sum(len({p[0] for p in shape[w : w + WINDOW]}) for w in windows)
        base = asyncio.run(baselines(folder, config, mean_push))
        reports.append(asyncio.run(soak(config, folder=folder / "sqlite")))
        _say(describe(reports[-1]))
        if postgres:
            problem = postgres_reachable(postgres_url)
            if problem is not None:
                _say(f"no PostgreSQL at {postgres_url} ({problem}): skipping it")
            else:
                with throwaway_database(postgres_url) as database_url:
                    reports.append(asyncio.run(soak(config, database_url, folder / "pg")))
                _say(describe(reports[-1]))
    for report in reports:
        print(report.summary(), flush=True)
    figures = [figure for report in reports for figure in _figures(report, base)]
    if not all(report.ok for report in reports):
        raise RuntimeError("the soak was not correct: " + "; ".join(r.summary() for r in reports))
    return figures


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n")[0]
    )
    defaults = config_from_env()
    parser.add_argument("--streams", type=int, default=defaults.streams)
    parser.add_argument("--referrals", type=int, default=defaults.referrals)
    parser.add_argument("--in-flight", type=int, default=defaults.in_flight)
    parser.add_argument("--no-rounds", action="store_true")
    parser.add_argument("--postgres", action="store_true")
    parser.add_argument("--replay-window", type=int, default=defaults.replay_window)
    args = parser.parse_args(argv)
    from bench.common import print_table

    config = Config(
        args.streams,
        args.referrals,
        args.in_flight,
        not args.no_rounds,
        replay_window=args.replay_window,
    )
    print_table(run(config, postgres=args.postgres or None))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
