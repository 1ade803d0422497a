"""The escrow's shared rules: the tombstone chain, the signed escrow head, audit checkpoints
(escrow.proto; issue 14; docs/storage.md, "Erasures that outlive the home").

Pure functions over bytes: the broker signs with them, the node verifies with them, and neither
needs to trust the other's arithmetic. The chain is

    chain_0 = 32 zero bytes
    chain_n = digest(LABEL_ESCROW_CHAIN, chain_(n-1) || frame(n, tombstone_id,
                     digest(LABEL_TOMBSTONE, sealed)))

so a head (size, chain) signed by the broker commits to every tombstone of an agency's escrow in
order: a node that recomputes it from the tombstones it was given knows it got all of them.
Checkpoints chain too (each names the digest of the one before), like a transparency log.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from tessera import crypto, labels
from tessera.errors import BadSignature, InvalidInput, RolledBack
from tessera.timestamps import to_datetime, to_timestamp
from tessera.v1 import common_pb2 as common_pb
from tessera.v1 import escrow_pb2 as escrow_pb

GENESIS_CHAIN = bytes(32)
# A tombstone id is a UUID in text form; the broker refuses anything longer.
TOMBSTONE_ID_CHARS = 36
# Every sealed tombstone and sealed checkpoint position has exactly this many bytes (the node
# pads before sealing), so the broker cannot tell one kind from another by its size.
SEALED_BYTES = 48 + crypto.SIGNATURE_BYTES + 256
MAX_HEAD_BYTES = 4096


def _frame(*parts: bytes) -> bytes:
    # common.proto, convention 3: each part prefixed with its length as 8 bytes big-endian.
    return b"".join(len(part).to_bytes(8, "big") + part for part in parts)


def tombstone_digest(sealed: bytes) -> bytes:
    """digest(LABEL_TOMBSTONE, sealed): what the chain commits to for one tombstone."""
    return crypto.digest(labels.LABEL_TOMBSTONE, sealed)


def chain_next(previous: bytes, sequence: int, tombstone_id: str, sealed: bytes) -> bytes:
    """The chain value after tombstone number ``sequence`` (module docstring)."""
    return crypto.digest(
        labels.LABEL_ESCROW_CHAIN,
        previous
        + _frame(sequence.to_bytes(8, "big"), tombstone_id.encode(), tombstone_digest(sealed)),
    )


def sign_blob(signer: crypto.Identity, label: bytes, body: bytes) -> common_pb.SignedBlob:
    """``body`` signed by ``signer`` under ``label`` (common.proto, convention 2)."""
    return common_pb.SignedBlob(
        body=body, signature=signer.sign(label, body), signer=signer.public.signing_key
    )


def _verified_body(blob: common_pb.SignedBlob, broker_key: bytes, label: bytes, what: str) -> bytes:
    if len(blob.body) > MAX_HEAD_BYTES:
        raise BadSignature(f"the broker's {what} is too large")
    if bytes(blob.signer) != broker_key:
        raise BadSignature(f"the {what} is not signed by this node's broker")
    crypto.verify(broker_key, label, bytes(blob.body), bytes(blob.signature))
    return bytes(blob.body)


# --- the escrow head ------------------------------------------------------------------------


@dataclass(frozen=True)
class EscrowHead:
    """A verified head: an agency's escrow holds ``size`` tombstones ending at ``chain``."""

    agency_id: str
    size: int
    chain: bytes
    signed_at: dt.datetime


def sign_head(
    broker: crypto.Identity, agency_id: str, size: int, chain: bytes, now: dt.datetime
) -> common_pb.SignedBlob:
    """The broker's signed EscrowHead of one agency's escrow."""
    if size < 0 or len(chain) != 32 or (size == 0 and chain != GENESIS_CHAIN):
        raise InvalidInput("an escrow head needs a size and the chain value at that size")
    head = escrow_pb.EscrowHead(agency_id=agency_id, size=size, chain=chain)
    head.signed_at.CopyFrom(to_timestamp(now, "now"))
    return sign_blob(broker, labels.LABEL_ESCROW_HEAD, head.SerializeToString(deterministic=True))


