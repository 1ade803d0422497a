"""A real broker over TLS with real enrolled nodes: enrolment, the directory, and the relay.

Attacks: a replayed or forged request, an unenrolled or revoked key, an oversized or misaddressed
envelope, a reused or forged enrolment code, a directory entry altered in the broker's database.
"""

from __future__ import annotations

import datetime as dt
import shutil
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker import identity as broker_identity
from broker.domain import StoredLogEntry
from broker.operator_client import OperatorClient
from broker.service import DirectoryView
from broker.store import BrokerStore
from broker.store.database import open_database
from node import directory_sync
from node.keyring import open_keyring
from tessera import config, crypto, directory, enrolment, labels, rpc
from tessera.config import Limits
from tessera.errors import ConfigError, CryptoError, InvalidInput, TesseraError
from tessera.v1 import directory_pb2 as directory_pb
from tessera.v1 import directory_pb2_grpc as directory_grpc
from tessera.v1 import relay_pb2 as relay_pb
from tessera.v1 import relay_pb2_grpc as relay_grpc
from tests.support import (
    PASSPHRASE,
    Agency,
    BackgroundBroker,
    disk_bytes,
    enrol,
    make_broker,
    make_node,
    receive,
    seal,
    send,
)

MARKER = "Zorvanka-Quillimet-7731"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BackgroundBroker]:
    running = BackgroundBroker(make_broker(tmp_path / "broker", delivery_lease_seconds=1.0))
    try:
        yield running
    finally:
        running.stop()


def receive_status(
    broker: BackgroundBroker, agency: Agency, signer: crypto.Identity
) -> grpc.StatusCode:
    """The status a Receive signed by ``signer`` gets from ``broker`` (over ``agency``'s
    pinned certificate)."""
    channel = rpc.open_channel(
        broker.address, agency.link.certificate, signer, Limits().max_message_bytes
    )
    try:
        list(relay_grpc.RelayStub(channel).Receive(relay_pb.ReceiveRequest(), timeout=5))
    except grpc.RpcError as exc:
        return exc.code()
    finally:
        channel.close()
    return grpc.StatusCode.OK


@pytest.fixture
def replicas(postgres_url: str, tmp_path: Path) -> Iterator[tuple[BackgroundBroker, ...]]:
    """Two broker processes of one region on one PostgreSQL database (same identity, their
    own ports), as behind a load balancer."""
    first = make_broker(tmp_path / "broker-a", database_url=postgres_url)
    second_home = tmp_path / "broker-b"
    shutil.copytree(first.home, second_home, ignore=shutil.ignore_patterns("run", "tessera.db*"))
    broker_a = BackgroundBroker(first)
    try:
        broker_b = BackgroundBroker(config.load(second_home, {}))
    except BaseException:
        broker_a.stop()
        raise
    try:
        yield broker_a, broker_b
    finally:
        broker_b.stop()
        broker_a.stop()


def test_enrolment_pins_keys_and_the_code_is_single_use(
    broker: BackgroundBroker, tmp_path: Path
) -> None:
    shelter = enrol(broker, tmp_path, "harbour-shelter")
    clinic = enrol(broker, tmp_path, "lantern-clinic")
    cache = directory_sync.sync(shelter.home, shelter.identity, shelter.link)
    assert set(cache.records) == {"harbour-shelter", "lantern-clinic"}
    assert cache.records["lantern-clinic"].identity == clinic.identity.public
    assert cache.size == 2
    with OperatorClient(broker.settings.home) as operator:
        code = operator.enrolment_code("third-agency", 1)
    home = tmp_path / "third"
    make_node(home, name="Third")
    identity = open_keyring(home, PASSPHRASE).identity
    directory_sync.enrol(home, identity, code, "Third")
    with pytest.raises(TesseraError):  # the same code a second time
        directory_sync.enrol(tmp_path / "lantern-clinic", clinic.identity, code, "Again")


def test_a_code_whose_certificate_does_not_match_is_refused(
    broker: BackgroundBroker, tmp_path: Path
) -> None:
    with OperatorClient(broker.settings.home) as operator:
        code = enrolment.decode(operator.enrolment_code("harbour-shelter", 1))
    forged = enrolment.EnrolmentCode(
        code.broker_address, "00" * 32, code.token, code.agency_id, code.region
    ).encode()
    home = tmp_path / "n"
    make_node(home)
    with pytest.raises(InvalidInput, match="does not match"):
        directory_sync.enrol(home, open_keyring(home, PASSPHRASE).identity, forged, "N")
    with pytest.raises(InvalidInput, match="not a Tessera enrolment code"):
        directory_sync.enrol(home, open_keyring(home, PASSPHRASE).identity, "hello", "N")


