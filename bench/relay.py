"""Relay throughput and latency of the broker against a bare grpc.aio echo server (issue 5).

Every figure compares real processes measured in the same run, on the same machine, driven by the
same client with the same payloads:

* **Baseline**: a bare ``grpc.aio`` echo server in its own process (one generic unary method with
  identity serializers, no interceptor, no database) behind the same TLS setup as Tessera's servers
  (a self-signed certificate, the pinned-certificate channel options of :mod:`tessera.rpc`). Each
  call carries one sealed envelope's bytes and gets them back.
* **Wire pattern**: an in-memory relay (:class:`MemoryRelay`) in its own process, same TLS: the
  relay's calls with nothing behind them (no signature checks, no database, no receipt
  signature), driven by the same client as the broker. It is the ceiling of the relay's call
  pattern on this machine, and the baseline for what security and durability cost.
* **Relay**: ``tessera --home H broker serve`` in its own process. One sender agency sends the same
  envelopes (about 2 KiB sealed, a realistic referral) with the same number of calls in flight over
  a signed asyncio channel (:func:`tessera.rpc.open_aio_channel`); the recipient agency holds a
  ``Receive(follow=True)`` stream and acknowledges in batches (whatever arrived while the previous
  Acknowledge was in flight). Throughput counts envelopes delivered *and acknowledged* (so deleted
  by the broker) per second; latency runs from the start of the Send call to the delivery reaching
  the recipient's stream.
* **Scale-out**: the relay on PostgreSQL with one broker process, then two (the second a copy of the
  first's home: identity, TLS, operators, credential, config), Send calls spread evenly across both;
  the recipient's stream and acknowledgements go to the first. The SQLite figure is the
  single-process deployment the docs recommend for SQLite.

Each loaded figure is the best of a few runs (32 calls in flight by default), each after a warm-up
(connections, TLS sessions, thread pools, database caches); a shorter phase with one call in
flight shows the latency of the path itself rather than of the queue. Progress lines give, per
run, the Send calls' own latency, the delay from a Send's return to its delivery, and the CPU
cores each server process, the client and the whole machine used (from /proc): brokers,
PostgreSQL and the client share the machine's cores, so on a small machine two broker processes
compete for the same CPU, which the printed notes say. The per-agency send rate limit
(``sends_per_minute``) is raised in the benchmark's broker homes: this measures the relay's
capacity, not the limiter.

Run only this one with ``python -m bench relay``. PostgreSQL: ``TESSERA_BENCH_POSTGRES_URL``
(default ``postgresql://postgres@127.0.0.1:5432/postgres``) names a server where the benchmark may
create and drop a throwaway database; without one, the PostgreSQL figures are skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import grpc
import grpc.aio

from bench.common import Figure, percentile
from broker.operator_client import OperatorClient
from broker.setup import BrokerInit, init_broker
from node import directory_sync
from node.keyring import open_keyring
from node.setup import NodeInit, init_node
from tessera import config, crypto, labels, rpc, tls
from tessera.config import OUTBOX_BATCH, Argon2Profile, Limits
from tessera.credential import RUN_FILE
from tessera.db import libpq_dsn
from tessera.v1 import common_pb2 as common_pb
from tessera.v1 import relay_pb2 as relay_pb
from tessera.v1 import relay_pb2_grpc as relay_grpc

ROOT = Path(__file__).resolve().parent.parent
REGION = "north"
PASSPHRASE = "benchmark passphrase, throwaway keys"  # throwaway node homes
ENVELOPE_BYTES = 2048  # sealed size of one envelope: a referral with a few fields and notes
ACK_BATCH = 500  # the most delivery ids one Acknowledge carries
BATCHES_IN_FLIGHT = 2  # SendBatch calls in flight (a node pushes one; two nodes at once)
ECHO_SERVICE = "bench.Echo"
ECHO_METHOD = f"/{ECHO_SERVICE}/Echo"
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
PHASE_TIMEOUT = 300.0
START_TIMEOUT = 60.0
MAX_MESSAGE = Limits().max_message_bytes


# --- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """One measured phase: how many messages, how long in all, and each message's latency."""

    label: str
    messages: int
    seconds: float
    latencies: list[float]  # seconds, one per message
    concurrency: int
    detail: str = ""  # diagnostics for the progress lines
    cpu: str = ""

    @property
    def throughput(self) -> float:
        """Messages per second over the whole phase."""
        return self.messages / self.seconds

    def latency_ms(self, fraction: float) -> float:
        """A latency percentile in milliseconds."""
        return percentile(self.latencies, fraction) * 1000

    def describe(self) -> str:
        """Progress lines."""
        lines = [
            f"{self.label}, {self.concurrency} in flight: {self.messages:,} in "
            f"{self.seconds:.2f} s = {self.throughput:,.0f}/s, p50 {self.latency_ms(0.5):.1f} ms, "
            f"p99 {self.latency_ms(0.99):.1f} ms"
        ]
        lines += [f"    {text}" for text in (self.detail, self.cpu) if text]
        return "\n  relay: ".join(lines)


def best(outcomes: Sequence[Outcome]) -> Outcome:
    """The run with the highest throughput (the least disturbed by noise), latencies included."""
    return max(outcomes, key=lambda o: o.throughput)


