"""Signed but malformed requests to the broker's Directory get a clear status, never INTERNAL.

Found by an attacker's probe (issue 16): a garbage RotateKeys statement, and GetEntries or
GetConsistency sizes beyond the log (up to 2**64 - 1, past SQLite's integer), raised unhandled
exceptions: INTERNAL and a traceback in the broker's log. Each is sent here by an enrolled agency
over TLS, signed; the broker must answer INVALID_ARGUMENT (or another typed status) and keep
serving, with nothing appended to the directory.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tessera import crypto, labels, rpc
from tessera.config import Limits
from tessera.v1 import common_pb2 as common_pb
from tessera.v1 import directory_pb2 as directory_pb
from tessera.v1 import directory_pb2_grpc as directory_grpc
from tests.support import Agency, BackgroundBroker, enrol, make_broker

U64 = 2**64 - 1
I64 = 2**63


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BackgroundBroker]:
    running = BackgroundBroker(make_broker(tmp_path / "broker"))
    try:
        yield running
    finally:
        running.stop()


def _call(agency: Agency, method: str, request: Any) -> Any:
    channel = rpc.open_channel(
        agency.link.address, agency.link.certificate, agency.identity, Limits().max_message_bytes
    )
    try:
        return getattr(directory_grpc.DirectoryStub(channel), method)(request, timeout=10)
    finally:
        channel.close()


def _size_and_chain(reply: Any) -> tuple[int, bytes]:
    head = directory_pb.LogHead.FromString(reply.head.body)
    return head.size, head.chain


MALFORMED = [
    ("RotateKeys", "garbage body"),
    ("RotateKeys", directory_pb.RotateKeysRequest(possession_signature=b"x")),
    ("GetEntries", directory_pb.GetEntriesRequest(since=U64)),
    ("GetEntries", directory_pb.GetEntriesRequest(since=I64)),
    ("GetEntries", directory_pb.GetEntriesRequest(since=10_000, limit=2**32 - 1)),
    ("GetConsistency", directory_pb.GetConsistencyRequest(from_size=U64)),
    ("GetConsistency", directory_pb.GetConsistencyRequest(from_size=1, to_size=U64)),
    ("GetConsistency", directory_pb.GetConsistencyRequest(from_size=I64, to_size=I64)),
    ("GetConsistency", directory_pb.GetConsistencyRequest(from_size=2, to_size=1)),
]


@pytest.mark.parametrize(("method", "request_"), MALFORMED)
def test_a_malformed_signed_request_gets_a_clear_status_not_internal(
    broker: BackgroundBroker,
    tmp_path: Path,
    method: str,
    request_: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    agency = enrol(broker, tmp_path, "harbour-shelter")
    if (
        request_ == "garbage body"
    ):  # signed by the agency's own key, over bytes that parse as nothing
        body = b"\xff\x00garbage"
        request_ = directory_pb.RotateKeysRequest(
            statement=common_pb.SignedBlob(
                body=body,
                signature=agency.identity.sign(labels.LABEL_DIRECTORY_ENTRY, body),
                signer=agency.identity.public.signing_key,
            ),
            possession_signature=agency.identity.sign(labels.LABEL_KEY_ROTATION, body),
        )
    before = _call(agency, "GetHead", directory_pb.GetHeadRequest())
    with caplog.at_level(logging.ERROR), pytest.raises(grpc.RpcError) as caught:
        _call(agency, method, request_)
    code = caught.value.code()
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, caught.value.details())
    assert caught.value.details() and "internal" not in caught.value.details().lower()
    assert not [r for r in caplog.records if r.exc_info], "a traceback reached the log"
    after = _call(agency, "GetHead", directory_pb.GetHeadRequest())
    assert _size_and_chain(after) == _size_and_chain(before)  # nothing appended


def test_a_broker_log_rolled_back_behind_a_node_raises_the_rollback_alarm(tmp_path: Path) -> None:
    """GetEntries past the end is now refused; a node whose pinned log is longer than the
    broker's (a broker restored from an older copy) still gets the integrity alarm, not a usage
    error."""
    import sqlite3

    from node import directory_sync
    from tessera.errors import CryptoError

    settings = make_broker(tmp_path / "broker")
    broker = BackgroundBroker(settings)
    try:
        shelter = enrol(broker, tmp_path, "harbour-shelter")
        enrol(broker, tmp_path, "lantern-clinic")
        assert directory_sync.sync(shelter.home, shelter.identity, shelter.link).size == 2
    finally:
        broker.stop()
    with sqlite3.connect(settings.home / "tessera.db") as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        log = next(t for t in tables if "log" in t and t.startswith("broker_"))
        db.execute(f"DELETE FROM {log} WHERE sequence = 2")
    restored = BackgroundBroker(settings)
    try:
        link = dataclasses.replace(shelter.link, address=restored.address)  # a new port
        with pytest.raises(CryptoError):
            directory_sync.sync(shelter.home, shelter.identity, link)
    finally:
        restored.stop()


def _raw_call(agency: Agency, method: str, body: bytes, *, signed: bool) -> grpc.RpcError:
    """Send ``body`` as it is (no protobuf on the client side), signed by ``agency`` or not."""
    channel = rpc.open_channel(
        agency.link.address, agency.link.certificate, None, Limits().max_message_bytes
    )
    try:
        call = channel.unary_unary(
            method, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        metadata = crypto.sign_request(agency.identity, method, body).to_metadata()
        with pytest.raises(grpc.RpcError) as caught:
            call(body, timeout=20, metadata=metadata if signed else None)
        return caught.value
    finally:
        channel.close()


def test_the_signature_is_checked_before_the_body_is_parsed(
    broker: BackgroundBroker, tmp_path: Path
) -> None:
    """Bytes that are no protobuf at all: unsigned, the broker answers UNAUTHENTICATED (it never
    parsed them); signed by an enrolled agency, INVALID_ARGUMENT naming the method."""
    agency = enrol(broker, tmp_path, "harbour-shelter")
    method = "/tessera.v1.Relay/SendBatch"
    garbage = b"\xff" * (8 * 1024 * 1024)  # 8 MiB of an invalid wire type
    unsigned = _raw_call(agency, method, garbage, signed=False)
    assert unsigned.code() == grpc.StatusCode.UNAUTHENTICATED, unsigned.details()
    signed = _raw_call(agency, method, garbage, signed=True)
    assert signed.code() == grpc.StatusCode.INVALID_ARGUMENT, signed.details()
    assert "not a valid protobuf message" in (signed.details() or "")


def test_a_request_over_the_brokers_request_limit_is_refused_before_it_is_read(
    broker: BackgroundBroker, tmp_path: Path
) -> None:
    """The broker takes requests of at most ``max_request_bytes`` (16 MiB): a larger one, even
    unsigned, is refused from its length prefix; the broker then serves the next call."""
    agency = enrol(broker, tmp_path, "harbour-shelter")
    limit = Limits().max_request_bytes
    refused = _raw_call(agency, "/tessera.v1.Relay/SendBatch", b"\xff" * (limit + 1), signed=False)
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.details()
    assert _call(agency, "GetHead", directory_pb.GetHeadRequest()).head.body
