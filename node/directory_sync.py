"""The node's side of the key directory: enrolment, syncing and pinning (DESIGN.md section 5).

The node keeps what it has verified in its home: ``broker.json`` (the broker's address, pinned TLS
certificate and pinned signing key, and this agency's id) and ``directory.json`` (the size and
chain of the log it verified, and every agency's pinned record, plus which agencies an
administrator verified out of band). Every sync checks the new entries against the pinned head,
so a forked or rewritten log, or a key substituted without a rotation signed by the old key, is
refused (tessera.directory raises; nothing is saved).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from tessera import crypto, directory, enrolment, rpc
from tessera.config import Limits
from tessera.errors import ConfigError, InvalidInput, NotFound
from tessera.files import atomic_write
from tessera.v1 import common_pb2 as common_pb
from tessera.v1 import directory_pb2 as directory_pb
from tessera.v1 import directory_pb2_grpc as directory_grpc

LINK_FILE = "broker.json"
CACHE_FILE = "directory.json"
_PAGE = 1000


@dataclass(frozen=True)
class BrokerLink:
    """How this node reaches and trusts its broker."""

    address: str
    certificate: bytes
    broker_key: bytes
    agency_id: str
    region: str


@dataclass
class DirectoryCache:
    """What the node has verified of the directory."""

    size: int = 0
    chain: bytes = directory.GENESIS_CHAIN
    records: dict[str, directory.AgencyRecord] = field(default_factory=dict)
    verified: set[str] = field(default_factory=set)


def load_link(home: Path) -> BrokerLink:
    """The broker link; ConfigError saying how to enrol if there is none."""
    path = home / LINK_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return BrokerLink(
            address=data["address"],
            certificate=data["certificate"].encode(),
            broker_key=bytes.fromhex(data["broker_key"]),
            agency_id=data["agency_id"],
            region=data["region"],
        )
    except FileNotFoundError:
        raise ConfigError(
            "this node is not enrolled with a broker",
            hint="run `tessera node enrol CODE` with the operator's code",
        ) from None
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{path} is damaged ({exc})", hint="enrol again") from None


def load_cache(home: Path) -> DirectoryCache:
    """The verified directory (empty before the first sync)."""
    path = home / CACHE_FILE
    if not path.exists():
        return DirectoryCache()
    data = json.loads(path.read_text(encoding="utf-8"))
    return DirectoryCache(
        size=int(data["size"]),
        chain=bytes.fromhex(data["chain"]),
        records={r["agency_id"]: _record(r) for r in data["records"]},
        verified=set(data.get("verified", [])),
    )


def save_cache(home: Path, cache: DirectoryCache) -> None:
    """Write the verified directory atomically."""
    data = {
        "size": cache.size,
        "chain": cache.chain.hex(),
        "records": [_record_json(r) for r in cache.records.values()],
        "verified": sorted(cache.verified),
    }
    atomic_write(home / CACHE_FILE, json.dumps(data, indent=1).encode())


def open_directory_channel(
    link: BrokerLink, identity: crypto.Identity | None
) -> tuple[grpc.Channel, directory_grpc.DirectoryStub]:
    """A signed TLS channel to the broker, trusting only the pinned certificate."""
    channel = rpc.open_channel(link.address, link.certificate, identity, Limits().max_message_bytes)
    return channel, directory_grpc.DirectoryStub(channel)


def enrol(
    home: Path, identity: crypto.Identity, code_text: str, name: str, services: Iterable[str] = ()
) -> BrokerLink:
    """Enrol this node with the broker named in an enrolment code, then sync the directory."""
    code = enrolment.decode(code_text)
    certificate = enrolment.fetch_certificate(code)
    probe = BrokerLink(code.broker_address, certificate, b"", code.agency_id, code.region)
    channel, stub = open_directory_channel(probe, None)
    try:
        info = _call(stub.GetBrokerInfo, directory_pb.GetBrokerInfoRequest(), code.broker_address)
        if info.region != code.region:
            raise ConfigError(f"the broker serves region {info.region!r}, not {code.region!r}")
        statement = directory.enrol_statement(
            identity, code.agency_id, name, code.region, sorted(services), dt.datetime.now(dt.UTC)
        )
        _call(
            stub.Enrol,
            directory_pb.EnrolRequest(token=code.token, statement=statement),
            code.broker_address,
        )
    finally:
        channel.close()
    link = BrokerLink(
        code.broker_address, certificate, bytes(info.signing_key), code.agency_id, code.region
    )
    atomic_write(
        home / LINK_FILE,
        json.dumps(
            {
                "address": link.address,
                "certificate": link.certificate.decode(),
                "broker_key": link.broker_key.hex(),
                "agency_id": link.agency_id,
                "region": link.region,
            },
            indent=1,
        ).encode(),
    )
    sync(home, identity, link)
    return link


def sync(home: Path, identity: crypto.Identity, link: BrokerLink) -> DirectoryCache:
    """Fetch entries past the verified size, verify them against the signed head, re-pin."""
    cache = load_cache(home)
    channel, stub = open_directory_channel(link, identity)
    try:
        entries: list[common_pb.SignedBlob] = []
        while True:
            try:
                page = _call(
                    stub.GetEntries,
                    directory_pb.GetEntriesRequest(since=cache.size + len(entries), limit=_PAGE),
                    link.address,
                )
            except InvalidInput:
                # The broker's log is shorter than what we verified: take its signed head, so
                # the check below raises the rollback alarm rather than a usage error.
                head = _call(stub.GetHead, directory_pb.GetHeadRequest(), link.address).head
                break
            entries.extend(page.entries)
            head = page.head
            if len(page.entries) < _PAGE:
                break
    finally:
        channel.close()
    verified_head, new = directory.verify_extension(
        link.broker_key, link.region, cache.size, cache.chain, entries, head
    )
    cache.records = directory.apply_to_pins(cache.records, new)
    cache.size, cache.chain = verified_head.size, verified_head.chain
    save_cache(home, cache)
    return cache


def rotate_keys(
    link: BrokerLink, old: crypto.Identity, statement: common_pb.SignedBlob, possession: bytes
) -> None:
    """Have the broker record a ROTATE statement, the call signed by the old key."""
    channel, stub = open_directory_channel(link, old)
    try:
        _call(
            stub.RotateKeys,
            directory_pb.RotateKeysRequest(statement=statement, possession_signature=possession),
            link.address,
        )
    finally:
        channel.close()


def mark_verified(home: Path, agency_id: str) -> directory.AgencyRecord:
    """Record that an administrator compared this agency's fingerprint out of band."""
    cache = load_cache(home)
    record = cache.records.get(agency_id)
    if record is None:
        raise NotFound(
            f"no agency {agency_id!r} in this node's directory",
            hint="`tessera agency list` shows the agencies the node knows",
        )
    cache.verified.add(agency_id)
    save_cache(home, cache)
    return record


