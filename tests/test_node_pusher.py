"""The node's outbox pusher (node.relay_worker) against a real broker over TLS: the outbox goes
in signed Relay.SendBatch calls; an envelope the broker refuses stays queued with the broker's
reason while the others leave the outbox."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.operator_client import OperatorClient
from node import directory_sync
from node.client import NodeClient
from node.directory_sync import BrokerLink
from node.keyring import open_keyring
from node.referrals.flows import Referrals
from node.referrals.model import OutboxItem, OutboxKind
from node.relay_worker import RelayWorker, split_by_size
from tessera import crypto, labels
from tessera.errors import StorageError
from tessera.needs import NeedCategory, NeedStatus
from tessera.v1 import relay_pb2 as relay_pb
from tests.nodefixtures import Node, NodeFactory, db_url_fixture, nodes_fixture  # noqa: F401
from tests.support import (
    PASSPHRASE,
    Agency,
    BackgroundBroker,
    BackgroundNode,
    enrol,
    enrolled_node,
    make_broker,
    make_node,
    receive,
    send,
    unlock,
)

NOW = dt.datetime(2026, 10, 15, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BackgroundBroker]:
    running = BackgroundBroker(make_broker(tmp_path / "broker"))
    try:
        yield running
    finally:
        running.stop()


def enrolled(broker: BackgroundBroker, nodes: NodeFactory) -> tuple[Node, BrokerLink]:
    """The node under test (harbour-shelter), enrolled with the broker."""
    node = nodes.make(name="harbour-shelter")
    with OperatorClient(broker.settings.home) as operator:
        code = operator.enrolment_code("harbour-shelter", 1)
    link = directory_sync.enrol(node.home, node.keyring.identity, code, "Harbour", ["medical"])
    return node, link


def test_the_pusher_sends_the_outbox_and_a_refused_envelope_stays_queued(
    broker: BackgroundBroker, nodes: NodeFactory, tmp_path: Path
) -> None:
    clinic = enrol(broker, tmp_path / "others", "lantern-clinic")
    node, link = enrolled(broker, nodes)
    recipients = ["lantern-clinic", "no-such-agency", "lantern-clinic"]
    for index, recipient in enumerate(recipients):
        node.sql(
            "INSERT INTO outbox (kind, referral_id, recipient_id, idempotency_key, "
            "consent_commitment, sealed, attempts, last_error, created_at) "
            "VALUES ('status_update', :r, :to, :k, :c, :s, 0, '', :t)",
            r=str(uuid.uuid4()),
            to=recipient,
            k=f"key-{index}",
            c=b"",
            s=crypto.seal(
                node.keyring.identity,
                clinic.identity.public,
                labels.LABEL_STATUS,
                f"status {index}".encode(),
            ),
            t=NOW,
        )
    referrals = Referrals(node.store, node.home)
    worker = RelayWorker(node.store, referrals, node.keyring, node.home, link)

    async def push_until_settled() -> None:
        worker.start()  # its pusher sends the outbox at once
        try:
            for _ in range(200):
                rows = node.sql("SELECT recipient_id, attempts, last_error FROM outbox")
                if len(rows) == 1 and rows[0].attempts >= 1:
                    return
                await asyncio.sleep(0.05)
            raise AssertionError(f"the outbox never settled: {rows}")
        finally:
            await worker.stop()

    asyncio.run(push_until_settled())
    (left,) = referrals.stores.outbox.pending()
    assert left.recipient_id == "no-such-agency"
    assert "no enrolled agency 'no-such-agency'" in left.last_error
    delivered = receive(clinic)
    assert sorted(
        crypto.open_sealed(
            clinic.identity, node.keyring.identity.public, labels.LABEL_STATUS, d.sealed_envelope
        )
        for d in delivered
    ) == [b"status 0", b"status 2"]


def item(index: int, size: int) -> OutboxItem:
    return OutboxItem(
        id=index,
        kind=OutboxKind.STATUS_UPDATE,
        referral_id=str(uuid.uuid4()),
        recipient_id="lantern-clinic",
        idempotency_key=f"key-{index}",
        consent_commitment=b"",
        sealed=b"\x01" * size,
        attempts=0,
        last_error="",
        created_at=NOW,
        last_attempt_at=None,
    )


def test_split_by_size_keeps_order_and_stay_under_the_message_size() -> None:
    items = [item(i, size) for i, size in enumerate([400, 400, 300, 900, 100, 1500])]
    chunks = split_by_size(items, 1000)
    assert [[i.id for i in chunk] for chunk in chunks] == [[0, 1], [2], [3, 4], [5]]
    # One envelope larger than the bound still travels, alone.
    assert all(sum(len(i.sealed) for i in c) <= 1000 or len(c) == 1 for c in chunks)
    assert split_by_size([], 1000) == []


def test_a_node_enrolled_while_it_serves_starts_relaying_without_a_restart(
    broker: BackgroundBroker, tmp_path: Path
) -> None:
    home = tmp_path / "harbour-shelter"
    node = BackgroundNode(make_node(home, name="Harbour Shelter"))
    try:
        assert node.running.relay is None  # not enrolled: nothing to relay with
        identity = open_keyring(home, PASSPHRASE).identity
        with OperatorClient(broker.settings.home) as operator:
            code = operator.enrolment_code("harbour-shelter", 1)
        link = directory_sync.enrol(home, identity, code, "Harbour Shelter", ["medical"])
        harbour = Agency(home, "harbour-shelter", identity, link)
        clinic = enrol(broker, tmp_path / "others", "lantern-clinic")
        # Mail for the node. Not a Tessera envelope inside: its receiver, once running, opens
        # it, refuses it and acknowledges it, so the broker's mailbox empties.
        send(clinic, harbour, b"not an envelope", "first-mail")
        deadline = time.monotonic() + 15
        while broker.running.store.waiting_count("harbour-shelter") and (
            time.monotonic() < deadline
        ):
            time.sleep(0.1)
        assert node.running.relay is not None
        assert broker.running.store.waiting_count("harbour-shelter") == 0
    finally:
        node.stop()


def test_a_streamed_batch_syncs_the_directory_once_before_opening_any_envelope(
    broker: BackgroundBroker, nodes: NodeFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node, link = enrolled(broker, nodes)
    # Enrolled after the node's directory cache was written: unknown to it until it syncs.
    enrol(broker, tmp_path / "others", "lantern-clinic")
    enrol(broker, tmp_path / "others", "meridian-legal")
    calls = {"load_cache": 0, "sync": 0}

    def counted(name: str) -> Any:
        real = getattr(directory_sync, name)

        def call(*args: Any) -> Any:
            calls[name] += 1
            return real(*args)

        return call

    for name in calls:
        monkeypatch.setattr(directory_sync, name, counted(name))

    def delivery(sender_id: str) -> relay_pb.Delivery:
        # Not a Tessera envelope: each is opened, refused (audited) and acknowledged.
        return relay_pb.Delivery(
            delivery_id=str(uuid.uuid4()),
            sender_agency_id=sender_id,
            sealed_envelope=b"not an envelope",
        )

    senders = ["lantern-clinic", "lantern-clinic", "meridian-legal", "no-such-agency"]
    worker = RelayWorker(
        node.store, Referrals(node.store, node.home), node.keyring, node.home, link
    )

    async def handle_one_batch() -> None:
        worker.start()
        try:
            await worker.handle(*(delivery(s) for s in senders))
        finally:
            await worker.stop()

    asyncio.run(handle_one_batch())
    # One sync for the whole batch (it reads the cache once, to extend it), before the first
    # envelope: it fetched the whole directory, so the agency still unknown makes no second one.
    assert calls == {"load_cache": 1, "sync": 1}
    refused = node.store.audit_entries(actions=("envelope.refused",))
    reasons = {e.detail["sender_id"]: e.detail["reason"] for e in refused}
    assert len(refused) == len(senders)
    assert reasons["no-such-agency"] == "agency 'no-such-agency' is not in the directory"
    # The agencies enrolled late were found by that sync: refused for the envelope, not for
    # being unknown.
    assert "not in the directory" not in reasons["lantern-clinic"]
    assert "not in the directory" not in reasons["meridian-legal"]


# --- the receiver against real nodes: a failing database, a revoked sender ---------------------


@dataclasses.dataclass
class Pair:
    """A broker with short leases, and two running, enrolled nodes: harbour sends to lantern."""

    broker: BackgroundBroker
    harbour: BackgroundNode
    lantern: BackgroundNode
    root: Path

    def refer(self) -> str:
        """Harbour grants consent and sends lantern a referral; its id."""
        with NodeClient(self.harbour.settings.home, unlock=unlock) as harbour:
            case = harbour.create_case(
                {"prs_FirstName": "Mirelka"}, "", [(NeedCategory.MEDICAL, NeedStatus.IDENTIFIED)]
            )
            consent = harbour.grant_consent(
                case.case_id,
                "lantern-clinic",
                NeedCategory.MEDICAL,
                ("identity",),
                dt.date.today() + dt.timedelta(days=30),
                "verbal",
            )
            sent = harbour.send_referral(
                case.case_id,
                "lantern-clinic",
                NeedCategory.MEDICAL,
                consent_id=consent.consent_id,
            )
        return str(sent.referral_id)

    def inbox(self) -> list[str]:
        with NodeClient(self.lantern.settings.home, unlock=unlock) as lantern:
            return [r.referral_id for r in lantern.inbox(True)]


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    broker = BackgroundBroker(make_broker(tmp_path / "broker", delivery_lease_seconds=1.0))
    started: list[BackgroundNode] = []
    try:
        for agency in ("harbour-shelter", "lantern-clinic"):
            started.append(BackgroundNode(enrolled_node(broker, tmp_path, agency)))
        pair = Pair(broker, started[0], started[1], tmp_path)
        yield pair
        started = [pair.harbour, pair.lantern]  # the test may have restarted one
    finally:
        for node in started:
            node.stop()
        broker.stop()


def eventually(probe: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_a_referral_the_database_fails_to_store_is_not_acknowledged_and_arrives_once(
    pair: Pair,
) -> None:
    # The disk fills or the database goes away just as the referral is applied: the node must
    # not acknowledge it (the broker would delete the only copy); it is offered again and
    # stored exactly once.
    relay = pair.lantern.running.relay
    assert relay is not None
    incoming = relay._referrals.stores.incoming
    real = incoming.store
    failures = []

    def failing_once(*args: Any, **kwargs: Any) -> Any:
        if not failures:
            failures.append(1)
            raise StorageError("the disk is full", hint="free some space")
        return real(*args, **kwargs)

    incoming.store = failing_once  # type: ignore[method-assign]
    referral_id = pair.refer()
    eventually(lambda: pair.inbox() == [referral_id], "the referral after its redelivery")
    assert failures == [1]
    store = pair.lantern.running.store
    assert store.audit_entries(actions=("envelope.refused",)) == []
    assert len(store.audit_entries(actions=("referral.received",))) == 1
    eventually(
        lambda: pair.broker.running.store.waiting_count("lantern-clinic") == 0,
        "the acknowledgement",
    )


def test_a_referral_from_an_agency_revoked_while_it_waited_at_the_broker_is_refused(
    pair: Pair,
) -> None:
    # A laptop is lost: the operator revokes its agency. Whatever that agency had sent and the
    # broker still holds must not be trusted by the recipient, though its cached directory
    # still lists the agency as it was.
    pair.lantern.stop()
    pair.refer()
    eventually(lambda: pair.broker.running.store.waiting_count("lantern-clinic") == 1, "the send")
    with OperatorClient(pair.broker.settings.home) as operator:
        operator.revoke("harbour-shelter", "laptop lost")
    pair.lantern = BackgroundNode(pair.lantern.settings)
    eventually(
        lambda: pair.broker.running.store.waiting_count("lantern-clinic") == 0,
        "the envelope to be taken",
    )
    assert pair.inbox() == []
    refused = pair.lantern.running.store.audit_entries(actions=("envelope.refused",))
    assert len(refused) == 1 and "revoked" in refused[0].detail["reason"]
