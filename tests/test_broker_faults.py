"""Crash safety of the relay: real broker processes SIGKILLed at random moments under traffic.

DESIGN.md section 6: "Delivery is at-least-once on the wire and exactly-once in effect ... an
envelope is deleted from the broker only after the recipient acknowledges it; nothing is lost when
any process is killed at any moment". Section 3: several broker processes on one PostgreSQL
deliver every envelope exactly once and never lose one.

Each case runs real ``tessera broker serve`` processes (TLS gRPC, SQLite or PostgreSQL) and drives
them from this process with threads acting as three enrolled agencies:

- senders send sealed envelopes (per agency, one sending thread with Send, one with SendBatch
  calls of several), each with its own idempotency key and a payload naming a unique message id;
  on any error they retry the SAME request (same keys, same sealed bytes) until it is accepted,
  failing over to the other broker process when there are two; after a failure they also repeat
  the envelope accepted before it, which must come back as a duplicate with the same delivery id
  (idempotency keys live in the database, not in a process);
- receivers poll ``Receive(follow=False)`` (``ReceiveBatches`` for some agencies), open every
  envelope, and acknowledge it; they dedupe by delivery id, as a recipient must (exactly-once in
  effect);
- a killer thread SIGKILLs the broker processes in turn at random points of the traffic (a seeded
  ``random.Random``; set TESSERA_FAULT_SEED to replay a seed): half the kills at a random moment,
  half just as a process has leased a batch and is streaming it, sometimes again while the
  process restarts; after the last send every process is killed and restarted once more.

At the end every message sent was processed exactly once by its recipient, under the one delivery
id its sender's receipt named (so the broker never stored a retried send twice), envelopes leased
by dead processes came back, and the broker's database holds no envelope: none was lost, none is
left behind. Leases are 3 s here (``[limits]`` in the broker's tessera.toml) so that they do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker.store.database import open_database
from broker.store.relay import BrokerStore
from node import directory_sync
from tessera import crypto, labels, rpc
from tessera.config import CONFIG_FILE, Limits
from tessera.credential import RUN_FILE
from tessera.v1 import relay_pb2 as relay_pb
from tessera.v1 import relay_pb2_grpc as relay_grpc
from tests.support import Agency, enrol, make_broker

pytestmark = pytest.mark.slow

AGENCIES = ("harbour-shelter", "lantern-clinic", "beacon-legal")
# Short leases so that envelopes leased by a killed process come back quickly.
LEASE_SECONDS = 3.0
RPC_TIMEOUT = 10.0
START_TIMEOUT = 60.0
DRAIN_TIMEOUT = 120.0
# Draining gives up when nothing changed for this long (several leases and a restart).
STALL_SECONDS = 20.0
RECEIVE_BATCH = 50
SEND_BATCH = 8  # envelopes in one SendBatch call of a batched sending thread
RETRY_PAUSE = 0.02
# How long the killer waits for a delivery stream to kill a broker in (else it kills anyway).
MID_STREAM_WAIT = 5.0
# Before a kill in the middle of a delivery stream, receivers pause this long to let a batch build.
HOLD_SECONDS = 0.8
# A receiver that found fewer than a batch waits this long before it asks again.
IDLE_PAUSE = 0.4
# Sending threads per agency (each sends its share of the agency's envelopes in order).
SENDERS = 2
# What a client may see while a broker process dies or restarts: the connection drops or is
# refused (UNAVAILABLE), a call dies with it (CANCELLED, DEADLINE_EXCEEDED). Anything else
# (INTERNAL, UNAUTHENTICATED, ALREADY_EXISTS, ...) would be a bug and fails the test.
TRANSIENT = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}
)


def _tessera_command() -> str:
    beside = Path(sys.executable).with_name("tessera")
    found = str(beside) if beside.exists() else shutil.which("tessera")
    if not found:
        pytest.fail("the `tessera` console script is not installed")
    return found


# --- broker processes ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """Where one start of a broker process listens (``epoch`` tells restarts apart)."""

    address: str
    epoch: int


class BrokerProcess:
    """A real ``tessera broker serve`` process over one home, restartable after SIGKILL."""

    _epochs = iter(range(1, 1_000_000))

    def __init__(self, name: str, home: Path, database_url: str, log_path: Path) -> None:
        self.name, self.home, self.database_url, self.log_path = name, home, database_url, log_path
        self.proc: subprocess.Popen[bytes] | None = None
        # The last address published; left in place while the process is dead, like a client's
        # configured address, so clients keep retrying it and fail until the restart.
        self.endpoint: Endpoint | None = None
        self.starts = 0

    def spawn(self) -> None:
        """Start the process (the run file it will write is removed first: a killed process
        leaves its own behind)."""
        assert self.proc is None or self.proc.poll() is not None
        (self.home / RUN_FILE).unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
        env.update(TESSERA_LOG_FORMAT="json", TESSERA_DATABASE_URL=self.database_url)
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [_tessera_command(), "--home", str(self.home), "broker", "serve"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def wait_ready(self) -> None:
        """Wait for this start's run file, then publish its address to the clients."""
        assert self.proc is not None
        run_file = self.home / RUN_FILE
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.proc.returncode} while starting:\n"
                    + self.log_tail()
                )
            try:
                data = json.loads(run_file.read_text())
                if data["pid"] == self.proc.pid:
                    self.endpoint = Endpoint(str(data["address"]), next(self._epochs))
                    return
            except (OSError, ValueError, KeyError):
                pass  # not written yet, or half written
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not start in time:\n" + self.log_tail())
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, leases stay held, the run file stays behind."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=30)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