class CpuMeter:
    """CPU cores used over a phase by some processes, by this one and by the whole machine.

    Read from /proc (Linux); elsewhere it reports nothing.
    """

    def __init__(self, processes: dict[str, int]) -> None:
        self._processes = processes
        self._start = self._sample()

    def _sample(self) -> tuple[float, dict[str, float], float, float] | None:
        try:
            tick = os.sysconf("SC_CLK_TCK")
            each = {}
            for name, pid in self._processes.items():
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                each[name] = (int(fields[11]) + int(fields[12])) / tick
            cpu = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
            machine = (sum(cpu) - cpu[3] - cpu[4]) / tick  # all but idle and iowait
        except (OSError, ValueError, IndexError):
            return None
        times = os.times()
        return time.perf_counter(), each, times.user + times.system, machine

    def report(self) -> str:
        """``CPU cores used: broker 0.85, client 0.14, whole machine 1.70 of 2``."""
        end = self._sample()
        if self._start is None or end is None:
            return ""
        wall = end[0] - self._start[0]
        used = [f"{name} {(end[1][name] - self._start[1][name]) / wall:.2f}" for name in end[1]]
        used.append(f"client {(end[2] - self._start[2]) / wall:.2f}")
        machine = (end[3] - self._start[3]) / wall
        return f"CPU cores used: {', '.join(used)}, whole machine {machine:.2f} of {os.cpu_count()}"


def _say(text: str) -> None:
    print(f"  relay: {text}", flush=True)


# --- processes ----------------------------------------------------------------------------------


def _child_env() -> dict[str, str]:
    # No TESSERA_* override from the caller's shell may point a benchmark broker elsewhere.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    env["TESSERA_LOG_FORMAT"] = "json"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return env


class ServerProcess:
    """A server in a child process that writes its address to ``home/run/node.json``."""

    def __init__(self, name: str, argv: list[str], home: Path, log: Path) -> None:
        self.name = name
        self._argv = argv
        self._run_file = home / RUN_FILE
        self._log_path = log
        self._log: TextIO | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self.address = ""

    def start(self) -> str:
        """Start the process and wait until it has written its address; returns the address."""
        self._run_file.unlink(missing_ok=True)
        self._log = self._log_path.open("w", encoding="utf-8")
        self._process = subprocess.Popen(
            self._argv, cwd=ROOT, env=_child_env(), stdout=subprocess.DEVNULL, stderr=self._log
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._run_file.exists():
                with contextlib.suppress(ValueError, KeyError, OSError):
                    self.address = str(json.loads(self._run_file.read_text())["address"])
                    return self.address
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start; its log:\n{self.log_tail()}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        """The running process's id."""
        if self._process is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._process.pid

    def log_tail(self, lines: int = 20) -> str:
        """The end of the process's standard error."""
        try:
            return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM (the servers shut down gracefully on it), then SIGKILL if it hangs."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None


def _tessera_exe() -> str:
    return shutil.which("tessera", path=os.path.dirname(sys.executable)) or "tessera"


def _started(stack: contextlib.ExitStack, process: ServerProcess) -> str:
    stack.callback(process.stop)
    address = process.start()
    _say(f"{process.name} listening on {address}")
    return address


# --- channels -----------------------------------------------------------------------------------


def open_channel(address: str, cert: bytes, identity: crypto.Identity | None) -> grpc.aio.Channel:
    """An asyncio TLS channel with Tessera's options, signing with ``identity`` when given (the
    same signing interceptors a node uses)."""
    return rpc.open_aio_channel(address, cert, identity, MAX_MESSAGE)


# --- the echo baseline --------------------------------------------------------------------------


async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


async def _drive(count: int, concurrency: int, call: Callable[[int], Awaitable[None]]) -> None:
    """Make ``count`` calls, ``concurrency`` of them in flight at any moment."""
    indexes = iter(range(count))

    async def worker() -> None:
        for index in indexes:  # shared: each index is taken by exactly one worker
            await call(index)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))


