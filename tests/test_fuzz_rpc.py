"""Every RPC of node and broker, fuzzed (issue 16 item 3).

One real broker and one real enrolled node run on loopback ports over TLS, with real SQLite
files, holding real data (cases, a consent, a referral, a statistics round). Each method named in
the generated ``tessera.v1`` descriptors (so a new one is fuzzed with no change here) gets
hypothesis-generated requests, mutations of them and random bytes:

* **signed** by a real credential whose role may call the method (node administrator or
  caseworker; broker agency, operator or coordinator), so the request reaches the handler;
* **unsigned** (no signature, garbage, a stranger's key, a signature over other bytes, a stale
  one), which must be refused as UNAUTHENTICATED before anything is parsed.

A reply passes when it is no INTERNAL or UNKNOWN status, came back before its deadline, and the
servers' log holds no traceback or error; after each method both servers must still answer.
``TESSERA_FUZZ=full`` (``make adversarial``) runs the full profile; see tests/fuzzkit.py.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import access as broker_access
from broker.coordinators import add_coordinator
from broker.stats import StatsClient
from node import access as node_access
from node import directory_sync, htcds, stats
from node.client import NodeClient
from node.domain import StaffRole
from node.keyring import open_keyring
from tessera import credential, crypto, labels, rpc
from tessera.config import Limits
from tessera.needs import NeedCategory, NeedStatus
from tessera.v1 import common_pb2 as common_pb
from tessera.v1 import escrow_pb2 as escrow_pb
from tessera.v1 import node_pb2 as node_pb
from tessera.v1 import stats_pb2 as stats_pb
from tests import fuzzkit
from tests.fuzzkit import TALLY, LogWatch, Pools, Reply
from tests.support import (
    PASSPHRASE,
    BackgroundBroker,
    BackgroundNode,
    enrol,
    enrolled_node,
    make_broker,
    unlock,
)

HARBOUR, LANTERN, FUZZER = "harbour-shelter", "lantern-clinic", "fuzz-agency"
# Which server serves each service. A service added to tessera.v1 fails
# test_every_method_of_every_service_is_fuzzed until it is named here.
SERVER_OF_SERVICE = {
    "tessera.v1.Node": "node",
    "tessera.v1.Stats": "broker",
    "tessera.v1.Relay": "broker",
    "tessera.v1.Escrow": "broker",
    # Last: its Revoke may withdraw an agency the other services' requests name.
    "tessera.v1.Directory": "broker",
}
_ORDER = list(SERVER_OF_SERVICE)
METHODS = sorted(
    fuzzkit.all_methods(),
    key=lambda m: (
        _ORDER.index(m.containing_service.full_name)
        if m.containing_service.full_name in _ORDER
        else len(_ORDER)
    ),
)
FORBIDDEN = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


@dataclass
class World:
    """The running servers, the credentials that may call them and the values worth sending."""

    broker: BackgroundBroker
    node: BackgroundNode
    channels: dict[str, grpc.Channel]
    identities: dict[str, crypto.Identity]  # caller name -> identity
    roles: dict[str, tuple[str, str]]  # caller name -> (server, role)
    pools: Pools
    stranger: crypto.Identity
    watch: LogWatch
    fuzzed: set[str] = field(default_factory=set)

    def server_of(self, method: MethodDescriptor) -> str:
        return SERVER_OF_SERVICE[method.containing_service.full_name]

    def callers(self, method: MethodDescriptor) -> list[str]:
        """The credentials whose role may call ``method`` (``public`` for an open method)."""
        path = fuzzkit.method_path(method)
        server = self.server_of(method)
        if server == "broker" and path in broker_access.PUBLIC:
            return ["public"]
        if server == "node":
            allowed = {r.value for r in node_access.allowed_roles(path)}
        else:
            allowed = set(broker_access.allowed_roles(path))
        return sorted(n for n, (s, role) in self.roles.items() if s == server and role in allowed)

    def check(self, method: MethodDescriptor, how: str, reply: Reply) -> None:
        """The pass criteria for one reply, then the log since the previous reply."""
        TALLY.count(reply)
        self.fuzzed.add(fuzzkit.method_path(method))
        where = f"{fuzzkit.method_path(method)} ({how} request)"
        assert reply.code not in FORBIDDEN, f"{where}: {reply.code.name} {reply.details!r}"
        assert reply.code != grpc.StatusCode.DEADLINE_EXCEEDED, f"{where} hung past its deadline"
        assert reply.seconds < fuzzkit.UNARY_DEADLINE + 5, f"{where} took {reply.seconds:.1f}s"
        if reply.code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
            assert reply.details, f"{where}: {reply.code.name} with no message"
        logged = self.watch.take()
        if logged:
            TALLY.crashes += 1
        assert not logged, f"{where} left a traceback or an error in the log:\n" + "\n".join(logged)


def _channel(address: str, certificate: bytes) -> grpc.Channel:
    limit = Limits().max_message_bytes
    return rpc.open_channel(address, certificate, None, limit)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("fuzz")
    sandbox = root / "cwd"
    sandbox.mkdir()
    previous_cwd = Path.cwd()
    os.chdir(sandbox)  # relative paths a request names (Backup.destination) land in here
    watch = LogWatch()
    logging.getLogger().addHandler(watch)
    broker = BackgroundBroker(make_broker(root / "broker"))
    running: list[BackgroundNode] = []
    try:
        harbour = enrolled_node(broker, root, HARBOUR)
        enrolled_node(broker, root, LANTERN)  # a recipient in the directory (not serving)
        fuzzer = enrol(broker, root, FUZZER)
        node_identity = open_keyring(harbour.home, PASSPHRASE).identity
        directory_sync.sync(harbour.home, node_identity, directory_sync.load_link(harbour.home))
        directory_sync.mark_verified(harbour.home, LANTERN)
        node = BackgroundNode(harbour)
        running.append(node)
        admin = credential.read(harbour.home, unlock).identity
        caseworker = crypto.Identity.generate()
        operator = credential.read(broker.settings.home).identity
        add_coordinator(broker.settings, "fuzz-coordinator", root / "coordinator")
        coordinator = credential.read(root / "coordinator").identity
        # The node's passphrase too: RotateKeyEncryptionKey asks for it before anything else.
        strings = [HARBOUR, LANTERN, "north", "nobody-agency", PASSPHRASE]
        with NodeClient(harbour.home, unlock=unlock) as client:
            client.add_staff("Casey Worker", StaffRole.CASEWORKER, caseworker.public.signing_key)
            for first in ("Ilsabet", "Korvin"):
                case = client.create_case(
                    {"prs_FirstName": first, "prs_Gender": "Feminine"},
                    "",
                    [(NeedCategory.MEDICAL, NeedStatus.UNMET)],
                )
                strings.append(str(case.case_id))
            consent = client.grant_consent(
                strings[-1],
                LANTERN,
                NeedCategory.MEDICAL,
                ("identity",),
                dt.date.today() + dt.timedelta(days=30),
                "verbal",
            )
            strings.append(str(consent.consent_id))
            sent = client.send_referral(
                strings[-2], LANTERN, NeedCategory.MEDICAL, consent_id=strings[-1]
            )
            strings.append(str(sent.referral_id))
        period = stats.period_of(dt.datetime.now(dt.UTC))
        with StatsClient(root / "coordinator") as coordinating:
            blob = coordinating.open_round("north", period, 2, 0.5, participants=[HARBOUR, FUZZER])
            strings.append(stats_pb.Round.FromString(blob.body).round_id)
        strings += [period, "2026-10", dt.date.today().isoformat()]
        strings += list(htcds.FIELD_NAMES)
        strings += [c.value for c in NeedCategory] + [s.value for s in NeedStatus]
        strings += list(htcds.DATA_CATEGORIES)
        keys = [
            fuzzer.identity.public.signing_key,
            node_identity.public.signing_key,
            crypto.digest(labels.LABEL_CONSENT_COMMITMENT, b"fuzz"),
        ]
        channels = {
            "node": _channel(node.address, credential.read(harbour.home, unlock).node_certificate),
            "broker": _channel(broker.address, fuzzer.link.certificate),
        }
        yield World(
            broker=broker,
            node=node,
            channels=channels,
            identities={
                "admin": admin,
                "caseworker": caseworker,
                "agency": fuzzer.identity,
                "operator": operator,
                "coordinator": coordinator,
            },
            roles={
                "admin": ("node", StaffRole.ADMIN.value),
                "caseworker": ("node", StaffRole.CASEWORKER.value),
                "agency": ("broker", broker_access.AGENCY),
                "operator": ("broker", "operator"),
                "coordinator": ("broker", "coordinator"),
            },
            pools=Pools(strings=strings, keys=keys, path_prefix="sandbox"),
            stranger=crypto.Identity.generate(),
            watch=watch,
        )
        for channel in channels.values():
            channel.close()
    finally:
        for started in running:
            started.stop()
        broker.stop()
        os.chdir(previous_cwd)
        logging.getLogger().removeHandler(watch)


@pytest.fixture(autouse=True)
def _still_serving(world: World) -> Iterator[None]:
    """After each method's run, both servers still answer a signed call."""
    yield
    for method_name, caller in (
        ("/tessera.v1.Node/GetStatus", "admin"),
        ("/tessera.v1.Directory/GetHead", "agency"),
    ):
        method = next(m for m in METHODS if fuzzkit.method_path(m) == method_name)
        reply = fuzzkit.call_raw(
            world.channels[world.server_of(method)],
            method,
            b"",
            fuzzkit.signed_metadata(world.identities[caller], method, b""),
        )
        if reply.code != grpc.StatusCode.OK:
            TALLY.crashes += 1
        assert reply.code == grpc.StatusCode.OK, f"{method_name} after fuzzing: {reply}"


