"""Small checks of the tessera.v1 wire contract itself (proto/tessera/v1/*.proto, docs/wire.md).

They check what the sources promise: the services and RPCs exist under their full names with the
expected shapes, no message uses map<> (signed bodies need a fixed serialization), every element
of the .proto sources is documented and every field says who may see it, the need vocabulary
matches shared/htcds/NEEDS.md, and one message per file survives a round trip.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, FileDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from tessera import labels
from tessera.v1 import common_pb2 as common_pb
from tessera.v1 import consent_pb2 as consent_pb
from tessera.v1 import directory_pb2 as directory_pb
from tessera.v1 import directory_pb2_grpc as directory_grpc
from tessera.v1 import escrow_pb2 as escrow_pb
from tessera.v1 import escrow_pb2_grpc as escrow_grpc
from tessera.v1 import node_pb2 as node_pb
from tessera.v1 import node_pb2_grpc as node_grpc
from tessera.v1 import referral_pb2 as referral_pb
from tessera.v1 import relay_pb2 as relay_pb
from tessera.v1 import relay_pb2_grpc as relay_grpc
from tessera.v1 import stats_pb2 as stats_pb
from tessera.v1 import stats_pb2_grpc as stats_grpc

PROTO_ROOT = Path(__file__).resolve().parent.parent / "proto"
FILES: dict[str, FileDescriptor] = {
    "common": common_pb.DESCRIPTOR,
    "consent": consent_pb.DESCRIPTOR,
    "directory": directory_pb.DESCRIPTOR,
    "escrow": escrow_pb.DESCRIPTOR,
    "node": node_pb.DESCRIPTOR,
    "referral": referral_pb.DESCRIPTOR,
    "relay": relay_pb.DESCRIPTOR,
    "stats": stats_pb.DESCRIPTOR,
}

# Service full name -> {method: server streaming?}. No method is client-streaming: one signature
# covers exactly one request message (common.proto, convention 4).
SERVICES: dict[str, dict[str, bool]] = {
    "tessera.v1.Directory": {
        "GetBrokerInfo": False,
        "IssueEnrolmentToken": False,
        "Enrol": False,
        "RotateKeys": False,
        "Revoke": False,
        "GetHead": False,
        "GetEntries": False,
        "GetConsistency": False,
        "GetAgency": False,
    },
    "tessera.v1.Relay": {
        "Send": False,
        "SendBatch": False,
        "Receive": True,
        "ReceiveBatches": True,
        "Acknowledge": False,
        "PurgeConsent": False,
    },
    "tessera.v1.Stats": {
        "OpenRound": False,
        "GetRound": False,
        "ListRounds": False,
        "SubmitShare": False,
        "RestartRound": False,
        "GetRelease": False,
        "ListReleases": False,
        "DeclineRound": False,
        "CancelRound": False,
    },
    "tessera.v1.Escrow": {
        "DepositTombstones": False,
        "ListTombstones": False,
        "Checkpoint": False,
        "LatestCheckpoint": False,
    },
    "tessera.v1.Node": {
        "GetStatus": False,
        "CreateCase": False,
        "GetCase": False,
        "UpdateCase": False,
        "ListCases": False,
        "FindCases": False,
        "CloseCase": False,
        "EraseCase": False,
        "SetNeed": False,
        "ImportCases": True,
        "ExportCases": True,
        "VerifyAudit": False,
        "ListDisclosures": False,
        "ShowAudit": False,
        "AddStaff": False,
        "RemoveStaff": False,
        "ListStaff": False,
        "RotateKeyEncryptionKey": False,
        "Backup": True,
        "GrantConsent": False,
        "ListConsents": False,
        "RevokeConsent": False,
        "SendReferral": False,
        "ListReferrals": False,
        "Inbox": False,
        "ShowReferral": False,
        "AnswerReferral": False,
        "ListAgencies": False,
        "VerifyAgency": False,
        "BudgetStatus": False,
    },
}

# shared/htcds/NEEDS.md, in its table order, and its statuses.
NEED_CODES = [
    "safe_housing", "basic_needs", "medical", "mental_health", "substance_use",
    "legal_criminal", "legal_civil", "immigration", "safety_planning", "education",
    "employment", "financial", "life_skills", "childcare", "family", "interpretation",
    "case_management", "peer_support",
]  # fmt: skip
NEED_STATUSES = ["identified", "referred", "in_progress", "met", "unmet", "declined"]

# The signing labels the .proto sources name (common.proto, convention 3) are tessera.crypto's.
# (proto file, label text, tessera.crypto constant)
LABELS = [
    ("directory", "tessera/v1/key-rotation", "LABEL_KEY_ROTATION"),
    ("directory", "tessera/v1/directory-entry", "LABEL_DIRECTORY_ENTRY"),
    ("directory", "tessera/v1/directory-head", "LABEL_DIRECTORY_HEAD"),
    ("consent", "tessera/v1/consent-receipt", "LABEL_CONSENT_RECEIPT"),
    ("consent", "tessera/v1/consent-commitment", "LABEL_CONSENT_COMMITMENT"),
    ("relay", "tessera/v1/relay-receipt", "LABEL_RECEIPT"),
    ("referral", "tessera/v1/envelope", "LABEL_ENVELOPE"),
    ("referral", "tessera/v1/status", "LABEL_STATUS"),
    ("stats", "tessera/v1/round", "LABEL_ROUND"),
    ("stats", "tessera/v1/release", "LABEL_RELEASE"),
    ("common", "tessera/v1/request", "LABEL_REQUEST"),
    ("escrow", "tessera/v1/tombstone", "LABEL_TOMBSTONE"),
    ("escrow", "tessera/v1/escrow-head", "LABEL_ESCROW_HEAD"),
    ("escrow", "tessera/v1/escrow-chain", "LABEL_ESCROW_CHAIN"),
    ("escrow", "tessera/v1/checkpoint-position", "LABEL_CHECKPOINT_POSITION"),
    ("escrow", "tessera/v1/audit-checkpoint", "LABEL_AUDIT_CHECKPOINT"),
]

# Field numbers of the descriptor.proto elements that make up a SourceCodeInfo path.
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE = 4, 5, 6
MESSAGE_FIELD, MESSAGE_NESTED, MESSAGE_ENUM, MESSAGE_ONEOF = 2, 3, 4, 8
ENUM_VALUE, SERVICE_METHOD = 2, 2


@pytest.fixture(scope="module")
def source_set(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorSet:
    """The .proto sources compiled with their comments (protoc --include_source_info)."""
    out = tmp_path_factory.mktemp("descriptors") / "tessera.pb"
    sources = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in PROTO_ROOT.rglob("*.proto"))
    completed = subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc",
            f"--proto_path={PROTO_ROOT}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *sources,
        ],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    descriptor_set = descriptor_pb2.FileDescriptorSet()
    descriptor_set.ParseFromString(out.read_bytes())
    return descriptor_set


def _elements(
    file: descriptor_pb2.FileDescriptorProto,
) -> Iterator[tuple[str, str, tuple[int, ...]]]:
    """Yield (kind, full name, source path) for every documented element of a file."""

    def enum(
        e: descriptor_pb2.EnumDescriptorProto, scope: str, path: tuple[int, ...]
    ) -> Iterator[tuple[str, str, tuple[int, ...]]]:
        yield "enum", f"{scope}.{e.name}", path
        for i, value in enumerate(e.value):
            yield "enum value", f"{scope}.{e.name}.{value.name}", (*path, ENUM_VALUE, i)

    def message(
        m: descriptor_pb2.DescriptorProto, scope: str, path: tuple[int, ...]
    ) -> Iterator[tuple[str, str, tuple[int, ...]]]:
        name = f"{scope}.{m.name}"
        yield "message", name, path
        for i, field in enumerate(m.field):
            yield "field", f"{name}.{field.name}", (*path, MESSAGE_FIELD, i)
        # proto3 `optional` fields make synthetic oneofs, which have no source text of their own.
        synthetic = {f.oneof_index for f in m.field if f.proto3_optional}
        for i, oneof in enumerate(m.oneof_decl):
            if i not in synthetic:
                yield "oneof", f"{name}.{oneof.name}", (*path, MESSAGE_ONEOF, i)
        for i, nested in enumerate(m.nested_type):
            yield from message(nested, name, (*path, MESSAGE_NESTED, i))
        for i, nested_enum in enumerate(m.enum_type):
            yield from enum(nested_enum, name, (*path, MESSAGE_ENUM, i))

    for i, m in enumerate(file.message_type):
        yield from message(m, file.package, (FILE_MESSAGE, i))
    for i, e in enumerate(file.enum_type):
        yield from enum(e, file.package, (FILE_ENUM, i))
    for i, service in enumerate(file.service):
        yield "service", f"{file.package}.{service.name}", (FILE_SERVICE, i)
        for j, method in enumerate(service.method):
            yield (
                "method",
                f"{file.package}.{service.name}.{method.name}",
                (FILE_SERVICE, i, SERVICE_METHOD, j),
            )


def _all_messages(descriptor: FileDescriptor) -> Iterator[Descriptor]:
    pending = list(descriptor.message_types_by_name.values())
    while pending:
        message = pending.pop()
        yield message
        pending.extend(message.nested_types)


# ---- services ----------------------------------------------------------------------------------


def test_services_have_their_full_names_and_methods(
    source_set: descriptor_pb2.FileDescriptorSet,
) -> None:
    found = {
        f"{file.package}.{service.name}": {m.name: m for m in service.method}
        for file in source_set.file
        for service in file.service
    }
    assert set(found) == set(SERVICES)
    for service, expected in SERVICES.items():
        methods = found[service]
        assert set(methods) == set(expected), service
        for name, server_streaming in expected.items():
            assert methods[name].server_streaming is server_streaming, f"{service}/{name}"
            assert not methods[name].client_streaming, f"{service}/{name} must be unary in"


def test_generated_modules_expose_the_services() -> None:
    # The full names health checking and reflection are registered under.
    assert directory_pb.DESCRIPTOR.services_by_name["Directory"].full_name == "tessera.v1.Directory"
    assert relay_pb.DESCRIPTOR.services_by_name["Relay"].full_name == "tessera.v1.Relay"
    assert stats_pb.DESCRIPTOR.services_by_name["Stats"].full_name == "tessera.v1.Stats"
    assert escrow_pb.DESCRIPTOR.services_by_name["Escrow"].full_name == "tessera.v1.Escrow"
    assert node_pb.DESCRIPTOR.services_by_name["Node"].full_name == "tessera.v1.Node"
    # And the stubs and registration helpers that servers and clients use.
    for module, service in [
        (directory_grpc, "Directory"),
        (relay_grpc, "Relay"),
        (stats_grpc, "Stats"),
        (escrow_grpc, "Escrow"),
        (node_grpc, "Node"),
    ]:
        assert hasattr(module, f"{service}Stub")
        assert hasattr(module, f"{service}Servicer")
        assert hasattr(module, f"add_{service}Servicer_to_server")


def test_every_file_is_in_package_tessera_v1(
    source_set: descriptor_pb2.FileDescriptorSet,
) -> None:
    assert {file.name for file in source_set.file} == {f"tessera/v1/{name}.proto" for name in FILES}
    for file in source_set.file:
        assert file.package == "tessera.v1", file.name
        assert file.syntax == "proto3", file.name


# ---- message shapes ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FILES))
def test_no_map_fields(name: str) -> None:
    for message in _all_messages(FILES[name]):
        assert not message.GetOptions().map_entry, f"{message.full_name} is a map<> entry"
        for field in message.fields:
            target = field.message_type
            assert target is None or not target.GetOptions().map_entry, (
                f"{message.full_name}.{field.name} is a map<> field: signed bodies need a "
                "fixed serialization, use a repeated message instead"
            )


def test_every_enum_starts_with_unspecified(
    source_set: descriptor_pb2.FileDescriptorSet,
) -> None:
    for file in source_set.file:
        for enum in file.enum_type:
            prefix = "".join(f"_{c}" if c.isupper() else c.upper() for c in enum.name)[1:]
            assert enum.value[0].number == 0, enum.name
            assert enum.value[0].name == f"{prefix}_UNSPECIFIED", enum.name
            for value in enum.value:
                assert value.name.startswith(f"{prefix}_"), f"{enum.name}.{value.name}"


def test_need_vocabulary_matches_needs_md() -> None:
    categories = [
        v.name.removeprefix("NEED_CATEGORY_").lower()
        for v in common_pb.DESCRIPTOR.enum_types_by_name["NeedCategory"].values
        if v.number != 0
    ]
    statuses = [
        v.name.removeprefix("NEED_STATUS_").lower()
        for v in common_pb.DESCRIPTOR.enum_types_by_name["NeedStatus"].values
        if v.number != 0
    ]
    assert categories == NEED_CODES
    assert statuses == NEED_STATUSES


@pytest.mark.parametrize(("name", "label", "constant"), LABELS)
def test_labels_named_in_the_sources_are_those_of_tessera_labels(
    name: str, label: str, constant: str
) -> None:
    source = (PROTO_ROOT / "tessera" / "v1" / f"{name}.proto").read_text(encoding="utf-8")
    assert label in source, f"{name}.proto no longer names {label}"
    assert getattr(labels, constant) == label.encode("ascii"), (
        f"tessera.labels.{constant} changed: update the .proto comments and docs/wire.md"
    )


# ---- documentation -----------------------------------------------------------------------------


def test_every_element_has_a_leading_comment(
    source_set: descriptor_pb2.FileDescriptorSet,
) -> None:
    missing: list[str] = []
    for file in source_set.file:
        comments = {
            tuple(location.path): location.leading_comments.strip()
            for location in file.source_code_info.location
        }
        missing += [
            f"{file.name}: {kind} {name}"
            for kind, name, path in _elements(file)
            if not comments.get(path)
        ]
    assert not missing, "undocumented in the .proto sources:\n  " + "\n  ".join(missing)


def test_every_field_says_who_may_see_it(
    source_set: descriptor_pb2.FileDescriptorSet,
) -> None:
    vague: list[str] = []
    for file in source_set.file:
        comments = {
            tuple(location.path): location.leading_comments
            for location in file.source_code_info.location
        }
        for kind, name, path in _elements(file):
            # The convention of common.proto: every field comment says "Seen by: ...".
            if kind == "field" and "Seen by:" not in " ".join(comments.get(path, "").split()):
                vague.append(f"{file.name}: {name}")
    assert not vague, "fields whose comment does not say who may see them:\n  " + "\n  ".join(vague)


# ---- round trips, one message per file ---------------------------------------------------------


def _at(seconds: int) -> Timestamp:
    return Timestamp(seconds=seconds, nanos=0)


def _round_trip(message: Message) -> None:
    wire = message.SerializeToString()
    again = type(message)()
    again.ParseFromString(wire)
    assert again == message
    # Without map<> fields, default serialization is already the deterministic one, so the bytes
    # a signer produced can be reproduced (and compared) by anyone holding the same message.
    assert again.SerializeToString() == wire
    assert message.SerializeToString(deterministic=True) == wire


def test_round_trip_common() -> None:
    blob = common_pb.SignedBlob(body=b"\x0a\x03abc", signature=bytes(64), signer=bytes(range(32)))
    _round_trip(blob)
    _round_trip(common_pb.AgencyRef(agency_id="clinic-03", name="Clinic Three"))


def test_round_trip_directory() -> None:
    entry = directory_pb.DirectoryEntry(
        kind=directory_pb.ENTRY_KIND_ENROL,
        agency_id="shelter-north-01",
        name="North Shelter",
        region="north",
        services=[common_pb.NEED_CATEGORY_SAFE_HOUSING, common_pb.NEED_CATEGORY_MEDICAL],
        signing_key=bytes(32),
        encryption_key=bytes(range(32)),
        valid_from=_at(1_790_000_000),
        created_at=_at(1_790_000_000),
    )
    statement = common_pb.SignedBlob(
        body=entry.SerializeToString(), signature=bytes(64), signer=bytes(32)
    )
    log_entry = directory_pb.LogEntry(
        sequence=1, statement=statement, logged_at=_at(1_790_000_001), previous_chain=bytes(32)
    )
    _round_trip(log_entry)
    # The statement's body is the exact signed bytes; parsing it gives the entry back.
    carried = directory_pb.LogEntry.FromString(log_entry.SerializeToString()).statement.body
    assert directory_pb.DirectoryEntry.FromString(carried) == entry


def test_round_trip_relay() -> None:
    _round_trip(
        relay_pb.Delivery(
            delivery_id="d-1",
            sender_agency_id="legal-aid-02",
            sealed_envelope=b"\x00\xff" * 40,
            received_at=_at(1_790_000_000),
            consent_commitment=bytes(32),
            attempt=2,
        )
    )


def test_round_trip_referral() -> None:
    content = referral_pb.EnvelopeContent(
        message_id="m-1",
        sender_agency_id="shelter-north-01",
        recipient_agency_id="clinic-03",
        created_at=_at(1_790_000_000),
        referral=referral_pb.Referral(
            referral_id="r-1",
            need=common_pb.NEED_CATEGORY_MEDICAL,
            fields=[
                common_pb.Field(name="prs_FirstName", value="A."),
                common_pb.Field(name="vic_TypeOfExploitation", value="ForcedLabour;Servitude"),
            ],
            consent_receipt=common_pb.SignedBlob(body=b"receipt", signature=bytes(64)),
        ),
    )
    _round_trip(content)
    assert content.WhichOneof("payload") == "referral"
    declined = referral_pb.EnvelopeContent(
        message_id="m-2",
        status_update=referral_pb.StatusUpdate(
            referral_id="r-1",
            status=referral_pb.REFERRAL_STATUS_DECLINED,
            decline_reason=referral_pb.DECLINE_REASON_NO_CAPACITY,
        ),
    )
    _round_trip(declined)
    assert declined.WhichOneof("payload") == "status_update"


def test_round_trip_consent() -> None:
    _round_trip(
        consent_pb.ConsentReceipt(
            consent_id="0f8e6f9c-2b1a-4c55-9d59-5b2f0f1f6a10",
            sending_agency_id="shelter-north-01",
            receiving_agency_id="clinic-03",
            purpose=common_pb.NEED_CATEGORY_MEDICAL,
            data_categories=["prs_Birthdate", "prs_FirstName"],
            method=consent_pb.CONSENT_METHOD_WRITTEN,
            witnessed_by="staff-7",
            granted_at=_at(1_790_000_000),
            expires_at=_at(1_800_000_000),
            survivor_pseudonym="p-5c1d",
        )
    )


def test_round_trip_stats() -> None:
    top = 2**64 - 1  # cells are integers mod 2^64: the full unsigned range must survive
    _round_trip(
        stats_pb.SubmitShareRequest(
            round_id="round-1",
            attempt=2,
            agency_id="shelter-north-01",
            round_digest=bytes(32),
            masked_cells=[0, 1, top, 2**63],
        )
    )
    _round_trip(
        stats_pb.Release(
            release_id="rel-1",
            round_id="round-1",
            period="2026-10",
            mode=stats_pb.ROUND_MODE_PRIVATE,
            cells=[stats_pb.ReleasedCell(coordinates=["medical", "unmet"], value=-3, lower=-9.5)],
            epsilon=1.0,
            alpha=0.05,
            participants=5,
        )
    )


def test_round_trip_node() -> None:
    case = node_pb.Case(
        case_id="c-1",
        version=3,
        fields=[common_pb.Field(name="prs_Citizenship", value="PH")],
        needs=[
            node_pb.Need(
                category=common_pb.NEED_CATEGORY_IMMIGRATION,
                status=common_pb.NEED_STATUS_UNMET,
                identified_on="2026-10-02",
            )
        ],
        status=node_pb.CASE_STATUS_OPEN,
        created_at=_at(1_790_000_000),
    )
    _round_trip(node_pb.GetCaseResponse(case=case))
    result = node_pb.ImportCasesEvent(
        result=node_pb.ImportResult(
            imported=0,
            rejected=1,
            problems=[node_pb.RowProblem(row=4, field="prs_Birthdate", reason="not a date")],
        )
    )
    _round_trip(result)
    assert result.WhichOneof("event") == "result"


def test_round_trip_escrow() -> None:
    entry = escrow_pb.EscrowEntry(
        sequence=3,
        tombstone=escrow_pb.SealedTombstone(tombstone_id="t-1", sealed=b"\x01" * 368),
        deposited_at=_at(1_700_000_000),
    )
    _round_trip(entry)
    _round_trip(
        escrow_pb.AuditCheckpoint(
            agency_id="harbour-shelter",
            number=2,
            sealed_position=b"\x02" * 368,
            checkpointed_at=_at(1_700_000_100),
            previous=b"\x03" * 32,
        )
    )