# --- what the clients saw -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Message:
    """One envelope to send: fixed key and sealed bytes, reused on every retry."""

    message_id: str
    sender: str
    recipient: str
    key: str
    sealed: bytes


class Ledger:
    """Everything the senders, receivers and killer observed; shared by their threads."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.lock = threading.Lock()
        self.receipts: dict[str, str] = {}  # message id -> delivery id on the sender's receipt
        self.duplicate_receipts = 0
        self.retried_messages = 0
        self.errors: Counter[tuple[str, str]] = Counter()  # (operation, status code name)
        self.error_samples: dict[tuple[str, str], str] = {}
        # Per recipient: delivery id -> message id (first time seen), and effects per message.
        self.seen: dict[str, dict[str, str]] = {a: {} for a in AGENCIES}
        self.effects: Counter[str] = Counter()
        self.wire_deliveries = 0
        self.wire_repeats = 0
        # (delivery id, attempt) -> times delivered: each lease hands an envelope out once.
        self.leases: Counter[tuple[str, int]] = Counter()
        self.recovered = 0
        self.repeats_after_crash = 0
        self.kills: list[tuple[str, int, int]] = []  # (broker, sends accepted, effects) at kill
        self.startup_kills = 0
        self.stream_kills: list[KillRequest] = []

    def accepted(self, message: Message, delivery_id: str, duplicate: bool, attempts: int) -> None:
        with self.lock:
            assert message.message_id not in self.receipts
            self.receipts[message.message_id] = delivery_id
            self.duplicate_receipts += duplicate
            self.retried_messages += attempts > 1

    def failed(self, operation: str, exc: grpc.RpcError) -> None:
        call: Any = exc
        code = call.code()
        key = (operation, code.name if code is not None else "NONE")
        with self.lock:
            self.errors[key] += 1
            self.error_samples.setdefault(key, str(call.details()))

    def sent(self) -> int:
        with self.lock:
            return len(self.receipts)

    def processed(self) -> int:
        with self.lock:
            return len(self.effects)


@dataclasses.dataclass
class Run:
    """One fault run's shared state: brokers, agencies, ledger, and the stop signals."""

    brokers: list[BrokerProcess]
    publics: dict[str, crypto.PublicIdentity]
    ledger: Ledger
    abort: threading.Event = dataclasses.field(default_factory=threading.Event)
    sending_done: threading.Event = dataclasses.field(default_factory=threading.Event)
    stop_receiving: threading.Event = dataclasses.field(default_factory=threading.Event)
    thread_errors: list[str] = dataclasses.field(default_factory=list)
    # Set by the killer, taken by a receiver of that broker at its next delivery (see _receiver).
    kill_request: KillRequest | None = None
    kill_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    # Senders start no new envelope beyond this many accepted ones: the killer moves it on after
    # each kill, so that on a slow machine every planned kill still falls inside the traffic.
    gate: float = float("inf")

    def wait_for_gate(self) -> None:
        while self.ledger.sent() >= self.gate and not self.abort.is_set():
            time.sleep(0.01)


