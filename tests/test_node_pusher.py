"""The node's outbox pusher (node.relay_worker) against a real broker over TLS: the outbox goes
in signed Relay.SendBatch calls; an envelope the broker refuses stays queued with the broker's
reason while the others leave the outbox."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.operator_client import OperatorClient
from node import directory_sync
from node.keyring import open_keyring
from node.relay_worker import RelayWorker, split_by_size
from node.store.referrals import OutboxItem, OutboxKind, ReferralStore
from tessera import crypto
from tests.nodefixtures import NodeFactory, db_url_fixture, nodes_fixture  # noqa: F401
from tests.support import (
    PASSPHRASE,
    Agency,
    BackgroundBroker,
    BackgroundNode,
    enrol,
    make_broker,
    make_node,
    receive,
    send,
)

NOW = dt.datetime(2026, 10, 15, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BackgroundBroker]:
    running = BackgroundBroker(make_broker(tmp_path / "broker"))
    try:
        yield running
    finally:
        running.stop()


def test_the_pusher_sends_the_outbox_and_a_refused_envelope_stays_queued(
    broker: BackgroundBroker, nodes: NodeFactory, tmp_path: Path
) -> None:
    clinic = enrol(broker, tmp_path / "others", "lantern-clinic")
    node = nodes.make(name="harbour-shelter")
    with OperatorClient(broker.settings.home) as operator:
        code = operator.enrolment_code("harbour-shelter", 1)
    link = directory_sync.enrol(node.home, node.keyring.identity, code, "Harbour", ["medical"])
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
                crypto.LABEL_STATUS,
                f"status {index}".encode(),
            ),
            t=NOW,
        )
    referrals = ReferralStore(node.store)
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
    (left,) = referrals.pending_outbox()
    assert left.recipient_id == "no-such-agency"
    assert "no enrolled agency 'no-such-agency'" in left.last_error
    delivered = receive(clinic)
    assert sorted(
        crypto.open_sealed(
            clinic.identity, node.keyring.identity.public, crypto.LABEL_STATUS, d.sealed_envelope
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
