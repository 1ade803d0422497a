"""Relay.SendBatch against a real broker over TLS, with real enrolled agencies.

A batch must be exactly as safe as the same envelopes sent one by one: each envelope is checked,
stored and receipted on its own (one bad envelope refuses only itself), the rate limit counts
envelopes rather than calls, and the call itself is signed like any other: replayed, altered or
unsigned batches are refused whole and store nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy import Engine, text

from broker.domain import StoredEnvelope
from broker.operator_client import OperatorClient
from broker.service import DirectoryView, RelayServicer
from broker.store import BrokerStore
from broker.store.database import open_database
from tessera import crypto, labels, rpc
from tessera.config import Limits
from tessera.errors import Conflict, Exhausted, InvalidInput, NotFound, Refused
from tessera.v1 import relay_pb2 as relay_pb
from tessera.v1 import relay_pb2_grpc as relay_grpc
from tests.nodefixtures import pg_dump_data
from tests.support import (
    Agency,
    BackgroundBroker,
    disk_bytes,
    enrol,
    make_broker,
    receive,
    seal,
)

MARKER = "Velmora-Tansicot-4418"
SEND_BATCH = "/tessera.v1.Relay/SendBatch"


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def broker(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[BackgroundBroker]:
    """A running broker on SQLite, then on PostgreSQL (every test using it runs on both)."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else ""
    running = BackgroundBroker(
        make_broker(tmp_path / "broker", url, max_envelope_bytes=4096, max_send_batch=100)
    )
    try:
        yield running
    finally:
        running.stop()


def stored_bytes(broker: BackgroundBroker) -> bytes:
    """Everything the broker's database holds: the SQLite file and its WAL, or a pg_dump."""
    url = broker.settings.database_url
    return pg_dump_data(url) if url else disk_bytes(broker.settings)


def envelope(
    sender: Agency, recipient: Agency, key: str, payload: bytes = b"", commitment: bytes = b""
) -> relay_pb.SendRequest:
    return relay_pb.SendRequest(
        recipient_agency_id=recipient.agency_id,
        idempotency_key=key,
        consent_commitment=commitment
        or crypto.digest(labels.LABEL_CONSENT_COMMITMENT, key.encode()),
        sealed_envelope=seal(sender, recipient, payload or f"{MARKER} {key}".encode()),
    )


def send_batch(sender: Agency, *envelopes: relay_pb.SendRequest) -> relay_pb.SendBatchResponse:
    channel, stub = sender.relay()
    try:
        reply: relay_pb.SendBatchResponse = stub.SendBatch(
            relay_pb.SendBatchRequest(envelopes=envelopes), timeout=10
        )
        return reply
    finally:
        channel.close()


def refusal(result: relay_pb.SendResult) -> Exception:
    assert result.HasField("refused"), result
    r = result.refused
    return rpc.error_from_refusal(r.code, r.message, r.hint, r.kind)


def opened(recipient: Agency, sender: Agency, deliveries: list[relay_pb.Delivery]) -> list[bytes]:
    return [
        crypto.open_sealed(
            recipient.identity,
            sender.identity.public,
            labels.LABEL_ENVELOPE,
            delivery.sealed_envelope,
        )
        for delivery in deliveries
    ]