def test_an_envelope_travels_once_and_the_broker_never_sees_plaintext(
    broker: BackgroundBroker, tmp_path: Path
) -> None:
    shelter = enrol(broker, tmp_path, "harbour-shelter")
    clinic = enrol(broker, tmp_path, "lantern-clinic")
    payload = f"referral for {MARKER}".encode()
    sealed = seal(shelter, clinic, payload)
    first = send(shelter, clinic, payload, "ref-1", sealed)
    again = send(shelter, clinic, payload, "ref-1", sealed)  # a retry after a lost answer
    assert not first.duplicate and again.duplicate
    receipt = first.receipt
    crypto.verify(shelter.link.broker_key, labels.LABEL_RECEIPT, receipt.body, receipt.signature)
    delivered = receive(clinic)
    assert len(delivered) == 1
    assert delivered[0].sender_agency_id == "harbour-shelter"
    opened = crypto.open_sealed(
        clinic.identity,
        shelter.identity.public,
        labels.LABEL_ENVELOPE,
        delivered[0].sealed_envelope,
    )
    assert opened == payload
    assert receive(clinic) == []  # acknowledged: deleted
    assert MARKER.encode() not in disk_bytes(broker.settings)


def test_an_unacknowledged_envelope_is_delivered_again_with_the_same_id(
    broker: BackgroundBroker, tmp_path: Path
) -> None:
    shelter = enrol(broker, tmp_path, "harbour-shelter")
    clinic = enrol(broker, tmp_path, "lantern-clinic")
    send(shelter, clinic, b"x", "ref-2")
    first = receive(clinic, ack=False)  # the recipient dies before acknowledging
    time.sleep(1.2)  # the lease (1 s in this test) runs out
    second = receive(clinic)
    assert [d.delivery_id for d in second] == [d.delivery_id for d in first]
    assert second[0].attempt == 2