@dataclasses.dataclass
class KillRequest:
    """Kill broker ``broker`` in the middle of a delivery stream."""

    broker: int
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    # Until then no receiver polls, so that envelopes pile up for the stream to be cut.
    hold_until: float = dataclasses.field(default_factory=lambda: time.monotonic() + HOLD_SECONDS)
    received_after: int = 0  # deliveries the receiver still got from that stream afterwards

    def holding(self) -> bool:
        return time.monotonic() < self.hold_until


class Connection:
    """One client's TLS channel, reopened whenever the broker endpoint it should use changes."""

    def __init__(self, agency: Agency) -> None:
        self.agency = agency
        self.endpoint: Endpoint | None = None
        self.channel: grpc.Channel | None = None
        self.stub: relay_grpc.RelayStub | None = None

    def stub_for(self, endpoint: Endpoint) -> relay_grpc.RelayStub:
        if endpoint != self.endpoint or self.stub is None:
            self.close()
            self.channel = rpc.open_channel(
                endpoint.address,
                self.agency.link.certificate,
                self.agency.identity,
                Limits().max_message_bytes,
            )
            self.stub = relay_grpc.RelayStub(self.channel)
            self.endpoint = endpoint
        return self.stub

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.channel, self.stub, self.endpoint = None, None, None


class Sender:
    """One sending thread of an agency: sends its envelopes in order, each until accepted; with
    ``batched``, in SendBatch calls of ``SEND_BATCH``, each call repeated until every envelope
    of it was accepted (as a node's outbox pusher does)."""

    def __init__(self, run: Run, agency: Agency, first_broker: int, batched: bool) -> None:
        self.run, self.agency, self.broker = run, agency, first_broker
        self.batched = batched
        self.connection = Connection(agency)

    def send_all(self, messages: list[Message]) -> None:
        previous: tuple[Message, str] | None = None
        step = SEND_BATCH if self.batched else 1
        try:
            for start in range(0, len(messages), step):
                self.run.wait_for_gate()
                chunk = messages[start : start + step]
                outcomes = self.send_batch(chunk) if self.batched else [self.send(chunk[0])]
                if any(outcome is None for outcome in outcomes):
                    return  # aborted
                attempts = 1
                for message, outcome in zip(chunk, outcomes, strict=True):
                    assert outcome is not None
                    delivery_id, duplicate, attempts = outcome
                    self.run.ledger.accepted(message, delivery_id, duplicate, attempts)
                if attempts > 1 and previous is not None:
                    self.repeat(*previous)
                previous = (chunk[-1], self.run.ledger.receipts[chunk[-1].message_id])
        finally:
            self.connection.close()

    def send_batch(self, chunk: list[Message]) -> list[tuple[str, bool, int] | None]:
        """SendBatch until every envelope of ``chunk`` is accepted, the same requests every time;
        (delivery id, duplicate, attempts) per envelope, from the call that accepted them all."""
        request = relay_pb.SendBatchRequest(envelopes=[_request(m) for m in chunk])
        answered = self.until_answered(lambda stub: stub.SendBatch(request, timeout=RPC_TIMEOUT))
        if answered is None:
            return [None]
        reply, attempts = answered
        assert len(reply.results) == len(chunk)
        refused = [r.refused for r in reply.results if r.HasField("refused")]
        assert not refused, f"the broker refused envelopes of a batch: {refused[:2]}"
        return [
            (*self.check_receipt(message, result.accepted), attempts)
            for message, result in zip(chunk, reply.results, strict=True)
        ]

    def until_answered(self, call: Callable[[relay_grpc.RelayStub], Any]) -> tuple[Any, int] | None:
        """Make ``call`` until a broker answers it, failing over to the next broker process
        after every error; (answer, attempts), or None if the run was aborted."""
        attempts = 0
        while not self.run.abort.is_set():
            endpoint = self.run.brokers[self.broker].endpoint
            assert endpoint is not None
            attempts += 1
            try:
                return call(self.connection.stub_for(endpoint)), attempts
            except grpc.RpcError as exc:
                self.run.ledger.failed("send", exc)
                self.broker = (self.broker + 1) % len(self.run.brokers)  # fail over
                time.sleep(RETRY_PAUSE)
        return None

    def repeat(self, message: Message, delivery_id: str) -> None:
        """Send an envelope accepted before the last failure again, as a client does that is
        unsure its answer arrived: the idempotency key must be remembered across the crash."""
        accepted = self.send(message)
        if accepted is not None:
            assert accepted[:2] == (delivery_id, True), f"repeat of {message.key}: {accepted}"
            with self.run.ledger.lock:
                self.run.ledger.repeats_after_crash += 1

    def send(self, message: Message) -> tuple[str, bool, int] | None:
        """Send until accepted, the same request every time; (delivery id, duplicate, attempts)."""
        request = _request(message)
        answered = self.until_answered(lambda stub: stub.Send(request, timeout=RPC_TIMEOUT))
        if answered is None:
            return None
        reply, attempts = answered
        return (*self.check_receipt(message, reply), attempts)

    def check_receipt(self, message: Message, reply: relay_pb.SendResponse) -> tuple[str, bool]:
        """The broker-signed receipt of ``message``, checked; (delivery id, duplicate)."""
        crypto.verify(
            self.agency.link.broker_key,
            labels.LABEL_RECEIPT,
            reply.receipt.body,
            reply.receipt.signature,
        )
        receipt = relay_pb.RelayReceipt.FromString(reply.receipt.body)
        assert receipt.idempotency_key == message.key
        assert receipt.recipient_agency_id == message.recipient
        assert receipt.envelope_digest == crypto.digest(labels.LABEL_ENVELOPE, message.sealed)
        return receipt.delivery_id, reply.duplicate


