"""Real servers expose Prometheus metrics that move, and report NOT_SERVING without a database.

Every test starts a real node or broker (TLS gRPC, real SQLite or PostgreSQL) with a
``metrics_port`` and reads http://127.0.0.1:PORT/metrics as a scraper would. Counters are global
to the process, so each check compares a scrape taken before the calls with one taken after.
"""

from __future__ import annotations

import dataclasses
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import make_url

from broker.operator_client import OperatorClient
from broker.server import RunningBroker, start_broker
from node.client import NodeClient
from node.server import RunningNode, start_node
from tessera import rpc
from tessera.config import Limits, Settings
from tessera.errors import ConfigError
from tessera.loop import LoopThread
from tessera.v1 import node_pb2 as node_pb
from tessera.v1 import node_pb2_grpc as node_grpc
from tessera.v1 import relay_pb2 as relay_pb
from tessera.v1 import relay_pb2_grpc as relay_grpc
from tests.support import (
    PASSPHRASE,
    BackgroundBroker,
    BackgroundNode,
    make_broker,
    make_node,
    unlock,
    wait_for,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
GET_STATUS = "/tessera.v1.Node/GetStatus"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> Samples:
    """Every sample the endpoint serves, keyed by name and sorted labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert reply.status == 200
        body = reply.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def scrape_once_counted(port: int, before: Samples, method: str, code: str) -> Samples:
    """A scrape taken once the call to ``method`` refused with ``code`` is counted.

    The interceptor counts a refusal as its handler unwinds, which can be just after the caller
    has its status (a long garbage collection in the server's thread, say, after a big test
    run): waiting for that one count keeps every other assertion exact.
    """
    name = "tessera_rpc_requests_total"
    start = value(before, name, method=method, code=code)

    def counted() -> Samples | None:
        samples = scrape(port)
        return samples if value(samples, name, method=method, code=code) > start else None

    return wait_for(counted, f"the {code} call to {method} to be counted", timeout=5)


def metrics_refused(port: int) -> bool:
    try:
        scrape(port)
    except OSError:
        return True
    return False


# --- node -----------------------------------------------------------------------------------


@pytest.fixture
def node(tmp_path: Path) -> Iterator[BackgroundNode]:
    settings = dataclasses.replace(make_node(tmp_path / "node"), metrics_port=free_port())
    running = BackgroundNode(settings)
    try:
        yield running
    finally:
        running.stop()


def test_node_counts_calls_refusals_and_cases(node: BackgroundNode) -> None:
    port = node.settings.metrics_port
    assert node.running.metrics is not None
    assert node.running.metrics.port == port
    before = scrape(port)

    with NodeClient(node.settings.home, unlock=unlock) as admin:
        for _ in range(3):
            assert admin.status().name == "Harbour Shelter"
    cert = node.settings.cert_path.read_bytes()
    channel = rpc.open_channel(node.address, cert, None, Limits().max_message_bytes)
    with pytest.raises(grpc.RpcError) as info:
        node_grpc.NodeStub(channel).GetStatus(node_pb.GetStatusRequest(), timeout=5)
    channel.close()
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

    after = scrape_once_counted(port, before, GET_STATUS, "UNAUTHENTICATED")
    requests = "tessera_rpc_requests_total"
    ok_before = value(before, requests, method=GET_STATUS, code="OK")
    assert value(after, requests, method=GET_STATUS, code="OK") - ok_before == 3
    refused_before = value(before, requests, method=GET_STATUS, code="UNAUTHENTICATED")
    assert value(after, requests, method=GET_STATUS, code="UNAUTHENTICATED") - refused_before == 1
    failures = "tessera_auth_failures_total"
    assert total(after, failures) - total(before, failures) == 1
    latency = "tessera_rpc_latency_seconds_count"
    assert value(after, latency, method=GET_STATUS) - value(before, latency, method=GET_STATUS) == 4
    assert value(after, "tessera_database_up") == 1
    assert ("tessera_node_cases", ()) in after


def test_node_stops_serving_metrics_when_it_stops(tmp_path: Path) -> None:
    port = free_port()
    running = BackgroundNode(dataclasses.replace(make_node(tmp_path / "n"), metrics_port=port))
    assert not metrics_refused(port)
    running.stop()
    assert metrics_refused(port)


def test_metrics_are_off_unless_a_port_is_set(tmp_path: Path) -> None:
    running = BackgroundNode(make_node(tmp_path / "n"))
    try:
        assert running.settings.metrics_port == 0
        assert running.running.metrics is None
    finally:
        running.stop()


def test_a_metrics_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = dataclasses.replace(
            make_node(tmp_path / "n"), metrics_port=taken.getsockname()[1]
        )
        loop = LoopThread()
        try:
            with pytest.raises(ConfigError, match="cannot serve metrics") as info:
                loop.run(start_node(settings, PASSPHRASE))
        finally:
            loop.close()
    assert "metrics_port" in (info.value.hint or "")


# --- broker ---------------------------------------------------------------------------------


def test_broker_counts_calls_refusals_and_waiting_envelopes(tmp_path: Path) -> None:
    port = free_port()
    broker = BackgroundBroker(
        dataclasses.replace(make_broker(tmp_path / "broker"), metrics_port=port)
    )
    try:
        before = scrape(port)
        with OperatorClient(broker.settings.home) as operator:
            operator.enrolment_code("harbour-shelter", 1)
        cert = broker.settings.cert_path.read_bytes()
        channel = rpc.open_channel(broker.address, cert, None, Limits().max_message_bytes)
        with pytest.raises(grpc.RpcError) as info:
            relay_grpc.RelayStub(channel).Acknowledge(relay_pb.AcknowledgeRequest(), timeout=5)
        channel.close()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        after = scrape_once_counted(
            port, before, "/tessera.v1.Relay/Acknowledge", "UNAUTHENTICATED"
        )
    finally:
        broker.stop()

    requests = "tessera_rpc_requests_total"
    issue = "/tessera.v1.Directory/IssueEnrolmentToken"
    ack = "/tessera.v1.Relay/Acknowledge"
    assert (
        value(after, requests, method=issue, code="OK")
        - value(before, requests, method=issue, code="OK")
        == 1
    )
    assert (
        value(after, requests, method=ack, code="UNAUTHENTICATED")
        - value(before, requests, method=ack, code="UNAUTHENTICATED")
        == 1
    )
    failures = "tessera_auth_failures_total"
    assert total(after, failures) - total(before, failures) == 1
    assert value(after, "tessera_envelopes_waiting") == 0
    assert metrics_refused(port)


# --- health when the database goes away (PostgreSQL, reversibly) ----------------------------


def _shut_out(database_url: str, allow: bool) -> None:
    """Refuse (or allow again) connections to the test database, dropping the open ones."""
    url = make_url(database_url)
    name = url.database
    admin = url.set(drivername="postgresql", database="postgres")
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allow).lower()}')
        if not allow:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )


def _health(address: str, cert: bytes) -> int:
    channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=cert))
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status)
    finally:
        channel.close()


def _wait_for(address: str, cert: bytes, status: int, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while (seen := _health(address, cert)) != status:
        assert time.monotonic() < deadline, f"health stayed {seen}, wanted {status}"
        time.sleep(0.1)


def _check_health_follows_database(
    settings: Settings, address: str, database_url: str, port: int
) -> None:
    cert = settings.cert_path.read_bytes()
    serving = health_pb2.HealthCheckResponse.SERVING
    assert _health(address, cert) == serving
    _shut_out(database_url, allow=False)
    try:
        _wait_for(address, cert, health_pb2.HealthCheckResponse.NOT_SERVING)
        assert value(scrape(port), "tessera_database_up") == 0
    finally:
        _shut_out(database_url, allow=True)
    _wait_for(address, cert, serving)
    assert value(scrape(port), "tessera_database_up") == 1


def test_node_reports_not_serving_while_its_database_refuses_connections(
    tmp_path: Path, postgres_url: str
) -> None:
    port = free_port()
    settings = dataclasses.replace(
        make_node(tmp_path / "node", database_url=postgres_url), metrics_port=port
    )
    loop = LoopThread()
    running: RunningNode = loop.run(start_node(settings, PASSPHRASE, health_interval=0.2))
    try:
        _check_health_follows_database(settings, running.address, postgres_url, port)
    finally:
        loop.run(running.stop(grace=0.5))
        loop.close()


def test_broker_reports_not_serving_while_its_database_refuses_connections(
    tmp_path: Path, postgres_url: str
) -> None:
    port = free_port()
    settings = dataclasses.replace(
        make_broker(tmp_path / "broker", database_url=postgres_url), metrics_port=port
    )
    loop = LoopThread()
    running: RunningBroker = loop.run(start_broker(settings, health_interval=0.2))
    try:
        _check_health_follows_database(settings, running.address, postgres_url, port)
    finally:
        loop.run(running.stop(grace=0.5))
        loop.close()