def verify_head(blob: common_pb.SignedBlob, broker_key: bytes, agency_id: str) -> EscrowHead:
    """A head signed by the pinned broker key for this agency; BadSignature otherwise."""
    body = _verified_body(blob, broker_key, labels.LABEL_ESCROW_HEAD, "escrow head")
    head = escrow_pb.EscrowHead()
    try:
        head.ParseFromString(body)
    except DecodeError:
        raise BadSignature("the broker's escrow head is malformed") from None
    if head.agency_id != agency_id:
        raise BadSignature(f"the escrow head is {head.agency_id!r}'s, not this agency's")
    if len(head.chain) != 32 or not head.HasField("signed_at"):
        raise BadSignature("the broker's escrow head is malformed")
    return EscrowHead(agency_id, head.size, bytes(head.chain), to_datetime(head.signed_at))


def verify_entries(entries: Iterable[escrow_pb.EscrowEntry], head: EscrowHead) -> None:
    """Check that ``entries`` are the whole escrow the head commits to, in order, from the first.

    RolledBack if any is missing, out of order, altered, or the list and head disagree.
    """
    chain = GENESIS_CHAIN
    count = 0
    for entry in entries:
        count += 1
        if entry.sequence != count:
            raise RolledBack(
                f"the broker's escrow skips or repeats tombstone {count} (got {entry.sequence})"
            )
        chain = chain_next(chain, count, entry.tombstone.tombstone_id, entry.tombstone.sealed)
    if count != head.size or chain != head.chain:
        raise RolledBack(
            f"the broker sent {count} tombstones that do not add up to its signed head "
            f"({head.size} tombstones)"
        )


# --- audit checkpoints ----------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A verified broker checkpoint of an agency's (still sealed) audit position."""

    agency_id: str
    number: int
    sealed_position: bytes
    checkpointed_at: dt.datetime
    previous: bytes
    blob: common_pb.SignedBlob


def checkpoint_digest(body: bytes) -> bytes:
    """What the next checkpoint names as ``previous``."""
    return crypto.digest(labels.LABEL_AUDIT_CHECKPOINT, body)


def sign_checkpoint(
    broker: crypto.Identity,
    agency_id: str,
    number: int,
    sealed_position: bytes,
    previous: bytes,
    now: dt.datetime,
) -> common_pb.SignedBlob:
    """The broker's signed AuditCheckpoint."""
    body = escrow_pb.AuditCheckpoint(
        agency_id=agency_id, number=number, sealed_position=sealed_position, previous=previous
    )
    body.checkpointed_at.CopyFrom(to_timestamp(now, "now"))
    return sign_blob(
        broker, labels.LABEL_AUDIT_CHECKPOINT, body.SerializeToString(deterministic=True)
    )


def verify_checkpoint(blob: common_pb.SignedBlob, broker_key: bytes, agency_id: str) -> Checkpoint:
    """A checkpoint signed by the pinned broker key for this agency; BadSignature otherwise."""
    body = _verified_body(blob, broker_key, labels.LABEL_AUDIT_CHECKPOINT, "audit checkpoint")
    checkpoint = escrow_pb.AuditCheckpoint()
    try:
        checkpoint.ParseFromString(body)
    except DecodeError:
        raise BadSignature("the broker's audit checkpoint is malformed") from None
    if checkpoint.agency_id != agency_id:
        raise BadSignature(f"the checkpoint is {checkpoint.agency_id!r}'s, not this agency's")
    if not checkpoint.number or not checkpoint.HasField("checkpointed_at"):
        raise BadSignature("the broker's audit checkpoint is malformed")
    return Checkpoint(
        agency_id=agency_id,
        number=checkpoint.number,
        sealed_position=bytes(checkpoint.sealed_position),
        checkpointed_at=to_datetime(checkpoint.checkpointed_at),
        previous=bytes(checkpoint.previous),
        blob=blob,
    )
