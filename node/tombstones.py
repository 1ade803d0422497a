"""Tombstones and checkpoint positions a node seals to itself (escrow.proto; issue 14).

Pure functions over bytes and domain objects; ``node.escrow`` does the broker I/O and
``node.store.anchors`` the storage. A tombstone records one erasure or staff removal; a
checkpoint position records the node's audit head. Both are padded to a fixed length, signed by
the node and sealed to the node's own X25519 key (``tessera.crypto.seal`` with the node as
sender and recipient), so the broker that keeps them learns only that one exists and when: not
what it records, not which kind it is, not how long the node's audit log is.

A tombstone's id is derived from its content with a key only the node holds, so the same erasure
always has the same id: depositing it again (after a restore) is recognised by the broker as a
repeat, while the id itself says nothing about the survivor.
"""

from __future__ import annotations

import datetime as dt
import enum
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from tessera import crypto, escrow, labels
from tessera.errors import BadSignature, WrongRecipient
from tessera.timestamps import to_datetime, to_timestamp
from tessera.v1 import escrow_pb2 as escrow_pb

# Padded payload length before sealing: the sealed box is then escrow.SEALED_BYTES long.
_PADDED = escrow.SEALED_BYTES - 48 - crypto.SIGNATURE_BYTES
_LABEL_TOMBSTONE_ID = b"tessera/v1/tombstone-id"


class TombstoneKind(enum.Enum):
    """What a tombstone records."""

    ERASURE = "erasure"
    STAFF_REMOVAL = "staff-removal"


_KIND_PB = {
    TombstoneKind.ERASURE: escrow_pb.TOMBSTONE_KIND_ERASURE,
    TombstoneKind.STAFF_REMOVAL: escrow_pb.TOMBSTONE_KIND_STAFF_REMOVAL,
}


@dataclass(frozen=True)
class Tombstone:
    """One erasure (subject: the case id) or staff removal (subject: the key in hex)."""

    tombstone_id: str
    kind: TombstoneKind
    subject: str
    at: dt.datetime


def tombstone_id(record_key: crypto.DataKey, kind: TombstoneKind, subject: str) -> str:
    """The UUID of the tombstone of ``kind`` for ``subject``: the same every time, unlinkable
    to it without the node's record key."""
    key = crypto.derive_key(record_key, _LABEL_TOMBSTONE_ID)
    return str(uuid.UUID(hex=crypto.blind_index(key, f"{kind.value}:{subject}")[:32], version=4))


def _pad(body: bytes) -> bytes:
    if len(body) > _PADDED - 2:
        raise ValueError("a sealed record is too long to pad")  # never: ids are short
    return struct.pack(">H", len(body)) + body + bytes(_PADDED - 2 - len(body))


def _unpad(padded: bytes) -> bytes:
    if len(padded) != _PADDED:
        raise BadSignature("a sealed record has the wrong length")
    (size,) = struct.unpack(">H", padded[:2])
    if size > _PADDED - 2 or any(padded[2 + size :]):
        raise BadSignature("a sealed record is malformed")
    return padded[2 : 2 + size]


def seal_tombstone(identity: crypto.Identity, tombstone: Tombstone) -> bytes:
    """The tombstone signed by the node and sealed to the node itself, escrow.SEALED_BYTES long."""
    message = escrow_pb.Tombstone(
        tombstone_id=tombstone.tombstone_id,
        kind=_KIND_PB[tombstone.kind],
        subject=tombstone.subject,
    )
    message.at.CopyFrom(to_timestamp(tombstone.at))
    payload = _pad(message.SerializeToString(deterministic=True))
    return crypto.seal(identity, identity.public, labels.LABEL_TOMBSTONE, payload)


def _open_own(identities: Sequence[crypto.Identity], label: bytes, sealed: bytes) -> bytes:
    # Sealed by the node to itself, under whichever identity it had then (keys rotate).
    for identity in identities[:-1]:
        try:
            return crypto.open_sealed(identity, identity.public, label, sealed)
        except WrongRecipient:
            continue
    last = identities[-1]
    return crypto.open_sealed(last, last.public, label, sealed)


def open_tombstone(
    identities: Sequence[crypto.Identity], tombstone_id: str, sealed: bytes
) -> Tombstone:
    """Open a tombstone this node sealed (under any of its identities); WrongRecipient or
    BadSignature if it did not, or if it was filed under another id."""
    payload = _unpad(_open_own(identities, labels.LABEL_TOMBSTONE, sealed))
    message = escrow_pb.Tombstone()
    try:
        message.ParseFromString(payload)
    except DecodeError:
        raise BadSignature("an escrowed tombstone is malformed") from None
    kinds = {v: k for k, v in _KIND_PB.items()}
    if message.tombstone_id != tombstone_id or message.kind not in kinds:
        raise BadSignature("an escrowed tombstone does not match its id")
    return Tombstone(
        tombstone_id=message.tombstone_id,
        kind=kinds[message.kind],
        subject=message.subject,
        at=to_datetime(message.at),
    )


@dataclass(frozen=True)
class AuditPosition:
    """The head of the node's audit log: its last entry's sequence number and hash."""

    seq: int
    entry_hash: bytes


def seal_position(identity: crypto.Identity, position: AuditPosition) -> bytes:
    """The audit position signed by the node and sealed to itself, escrow.SEALED_BYTES long."""
    message = escrow_pb.CheckpointPosition(
        audit_sequence=position.seq, entry_hash=position.entry_hash
    )
    payload = _pad(message.SerializeToString(deterministic=True))
    return crypto.seal(identity, identity.public, labels.LABEL_CHECKPOINT_POSITION, payload)


def open_position(identities: Sequence[crypto.Identity], sealed: bytes) -> AuditPosition:
    """Open a checkpoint position this node sealed; BadSignature or WrongRecipient otherwise."""
    payload = _unpad(_open_own(identities, labels.LABEL_CHECKPOINT_POSITION, sealed))
    message = escrow_pb.CheckpointPosition()
    try:
        message.ParseFromString(payload)
    except DecodeError:
        raise BadSignature("a checkpointed audit position is malformed") from None
    return AuditPosition(seq=message.audit_sequence, entry_hash=bytes(message.entry_hash))