def test_requests_from_strangers_replays_and_revoked_agencies_are_refused(
    broker: BackgroundBroker, tmp_path: Path
) -> None:
    shelter = enrol(broker, tmp_path, "harbour-shelter")
    clinic = enrol(broker, tmp_path, "lantern-clinic")
    stranger = crypto.Identity.generate()
    assert receive_status(broker, shelter, stranger) == grpc.StatusCode.UNAUTHENTICATED

    plain = rpc.open_channel(
        broker.address, shelter.link.certificate, None, Limits().max_message_bytes
    )
    stub = relay_grpc.RelayStub(plain)
    request = relay_pb.SendRequest(
        recipient_agency_id="lantern-clinic", idempotency_key="k", sealed_envelope=b"\x01" * 64
    )
    signature = crypto.sign_request(
        shelter.identity, "/tessera.v1.Relay/Send", request.SerializeToString()
    )
    stub.Send(request, metadata=signature.to_metadata(), timeout=5)
    with pytest.raises(grpc.RpcError) as info:  # the captured request, replayed
        stub.Send(request, metadata=signature.to_metadata(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

    too_big = relay_pb.SendRequest(
        recipient_agency_id="lantern-clinic",
        idempotency_key="big",
        sealed_envelope=b"\x00" * (Limits().max_envelope_bytes + 1),
    )
    with pytest.raises(grpc.RpcError) as info:
        relay_grpc.RelayStub(shelter.relay()[0]).Send(too_big, timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    nowhere = relay_pb.SendRequest(
        recipient_agency_id="no-such-agency", idempotency_key="n", sealed_envelope=b"\x01" * 64
    )
    with pytest.raises(grpc.RpcError) as info:
        relay_grpc.RelayStub(shelter.relay()[0]).Send(nowhere, timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    with OperatorClient(broker.settings.home) as operator:
        operator.revoke("harbour-shelter", "laptop lost")
    with pytest.raises(grpc.RpcError) as info:
        relay_grpc.RelayStub(shelter.relay()[0]).Send(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    cache = directory_sync.sync(clinic.home, clinic.identity, clinic.link)
    assert cache.records["harbour-shelter"].revoked
    # The broker keeps serving everyone else.
    assert receive(clinic) is not None
    plain.close()


def test_an_agency_key_swapped_in_the_database_does_not_let_a_stranger_in(
    broker: BackgroundBroker, tmp_path: Path
) -> None:
    # The broker authenticates from its verified view of the signed log, not from the derived
    # agency table: someone who can write the database cannot slip their own key in.
    shelter = enrol(broker, tmp_path, "harbour-shelter")
    enrol(broker, tmp_path, "lantern-clinic")
    stranger = crypto.Identity.generate()
    database = broker.settings.effective_database_url.removeprefix("sqlite:///")
    with sqlite3.connect(database) as connection:
        changed = connection.execute(
            "UPDATE broker_agency SET signing_key = ? WHERE agency_id = ?",
            (stranger.public.signing_key, "harbour-shelter"),
        ).rowcount
    assert changed == 1
    assert receive_status(broker, shelter, stranger) == grpc.StatusCode.UNAUTHENTICATED
    # The real agency is still served.
    assert receive(shelter) == []


@pytest.mark.postgres
def test_broker_processes_on_one_database_see_enrolments_and_revocations_at_once(
    replicas: tuple[BackgroundBroker, BackgroundBroker], tmp_path: Path
) -> None:
    # Each broker process authenticates from its own in-memory view of the directory. An agency
    # enrolled through one process is served by another at once, and one revoked through one
    # process is refused by the other on its very next request.
    broker_a, broker_b = replicas
    assert broker_a.address != broker_b.address
    shelter = enrol(broker_a, tmp_path, "harbour-shelter")
    clinic = enrol(broker_a, tmp_path, "lantern-clinic")
    via_b = rpc.open_channel(
        broker_b.address, shelter.link.certificate, shelter.identity, Limits().max_message_bytes
    )
    stub_b = relay_grpc.RelayStub(via_b)
    request = relay_pb.SendRequest(
        recipient_agency_id="lantern-clinic", idempotency_key="k1", sealed_envelope=b"\x01" * 64
    )
    assert not stub_b.Send(request, timeout=10).duplicate  # enrolled through A, served by B

    with OperatorClient(broker_a.settings.home) as operator:
        operator.revoke("harbour-shelter", "laptop lost")
    request.idempotency_key = "k2"
    with pytest.raises(grpc.RpcError) as info:
        stub_b.Send(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in (info.value.details() or "")
    # Broker B keeps serving everyone else: the clinic receives what was sent before.
    clinic_b = rpc.open_channel(
        broker_b.address, clinic.link.certificate, clinic.identity, Limits().max_message_bytes
    )
    deliveries = list(relay_grpc.RelayStub(clinic_b).Receive(relay_pb.ReceiveRequest(), timeout=10))
    assert [d.sender_agency_id for d in deliveries] == ["harbour-shelter"]
    via_b.close()
    clinic_b.close()


def test_a_directory_entry_altered_in_the_database_is_detected_by_nodes(
    broker: BackgroundBroker, tmp_path: Path
) -> None:
    import sqlite3

    shelter = enrol(broker, tmp_path, "harbour-shelter")
    fresh_home = tmp_path / "late"
    make_node(fresh_home)
    late_identity = open_keyring(fresh_home, PASSPHRASE).identity
    enrol(broker, tmp_path, "lantern-clinic")
    with sqlite3.connect(broker.settings.home / "tessera.db") as db:
        table, column = _log_table(db)
        blob = db.execute(f"SELECT {column} FROM {table} WHERE sequence = 2").fetchone()[0]
        tampered = bytearray(blob)
        tampered[len(tampered) // 2] ^= 0x01
        db.execute(f"UPDATE {table} SET {column} = ? WHERE sequence = 2", (bytes(tampered),))
    # The node that already verified entry 1 sees a changed entry 2.
    with pytest.raises((CryptoError, ConfigError, TesseraError)):
        directory_sync.sync(shelter.home, shelter.identity, shelter.link)
    del late_identity


def _log_table(db: object) -> tuple[str, str]:
    import sqlite3

    assert isinstance(db, sqlite3.Connection)
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    table = next(t for t in tables if "log" in t and t.startswith("broker_"))
    columns = [r[1] for r in db.execute(f"PRAGMA table_info({table})")]
    column = next(c for c in columns if c in ("blob", "entry", "body", "entry_blob"))
    return table, column


def test_an_agency_over_its_send_rate_is_told_to_slow_down(tmp_path: Path) -> None:
    broker = BackgroundBroker(make_broker(tmp_path / "broker", sends_per_minute=3))
    try:
        shelter = enrol(broker, tmp_path, "harbour-shelter")
        clinic = enrol(broker, tmp_path, "lantern-clinic")
        for number in range(3):
            send(shelter, clinic, b"x", f"k{number}")
        with pytest.raises(grpc.RpcError) as info:
            send(shelter, clinic, b"x", "k3")
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "more than 3 envelopes a minute" in (info.value.details() or "")
        assert len(receive(clinic)) == 3  # the refused one was not stored
        send(clinic, shelter, b"y", "other")  # other agencies are unaffected
    finally:
        broker.stop()


def test_asyncio_clients_sign_unary_and_streaming_calls(
    broker: BackgroundBroker, tmp_path: Path
) -> None:
    import asyncio

    shelter = enrol(broker, tmp_path, "harbour-shelter")
    clinic = enrol(broker, tmp_path, "lantern-clinic")
    sealed = seal(shelter, clinic, b"hello")

    async def exchange() -> list[relay_pb.Delivery]:
        sender = rpc.open_aio_channel(
            broker.address, shelter.link.certificate, shelter.identity, Limits().max_message_bytes
        )
        receiver = rpc.open_aio_channel(
            broker.address, clinic.link.certificate, clinic.identity, Limits().max_message_bytes
        )
        try:
            await relay_grpc.RelayStub(sender).Send(
                relay_pb.SendRequest(
                    recipient_agency_id="lantern-clinic",
                    idempotency_key="aio",
                    sealed_envelope=sealed,
                ),
                timeout=10,
            )
            stream = relay_grpc.RelayStub(receiver).Receive(
                relay_pb.ReceiveRequest(follow=False), timeout=10
            )
            return [delivery async for delivery in stream]
        finally:
            await sender.close()
            await receiver.close()

    delivered = asyncio.run(exchange())
    assert [d.sender_agency_id for d in delivered] == ["harbour-shelter"]


@pytest.mark.postgres
def test_a_request_replayed_to_another_broker_process_is_refused(
    replicas: tuple[BackgroundBroker, BackgroundBroker], tmp_path: Path
) -> None:
    # Each process has its own in-memory ReplayGuard; only the nonces they share through the
    # database stop a request captured on its way to one process from being played to another,
    # whether after it or at the same moment.
    shelter = enrol(replicas[0], tmp_path, "harbour-shelter")
    clinic = enrol(replicas[0], tmp_path, "lantern-clinic")
    channels = [
        rpc.open_channel(broker.address, shelter.link.certificate, None, Limits().max_message_bytes)
        for broker in replicas
    ]
    stubs = [relay_grpc.RelayStub(channel) for channel in channels]

    def signed(key: str) -> tuple[relay_pb.SendRequest, list[tuple[str, str]]]:
        request = relay_pb.SendRequest(
            recipient_agency_id="lantern-clinic", idempotency_key=key, sealed_envelope=b"\x01" * 64
        )
        signature = crypto.sign_request(
            shelter.identity, "/tessera.v1.Relay/Send", request.SerializeToString()
        )
        return request, signature.to_metadata()

    def status(
        stub: relay_grpc.RelayStub, request: relay_pb.SendRequest, metadata: list[tuple[str, str]]
    ) -> grpc.StatusCode:
        try:
            stub.Send(request, metadata=metadata, timeout=10)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
        return grpc.StatusCode.OK

    try:
        request, metadata = signed("after")
        assert status(stubs[0], request, metadata) == grpc.StatusCode.OK
        assert status(stubs[1], request, metadata) == grpc.StatusCode.UNAUTHENTICATED
        request, metadata = signed("at-once")
        with ThreadPoolExecutor(2) as pool:
            raced = list(pool.map(lambda stub: status(stub, request, metadata), stubs))
    finally:
        for channel in channels:
            channel.close()
    assert sorted(code.name for code in raced) == ["OK", "UNAUTHENTICATED"]
    assert sorted(d.sealed_envelope for d in receive(clinic)) == [b"\x01" * 64] * 2


class CountingStore(BrokerStore):
    """The real store, counting its reads of the directory log."""

    reads = 0

    def log_entries(self, since: int, limit: int) -> list[StoredLogEntry]:
        self.reads += 1
        return super().log_entries(since, limit)


def test_the_directory_view_reads_a_long_log_in_pages_and_only_when_it_grew(
    broker: BackgroundBroker, tmp_path: Path
) -> None:
    # A view far behind the log (a broker process started on a large directory) must verify
    # all of it, not its first page only; and one already current must not read it again.
    for agency_id in ("harbour-shelter", "lantern-clinic", "riverside-legal"):
        enrol(broker, tmp_path, agency_id)
    with OperatorClient(broker.settings.home) as operator:
        operator.revoke("lantern-clinic", "laptop lost")
    engine = open_database(broker.settings.effective_database_url)
    try:
        store = CountingStore(engine)
        identity = broker_identity.load_identity(broker.settings.home)
        paged = DirectoryView(store, identity, "north", page=2)
        paged.refresh()
        assert store.reads == 3  # entries 1-2, 3-4, then nothing more
        whole = DirectoryView(BrokerStore(engine), identity, "north")
        whole.refresh()
        assert (paged.size, paged.chain, paged.records) == (4, whole.chain, whole.records)
        assert paged.records["lantern-clinic"].revoked
        shelter_key = whole.records["harbour-shelter"].identity.signing_key
        assert paged.agency_by_signing_key(shelter_key) == whole.records["harbour-shelter"]

        paged.catch_up(4)  # the size a nonce batch read: nothing new, no read
        assert store.reads == 3
        enrol(broker, tmp_path, "willow-aid")
        paged.catch_up(5)
        assert store.reads == 4 and "willow-aid" in paged.records  # one short page
        paged.catch_up(None)  # size unknown: read
        assert store.reads == 5
    finally:
        engine.dispose()


def test_a_request_accepted_before_a_restart_is_refused_after_it(tmp_path: Path) -> None:
    # The replay window outlives the process: a captured request replayed to the restarted
    # broker (one process on SQLite) within its window is refused, and nothing is stored twice.
    settings = make_broker(tmp_path / "broker")
    broker = BackgroundBroker(settings)
    restarted: BackgroundBroker | None = None
    try:
        shelter = enrol(broker, tmp_path, "harbour-shelter")
        clinic = enrol(broker, tmp_path, "lantern-clinic")
        request = relay_pb.SendRequest(
            recipient_agency_id="lantern-clinic",
            idempotency_key="captured",
            sealed_envelope=seal(shelter, clinic, b"once"),
        )
        signature = crypto.sign_request(
            shelter.identity, "/tessera.v1.Relay/Send", request.SerializeToString()
        )

        def send_signed(running: BackgroundBroker) -> relay_pb.SendResponse:
            channel = rpc.open_channel(
                running.address, shelter.link.certificate, None, Limits().max_message_bytes
            )
            try:
                reply: relay_pb.SendResponse = relay_grpc.RelayStub(channel).Send(
                    request, metadata=signature.to_metadata(), timeout=10
                )
                return reply
            finally:
                channel.close()

        assert not send_signed(broker).duplicate
        broker.stop()
        restarted = BackgroundBroker(settings)
        with pytest.raises(grpc.RpcError) as info:
            send_signed(restarted)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "replay" in str(info.value.details())
        channel = rpc.open_channel(
            restarted.address, clinic.link.certificate, clinic.identity, Limits().max_message_bytes
        )
        try:
            waiting = list(
                relay_grpc.RelayStub(channel).Receive(relay_pb.ReceiveRequest(), timeout=10)
            )
        finally:
            channel.close()
        assert len(waiting) == 1  # stored once
    finally:
        (restarted or broker).stop()


def test_keys_rotate_only_by_their_agency_and_the_old_key_is_refused_afterwards(
    broker: BackgroundBroker, tmp_path: Path
) -> None:
    shelter = enrol(broker, tmp_path, "harbour-shelter")
    clinic = enrol(broker, tmp_path, "lantern-clinic")
    current = directory_sync.sync(clinic.home, clinic.identity, clinic.link)
    new_keys = crypto.Identity.generate()
    statement, possession = directory.rotate_statement(
        shelter.identity, new_keys, current.records["harbour-shelter"], dt.datetime.now(dt.UTC)
    )
    rotate = directory_pb.RotateKeysRequest(statement=statement, possession_signature=possession)

    def directory_stub(identity: crypto.Identity) -> tuple[grpc.Channel, Any]:
        channel = rpc.open_channel(
            broker.address, clinic.link.certificate, identity, Limits().max_message_bytes
        )
        return channel, directory_grpc.DirectoryStub(channel)

    # Another agency cannot put the shelter's rotation through, even a genuine one.
    channel, stub = directory_stub(clinic.identity)
    with pytest.raises(grpc.RpcError) as info:
        stub.RotateKeys(rotate, timeout=10)
    channel.close()
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED

    channel, stub = directory_stub(shelter.identity)
    stub.RotateKeys(rotate, timeout=10)
    channel.close()
    # The old key no longer authenticates anyone; the new one speaks for the shelter.
    with pytest.raises(grpc.RpcError) as info:
        receive(shelter)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    rotated = Agency(shelter.home, shelter.agency_id, new_keys, shelter.link)
    assert receive(rotated) == []
    # Other nodes follow the rotation (signed by the old key): the new key is pinned, no alarm.
    after = directory_sync.sync(clinic.home, clinic.identity, clinic.link)
    assert after.records["harbour-shelter"].identity == new_keys.public
