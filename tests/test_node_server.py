"""A real node server over TLS: who may call what, and what refused calls leave behind."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from node.client import NodeClient
from node.domain import StaffRole
from node.htcds.csv_format import write_csv
from node.htcds.synthetic import synthetic_records
from node.keyring import KEYRING_FILE
from tessera import credential, crypto, rpc
from tessera.config import Limits
from tessera.errors import (
    Conflict,
    InvalidInput,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from tessera.needs import NeedCategory, NeedStatus
from tessera.v1 import node_pb2 as node_pb
from tessera.v1 import node_pb2_grpc as node_grpc
from tests.support import CASEWORKER_PASSPHRASE, PASSPHRASE, BackgroundNode, make_node, unlock


@pytest.fixture
def node(tmp_path: Path) -> Iterator[BackgroundNode]:
    running = BackgroundNode(make_node(tmp_path / "node"))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def admin(node: BackgroundNode) -> Iterator[NodeClient]:
    with NodeClient(node.settings.home, unlock=unlock) as client:
        yield client


def _stub(node: BackgroundNode, identity: crypto.Identity | None) -> node_grpc.NodeStub:
    cert = node.settings.cert_path.read_bytes()
    channel = rpc.open_channel(node.address, cert, identity, Limits().max_message_bytes)
    return node_grpc.NodeStub(channel)


def _refusals(node: BackgroundNode) -> list[dict[str, object]]:
    entries = node.running.store.audit_entries(actions=("access.refused",))
    return [dict(e.detail, actor=e.actor) for e in entries]


def _caseworker(node: BackgroundNode, admin: NodeClient, tmp_path: Path) -> NodeClient:
    identity = crypto.Identity.generate()
    admin.add_staff("Ana Ruiz", StaffRole.CASEWORKER, identity.public.signing_key)
    home = tmp_path / "ana"
    credential.write(
        home,
        credential.Credential(
            name="Ana Ruiz",
            identity=identity,
            node_address=node.address,
            node_certificate=node.settings.cert_path.read_bytes(),
        ),
        credential.PassphraseLock(CASEWORKER_PASSPHRASE, crypto.Argon2Params.TEST_CHEAP),
    )
    return NodeClient(home, unlock=lambda: CASEWORKER_PASSPHRASE)


def test_health_and_reflection_answer_without_credentials(node: BackgroundNode) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    cert = node.settings.cert_path.read_bytes()
    channel = rpc.open_channel(node.address, cert, None, Limits().max_message_bytes)
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service="tessera.v1.Node"), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = list(
        reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
    )
    names = {s.name for s in answers[0].list_services_response.service}
    assert "tessera.v1.Node" in names
    channel.close()


def test_unsigned_call_is_refused_and_audited(node: BackgroundNode) -> None:
    stub = _stub(node, None)
    with pytest.raises(grpc.RpcError) as info:
        stub.GetStatus(node_pb.GetStatusRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert any(r["method"] == "/tessera.v1.Node/GetStatus" for r in _refusals(node))


def test_unknown_key_is_refused_and_audited(node: BackgroundNode) -> None:
    stranger = crypto.Identity.generate()
    with pytest.raises(grpc.RpcError) as info:
        _stub(node, stranger).ListCases(node_pb.ListCasesRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not a staff credential" in (info.value.details() or "")
    assert any(r["reason"] == "unknown key" for r in _refusals(node))


def test_replayed_request_is_refused(node: BackgroundNode) -> None:
    identity = credential.read(node.settings.home, unlock).identity
    cert = node.settings.cert_path.read_bytes()
    channel = rpc.open_channel(node.address, cert, None, Limits().max_message_bytes)
    stub = node_grpc.NodeStub(channel)
    request = node_pb.GetStatusRequest()
    signature = crypto.sign_request(
        identity, "/tessera.v1.Node/GetStatus", request.SerializeToString()
    )
    stub.GetStatus(request, metadata=signature.to_metadata(), timeout=5)  # first use: fine
    with pytest.raises(grpc.RpcError) as info:
        stub.GetStatus(request, metadata=signature.to_metadata(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert any(r["reason"] == "ReplayedRequest" for r in _refusals(node))
    channel.close()


def test_signature_over_other_body_is_refused(node: BackgroundNode) -> None:
    identity = credential.read(node.settings.home, unlock).identity
    cert = node.settings.cert_path.read_bytes()
    channel = rpc.open_channel(node.address, cert, None, Limits().max_message_bytes)
    stub = node_grpc.NodeStub(channel)
    signed_for = node_pb.GetCaseRequest(case_id="a")
    sent = node_pb.GetCaseRequest(case_id="b")
    signature = crypto.sign_request(
        identity, "/tessera.v1.Node/GetCase", signed_for.SerializeToString()
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.GetCase(sent, metadata=signature.to_metadata(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    channel.close()


def test_caseworker_cannot_export_and_refusal_names_them(
    node: BackgroundNode, admin: NodeClient, tmp_path: Path
) -> None:
    with _caseworker(node, admin, tmp_path) as ana:
        assert ana.status()["your_role"] == "caseworker"
        with pytest.raises(PermissionDenied):
            list(ana.export_cases("csv", None))
        with pytest.raises(PermissionDenied):
            ana.rotate_kek("another passphrase", None)
    refusals = _refusals(node)
    assert {
        "actor": "staff:Ana Ruiz",
        "method": "/tessera.v1.Node/ExportCases",
        "reason": "role caseworker",
    } in refusals


def test_a_caseworker_is_refused_every_administrator_call_and_nothing_changes(
    node: BackgroundNode, admin: NodeClient, tmp_path: Path
) -> None:
    case_id = admin.create_case({"prs_FirstName": "Saoirse"})["case_id"]
    with _caseworker(node, admin, tmp_path) as ana:
        attempts = {
            "EraseCase": lambda: ana.erase_case(case_id, "asked"),
            "AddStaff": lambda: ana.add_staff(
                "Mallory", StaffRole.ADMIN, crypto.Identity.generate().public.signing_key
            ),
            # The client looks the name up first (ListStaff); the raw call is refused too.
            "ListStaff": lambda: ana.remove_staff("admin"),
            "RemoveStaff": lambda: ana._call(
                ana._stub.RemoveStaff, node_pb.RemoveStaffRequest(staff_id="admin")
            ),
            "Backup": lambda: ana.backup(None),
            "VerifyAgency": lambda: ana.verify_agency("lantern-clinic", "ABCD"),
        }
        for attempt in attempts.values():
            with pytest.raises(PermissionDenied):
                attempt()
    refused = {r["method"] for r in _refusals(node) if r["actor"] == "staff:Ana Ruiz"}
    assert refused >= {f"/tessera.v1.Node/{m}" for m in attempts}
    # Nothing happened: the case is there, the staff list is as it was, no backup was written.
    assert admin.get_case(case_id)["case_id"] == case_id
    assert {m["name"] for m in admin.list_staff()} == {"admin", "Ana Ruiz"}
    assert not list(node.settings.home.rglob("*.tbk"))


def test_searches_and_exports_are_audited_by_name_with_no_survivor_data(
    node: BackgroundNode, admin: NodeClient, tmp_path: Path
) -> None:
    admin.create_case({"prs_FirstName": "Saoirse", "prs_Email": "saoirse@example.org"})
    with _caseworker(node, admin, tmp_path) as ana:
        assert len(ana.find_cases({"prs_Email": "saoirse@example.org"})) == 1
    exported = b"".join(chunk for chunk, _total in admin.export_cases("csv", None))
    assert b"Saoirse" in exported
    entries = node.running.store.audit_entries(actions=("case.search", "cases.export"))
    assert [(e.actor, e.action) for e in entries] == [
        ("staff:Ana Ruiz", "case.search"),
        ("staff:admin", "cases.export"),
    ]
    assert entries[0].detail["matches"] == 1 and entries[1].detail["cases"] == 1
    # The log holds who, what and how many; never the name or the address searched for.
    for entry in entries:
        text = json.dumps(dict(entry.detail))
        assert "Saoirse" not in text and "saoirse@example.org" not in text


def test_a_client_pinned_to_its_node_refuses_another_server_at_that_address(
    node: BackgroundNode, tmp_path: Path
) -> None:
    # Someone answers at the node's address with another certificate (here: another real
    # node). The credential pins the real node's certificate: the call never reaches them.
    impostor = BackgroundNode(make_node(tmp_path / "impostor", name="Impostor Shelter"))
    try:
        held = credential.read(node.settings.home, unlock)
        home = tmp_path / "misdirected"
        credential.write(
            home,
            dataclasses.replace(held, node_address=impostor.address),
            credential.PassphraseLock(CASEWORKER_PASSPHRASE, crypto.Argon2Params.TEST_CHEAP),
        )
        client = NodeClient(home, unlock=lambda: CASEWORKER_PASSPHRASE)
        with client, pytest.raises(Unavailable):
            client.status()
        assert impostor.running.store.audit_entries(actions=("access.refused",)) == []
    finally:
        impostor.stop()


def test_a_stolen_admin_credential_alone_cannot_re_lock_the_node(
    node: BackgroundNode, admin: NodeClient
) -> None:
    # The thief holds an administrator's credential but not the node's passphrase.
    keyring_file = node.settings.home / KEYRING_FILE
    before = keyring_file.read_bytes()
    thief_secret = "correct horse battery staple of the thief 1987"
    for guess in (None, "not the node passphrase at all 4471"):
        with pytest.raises(Unauthenticated):
            admin.rotate_kek(thief_secret, None, guess)
    with pytest.raises(Unauthenticated):
        admin.rotate_kek(None, node.settings.home / "thief.key", "a wrong guess entirely 0912")
    assert keyring_file.read_bytes() == before
    assert not (node.settings.home / "thief.key").exists()
    # The passphrase in force does it.
    assert admin.rotate_kek("a brand new node passphrase for winter 2027", None, PASSPHRASE) == 2
    assert keyring_file.read_bytes() != before


def test_removed_staff_is_refused_at_once(
    node: BackgroundNode, admin: NodeClient, tmp_path: Path
) -> None:
    with _caseworker(node, admin, tmp_path) as ana:
        ana.create_case({"prs_FirstName": "Mirelka"})
        admin.remove_staff("Ana Ruiz")
        with pytest.raises(Unauthenticated, match="was removed"):
            ana.status()


def test_last_admin_cannot_be_removed(admin: NodeClient) -> None:
    with pytest.raises(Conflict):
        admin.remove_staff("admin")


def test_case_lifecycle_over_grpc_names_the_actor(node: BackgroundNode, admin: NodeClient) -> None:
    case = admin.create_case(
        {"prs_FirstName": "Mirelka", "prs_SecondName": "Dovanto", "prs_Gender": "feminine"},
        notes="arrived at night",
        needs=[(NeedCategory.SAFE_HOUSING, NeedStatus.IDENTIFIED)],
    )
    assert case["fields"]["prs_Gender"] == "Feminine"  # normalised to the standard's code
    updated = admin.update_case(case["case_id"], 1, {"prs_Citizenship": "ro"}, [], None)
    assert updated["version"] == 2
    assert updated["fields"]["prs_Citizenship"] == "RO"
    with pytest.raises(Conflict):
        admin.update_case(case["case_id"], 1, {"prs_Citizenship": "BG"}, [], None)
    admin.set_need(case["case_id"], NeedCategory.SAFE_HOUSING, NeedStatus.MET)
    found = admin.find_cases({"prs_FirstName": " mirelka", "prs_SecondName": "DOVANTO "})
    assert [c["case_id"] for c in found] == [case["case_id"]]
    shown = admin.get_case(case["case_id"])
    assert shown["notes"] == "arrived at night"
    assert shown["needs"] == [
        {"category": "safe_housing", "status": "met", "since": shown["needs"][0]["since"]}
    ]
    actors = {e.actor for e in node.running.store.audit_entries(case_id=case["case_id"])}
    assert actors == {"staff:admin"}
    assert node.running.store.verify_audit().ok


def test_bad_values_are_refused_without_echoing_identifying_data(admin: NodeClient) -> None:
    with pytest.raises(InvalidInput) as info:
        admin.create_case(
            {"prs_FirstName": "Mirelka", "prs_Birthdate": "31/02/1990", "prs_Gender": "Femenine"}
        )
    message = str(info.value)
    assert "prs_Birthdate" in message and "prs_Gender" in message
    assert "31/02/1990" not in message
    with pytest.raises(InvalidInput, match="unknown field"):
        admin.create_case({"prs_Nickname": "x"})
    with pytest.raises(NotFound):
        admin.get_case("00000000-0000-0000-0000-000000000000")


def test_import_all_or_nothing_then_skip_bad_rows(admin: NodeClient, tmp_path: Path) -> None:
    records = synthetic_records(40, seed=7)
    records[3]["prs_Gender"] = "Femenine"
    path = tmp_path / "intake.csv"
    write_csv(path, records)
    progress: list[tuple[int, int, int]] = []
    refused = admin.import_cases(path, False, lambda *p: progress.append(p))
    assert refused["imported"] == 0
    assert [(row, field) for row, field, _ in refused["problems"]] == [(5, "prs_Gender")]
    assert admin.list_cases(None, None, None, False, 100) == []
    accepted = admin.import_cases(path, True, lambda *p: progress.append(p))
    assert accepted["imported"] == 39
    assert len(admin.list_cases(None, None, None, False, 100)) == 39


def test_export_round_trips_through_htcds(admin: NodeClient, tmp_path: Path) -> None:
    from node.htcds.report import validate_file

    records = synthetic_records(12, seed=3)
    source = tmp_path / "in.csv"
    write_csv(source, records)
    admin.import_cases(source, False, lambda *p: None)
    out = tmp_path / "out.xlsx"
    out.write_bytes(b"".join(chunk for chunk, _n in admin.export_cases("xlsx", None)))
    report = validate_file(out)
    assert report.ok
    exported = sorted(
        tuple(sorted((k, v) for k, v in values.items() if k != "tessera_case_id"))
        for _n, values in report.good
    )
    assert exported == sorted(
        tuple(sorted(r.items())) for r in (validate_file(source).good[i][1] for i in range(12))
    )


def test_malformed_request_bytes_get_invalid_argument(node: BackgroundNode) -> None:
    identity = credential.read(node.settings.home, unlock).identity
    cert = node.settings.cert_path.read_bytes()
    channel = rpc.open_channel(node.address, cert, None, Limits().max_message_bytes)
    garbage = b"\xff\xff\xff\xff"
    call = channel.unary_unary(
        "/tessera.v1.Node/GetCase", request_serializer=None, response_deserializer=None
    )
    signature = crypto.sign_request(identity, "/tessera.v1.Node/GetCase", garbage)
    with pytest.raises(grpc.RpcError) as info:
        call(garbage, metadata=signature.to_metadata(), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    channel.close()


def test_stale_timestamp_is_refused(node: BackgroundNode) -> None:
    identity = credential.read(node.settings.home, unlock).identity
    cert = node.settings.cert_path.read_bytes()
    channel = rpc.open_channel(node.address, cert, None, Limits().max_message_bytes)
    request = node_pb.GetStatusRequest()
    signature = crypto.sign_request(
        identity, "/tessera.v1.Node/GetStatus", request.SerializeToString(), now=time.time() - 3600
    )
    with pytest.raises(grpc.RpcError) as info:
        node_grpc.NodeStub(channel).GetStatus(request, metadata=signature.to_metadata(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    channel.close()


def test_a_repeated_create_with_the_same_idempotency_key_creates_one_case(
    node: BackgroundNode,
) -> None:
    stub = _stub(node, credential.read(node.settings.home, unlock).identity)
    request = node_pb.CreateCaseRequest(idempotency_key="retry-1")
    first = stub.CreateCase(request, timeout=5).case.case_id
    second = stub.CreateCase(request, timeout=5).case.case_id
    assert first == second
    assert node.running.store.count_cases() == 1