def _call(method: Any, request: Any, address: str) -> Any:
    try:
        return method(request, timeout=30)
    except grpc.RpcError as exc:
        raise rpc.error_from_rpc(exc, f"the broker at {address}") from None


def _record_json(record: directory.AgencyRecord) -> dict[str, Any]:
    return {
        "agency_id": record.agency_id,
        "name": record.name,
        "region": record.region,
        "services": list(record.services),
        "identity": base64.b64encode(record.identity.to_bytes()).decode(),
        "valid_from": record.valid_from.isoformat(),
        "valid_until": record.valid_until.isoformat() if record.valid_until else None,
        "revoked": record.revoked,
        "sequence": record.sequence,
    }


def _record(data: dict[str, Any]) -> directory.AgencyRecord:
    return directory.AgencyRecord(
        agency_id=data["agency_id"],
        name=data["name"],
        region=data["region"],
        services=tuple(data["services"]),
        identity=crypto.PublicIdentity.from_bytes(base64.b64decode(data["identity"])),
        valid_from=dt.datetime.fromisoformat(data["valid_from"]),
        valid_until=dt.datetime.fromisoformat(data["valid_until"]) if data["valid_until"] else None,
        revoked=bool(data["revoked"]),
        sequence=int(data["sequence"]),
    )