def _request(message: Message) -> relay_pb.SendRequest:
    return relay_pb.SendRequest(
        recipient_agency_id=message.recipient,
        idempotency_key=message.key,
        consent_commitment=crypto.digest(labels.LABEL_CONSENT_COMMITMENT, message.key.encode()),
        sealed_envelope=message.sealed,
    )


def _sender(
    run: Run, agency: Agency, messages: list[Message], first_broker: int, batched: bool
) -> None:
    Sender(run, agency, first_broker, batched).send_all(messages)


def _deliver(run: Run, agency: Agency, delivery: relay_pb.Delivery) -> None:
    """The recipient's side: open, check, and process each delivery id once."""
    ledger = run.ledger
    with ledger.lock:
        ledger.wire_deliveries += 1
        ledger.leases[delivery.delivery_id, delivery.attempt] += 1
        known = ledger.seen[agency.agency_id].get(delivery.delivery_id)
        if known is not None:
            ledger.wire_repeats += 1
            return
    opened = crypto.open_sealed(
        agency.identity,
        run.publics[delivery.sender_agency_id],
        labels.LABEL_ENVELOPE,
        delivery.sealed_envelope,
    )
    payload = json.loads(opened)
    assert payload["to"] == agency.agency_id and payload["from"] == delivery.sender_agency_id
    with ledger.lock:
        seen = ledger.seen[agency.agency_id]
        if delivery.delivery_id in seen:  # the other receiver of this agency got it meanwhile
            ledger.wire_repeats += 1
            return
        seen[delivery.delivery_id] = payload["message_id"]
        ledger.effects[payload["message_id"]] += 1
        # First seen on a later attempt: a lease ran out unacknowledged, typically one held by
        # a broker process that was killed before the envelope reached the recipient.
        ledger.recovered += delivery.attempt > 1