def test_each_envelope_of_a_batch_is_stored_or_refused_on_its_own(
    broker: BackgroundBroker, tmp_path: Path
) -> None:
    shelter = enrol(broker, tmp_path, "harbour-shelter")
    clinic = enrol(broker, tmp_path, "lantern-clinic")
    first = envelope(shelter, clinic, "ref-1")
    oversized = relay_pb.SendRequest(
        recipient_agency_id="lantern-clinic", idempotency_key="big", sealed_envelope=b"\0" * 4097
    )
    nowhere = envelope(shelter, clinic, "lost")
    nowhere.recipient_agency_id = "no-such-agency"
    short_commitment = envelope(shelter, clinic, "short", commitment=b"\x01" * 5)
    empty = relay_pb.SendRequest(recipient_agency_id="lantern-clinic", idempotency_key="empty")
    second = envelope(shelter, clinic, "ref-2")
    same_key_other_bytes = envelope(shelter, clinic, "ref-1", payload=b"something else")

    reply = send_batch(
        shelter, first, oversized, nowhere, short_commitment, empty, second, same_key_other_bytes
    )

    results = list(reply.results)
    assert len(results) == 7
    for result, request in ((results[0], first), (results[5], second)):
        assert result.HasField("accepted") and not result.accepted.duplicate
        blob = result.accepted.receipt
        crypto.verify(shelter.link.broker_key, labels.LABEL_RECEIPT, blob.body, blob.signature)
        receipt = relay_pb.RelayReceipt.FromString(blob.body)
        assert receipt.sender_agency_id == "harbour-shelter"
        assert receipt.idempotency_key == request.idempotency_key
        assert receipt.envelope_digest == crypto.digest(
            labels.LABEL_ENVELOPE, request.sealed_envelope
        )
    assert isinstance(refusal(results[1]), Exhausted)
    assert results[1].refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "4,097 bytes" in results[1].refused.message
    assert isinstance(refusal(results[2]), NotFound)
    assert "no-such-agency" in results[2].refused.message
    assert isinstance(refusal(results[3]), InvalidInput)
    assert isinstance(refusal(results[4]), InvalidInput)
    assert isinstance(refusal(results[6]), Conflict)

    # Only the two good envelopes reached the recipient, intact; the broker kept no plaintext.
    delivered = receive(clinic)
    assert sorted(opened(clinic, shelter, delivered)) == [
        f"{MARKER} ref-1".encode(),
        f"{MARKER} ref-2".encode(),
    ]
    assert receive(clinic) == []
    raw = stored_bytes(broker)
    assert b"harbour-shelter" in raw  # the scan sees the rows (ids are stored in clear)
    # pg_dump prints bytea as hex: look for the marker in that form too.
    assert MARKER.encode() not in raw and MARKER.encode().hex().encode() not in raw


def test_a_repeated_batch_gets_the_original_receipts_and_stores_nothing_twice(
    broker: BackgroundBroker, tmp_path: Path
) -> None:
    shelter = enrol(broker, tmp_path, "harbour-shelter")
    clinic = enrol(broker, tmp_path, "lantern-clinic")
    batch = [envelope(shelter, clinic, f"ref-{i}") for i in range(5)]
    first = send_batch(shelter, *batch)
    again = send_batch(shelter, *batch)  # a retry after the answer was lost
    assert [r.accepted.duplicate for r in first.results] == [False] * 5
    assert [r.accepted.duplicate for r in again.results] == [True] * 5
    assert [r.accepted.receipt.body for r in again.results] == [
        r.accepted.receipt.body for r in first.results
    ]
    assert len(receive(clinic)) == 5