async def measure_echo(
    address: str,
    cert: bytes,
    payloads: Sequence[bytes],
    warmup: int,
    concurrency: int,
    metered: dict[str, int],
    batch: int = 1,
) -> Outcome:
    """Echo every payload with ``concurrency`` calls in flight (the first ``warmup`` unmeasured);
    latency per call. With ``batch`` > 1, each call carries ``batch`` payloads back to back
    (the same bytes a SendBatch of them carries), and throughput counts payloads."""
    channel = open_channel(address, cert, None)
    if batch > 1:
        payloads = [b"".join(payloads[i : i + batch]) for i in range(0, len(payloads), batch)]
        warmup = max(1, warmup // batch)
    try:
        echo: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(ECHO_METHOD)
        measured = len(payloads) - warmup
        latencies = [0.0] * len(payloads)

        async def call(index: int) -> None:
            started = time.perf_counter()
            reply = await echo(payloads[index], timeout=30)
            latencies[index] = time.perf_counter() - started
            if len(reply) != len(payloads[index]):
                raise RuntimeError("the echo server returned other bytes")

        await _drive(warmup, concurrency, call)
        meter = CpuMeter(metered)
        started = time.perf_counter()
        await _drive(measured, concurrency, lambda i: call(warmup + i))
        seconds = time.perf_counter() - started
        label = "grpc.aio echo" if batch == 1 else f"grpc.aio echo, {batch} payloads a call"
        outcome = Outcome(
            label,
            sum(len(p) for p in payloads[warmup:]) // ENVELOPE_BYTES,
            seconds,
            [latency for latency in latencies[warmup:] for _ in range(batch)],
            concurrency,
            cpu=meter.report(),
        )
        _say(outcome.describe())
        return outcome
    finally:
        await channel.close()


# --- the in-memory relay: the wire pattern alone --------------------------------------------


class MemoryRelay(relay_grpc.RelayServicer):
    """tessera.v1.Relay with nothing behind it: no interceptor (no signature check, no replay
    window, no authentication), no database, no receipt signature; mailboxes are in-memory
    queues. The benchmark's relay client drives it exactly as it drives the broker (its signed
    requests are not checked), so it measures what the relay's wire pattern (a unary Send in,
    a streamed Delivery out, batched Acknowledge calls) costs over one echo call.
    """

    def __init__(self) -> None:
        self._mail: list[relay_pb.Delivery] = []
        self._arrived = asyncio.Event()
        self._sent = 0

    async def Send(
        self, request: relay_pb.SendRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> relay_pb.SendResponse:
        self._sent += 1
        delivery_id = f"d{self._sent}"
        self._mail.append(
            relay_pb.Delivery(
                delivery_id=delivery_id,
                sender_agency_id="sender",
                sealed_envelope=request.sealed_envelope,
                consent_commitment=request.consent_commitment,
                attempt=1,
            )
        )
        self._arrived.set()
        receipt = relay_pb.RelayReceipt(
            delivery_id=delivery_id,
            recipient_agency_id=request.recipient_agency_id,
            idempotency_key=request.idempotency_key,
            consent_commitment=request.consent_commitment,
            size=len(request.sealed_envelope),
        )
        return relay_pb.SendResponse(receipt=common_pb.SignedBlob(body=receipt.SerializeToString()))

    async def SendBatch(
        self,
        request: relay_pb.SendBatchRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> relay_pb.SendBatchResponse:
        results = [
            relay_pb.SendResult(accepted=await self.Send(envelope, context))
            for envelope in request.envelopes
        ]
        return relay_pb.SendBatchResponse(results=results)

    async def Receive(
        self, request: relay_pb.ReceiveRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[relay_pb.Delivery]:
        while True:
            self._arrived.clear()
            batch, self._mail = self._mail, []
            for delivery in batch:
                yield delivery
            if not self._mail:
                await self._arrived.wait()

    async def ReceiveBatches(
        self, request: relay_pb.ReceiveRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[relay_pb.DeliveryBatch]:
        while True:
            self._arrived.clear()
            batch, self._mail = self._mail, []
            for start in range(0, len(batch), 100):  # as the broker leases them
                yield relay_pb.DeliveryBatch(deliveries=batch[start : start + 100])
            if not self._mail:
                await self._arrived.wait()

    async def Acknowledge(
        self,
        request: relay_pb.AcknowledgeRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> relay_pb.AcknowledgeResponse:
        return relay_pb.AcknowledgeResponse(deleted_ids=request.delivery_ids)


async def _serve(home: Path, add: Callable[[grpc.aio.Server], None]) -> None:
    """A bare grpc.aio server over TLS (no interceptor), until SIGTERM; address in the run file."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ]
    )
    add(server)
    credentials = grpc.ssl_server_credentials(
        [(tls.read_pem(home / "tls" / "server.key"), tls.read_pem(home / "tls" / "server.crt"))]
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    run_file = home / RUN_FILE
    run_file.parent.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps({"address": f"127.0.0.1:{port}", "pid": os.getpid()}))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1.0)
    run_file.unlink(missing_ok=True)


def _add_echo(server: grpc.aio.Server) -> None:
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(_echo)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(ECHO_SERVICE, {"Echo": handler}),)
    )


def _add_memory_relay(server: grpc.aio.Server) -> None:
    relay_grpc.add_RelayServicer_to_server(MemoryRelay(), server)


# --- agencies -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Agency:
    """A node identity (from a real node home's keyring) enrolled with one broker."""

    agency_id: str
    identity: crypto.Identity
    link: directory_sync.BrokerLink


def make_node_identity(folder: Path, agency_id: str) -> crypto.Identity:
    """Create a node home (throwaway keys, cheap Argon2) and open its keyring's identity."""
    home = folder / "nodes" / agency_id
    init_node(
        NodeInit(
            home=home,
            name=agency_id.replace("-", " ").title(),
            region=REGION,
            listen="127.0.0.1:0",
            argon2=Argon2Profile.TEST_CHEAP,
        ),
        PASSPHRASE,
    )
    return open_keyring(home, PASSPHRASE).identity


def enrol(broker_home: Path, folder: Path, agency_id: str, identity: crypto.Identity) -> Agency:
    """Enrol ``identity`` as ``agency_id`` with the running broker of ``broker_home``: a
    one-time code from the operator, then the node's side of enrolment (pins, sync)."""
    link_home = folder / "links" / f"{broker_home.name}-{agency_id}"
    link_home.mkdir(parents=True)
    with OperatorClient(broker_home) as operator:
        code = operator.enrolment_code(agency_id, 1)
    name = agency_id.replace("-", " ").title()
    link = directory_sync.enrol(link_home, identity, code, name, ["safe_housing"])
    return Agency(agency_id, identity, link)


def seal_payloads(
    sender: crypto.Identity, recipient: crypto.PublicIdentity, count: int
) -> list[bytes]:
    """``count`` distinct envelopes sealed to ``recipient``, each ``ENVELOPE_BYTES`` long."""
    overhead = len(crypto.seal(sender, recipient, labels.LABEL_ENVELOPE, b""))
    return [
        crypto.seal(sender, recipient, labels.LABEL_ENVELOPE, os.urandom(ENVELOPE_BYTES - overhead))
        for _ in range(count)
    ]


def send_requests(
    recipient_id: str, payloads: Sequence[bytes], tag: str
) -> list[relay_pb.SendRequest]:
    """One SendRequest per payload, each with its own idempotency key and consent commitment."""
    requests = []
    for index, sealed in enumerate(payloads):
        key = f"bench-{tag}-{index}"
        requests.append(
            relay_pb.SendRequest(
                recipient_agency_id=recipient_id,
                idempotency_key=key,
                consent_commitment=crypto.digest(labels.LABEL_CONSENT_COMMITMENT, key.encode()),
                sealed_envelope=sealed,
            )
        )
    return requests


# --- the relay ----------------------------------------------------------------------------------


class Mailbox:
    """The recipient: one Receive(follow=True) stream (ReceiveBatches when ``batched``, as a node
    follows its mailbox), and acknowledgements in batches.

    Deliveries are told apart by their consent commitment (unique per envelope here). Whatever
    arrives while an Acknowledge is in flight goes into the next one, so the batch size adapts to
    the arrival rate.
    """

    def __init__(self, stub: relay_grpc.RelayAsyncStub, batched: bool = False) -> None:
        self._stub = stub
        self._batched = batched
        self.sent_at: dict[bytes, float] = {}
        self.delivered_at: dict[bytes, float] = {}
        self._commitment_of: dict[str, bytes] = {}
        self._to_ack: list[str] = []
        self._wake = asyncio.Event()
        self._outstanding: set[bytes] = set()
        self._all_acked = asyncio.Event()
        self.acks = 0
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Open the stream and the acknowledging loop."""
        self._tasks = [
            asyncio.create_task(self._receive()),
            asyncio.create_task(self._acknowledge()),
        ]

    async def _receive(self) -> None:
        request = relay_pb.ReceiveRequest(follow=True)
        if self._batched:
            async for batch in self._stub.ReceiveBatches(request):
                self._arrived(batch.deliveries)
        else:
            async for delivery in self._stub.Receive(request):
                self._arrived([delivery])
        raise RuntimeError("the broker ended the Receive stream")

    def _arrived(self, deliveries: Sequence[relay_pb.Delivery]) -> None:
        now = time.perf_counter()
        for delivery in deliveries:
            commitment = bytes(delivery.consent_commitment)
            self.delivered_at.setdefault(commitment, now)
            self._commitment_of[delivery.delivery_id] = commitment
            self._to_ack.append(delivery.delivery_id)
        self._wake.set()

    async def _acknowledge(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._to_ack:
                batch, self._to_ack = self._to_ack[:ACK_BATCH], self._to_ack[ACK_BATCH:]
                reply = await self._stub.Acknowledge(
                    relay_pb.AcknowledgeRequest(delivery_ids=batch), timeout=30
                )
                self.acks += 1
                for delivery_id in reply.deleted_ids:
                    self._outstanding.discard(self._commitment_of.pop(delivery_id, b""))
                if not self._outstanding:
                    self._all_acked.set()

    async def all_acknowledged(self, requests: Sequence[relay_pb.SendRequest]) -> float:
        """Wait until every request's envelope was delivered and acknowledged; returns when."""
        self._outstanding = {bytes(r.consent_commitment) for r in requests}
        self._all_acked = asyncio.Event()
        # Deliveries of this batch may already have been acknowledged (fast relay, slow sender).
        self._outstanding -= set(self.delivered_at) - set(self._commitment_of.values())
        if not self._outstanding:
            return time.perf_counter()
        waiter = asyncio.create_task(self._all_acked.wait())
        done, _pending = await asyncio.wait(
            [waiter, *self._tasks], timeout=PHASE_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        finished = time.perf_counter()
        if waiter not in done:
            waiter.cancel()
            for task in done:
                task.result()  # raises the stream's or the acknowledger's error
            raise RuntimeError(f"{len(self._outstanding)} envelopes were never acknowledged")
        return finished

    async def stop(self) -> None:
        """Cancel the stream and the acknowledging loop."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await task


async def measure_relay(
    label: str,
    sender: crypto.Identity,
    recipient: crypto.Identity,
    cert: bytes,
    sender_addresses: Sequence[str],
    warmup: Sequence[relay_pb.SendRequest],
    requests: Sequence[relay_pb.SendRequest],
    concurrency: int,
    metered: dict[str, int],
    send_batch: int = 0,
) -> Outcome:
    """Send every request (Send calls alternating over ``sender_addresses``; with
    ``send_batch``, SendBatch calls of that many envelopes, ``concurrency`` calls in flight) and
    wait until the recipient, on the first address, has them all delivered and acknowledged."""
    sender_channels = [open_channel(address, cert, sender) for address in sender_addresses]
    recipient_channel = open_channel(sender_addresses[0], cert, recipient)
    mailbox = Mailbox(relay_grpc.RelayStub(recipient_channel), batched=send_batch > 0)
    returned_at: dict[bytes, float] = {}
    try:
        stubs = [relay_grpc.RelayStub(channel) for channel in sender_channels]
        mailbox.start()

        async def run(batch: Sequence[relay_pb.SendRequest]) -> tuple[float, float]:
            async def call(index: int) -> None:
                request = batch[index]
                commitment = bytes(request.consent_commitment)
                mailbox.sent_at[commitment] = time.perf_counter()
                await stubs[index % len(stubs)].Send(request, timeout=60)
                returned_at[commitment] = time.perf_counter()

            chunks = [batch[i : i + send_batch] for i in range(0, len(batch), send_batch or 1)]

            async def call_batch(index: int) -> None:
                chunk = chunks[index]
                commitments = [bytes(request.consent_commitment) for request in chunk]
                now = time.perf_counter()
                mailbox.sent_at.update(dict.fromkeys(commitments, now))
                reply = await stubs[index % len(stubs)].SendBatch(
                    relay_pb.SendBatchRequest(envelopes=chunk), timeout=60
                )
                refused = [r.refused for r in reply.results if r.HasField("refused")]
                if refused or len(reply.results) != len(chunk):
                    raise RuntimeError(f"the relay refused envelopes of a batch: {refused[:1]}")
                returned_at.update(dict.fromkeys(commitments, time.perf_counter()))

            started = time.perf_counter()
            if send_batch:
                await _drive(len(chunks), concurrency, call_batch)
            else:
                await _drive(len(batch), concurrency, call)
            sends_done = time.perf_counter()
            finished = await mailbox.all_acknowledged(batch)
            return sends_done - started, finished - started

        await run(warmup)
        acks_before = mailbox.acks
        meter = CpuMeter(metered)
        send_seconds, seconds = await run(requests)
        cpu = meter.report()
        commitments = [bytes(r.consent_commitment) for r in requests]
        sent, delivered = mailbox.sent_at, mailbox.delivered_at
        send_calls = [returned_at[c] - sent[c] for c in commitments]
        after_send = [delivered[c] - returned_at[c] for c in commitments]
        detail = (
            f"Send calls: p50 {percentile(send_calls, 0.5) * 1000:.1f} ms, p99 "
            f"{percentile(send_calls, 0.99) * 1000:.1f} ms, all returned after "
            f"{send_seconds:.2f} s; delivery after Send returned: p50 "
            f"{percentile(after_send, 0.5) * 1000:.1f} ms, p99 "
            f"{percentile(after_send, 0.99) * 1000:.1f} ms; "
            f"{mailbox.acks - acks_before} Acknowledge calls"
        )
        latencies = [delivered[c] - sent[c] for c in commitments]
        outcome = Outcome(label, len(requests), seconds, latencies, concurrency, detail, cpu)
        _say(outcome.describe())
        return outcome
    finally:
        await mailbox.stop()
        for channel in [*sender_channels, recipient_channel]:
            await channel.close()


# --- broker homes and databases -----------------------------------------------------------------


def make_broker_home(home: Path, database_url: str = "") -> Path:
    """``broker init`` in ``home`` (any free loopback port), with the send rate limit lifted."""
    init_broker(
        BrokerInit(
            home=home,
            name="Bench broker",
            region=REGION,
            listen="127.0.0.1:0",
            database_url=database_url,
        )
    )
    # Measure the relay, not the per-agency limiter (if this version has one).
    if "sends_per_minute" in {f.name for f in dataclasses.fields(Limits)}:
        with (home / config.CONFIG_FILE).open("a", encoding="utf-8") as handle:
            handle.write("\n[limits]\nsends_per_minute = 100000000\n")
    return home


def copy_broker_home(source: Path, target: Path) -> Path:
    """A second broker process's home: the same identity, TLS, operators, credential and config
    (so the same database), but its own run file."""
    shutil.copytree(
        source,
        target,
        ignore=shutil.ignore_patterns("run", "tessera.db*", "*.tmp"),
    )
    return target


def broker_process(home: Path, name: str) -> ServerProcess:
    """``tessera --home HOME broker serve`` as a child process."""
    return ServerProcess(
        name,
        [_tessera_exe(), "--home", str(home), "broker", "serve"],
        home,
        home.parent / f"{home.name}.log",
    )


@contextlib.contextmanager
def throwaway_database(admin_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database for one benchmark run, dropped afterwards (even if in use)."""
    import psycopg
    from psycopg import sql
    from sqlalchemy.engine import make_url

    name = f"tessera_bench_{secrets.token_hex(4)}"
    dsn = libpq_dsn(admin_url)
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_url(dsn).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as connection:
            connection.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def postgres_reachable(admin_url: str) -> str | None:
    """None if the PostgreSQL server answers, else why not."""
    import psycopg

    dsn = libpq_dsn(admin_url)
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as connection:
            connection.execute("SELECT 1")
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0]
    return None


# --- the benchmark ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What every phase shares: sizes, rounds, the node identities and the sealed payloads."""

    folder: Path
    sender: crypto.Identity
    recipient: crypto.Identity
    payloads: list[bytes]
    messages: int
    concurrency: int
    warmup: int
    runs: int
    unloaded: int  # messages of the one-in-flight latency phase
    send_batch: int = OUTBOX_BATCH  # envelopes a SendBatch call carries (as a node's pusher)
    batches_in_flight: int = BATCHES_IN_FLIGHT

    def requests(
        self, recipient_id: str, tag: str, concurrency: int | None = None
    ) -> tuple[list[relay_pb.SendRequest], list[relay_pb.SendRequest]]:
        """Warm-up and measured SendRequests, idempotency keys unique to ``tag``; one in flight
        when ``concurrency`` is 1 (a shorter phase)."""
        count = self.unloaded if concurrency == 1 else self.messages
        everything = send_requests(recipient_id, self.payloads[: self.warmup + count], tag)
        return everything[: self.warmup], everything[self.warmup :]


@dataclass(frozen=True)
class Mode:
    """How the sender hands envelopes over: one Send each, or SendBatch calls."""

    name: str
    concurrency: int  # calls in flight
    send_batch: int  # 0: Send calls; n: SendBatch calls of n envelopes

    @staticmethod
    def both(plan: Plan) -> tuple[Mode, Mode]:
        """The unary mode and the batched mode (a node's outbox pusher) of ``plan``."""
        return (
            Mode("Send", plan.concurrency, 0),
            Mode(f"SendBatch x{plan.send_batch}", plan.batches_in_flight, plan.send_batch),
        )


@dataclass
class Pair:
    """One configuration measured in both modes (best run of each)."""

    unary: Outcome
    batched: Outcome


@dataclass
class Results:
    """Every phase's best run (None where a phase could not run)."""

    echo: Outcome
    echo_batched: Outcome
    echo_unloaded: Outcome
    memory: Pair
    sqlite: Pair
    sqlite_unloaded: Pair
    pg_one: Pair | None = None
    pg_one_unloaded: Pair | None = None
    pg_two: Pair | None = None


async def _enrolled(plan: Plan, broker_home: Path) -> tuple[Agency, Agency]:
    sender = await asyncio.to_thread(
        enrol, broker_home, plan.folder, "harbour-shelter", plan.sender
    )
    recipient = await asyncio.to_thread(
        enrol, broker_home, plan.folder, "lantern-clinic", plan.recipient
    )
    return sender, recipient


def bare_server(plan: Plan, name: str, kind: str) -> ServerProcess:
    """``python -m bench.relay KIND HOME`` (an echo server or the in-memory relay) as a child
    process, with the TLS files of the baseline home."""
    home = plan.folder / "echo"
    return ServerProcess(
        name,
        [sys.executable, "-m", "bench.relay", kind, str(home)],
        home,
        plan.folder / f"{kind}.log",
    )


async def _relay_phase(
    plan: Plan,
    label: str,
    mode: Mode,
    tag: str,
    parties: tuple[crypto.Identity, crypto.Identity, bytes, str],
    addresses: Sequence[str],
    metered: dict[str, int],
    unloaded: bool = False,
) -> Outcome:
    """One measured run of a relay (``parties``: sender, recipient, certificate, recipient id)."""
    sender, recipient, cert, recipient_id = parties
    warm, measured = plan.requests(recipient_id, tag, 1 if unloaded else None)
    return await measure_relay(
        f"{label}, {mode.name}",
        sender,
        recipient,
        cert,
        addresses,
        warm,
        measured,
        1 if unloaded else mode.concurrency,
        metered,
        mode.send_batch,
    )


async def _pair(
    plan: Plan,
    label: str,
    tag: str,
    parties: tuple[crypto.Identity, crypto.Identity, bytes, str],
    addresses: Sequence[str],
    metered: dict[str, int],
) -> Pair:
    """Best of ``plan.runs`` runs in each mode, the modes alternating."""
    unary_runs: list[Outcome] = []
    batched_runs: list[Outcome] = []
    unary, batched = Mode.both(plan)
    for run in range(plan.runs):
        for mode, runs in ((unary, unary_runs), (batched, batched_runs)):
            runs.append(
                await _relay_phase(
                    plan, label, mode, f"{tag}-{mode.send_batch}-{run}", parties, addresses, metered
                )
            )
    return Pair(best(unary_runs), best(batched_runs))


async def _baseline_phases(plan: Plan) -> tuple[Outcome, Outcome, Outcome, Pair]:
    """The echo server (loaded, loaded with batches, one in flight) and the in-memory relay,
    same TLS setup."""
    home = plan.folder / "echo"
    cert = home / "tls" / "server.crt"
    tls.create_self_signed(cert, home / "tls" / "server.key", "echo")
    pem = tls.read_pem(cert)
    payloads = plan.payloads[: plan.warmup + plan.messages]
    with contextlib.ExitStack() as stack:
        server = bare_server(plan, "echo server", "echo-server")
        address = _started(stack, server)
        metered = {server.name: server.pid}
        loaded: list[Outcome] = []
        batched: list[Outcome] = []
        for _ in range(plan.runs):
            loaded.append(
                await measure_echo(address, pem, payloads, plan.warmup, plan.concurrency, metered)
            )
            batched.append(
                await measure_echo(
                    address,
                    pem,
                    payloads * 10,  # ten rounds of the same bytes: a phase long enough to time
                    plan.warmup,
                    plan.batches_in_flight,
                    metered,
                    batch=plan.send_batch,
                )
            )
        unloaded = await measure_echo(
            address, pem, plan.payloads[: plan.warmup + plan.unloaded], plan.warmup, 1, metered
        )
    with contextlib.ExitStack() as stack:
        server = bare_server(plan, "in-memory relay", "memory-relay")
        address = _started(stack, server)
        memory = await _pair(
            plan,
            "in-memory relay",
            "memory",
            (plan.sender, plan.recipient, pem, "lantern-clinic"),
            [address],
            {server.name: server.pid},
        )
    return best(loaded), best(batched), unloaded, memory


async def _unloaded_pair(
    plan: Plan,
    label: str,
    tag: str,
    parties: tuple[crypto.Identity, crypto.Identity, bytes, str],
    addresses: Sequence[str],
    metered: dict[str, int],
) -> Pair:
    """One envelope in flight: as a Send, and as a node sends a lone referral (a SendBatch of
    one, delivered over ReceiveBatches)."""
    unary, _batched = Mode.both(plan)
    lone = Mode("SendBatch x1", 1, 1)
    return Pair(
        await _relay_phase(
            plan, label, unary, f"{tag}-unloaded", parties, addresses, metered, unloaded=True
        ),
        await _relay_phase(
            plan, label, lone, f"{tag}-unloaded-1", parties, addresses, metered, unloaded=True
        ),
    )


async def _sqlite_phases(plan: Plan) -> tuple[Pair, Pair]:
    home = make_broker_home(plan.folder / "broker-sqlite")
    with contextlib.ExitStack() as stack:
        broker = broker_process(home, "broker")
        address = _started(stack, broker)
        sender, recipient = await _enrolled(plan, home)
        parties = (sender.identity, recipient.identity, sender.link.certificate, "lantern-clinic")
        metered = {broker.name: broker.pid}
        label = "relay, SQLite, 1 broker"
        loaded = await _pair(plan, label, "sqlite", parties, [address], metered)
        unloaded = await _unloaded_pair(plan, label, "sqlite", parties, [address], metered)
    return loaded, unloaded


async def _postgres_phases(plan: Plan, database_url: str) -> tuple[Pair, Pair, Pair]:
    first = make_broker_home(plan.folder / "broker-pg-a", database_url)
    second = copy_broker_home(first, plan.folder / "broker-pg-b")
    with contextlib.ExitStack() as stack:
        broker_a = broker_process(first, "broker A")
        address_a = _started(stack, broker_a)
        sender, recipient = await _enrolled(plan, first)
        parties = (sender.identity, recipient.identity, sender.link.certificate, "lantern-clinic")
        one = await _pair(
            plan,
            "relay, PostgreSQL, 1 broker",
            "pg1",
            parties,
            [address_a],
            {broker_a.name: broker_a.pid},
        )
        unloaded = await _unloaded_pair(
            plan,
            "relay, PostgreSQL, 1 broker",
            "pg1",
            parties,
            [address_a],
            {broker_a.name: broker_a.pid},
        )
        broker_b = broker_process(second, "broker B")
        address_b = _started(stack, broker_b)
        two = await _pair(
            plan,
            "relay, PostgreSQL, 2 brokers",
            "pg2",
            parties,
            [address_a, address_b],
            {broker_a.name: broker_a.pid, broker_b.name: broker_b.pid},
        )
    return one, unloaded, two


async def _run(plan: Plan, postgres_url: str | None) -> Results:
    echo, echo_batched, echo_unloaded, memory = await _baseline_phases(plan)
    sqlite, sqlite_unloaded = await _sqlite_phases(plan)
    results = Results(echo, echo_batched, echo_unloaded, memory, sqlite, sqlite_unloaded)
    if postgres_url is not None:
        with throwaway_database(postgres_url) as database_url:
            _say(f"PostgreSQL database {database_url.rsplit('/', 1)[-1]} created")
            results.pg_one, results.pg_one_unloaded, results.pg_two = await _postgres_phases(
                plan, database_url
            )
        _say("PostgreSQL brokers stopped, database dropped")
    return results


def _figures(results: Results) -> list[Figure]:
    cores = os.cpu_count() or 1
    echo, echo_unloaded, echo_batched = results.echo, results.echo_unloaded, results.echo_batched
    unary_mode, batched_mode = results.sqlite.unary, results.sqlite.batched
    machine = (
        f"{cores} CPU cores shared by the client, the server processes and PostgreSQL (and "
        "whatever else runs on the machine); durable commits (SQLite WAL synchronous=FULL, "
        "PostgreSQL as configured); echo and relay driven by the same client with the same "
        f"{ENVELOPE_BYTES:,}-byte payloads. 'Send': one Send call per envelope, "
        f"{unary_mode.concurrency} in flight, against echo at {echo.concurrency} calls in "
        f"flight. 'SendBatch': a node's outbox pusher, {batched_mode.concurrency} calls in "
        f"flight; its second baseline is the echo server fed the same batches "
        f"({echo_batched.concurrency} calls in flight, payloads/s)."
    )
    queueing = (
        "Loaded latency is mostly queueing (≈ envelopes in flight / throughput; a SendBatch "
        "call's envelopes all start together); the '1 in flight' rows show the path itself."
    )
    figures: list[Figure] = [
        Figure(
            "relay wire pattern",
            f"in-memory relay, {label}, delivered+acked/s",
            outcome.throughput,
            "echo calls/s",
            echo.throughput,
            "msg/s",
            note=(
                "The relay's calls with nothing behind them (no signature checks, no database, "
                "no receipt signature): the ceiling of the wire pattern itself (Send or "
                "SendBatch in, Deliveries streamed one or a batch to a message, batched "
                "Acknowledge calls) here."
            ),
        )
        for label, outcome in (
            ("Send", results.memory.unary),
            ("SendBatch", results.memory.batched),
        )
    ]
    figures += [
        Figure(
            "relay durability+security",
            f"broker on SQLite, {label}",
            broker.throughput,
            "in-memory relay, same mode",
            memory.throughput,
            "msg/s",
            note=(
                "What signed requests, the replay window, authentication, durable group-committed "
                "storage, leases and signed receipts cost over the bare wire pattern."
            ),
        )
        for label, broker, memory in (
            ("Send", results.sqlite.unary, results.memory.unary),
            ("SendBatch", results.sqlite.batched, results.memory.batched),
        )
    ]
    configs = [
        ("relay sqlite x1", results.sqlite, results.sqlite_unloaded),
        ("relay pg x1", results.pg_one, results.pg_one_unloaded),
        ("relay pg x2", results.pg_two, None),
    ]
    for benchmark, pair, unloaded in configs:
        if pair is None:
            continue
        figures += [
            Figure(
                benchmark,
                "Send, delivered+acked/s",
                pair.unary.throughput,
                "echo calls/s",
                echo.throughput,
                "msg/s",
                target=0.5,
                note=machine,
            ),
            Figure(
                benchmark,
                "SendBatch, delivered+acked/s",
                pair.batched.throughput,
                "echo calls/s",
                echo.throughput,
                "msg/s",
                target=0.5,
                note=machine,
            ),
            Figure(
                benchmark,
                "SendBatch, delivered+acked/s",
                pair.batched.throughput,
                "echo of the same batches",
                echo_batched.throughput,
                "msg/s",
                note=machine,
            ),
        ]
        for mode, outcome, baseline in (
            ("Send", pair.unary, echo),
            ("SendBatch", pair.batched, echo_batched),
        ):
            for tag, fraction in (("p50", 0.5), ("p99", 0.99)):
                figures.append(
                    Figure(
                        benchmark,
                        f"{mode}, {tag} send→delivered",
                        outcome.latency_ms(fraction),
                        f"echo {tag}, same calls",
                        baseline.latency_ms(fraction),
                        "ms",
                        higher_is_better=False,
                        note=queueing,
                    )
                )
        if unloaded is not None:
            figures += [
                Figure(
                    benchmark,
                    f"{mode}, p50, 1 in flight",
                    outcome.latency_ms(0.5),
                    "echo p50, 1 in flight",
                    echo_unloaded.latency_ms(0.5),
                    "ms",
                    higher_is_better=False,
                    note=queueing,
                )
                for mode, outcome in (
                    ("Send", unloaded.unary),
                    ("SendBatch of 1", unloaded.batched),
                )
            ]
    if results.pg_one is not None and results.pg_two is not None:
        figures += [
            Figure(
                "relay scale-out",
                f"pg, 2 broker processes, {label}",
                two.throughput,
                "1 broker process",
                one.throughput,
                "msg/s",
                note=(
                    f"2 broker processes on {cores} CPU cores that also run the client and "
                    "PostgreSQL: they compete with each other and with those for CPU, so this "
                    "understates what a second machine (or more cores) would add. Calls "
                    "alternate between the processes; the recipient's stream and "
                    "acknowledgements use the first."
                ),
            )
            for label, two, one in (
                ("Send", results.pg_two.unary, results.pg_one.unary),
                ("SendBatch", results.pg_two.batched, results.pg_one.batched),
            )
        ]
    return figures


def run(
    messages: int = 5000, concurrency: int = 32, warmup: int = 200, runs: int = 2
) -> list[Figure]:
    """Relay throughput and latency against the echo baseline, and 1 → 2 brokers on PostgreSQL;
    each loaded figure is the best of ``runs`` runs."""
    postgres_url = os.environ.get("TESSERA_BENCH_POSTGRES_URL", DEFAULT_POSTGRES)
    problem = postgres_reachable(postgres_url)
    if problem is not None:
        _say(f"no PostgreSQL at {postgres_url} ({problem}): skipping the PostgreSQL figures")
    with tempfile.TemporaryDirectory(prefix="tessera-bench-relay-") as tmp:
        folder = Path(tmp)
        _say("creating node identities and sealing envelopes")
        sender = make_node_identity(folder, "harbour-shelter")
        recipient = make_node_identity(folder, "lantern-clinic")
        unloaded = max(1, min(200, messages // 10))
        payloads = seal_payloads(sender, recipient.public, warmup + messages)
        plan = Plan(
            folder, sender, recipient, payloads, messages, concurrency, warmup, runs, unloaded
        )
        _say(
            f"{messages:,} messages of {len(payloads[0]):,} bytes, {concurrency} in flight, "
            f"best of {runs} runs, each after {warmup} warm-up messages; {unloaded} more with "
            f"1 in flight; {os.cpu_count()} CPU cores shared by every process"
        )
        results = asyncio.run(_run(plan, postgres_url if problem is None else None))
    return _figures(results)


_SERVERS = {"echo-server": _add_echo, "memory-relay": _add_memory_relay}


def _main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] in _SERVERS:
        asyncio.run(_serve(Path(argv[1]), _SERVERS[argv[0]]))
        return 0
    print(
        "usage: python -m bench.relay {echo-server|memory-relay} HOME   "
        "(run by `python -m bench relay`)"
    )
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
