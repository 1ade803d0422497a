"""Helpers that run real Tessera servers for tests: each in its own event loop thread."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc

from broker.operator_client import OperatorClient
from node import directory_sync
from node.keyring import open_keyring
from node.server import RunningNode, start_node
from node.setup import NodeInit, init_node
from tessera import crypto, labels, rpc
from tessera.config import Argon2Profile, Limits, Settings
from tessera.loop import LoopThread
from tessera.v1 import relay_pb2 as relay_pb
from tessera.v1 import relay_pb2_grpc as relay_grpc

PASSPHRASE = "a long test passphrase"
CASEWORKER_PASSPHRASE = "ledger orchid tramline quiet"


def unlock() -> str:
    """The passphrase that opens the administrator's credential in a node home made here (the
    node's own, as ``node init`` locks it)."""
    return PASSPHRASE


def make_node(home: Path, name: str = "Harbour Shelter", database_url: str = "") -> Settings:
    """A node home with cheap Argon2, listening on a free loopback port."""
    return init_node(
        NodeInit(
            home=home,
            name=name,
            region="north",
            listen="127.0.0.1:0",
            database_url=database_url,
            argon2=Argon2Profile.TEST_CHEAP,
        ),
        PASSPHRASE,
    )


class BackgroundNode:
    """A real node server (TLS, signed requests, SQLite or PostgreSQL) on a loopback port."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._loop = LoopThread()
        self.running: RunningNode = self._loop.run(start_node(settings, PASSPHRASE))

    @property
    def address(self) -> str:
        return self.running.address

    def stop(self) -> None:
        self._loop.run(self.running.stop(grace=0.5))
        self._loop.close()


class BackgroundBroker:
    """A real broker server (TLS, signed requests) on a loopback port."""

    def __init__(self, settings: Settings) -> None:
        from broker.server import start_broker

        self.settings = settings
        self._loop = LoopThread()
        self.running = self._loop.run(start_broker(settings))

    @property
    def address(self) -> str:
        return self.running.address

    def stop(self) -> None:
        self._loop.run(self.running.stop(grace=0.5))
        self._loop.close()


def disk_bytes(settings: Settings) -> bytes:
    """Every byte a server's embedded SQLite database has on disk: the file and its WAL."""
    database = settings.home / "tessera.db"
    wal = database.with_name("tessera.db-wal")
    return database.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


def make_broker(home: Path, database_url: str = "", **limits: float) -> Settings:
    """A broker home listening on a free loopback port (limits overridable for tests)."""
    import dataclasses

    from broker.setup import BrokerInit, init_broker
    from tessera.config import Limits

    settings = init_broker(
        BrokerInit(
            home=home,
            name="North broker",
            region="north",
            listen="127.0.0.1:0",
            database_url=database_url,
        )
    )
    return dataclasses.replace(settings, limits=dataclasses.replace(Limits(), **limits))


# --- enrolled agencies talking to a broker (no node server needed) ---------------------------


class Agency:
    """An enrolled node's identity and its link to the broker (no node server needed)."""

    def __init__(
        self, home: Path, agency_id: str, identity: crypto.Identity, link: directory_sync.BrokerLink
    ) -> None:
        self.home, self.agency_id, self.identity, self.link = home, agency_id, identity, link

    def relay(self) -> tuple[grpc.Channel, relay_grpc.RelayStub]:
        channel = rpc.open_channel(
            self.link.address, self.link.certificate, self.identity, Limits().max_message_bytes
        )
        return channel, relay_grpc.RelayStub(channel)


def enrol(broker: BackgroundBroker | Path, tmp_path: Path, agency_id: str) -> Agency:
    """Make a node home, enrol it with the broker (a running one, or a broker home whose
    server runs elsewhere), and return its identity and link."""
    home = tmp_path / agency_id
    make_node(home, name=agency_id.replace("-", " ").title())
    identity = open_keyring(home, PASSPHRASE).identity
    broker_home = broker if isinstance(broker, Path) else broker.settings.home
    with OperatorClient(broker_home) as operator:
        code = operator.enrolment_code(agency_id, 1)
    link = directory_sync.enrol(home, identity, code, agency_id.title(), ["safe_housing"])
    return Agency(home, agency_id, identity, link)


def seal(sender: Agency, recipient: Agency, payload: bytes) -> bytes:
    records = directory_sync.sync(sender.home, sender.identity, sender.link).records
    return crypto.seal(
        sender.identity, records[recipient.agency_id].identity, labels.LABEL_ENVELOPE, payload
    )


def send(
    sender: Agency, recipient: Agency, payload: bytes, key: str, sealed: bytes | None = None
) -> relay_pb.SendResponse:
    sealed = sealed or seal(sender, recipient, payload)
    channel, stub = sender.relay()
    try:
        return stub.Send(
            relay_pb.SendRequest(
                recipient_agency_id=recipient.agency_id,
                idempotency_key=key,
                consent_commitment=crypto.digest(labels.LABEL_CONSENT_COMMITMENT, key.encode()),
                sealed_envelope=sealed,
            ),
            timeout=10,
        )
    finally:
        channel.close()


def receive(agency: Agency, ack: bool = True) -> list[relay_pb.Delivery]:
    channel, stub = agency.relay()
    try:
        got = list(stub.Receive(relay_pb.ReceiveRequest(follow=False), timeout=10))
        if ack and got:
            stub.Acknowledge(
                relay_pb.AcknowledgeRequest(delivery_ids=[d.delivery_id for d in got]), timeout=10
            )
        return got
    finally:
        channel.close()


def enrolled_node(
    broker: BackgroundBroker,
    tmp_path: Path,
    agency_id: str,
    services: tuple[str, ...] = ("safe_housing", "medical", "legal_civil"),
) -> Settings:
    """Make a node home enrolled with a running broker; start it with ``BackgroundNode``."""
    home = tmp_path / agency_id
    settings = make_node(home, name=agency_id.replace("-", " ").title())
    identity = open_keyring(home, PASSPHRASE).identity
    with OperatorClient(broker.settings.home) as operator:
        code = operator.enrolment_code(agency_id, 1)
    directory_sync.enrol(home, identity, code, settings.name, list(services))
    return settings


T = TypeVar("T")


def wait_for(probe: Callable[[], T | None], what: str, timeout: float = 15.0) -> T:
    """``probe()`` once it returns something truthy; AssertionError naming ``what`` after
    ``timeout`` seconds (servers work in the background: wait on what they store, not sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