def test_an_empty_oversized_replayed_or_altered_batch_is_refused_whole(
    broker: BackgroundBroker, tmp_path: Path
) -> None:
    shelter = enrol(broker, tmp_path, "harbour-shelter")
    clinic = enrol(broker, tmp_path, "lantern-clinic")
    with pytest.raises(grpc.RpcError) as info:
        send_batch(shelter)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    too_many = [  # the limit is 100
        relay_pb.SendRequest(
            recipient_agency_id="lantern-clinic", idempotency_key=f"many-{i}", sealed_envelope=b"x"
        )
        for i in range(101)
    ]
    with pytest.raises(grpc.RpcError) as info:
        send_batch(shelter, *too_many)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1 to 100 envelopes" in str(info.value.details())

    plain = rpc.open_channel(
        broker.address, shelter.link.certificate, None, Limits().max_message_bytes
    )
    stub = relay_grpc.RelayStub(plain)
    request = relay_pb.SendBatchRequest(envelopes=[envelope(shelter, clinic, "captured")])
    body = request.SerializeToString()
    signature = crypto.sign_request(shelter.identity, SEND_BATCH, body)
    stub.SendBatch(request, metadata=signature.to_metadata(), timeout=5)
    with pytest.raises(grpc.RpcError) as info:  # the captured call, replayed
        stub.SendBatch(request, metadata=signature.to_metadata(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # An envelope slipped into a signed batch: the signature no longer covers the body.
    fresh = crypto.sign_request(shelter.identity, SEND_BATCH, body)
    altered = relay_pb.SendBatchRequest()
    altered.CopyFrom(request)
    altered.envelopes.append(envelope(shelter, clinic, "slipped-in"))
    with pytest.raises(grpc.RpcError) as info:
        stub.SendBatch(altered, metadata=fresh.to_metadata(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as info:  # not signed at all
        stub.SendBatch(request, timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    plain.close()

    # Only the one genuine call stored anything.
    assert opened(clinic, shelter, receive(clinic)) == [f"{MARKER} captured".encode()]


def test_the_rate_limit_counts_envelopes_not_calls(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="broker.service")
    running = BackgroundBroker(make_broker(tmp_path / "broker", sends_per_minute=3))
    try:
        shelter = enrol(running, tmp_path, "harbour-shelter")
        clinic = enrol(running, tmp_path, "lantern-clinic")
        reply = send_batch(shelter, *(envelope(shelter, clinic, f"ref-{i}") for i in range(5)))
        outcomes = [r.WhichOneof("outcome") for r in reply.results]
        assert outcomes == ["accepted"] * 3 + ["refused"] * 2
        late = refusal(reply.results[3])
        assert isinstance(late, Exhausted) and "3 envelopes a minute" in str(late)
        assert "nothing was stored" in str(late)
        assert len(receive(clinic)) == 3
        # The operator's log names each refusal by kind, and nothing of the envelopes.
        refusals = [r for r in caplog.records if r.getMessage() == "relay.envelope_refused"]
        assert len(refusals) == 2
        logged = " ".join(str(vars(r)) for r in refusals)
        assert "EXHAUSTED" in logged and "harbour-shelter" in logged
        assert "ref-3" not in logged and MARKER not in logged
    finally:
        running.stop()


def test_a_revoked_sender_is_refused_and_a_revoked_recipient_refuses_its_envelopes(
    broker: BackgroundBroker, tmp_path: Path
) -> None:
    shelter = enrol(broker, tmp_path, "harbour-shelter")
    clinic = enrol(broker, tmp_path, "lantern-clinic")
    legal = enrol(broker, tmp_path, "riverside-legal")
    with OperatorClient(broker.settings.home) as operator:
        operator.revoke("lantern-clinic", "laptop lost")
    reply = send_batch(
        shelter, envelope(shelter, clinic, "to-revoked"), envelope(shelter, legal, "to-legal")
    )
    assert isinstance(refusal(reply.results[0]), NotFound)
    assert reply.results[1].HasField("accepted")
    sealed_before = envelope(shelter, legal, "after-revocation")
    with OperatorClient(broker.settings.home) as operator:
        operator.revoke("harbour-shelter", "laptop lost")
    with pytest.raises(grpc.RpcError) as info:
        send_batch(shelter, sealed_before)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert len(receive(legal)) == 1


def purge(agency: Agency, commitment: bytes) -> relay_pb.PurgeConsentResponse:
    channel, stub = agency.relay()
    try:
        reply: relay_pb.PurgeConsentResponse = stub.PurgeConsent(
            relay_pb.PurgeConsentRequest(consent_commitment=commitment), timeout=10
        )
        return reply
    finally:
        channel.close()


def test_a_purged_consent_refuses_its_envelopes_and_only_its_sender_can_purge_it(
    broker: BackgroundBroker, tmp_path: Path
) -> None:
    # DESIGN.md section 6: the broker refuses to deliver, and purges, envelopes whose consent
    # was revoked, and refuses every later one under it, a retry of an accepted one included.
    shelter = enrol(broker, tmp_path, "harbour-shelter")
    clinic = enrol(broker, tmp_path, "lantern-clinic")
    revoked = crypto.digest(labels.LABEL_CONSENT_COMMITMENT, b"revoked consent")
    kept = crypto.digest(labels.LABEL_CONSENT_COMMITMENT, b"kept consent")
    delivered = crypto.digest(labels.LABEL_CONSENT_COMMITMENT, b"delivered consent")
    pending = [envelope(shelter, clinic, f"ref-{i}", commitment=revoked) for i in range(2)]
    send_batch(shelter, envelope(shelter, clinic, "early", commitment=delivered))
    assert len(receive(clinic)) == 1  # delivered and acknowledged before the revocation
    send_batch(shelter, *pending, envelope(shelter, clinic, "other", commitment=kept))

    # Another agency naming the same commitment purges nothing of the sender's.
    by_another = purge(clinic, revoked)
    assert (by_another.purged, by_another.already_delivered) == (0, 0)
    assert purge(shelter, revoked).purged == 2
    assert purge(shelter, revoked).purged == 0  # again: harmless
    assert purge(shelter, delivered).already_delivered == 1
    with pytest.raises(grpc.RpcError) as info:
        purge(shelter, revoked[:31])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    later = envelope(shelter, clinic, "later", commitment=revoked)
    reply = send_batch(
        shelter, pending[0], later, envelope(shelter, clinic, "more", commitment=kept)
    )
    assert isinstance(refusal(reply.results[0]), Refused)  # the retry of an accepted envelope
    assert isinstance(refusal(reply.results[1]), Refused)
    assert reply.results[2].HasField("accepted")
    channel, stub = shelter.relay()
    try:
        with pytest.raises(grpc.RpcError) as info:
            stub.Send(envelope(shelter, clinic, "single", commitment=revoked), timeout=10)
    finally:
        channel.close()
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert sorted(opened(clinic, shelter, receive(clinic))) == [
        f"{MARKER} more".encode(),
        f"{MARKER} other".encode(),
    ]


def test_receive_batches_hands_out_what_receive_would_several_to_a_message(
    tmp_path: Path,
) -> None:
    # Small message limit: 6 envelopes of 3,000 bytes cannot share one message of at most 8 KiB
    # (half the limit), so they arrive two to a message, in order, each once.
    running = BackgroundBroker(
        make_broker(tmp_path / "broker", max_message_bytes=16 * 1024, max_envelope_bytes=4096)
    )
    try:
        shelter = enrol(running, tmp_path, "harbour-shelter")
        clinic = enrol(running, tmp_path, "lantern-clinic")
        keys = [f"ref-{i}" for i in range(6)]
        sent = [envelope(shelter, clinic, key, payload=key.encode() * 600) for key in keys]
        for request in sent:  # one at a time: the batch would exceed the small message limit
            assert send_batch(shelter, request).results[0].HasField("accepted")
        channel, stub = clinic.relay()
        try:
            capped = list(
                stub.ReceiveBatches(relay_pb.ReceiveRequest(max_deliveries=5), timeout=10)
            )
            rest = list(stub.ReceiveBatches(relay_pb.ReceiveRequest(), timeout=10))
            stub.Acknowledge(
                relay_pb.AcknowledgeRequest(
                    delivery_ids=[d.delivery_id for b in capped + rest for d in b.deliveries]
                ),
                timeout=10,
            )
        finally:
            channel.close()
        assert [len(batch.deliveries) for batch in capped] == [2, 2, 1]
        delivered = [d for batch in capped + rest for d in batch.deliveries]
        assert [d.sealed_envelope for d in delivered] == [r.sealed_envelope for r in sent]
        assert {d.attempt for d in delivered} == {1}
        assert receive(clinic) == []  # all acknowledged, nothing left or leased
    finally:
        running.stop()


def fill(sender: Agency, count: int) -> list[str]:
    """``count`` small envelopes from ``sender`` to lantern-clinic, in SendBatch calls; the
    keys in order (each envelope's bytes are its key)."""
    keys = [f"bulk-{i:03d}" for i in range(count)]
    for start in range(0, count, 100):
        reply = send_batch(
            sender,
            *(
                relay_pb.SendRequest(
                    recipient_agency_id="lantern-clinic",
                    idempotency_key=key,
                    consent_commitment=crypto.digest(labels.LABEL_CONSENT_COMMITMENT, key.encode()),
                    sealed_envelope=key.encode(),
                )
                for key in keys[start : start + 100]
            ),
        )
        assert all(r.HasField("accepted") for r in reply.results)
    return keys


@dataclasses.dataclass
class LocalRelay:
    """A broker's relay servicer over a real store, driven without a server: for what a real
    stream cannot time (how far it runs ahead of its reader, a cancellation mid-claim)."""

    servicer: RelayServicer
    store: BrokerStore
    engine: Engine
    now: dt.datetime


@contextlib.contextmanager
def local_relay(
    tmp_path: Path, waiting: int, store_class: type[BrokerStore] = BrokerStore
) -> Iterator[LocalRelay]:
    """A relay servicer with ``waiting`` envelopes (their bytes are their keys, k000, ...)
    waiting for lantern-clinic."""
    settings = make_broker(tmp_path / "broker")
    engine = open_database(settings.effective_database_url)
    store = store_class(engine)
    identity = crypto.Identity.generate()
    servicer = RelayServicer(settings, store, identity, DirectoryView(store, identity, "north"))
    now = dt.datetime.now(dt.UTC)
    for i in range(waiting):
        key = f"k{i:03d}"
        store.put_envelope("harbour-shelter", "lantern-clinic", key, b"", key.encode(), now)
    try:
        yield LocalRelay(servicer, store, engine, now)
    finally:
        engine.dispose()


async def settle(relay: LocalRelay, leased: int) -> None:
    """Wait until exactly ``leased`` envelopes are leased to the servicer's process (claims and
    hand-backs run in worker threads), at most 10 s."""
    query = text("SELECT count(*) FROM broker_envelope WHERE lease_owner = :owner")
    for _ in range(500):
        with relay.engine.connect() as connection:
            count = connection.execute(query, {"owner": relay.servicer.owner}).scalar_one()
        if count == leased and not relay.servicer._background:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{count} envelopes still leased, expected {leased}")


def offered_elsewhere(relay: LocalRelay) -> list[StoredEnvelope]:
    """What another broker process would be offered now for lantern-clinic."""
    return BrokerStore(relay.engine).claim(
        "lantern-clinic", "another-process", 1000, 30.0, relay.now
    )


def test_a_stream_that_ends_early_hands_back_what_it_leased_ahead(tmp_path: Path) -> None:
    # The broker leases the next batch while the current one is streamed. A recipient that goes
    # away after the first batch must not leave the next one leased to nobody for a whole lease
    # (30 s): it is handed back at once, as if never offered.
    with local_relay(tmp_path, 250) as relay:
        servicer = relay.servicer

        async def first_batch_then_gone() -> list[StoredEnvelope]:
            leases = servicer._leased("lantern-clinic", relay_pb.ReceiveRequest(follow=True))
            first = await anext(leases)
            await settle(relay, 200)  # the next batch is leased ahead meanwhile
            await leases.aclose()  # the recipient went away
            await settle(relay, 100)  # only what was handed out stays leased
            return first

        first = asyncio.run(first_batch_then_gone())
        rest = offered_elsewhere(relay)
    assert [e.ciphertext.decode() for e in first] == [f"k{i:03d}" for i in range(100)]
    # The 100 handed out stay leased (unacknowledged); the next 100, leased ahead, and the last
    # 50, never claimed, are free at once, each for its first offer.
    assert [e.ciphertext.decode() for e in rest] == [f"k{i:03d}" for i in range(100, 250)]
    assert {e.attempts for e in rest} == {1}


def test_a_long_mailbox_streams_in_order_and_a_capped_stream_leases_no_more_than_it_hands_out(
    broker: BackgroundBroker, tmp_path: Path
) -> None:
    # The broker leases the next batch while streaming the current one; a stream capped by
    # max_deliveries must still lease only what it hands out, or the rest would be held back
    # until their lease ran out.
    shelter = enrol(broker, tmp_path, "harbour-shelter")
    clinic = enrol(broker, tmp_path, "lantern-clinic")
    keys = fill(shelter, 250)
    channel, stub = clinic.relay()
    try:
        capped = list(stub.Receive(relay_pb.ReceiveRequest(max_deliveries=150), timeout=10))
        rest = list(stub.Receive(relay_pb.ReceiveRequest(follow=False), timeout=10))
    finally:
        channel.close()
    assert [bytes(d.sealed_envelope).decode() for d in capped] == keys[:150]
    # Not leased by the capped stream: offered at once, each for the first time.
    assert [bytes(d.sealed_envelope).decode() for d in rest] == keys[150:]
    assert {d.attempt for d in capped + rest} == {1}


def test_receive_batches_honours_a_cap_across_its_leases(
    broker: BackgroundBroker, tmp_path: Path
) -> None:
    shelter = enrol(broker, tmp_path, "harbour-shelter")
    clinic = enrol(broker, tmp_path, "lantern-clinic")
    keys = fill(shelter, 250)
    channel, stub = clinic.relay()
    try:
        capped = list(stub.ReceiveBatches(relay_pb.ReceiveRequest(max_deliveries=150), timeout=10))
        rest = list(stub.ReceiveBatches(relay_pb.ReceiveRequest(), timeout=10))
    finally:
        channel.close()
    assert [len(batch.deliveries) for batch in capped] == [100, 50]
    assert [bytes(d.sealed_envelope).decode() for b in capped for d in b.deliveries] == keys[:150]
    assert [bytes(d.sealed_envelope).decode() for b in rest for d in b.deliveries] == keys[150:]
    assert {d.attempt for b in capped + rest for d in b.deliveries} == {1}


class SlowClaims(BrokerStore):
    """The real store, its claims slowed down so a stream can be cancelled in the middle of
    one (the database work is still real and still commits)."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.claimed = threading.Event()  # set once a claim has committed

    def claim(
        self, recipient_id: str, owner: str, limit: int, lease_seconds: float, now: dt.datetime
    ) -> list[StoredEnvelope]:
        time.sleep(0.3)
        leased = super().claim(recipient_id, owner, limit, lease_seconds, now)
        self.claimed.set()
        return leased


def test_a_stream_cancelled_while_its_claim_runs_hands_that_claim_back(tmp_path: Path) -> None:
    with local_relay(tmp_path, 30, SlowClaims) as relay:
        servicer = relay.servicer

        async def cancelled_mid_claim() -> None:
            leases = servicer._leased("lantern-clinic", relay_pb.ReceiveRequest(follow=True))
            waiting = asyncio.create_task(anext(leases))
            await asyncio.sleep(0.1)  # the claim is running in its thread
            waiting.cancel()  # the recipient's RPC was cancelled
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
            await leases.aclose()
            # The claim still finishes in its thread, leasing all 30, and is then handed back.
            store = relay.store
            assert isinstance(store, SlowClaims)
            assert await asyncio.to_thread(store.claimed.wait, 10)
            await settle(relay, 0)

        asyncio.run(cancelled_mid_claim())
        rest = offered_elsewhere(relay)
    # Nothing was handed out, so nothing stays leased: all 30 are offered at once, first time.
    assert [e.ciphertext.decode() for e in rest] == [f"k{i:03d}" for i in range(30)]
    assert {e.attempts for e in rest} == {1}
