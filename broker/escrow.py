"""tessera.v1.Escrow on the broker: agencies' sealed tombstones and audit checkpoints (issue 14).

Thin, as every servicer: the caller's agency comes from its signed request (tessera.rpc with
broker.access), the store appends or reads, and the broker signs heads and checkpoints with its
key (tessera.escrow). Nothing here can open a tombstone or a checkpoint position: both are
sealed by the node to itself. The broker learns how many of each an agency deposited, and when.
"""

from __future__ import annotations

from typing import Any

import grpc.aio
from sqlalchemy import Engine

from broker import serde
from broker.service import run_blocking, utc_now
from broker.store.escrow import MAX_PAGE, EscrowStore, Head
from tessera import crypto, escrow, rpc
from tessera.errors import InvalidInput
from tessera.v1 import common_pb2 as common_pb
from tessera.v1 import escrow_pb2 as escrow_pb
from tessera.v1 import escrow_pb2_grpc as escrow_grpc

Context = grpc.aio.ServicerContext[Any, Any]
_LAST_POSITION = 2**63 - 1
_DEFAULT_PAGE = 500


class EscrowServicer(escrow_grpc.EscrowServicer):
    """Implements tessera.v1.Escrow for enrolled agencies, each over its own escrow only."""

    def __init__(self, engine: Engine, identity: crypto.Identity) -> None:
        self._store = EscrowStore(engine)
        self._identity = identity

    def _signed_head(self, agency_id: str, head: Head) -> common_pb.SignedBlob:
        return escrow.sign_head(self._identity, agency_id, head.size, head.chain, utc_now())

    async def DepositTombstones(  # noqa: N802 - the proto's method name
        self, request: escrow_pb.DepositTombstonesRequest, context: Context
    ) -> escrow_pb.DepositTombstonesResponse:
        agency_id = rpc.current_caller().principal
        pairs = [(t.tombstone_id, bytes(t.sealed)) for t in request.tombstones]
        sequences, head = await run_blocking(self._store.deposit, agency_id, pairs, utc_now())
        return escrow_pb.DepositTombstonesResponse(
            sequences=sequences, head=self._signed_head(agency_id, head)
        )

    async def ListTombstones(  # noqa: N802 - the proto's method name
        self, request: escrow_pb.ListTombstonesRequest, context: Context
    ) -> escrow_pb.ListTombstonesResponse:
        agency_id = rpc.current_caller().principal
        limit = min(request.limit or _DEFAULT_PAGE, MAX_PAGE)
        # No position is past SQLite's 64-bit integers; asking after one answered INTERNAL (found
        # by fuzzing, issue 16). Nothing lies after it either way.
        since = min(request.since, _LAST_POSITION)
        rows, head = await run_blocking(self._store.tombstones, agency_id, since, limit)
        return escrow_pb.ListTombstonesResponse(
            entries=[serde.escrow_entry_pb(row) for row in rows],
            head=self._signed_head(agency_id, head),
        )

    async def Checkpoint(  # noqa: N802 - the proto's method name
        self, request: escrow_pb.CheckpointRequest, context: Context
    ) -> escrow_pb.CheckpointResponse:
        agency_id = rpc.current_caller().principal
        sealed = bytes(request.sealed_position)
        if len(sealed) != escrow.SEALED_BYTES:
            raise InvalidInput(f"a sealed position is exactly {escrow.SEALED_BYTES} bytes")
        now = utc_now()

        def sign(number: int, previous: bytes) -> tuple[bytes, bytes]:
            blob = escrow.sign_checkpoint(self._identity, agency_id, number, sealed, previous, now)
            return bytes(blob.body), bytes(blob.signature)

        body, signature = await run_blocking(self._store.checkpoint, agency_id, now, sign)
        return escrow_pb.CheckpointResponse(checkpoint=self._blob(body, signature))

    async def LatestCheckpoint(  # noqa: N802 - the proto's method name
        self, request: escrow_pb.LatestCheckpointRequest, context: Context
    ) -> escrow_pb.LatestCheckpointResponse:
        agency_id = rpc.current_caller().principal
        latest = await run_blocking(self._store.latest_checkpoint, agency_id)
        if latest is None:
            return escrow_pb.LatestCheckpointResponse()
        return escrow_pb.LatestCheckpointResponse(checkpoint=self._blob(*latest))

    def _blob(self, body: bytes, signature: bytes) -> common_pb.SignedBlob:
        return serde.signed_blob(body, signature, self._identity.public.signing_key)