def _receiver(run: Run, agency: Agency, broker: int, batched: bool) -> None:
    connection = Connection(agency)
    unacknowledged: list[str] = []
    try:
        while not run.stop_receiving.is_set() and not run.abort.is_set():
            request = run.kill_request
            if request is not None and (batched or request.broker != broker or request.holding()):
                # Let a backlog build up, so that the stream to be cut is long, and leave it to
                # the receivers of the broker to be killed that take one delivery per message
                # (a batched poll gets its whole lease in one message: nothing left to cut).
                time.sleep(0.02)
                continue
            endpoint = run.brokers[broker].endpoint
            assert endpoint is not None
            stub = connection.stub_for(endpoint)
            got = 0
            cut: KillRequest | None = None
            try:
                poll = relay_pb.ReceiveRequest(follow=False, max_deliveries=RECEIVE_BATCH)
                stream: Iterator[relay_pb.Delivery] = (
                    (
                        delivery
                        for batch in stub.ReceiveBatches(poll, timeout=RPC_TIMEOUT)
                        for delivery in batch.deliveries
                    )
                    if batched
                    else stub.Receive(poll, timeout=RPC_TIMEOUT)
                )
                for delivery in stream:
                    _deliver(run, agency, delivery)
                    unacknowledged.append(delivery.delivery_id)
                    got += 1
                    if cut is not None:
                        cut.received_after += 1
                    elif got == 1:
                        # The broker has just leased a batch and is streaming it: the moment
                        # where a broker that handed envelopes out without a lease that outlives it
                        # would lose the rest of the batch.
                        cut = _kill_mid_stream(run, broker)
            except grpc.RpcError as exc:
                run.ledger.failed("receive", exc)
                time.sleep(RETRY_PAUSE)
                continue
            if unacknowledged:
                try:
                    stub.Acknowledge(
                        relay_pb.AcknowledgeRequest(delivery_ids=unacknowledged),
                        timeout=RPC_TIMEOUT,
                    )
                except grpc.RpcError as exc:
                    run.ledger.failed("acknowledge", exc)
                    time.sleep(RETRY_PAUSE)
                    continue
                unacknowledged.clear()
            if got < RECEIVE_BATCH:  # caught up: let a batch build up
                time.sleep(IDLE_PAUSE)
    finally:
        connection.close()


def _kill_mid_stream(run: Run, broker: int) -> KillRequest | None:
    """Carry out the killer's pending request for ``broker``, if there is one."""
    with run.kill_lock:
        request = run.kill_request
        if request is None or request.broker != broker:
            return None
        run.kill_request = None
    run.brokers[broker].kill()
    request.done.set()
    return request


def _kill_plan(rng: random.Random, kills: int, total: int) -> list[float]:
    """When to kill, in envelopes accepted: one random point in each of ``kills`` equal slices
    of the first 80% of the sends."""
    width = 0.75 * total / kills
    return [0.05 * total + (n + rng.random()) * width for n in range(kills)]