def _id(method: MethodDescriptor) -> str:
    return f"{method.containing_service.name}.{method.name}"


@pytest.mark.parametrize("method", METHODS, ids=_id)
@settings(max_examples=fuzzkit.examples(ci=50, full=400))
@given(data=st.data())
def test_signed_requests_reach_the_handler_and_get_a_clear_status(
    world: World, method: MethodDescriptor, data: st.DataObject
) -> None:
    how, body = data.draw(fuzzkit.request_bytes(method, world.pools), label="request")
    callers = world.callers(method)
    caller = data.draw(st.sampled_from(callers), label="caller")
    metadata = (
        None
        if caller == "public"
        else fuzzkit.signed_metadata(world.identities[caller], method, body)
    )
    reply = fuzzkit.call_raw(world.channels[world.server_of(method)], method, body, metadata)
    world.check(method, f"{how}, signed as {caller}", reply)


@pytest.mark.parametrize("method", METHODS, ids=_id)
@settings(max_examples=fuzzkit.examples(ci=10, full=100))
@given(data=st.data())
def test_unsigned_requests_are_refused_before_they_are_parsed(
    world: World, method: MethodDescriptor, data: st.DataObject
) -> None:
    how, body = data.draw(fuzzkit.request_bytes(method, world.pools), label="request")
    metadata = data.draw(fuzzkit.unsigned_metadata(method, body, world.stranger), label="auth")
    reply = fuzzkit.call_raw(world.channels[world.server_of(method)], method, body, metadata)
    world.check(method, f"{how}, unsigned", reply)
    if world.callers(method) != ["public"]:
        assert reply.code == grpc.StatusCode.UNAUTHENTICATED, (reply.code, reply.details)


