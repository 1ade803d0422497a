"""Conversions between the broker's protobuf messages and its domain objects: the broker side's
one serde module (docs/architecture.md). The servicers (``broker.service``, ``broker.stats``,
``broker.escrow``) validate, call the stores and the domain, and convert through here; the
stores never see a ``_pb2`` type.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import TYPE_CHECKING

from broker.domain import AcceptedEnvelope, EnvelopePut, StoredEnvelope
from tessera import dp, rpc
from tessera.errors import InvalidInput, TesseraError
from tessera.timestamps import to_timestamp
from tessera.v1 import common_pb2 as common_pb
from tessera.v1 import escrow_pb2 as escrow_pb
from tessera.v1 import relay_pb2 as relay_pb
from tessera.v1 import stats_pb2 as stats_pb

if TYPE_CHECKING:
    from broker.store.escrow import StoredTombstone
    from broker.store.stats import StoredRound

#: The most cells a table may have (its spec is refused beyond).
MAX_CELLS = 10_000


def signed_blob(body: bytes, signature: bytes, signer: bytes) -> common_pb.SignedBlob:
    """A signed body as the wire carries it."""
    return common_pb.SignedBlob(body=body, signature=signature, signer=signer)


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


# --- relay --------------------------------------------------------------------------------------


def envelope_put(sender: str, request: relay_pb.SendRequest) -> EnvelopePut:
    """A Send as the store takes it (the store checks every field)."""
    return EnvelopePut(
        sender_id=sender,
        recipient_id=request.recipient_agency_id,
        idempotency_key=request.idempotency_key,
        consent_commitment=request.consent_commitment,
        ciphertext=request.sealed_envelope,
    )


def relay_receipt_body(accepted: AcceptedEnvelope) -> bytes:
    """The serialised RelayReceipt the broker signs for an accepted envelope."""
    return relay_pb.RelayReceipt(
        delivery_id=accepted.envelope_id,
        sender_agency_id=accepted.sender_id,
        recipient_agency_id=accepted.recipient_id,
        idempotency_key=accepted.idempotency_key,
        envelope_digest=accepted.envelope_digest,
        consent_commitment=accepted.consent_commitment,
        size=accepted.size,
        accepted_at=to_timestamp(accepted.received_at),
    ).SerializeToString()


def send_response(receipt: common_pb.SignedBlob, duplicate: bool) -> relay_pb.SendResponse:
    """A Send's answer: the signed receipt, and whether it repeated an earlier Send."""
    return relay_pb.SendResponse(receipt=receipt, duplicate=duplicate)


def send_refusal(error: TesseraError) -> relay_pb.SendResult:
    """One envelope of a batch refused, as the typed error would have mapped it alone."""
    code, message, hint, kind = rpc.refusal_parts(error)
    return relay_pb.SendResult(
        refused=relay_pb.SendRefusal(code=code, message=message, hint=hint, kind=kind)
    )


def delivery_pb(envelope: StoredEnvelope) -> relay_pb.Delivery:
    """An envelope as it is offered to its recipient."""
    return relay_pb.Delivery(
        delivery_id=envelope.envelope_id,
        sender_agency_id=envelope.sender_id,
        sealed_envelope=envelope.ciphertext,
        received_at=to_timestamp(envelope.received_at),
        consent_commitment=envelope.consent_commitment,
        attempt=envelope.attempts,
    )


# --- escrow -------------------------------------------------------------------------------------


def escrow_entry_pb(row: StoredTombstone) -> escrow_pb.EscrowEntry:
    """One escrowed tombstone as its agency reads it back."""
    return escrow_pb.EscrowEntry(
        sequence=row.sequence,
        tombstone=escrow_pb.SealedTombstone(tombstone_id=row.tombstone_id, sealed=row.sealed),
        deposited_at=to_timestamp(_aware(row.deposited_at)),
    )


# --- statistics: tables, rounds, releases -------------------------------------------------------


def spec_from_proto(table: stats_pb.TableSpec) -> dp.TableSpec:
    """A wire TableSpec as a validated :class:`tessera.dp.TableSpec` (InvalidInput otherwise)."""
    spec = dp.TableSpec(
        name=table.name,
        dimensions=tuple((d.name, tuple(d.values)) for d in table.dimensions),
        contribution_bound=int(table.contribution_bound),
    )
    if spec.size > MAX_CELLS:
        raise InvalidInput(f"a table has at most {MAX_CELLS} cells; this one has {spec.size}")
    return spec


def spec_to_proto(spec: dp.TableSpec) -> stats_pb.TableSpec:
    """A :class:`tessera.dp.TableSpec` as it travels."""
    return stats_pb.TableSpec(
        name=spec.name,
        dimensions=[stats_pb.TableDimension(name=n, values=list(v)) for n, v in spec.dimensions],
        contribution_bound=spec.contribution_bound,
    )


def local_noise(mode: int) -> bool:
    """Whether a round's wire mode is local noise (every node adds the full noise)."""
    return mode == stats_pb.ROUND_MODE_LOCAL_NOISE


def known_mode(mode: int) -> bool:
    """Whether a wire round mode is one a round may be opened in."""
    return mode in (stats_pb.ROUND_MODE_PRIVATE, stats_pb.ROUND_MODE_LOCAL_NOISE)


def round_mode_pb(local: bool) -> stats_pb.RoundMode.ValueType:
    """The wire round mode: local noise, or private (noise shares)."""
    return stats_pb.ROUND_MODE_LOCAL_NOISE if local else stats_pb.ROUND_MODE_PRIVATE


def round_noise_of(body: stats_pb.Round, spec: dp.TableSpec) -> dp.RoundNoise:
    """The noise scales of a signed round: its table, then its histogram if it has one."""
    if not body.HasField("histogram"):
        return dp.round_noise(spec, body.epsilon)
    return dp.round_noise(spec, body.epsilon, int(body.histogram.bins), body.histogram.epsilon)


def round_status_pb(stored: StoredRound, signer: bytes) -> stats_pb.RoundStatus:
    """A round as the broker reports it: the signed attempt, state, submissions, declines."""
    return stats_pb.RoundStatus(
        round=signed_blob(stored.body, stored.signature, signer),
        state=stored.state,  # type: ignore[arg-type]
        submitted=list(stored.submitted),
        release_id=stored.release_id or "",
        declines=[
            stats_pb.RoundDecline(
                agency_id=d.agency_id, reason=d.reason, declined_at=to_timestamp(d.declined_at)
            )
            for d in stored.declines
        ],
        cancel_reason=stored.cancel_reason or "",
    )


def released_cells(
    cells: Sequence[tuple[Sequence[str], int, float, float]],
) -> list[stats_pb.ReleasedCell]:
    """Released cells (coordinates, value, lower, upper) for the wire."""
    return [
        stats_pb.ReleasedCell(coordinates=list(c), value=v, lower=lo, upper=hi)
        for c, v, lo, hi in cells
    ]