def _killer(run: Run, rng: random.Random, plan: list[float]) -> None:
    """Kill broker processes (alternately) at the planned points of the sending; restart them.

    Half the kills are at a random moment, the others hit a broker while it streams deliveries.
    """
    total = run.ledger.total
    for number, threshold in enumerate(plan):
        # The traffic runs on past the kill point, but not past the next one (nor, after the last,
        # half-way to the end) until this kill is done.
        last = number + 1 == len(plan)
        run.gate = threshold + (total - threshold) / 2 if last else plan[number + 1]
        while run.ledger.sent() < threshold:
            if run.abort.is_set() or run.sending_done.is_set():
                return
            time.sleep(0.005)
        index = number % len(run.brokers)
        if (number // len(run.brokers)) % 2:
            _kill_while_delivering(run, index)
        else:
            time.sleep(rng.uniform(0.0, 0.15))
            run.brokers[index].kill()
        _record_kill_and_restart(run, rng, run.brokers[index])
    run.gate = float("inf")


def _kill_while_delivering(run: Run, index: int) -> None:
    request = KillRequest(index)
    with run.kill_lock:
        run.kill_request = request
    if request.done.wait(timeout=MID_STREAM_WAIT):
        with run.ledger.lock:
            run.ledger.stream_kills.append(request)
        return
    with run.kill_lock:
        mine = run.kill_request is request
        run.kill_request = None
    if mine:  # no delivery came: kill it anyway
        run.brokers[index].kill()
    else:  # a receiver took the request just now
        assert request.done.wait(timeout=START_TIMEOUT)
        with run.ledger.lock:
            run.ledger.stream_kills.append(request)


def _record_kill_and_restart(run: Run, rng: random.Random, broker: BrokerProcess) -> None:
    ledger = run.ledger
    with ledger.lock:
        ledger.kills.append((broker.name, len(ledger.receipts), len(ledger.effects)))
    time.sleep(rng.uniform(0.02, 0.2))
    broker.spawn()
    if rng.random() < 0.2:  # and once more while it is starting (migrating, verifying the log)
        time.sleep(rng.uniform(0.2, 1.0))
        broker.kill()
        with ledger.lock:
            ledger.startup_kills += 1
        broker.spawn()
    broker.wait_ready()


def _thread(run: Run, name: str, target: Callable[..., None], *args: Any) -> threading.Thread:
    def guarded() -> None:
        try:
            target(run, *args)
        except BaseException as exc:  # reported by the test, never lost in a thread
            run.thread_errors.append(f"{name}: {type(exc).__name__}: {exc}")
            run.abort.set()

    thread = threading.Thread(target=guarded, name=name, daemon=True)
    thread.start()
    return thread


# --- setting a run up -----------------------------------------------------------------------------


def _broker_homes(tmp_path: Path, database_url: str, processes: int) -> tuple[list[Path], str]:
    """One broker home, plus copies for replicas (same keys, TLS, operators, database)."""
    first = tmp_path / "broker-0"
    settings = make_broker(first, database_url)
    with (first / CONFIG_FILE).open("a", encoding="utf-8") as config:
        config.write(f"\n[limits]\ndelivery_lease_seconds = {LEASE_SECONDS}\n")
        # The per-process rate limit is not under test here; the traffic exceeds it on purpose.
        config.write("sends_per_minute = 1000000\n")
    homes = [first]
    for index in range(1, processes):
        replica = tmp_path / f"broker-{index}"
        shutil.copytree(first, replica, ignore=shutil.ignore_patterns("run", "tessera.db*"))
        homes.append(replica)
    return homes, settings.effective_database_url


def _messages(agencies: dict[str, Agency], total: int) -> dict[str, list[Message]]:
    """``total`` envelopes, spread over the senders, each to one of the other agencies."""
    plan: dict[str, list[Message]] = {}
    run_tag = secrets.token_hex(4)
    for index, sender_id in enumerate(AGENCIES):
        sender = agencies[sender_id]
        records = directory_sync.sync(sender.home, sender.identity, sender.link).records
        others = [a for a in AGENCIES if a != sender_id]
        count = total // len(AGENCIES) + (index < total % len(AGENCIES))
        plan[sender_id] = []
        for number in range(count):
            recipient = others[number % len(others)]
            message_id = f"{sender_id}/{number}/{run_tag}"
            payload = json.dumps(
                {"message_id": message_id, "from": sender_id, "to": recipient}
            ).encode()
            sealed = crypto.seal(
                sender.identity, records[recipient].identity, labels.LABEL_ENVELOPE, payload
            )
            key = f"fault-{secrets.token_hex(8)}"
            plan[sender_id].append(Message(message_id, sender_id, recipient, key, sealed))
    return plan


@dataclasses.dataclass
class Outcome:
    """What one run did, for the assertions and the report."""

    plan: dict[str, list[Message]]
    ledger: Ledger
    waiting_after: int
    setup_seconds: float
    sending_seconds: float
    drain_seconds: float


def _run(
    tmp_path: Path,
    database_url: str,
    processes: int,
    total: int,
    kills: int,
    rng: random.Random,
    brokers: list[BrokerProcess],
) -> Outcome:
    """Set up brokers and agencies, run the traffic with the killer, drain, stop everything."""
    setup_began = time.monotonic()
    homes, url = _broker_homes(tmp_path, database_url, processes)
    (tmp_path / "logs").mkdir()
    for index, home in enumerate(homes):
        log = tmp_path / "logs" / f"broker-{index}.log"
        brokers.append(BrokerProcess(f"broker-{index}", home, url, log))
    for broker in brokers:
        broker.spawn()
    for broker in brokers:
        broker.wait_ready()
    agencies = {a: enrol(homes[0], tmp_path, a) for a in AGENCIES}
    publics = {a: agency.identity.public for a, agency in agencies.items()}
    plan = _messages(agencies, total)
    run = Run(brokers, publics, Ledger(total))
    kill_plan = _kill_plan(rng, kills, total)
    run.gate = kill_plan[1] if len(kill_plan) > 1 else total
    engine = open_database(url)
    store = BrokerStore(engine)
    threads: list[threading.Thread] = []
    try:
        began = time.monotonic()
        setup_seconds = began - setup_began
        # Both ways of each call: agencies 0 and 2 receive with ReceiveBatches, agency 1 with
        # Receive; each agency's first sending thread uses Send, its second SendBatch.
        receivers = [
            _thread(run, f"receive-{a}-{b}", _receiver, agencies[a], b, i % 2 == 0)
            for i, a in enumerate(AGENCIES)
            for b in range(processes)
        ]
        senders = [
            _thread(
                run,
                f"send-{a}-{k}",
                _sender,
                agencies[a],
                plan[a][k::SENDERS],
                n % processes,
                k % 2 == 1,
            )
            for n, (a, k) in enumerate((a, k) for a in AGENCIES for k in range(SENDERS))
        ]
        killer = _thread(run, "killer", _killer, rng, kill_plan)
        threads = [*receivers, *senders, killer]
        for thread in senders:
            thread.join(timeout=DRAIN_TIMEOUT * 2)
        run.sending_done.set()
        killer.join(timeout=START_TIMEOUT * 3)
        sending_seconds = time.monotonic() - began
        _check_threads(run)
        assert run.ledger.sent() == total, f"only {run.ledger.sent()} of {total} sends accepted"

        # Kill every process once more while the recipients drain their mailboxes.
        began = time.monotonic()
        for broker in brokers:
            time.sleep(rng.uniform(0.0, 0.3))
            broker.kill()
            _record_kill_and_restart(run, rng, broker)
        drained = _drain(run, store)
        run.stop_receiving.set()
        for thread in receivers:
            thread.join(timeout=RPC_TIMEOUT * 3)
        drain_seconds = time.monotonic() - began
        _check_threads(run)
        if not drained:
            logs = "\n".join(f"{b.name}:\n{b.log_tail()}" for b in brokers)
            raise AssertionError(
                f"the mailboxes did not drain: {run.ledger.processed()} of {total} messages "
                f"processed, {store.waiting_count()} envelopes still waiting at the broker\n{logs}"
            )
    finally:
        run.abort.set()
        run.stop_receiving.set()
        for thread in threads:
            thread.join(timeout=RPC_TIMEOUT * 3)
        for broker in brokers:
            broker.close()
        engine.dispose()
    # Seen from a fresh connection to the database, after every broker process is gone.
    fresh = open_database(url)
    try:
        waiting_after = BrokerStore(fresh).waiting_count()
    finally:
        fresh.dispose()
    return Outcome(plan, run.ledger, waiting_after, setup_seconds, sending_seconds, drain_seconds)


def _drain(run: Run, store: BrokerStore) -> bool:
    """Wait until every message was processed and no envelope waits at the broker; False if
    that stops making progress (an envelope lost, or stuck under a lease that never ends)."""
    last: tuple[int, int] | None = None
    progressed = time.monotonic()
    deadline = progressed + DRAIN_TIMEOUT
    while time.monotonic() < deadline and not run.abort.is_set():
        state = (run.ledger.processed(), store.waiting_count())
        if state == (run.ledger.total, 0):
            return True
        if state != last:
            last, progressed = state, time.monotonic()
        elif time.monotonic() - progressed > STALL_SECONDS:
            return False
        time.sleep(0.1)
    return False


def _check_threads(run: Run) -> None:
    if run.thread_errors:
        logs = "\n".join(f"{b.name}:\n{b.log_tail()}" for b in run.brokers)
        raise AssertionError(f"{run.thread_errors}\n{logs}")


@pytest.fixture
def brokers() -> Iterator[list[BrokerProcess]]:
    """Broker processes of a test; all killed and reaped at the end, whatever happened."""
    started: list[BrokerProcess] = []
    try:
        yield started
    finally:
        for broker in started:
            broker.close()


CASES = [
    pytest.param("sqlite", 1, 1000, 5, id="sqlite-one-process"),
    pytest.param("postgresql", 1, 1000, 5, id="postgresql-one-process", marks=pytest.mark.postgres),
    pytest.param(
        "postgresql", 2, 2000, 6, id="postgresql-two-processes", marks=pytest.mark.postgres
    ),
]


@pytest.mark.parametrize(("backend", "processes", "total", "kills"), CASES)
def test_sigkilled_brokers_lose_nothing_and_deliver_each_envelope_once(
    backend: str,
    processes: int,
    total: int,
    kills: int,
    tmp_path: Path,
    brokers: list[BrokerProcess],
    request: pytest.FixtureRequest,
) -> None:
    began = time.monotonic()
    seed = int(os.environ.get("TESSERA_FAULT_SEED") or secrets.randbits(32))
    print(f"fault seed {seed} (replay with TESSERA_FAULT_SEED={seed})")
    database_url = request.getfixturevalue("postgres_url") if backend == "postgresql" else ""
    try:
        outcome = _run(
            tmp_path, database_url, processes, total, kills, random.Random(seed), brokers
        )
    except AssertionError as exc:
        raise AssertionError(f"seed {seed}: {exc}") from None
    ledger = outcome.ledger
    print(
        f"{backend} x{processes}: {total} envelopes, {len(ledger.kills)} kills "
        f"(+{ledger.startup_kills} while starting; {len(ledger.stream_kills)} mid-stream, "
        f"then received {[k.received_after for k in ledger.stream_kills]}) "
        f"at (sent, processed) "
        f"{[k[1:] for k in ledger.kills]}; {ledger.retried_messages} sends retried, "
        f"{ledger.duplicate_receipts} answered as duplicates, {ledger.repeats_after_crash} "
        f"deliberate repeats after a crash; {ledger.wire_deliveries} wire "
        f"deliveries, {ledger.wire_repeats} repeats, {ledger.recovered} first seen on a later "
        f"attempt; errors {dict(ledger.errors)}; "
        f"setup {outcome.setup_seconds:.1f} s, sending {outcome.sending_seconds:.1f} s, "
        f"draining {outcome.drain_seconds:.1f} s, "
        f"whole case {time.monotonic() - began:.1f} s"
    )
    where = f"seed {seed}"

    sent = {m.message_id: m for messages in outcome.plan.values() for m in messages}
    assert len(sent) == total
    # Every message was accepted, and processed exactly once, by its own recipient: none lost.
    assert set(ledger.receipts) == set(sent), where
    lost = sorted(set(sent) - set(ledger.effects))
    assert not lost, f"{where}: {len(lost)} messages never delivered, e.g. {lost[:5]}"
    unknown = sorted(set(ledger.effects) - set(sent))
    assert not unknown, f"{where}: messages nobody sent: {unknown[:5]}"
    twice = sorted(m for m, n in ledger.effects.items() if n > 1)
    assert not twice, f"{where}: {len(twice)} messages processed twice, e.g. {twice[:5]}"
    delivered: dict[str, set[str]] = {}
    for recipient, seen in ledger.seen.items():
        for delivery_id, message_id in seen.items():
            assert sent[message_id].recipient == recipient, f"{where}: {message_id} misdelivered"
            delivered.setdefault(message_id, set()).add(delivery_id)
    # One stored envelope per idempotency key: each message reached its recipient under exactly
    # the delivery id its sender's receipt named, retries included.
    distinct = {i for seen in ledger.seen.values() for i in seen}
    assert len(distinct) == total, f"{where}: {len(distinct)} envelopes for {total} messages"
    strays = [m for m in sent if delivered[m] != {ledger.receipts[m]}]
    assert not strays, f"{where}: delivered under another id than the receipt's: {strays[:5]}"
    # No two broker processes held one envelope at once: every delivery on the wire was under a
    # lease of its own (the attempt count grows with each).
    shared = [k for k, n in ledger.leases.items() if n > 1]
    assert not shared, f"{where}: handed out twice under one lease: {shared[:5]}"
    # Every envelope was acknowledged and deleted: nothing is left waiting at the broker.
    assert outcome.waiting_after == 0, where

    # The faults were real: processes died mid-traffic, and the clients saw it and retried.
    transient = {code.name for code in TRANSIENT}
    unexpected = {k: n for k, n in ledger.errors.items() if k[1] not in transient}
    assert not unexpected, f"{where}: {unexpected} {ledger.error_samples}"
    mid_traffic = [k for k in ledger.kills if 0 < k[1] < total]
    assert len(mid_traffic) >= kills, f"{where}: kills {ledger.kills}"
    assert len(ledger.kills) >= kills + processes, where
    assert {k[0] for k in mid_traffic} == {b.name for b in brokers}, where
    send_failures = sum(n for (op, _code), n in ledger.errors.items() if op == "send")
    assert send_failures > 0 and ledger.retried_messages > 0, f"{where}: {ledger.errors}"
    assert ledger.repeats_after_crash > 0, where  # idempotency keys outlived the processes
    # Some kills cut a delivery stream, and what the dead process had leased came back later.
    assert ledger.stream_kills, where
    assert ledger.recovered > 0, where