def test_every_method_of_every_service_is_fuzzed(world: World) -> None:
    """Each service in the descriptors is served by a server named here, each method has a
    credential that reaches its handler, and every service the servers register (read back
    through gRPC reflection) is one the descriptors define."""
    services = {m.containing_service.full_name for m in fuzzkit.all_methods()}
    unmapped = services - set(SERVER_OF_SERVICE)
    assert not unmapped, f"services no fuzz test knows the server of: {sorted(unmapped)}"
    unreachable = [fuzzkit.method_path(m) for m in METHODS if not world.callers(m)]
    assert not unreachable, f"no credential may call (so nothing fuzzes) {unreachable}"
    assert len(METHODS) == len(fuzzkit.all_methods()) >= 50
    for server, channel in world.channels.items():
        served = _reflected_services(channel)
        ours = {s for s in served if s.startswith("tessera.")}
        expected = {s for s, where in SERVER_OF_SERVICE.items() if where == server}
        assert ours == expected, (server, ours, expected)


def _reflected_services(channel: grpc.Channel) -> list[str]:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    return [s.name for s in reply.list_services_response.service]


# --- what the fuzzing found, kept as regressions ----------------------------------------------

_MEDICAL_UNMET = node_pb.Need(
    category=common_pb.NEED_CATEGORY_MEDICAL, status=common_pb.NEED_STATUS_UNMET
)
FOUND = [
    # A need category given twice hit the store's unique index: INTERNAL.
    ("Node.CreateCase", node_pb.CreateCaseRequest(needs=[_MEDICAL_UNMET, _MEDICAL_UNMET])),
    # A NUL byte in a path reached os calls: ValueError, INTERNAL.
    (
        "Node.RotateKeyEncryptionKey",
        node_pb.RotateKeyEncryptionKeyRequest(current_passphrase=PASSPHRASE, new_key_file="a\x00b"),
    ),
    ("Node.Backup", node_pb.BackupRequest(destination="sandbox/a\x00b")),
    # A backup folder that is a file (or cannot be made): OSError, INTERNAL.
    ("Node.Backup", node_pb.BackupRequest(destination="a-plain-file/backups")),
    # Page tokens of Unicode digits (int() refuses them) or past SQLite's integers: INTERNAL.
    ("Node.ListReferrals", node_pb.ListReferralsRequest(page_token="9" * 20)),
    ("Node.ListReferrals", node_pb.ListReferralsRequest(page_token="\u00b2")),
    ("Node.ListCases", node_pb.ListCasesRequest(page_token="9" * 20)),
    ("Node.Inbox", node_pb.InboxRequest(page_token="\u00b2")),
    ("Stats.ListReleases", stats_pb.ListReleasesRequest(page_token="9" * 20)),
    ("Stats.ListRounds", stats_pb.ListRoundsRequest(page_token="\u00b2")),
]
# Positions past SQLite's integers: nothing is after them (an empty page), not INTERNAL.
FOUND_EMPTY = [("Escrow.ListTombstones", escrow_pb.ListTombstonesRequest(since=2**64 - 1))]


@pytest.mark.parametrize(("name", "request_"), FOUND, ids=[f[0] for f in FOUND])
def test_what_fuzzing_found_is_refused_as_invalid_input(
    world: World, name: str, request_: Any
) -> None:
    world.node.settings.backups_path.mkdir(parents=True, exist_ok=True)
    (world.node.settings.backups_path / "a-plain-file").write_text("not a folder")
    method = next(m for m in METHODS if m.full_name == f"tessera.v1.{name}")
    body = request_.SerializeToString()
    for caller in world.callers(method):
        metadata = fuzzkit.signed_metadata(world.identities[caller], method, body)
        reply = fuzzkit.call_raw(world.channels[world.server_of(method)], method, body, metadata)
        world.check(method, f"regression, signed as {caller}", reply)
        assert reply.code == grpc.StatusCode.INVALID_ARGUMENT, (caller, reply.code, reply.details)
        assert "internal" not in reply.details.lower()


@pytest.mark.parametrize(("name", "request_"), FOUND_EMPTY, ids=[f[0] for f in FOUND_EMPTY])
def test_what_fuzzing_found_is_answered_not_internal(
    world: World, name: str, request_: Any
) -> None:
    method = next(m for m in METHODS if m.full_name == f"tessera.v1.{name}")
    body = request_.SerializeToString()
    for caller in world.callers(method):
        metadata = fuzzkit.signed_metadata(world.identities[caller], method, body)
        reply = fuzzkit.call_raw(world.channels[world.server_of(method)], method, body, metadata)
        world.check(method, f"regression, signed as {caller}", reply)
        assert reply.code == grpc.StatusCode.OK, (caller, reply.code, reply.details)
