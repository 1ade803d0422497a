"""The node's side of private statistics rounds (DESIGN.md section 7; proto tessera/v1/stats).

Pure computation over what the caller hands in (the need rows, the broker link, the verified
directory, the remaining budget); the relay worker does the I/O and the budget store the charge.

- :func:`local_table`: the node's table for a period from its need rows: a need counts in a
  period when its last update (``need.updated_at``) falls in that month; each survivor (case)
  contributes at most ``contribution_bound`` cells, once each, kept at random if more
  (``tessera.dp.bounded_counts``); then, if the round asks for it, the contribution histogram
  (``tessera.dp.contribution_histogram``: how many survivors fall in 1, 2, ... cells).
- :func:`check_round`: a node submits only to a round it accepts: signed by the pinned broker
  key (label ``tessera/v1/round``), for our region and a well-formed period, listing us, with
  participants in ascending byte order, a known table, a histogram of the expected shape, an
  open deadline, ε within our remaining budget, and (private mode) a threshold at least our
  configured minimum and no larger than the participants we count: ourselves, those our
  administrator verified out of band, and those our configuration trusts. Every refusal is a
  :class:`~tessera.errors.Refused` with the reason.
- :func:`build_share`: the cells submitted (recipe below).

Share recipe, per entry of the vector (the table's cells in cell order, row-major, last
dimension fastest, then the histogram's bins), scale s from ``dp.round_noise``: the table's
s = contribution_bound / (ε - ε_h), the histogram's 1 / ε_h:

- PRIVATE: v = count + noise, noise = NegBin(1/t, p) - NegBin(1/t, p) with p = exp(-1/s)
  (``dp.round_noise_share``); submitted = (v + net_mask) mod 2^64, where net_mask =
  ``dp.pair_masks(identity, own position, participants with their pinned keys, round_id,
  attempt, cells)``: for each other participant k, ``crypto.pairwise_mask`` with
  R = f"{round_id}/{attempt}", added if our position < k, subtracted otherwise.
- LOCAL_NOISE: submitted = (count + full discrete Laplace of scale s) mod 2^64
  (``dp.round_noise_share`` at threshold 1), unmasked.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from node import directory_sync
from node.store.budget import check_period
from tessera import crypto, dp, labels
from tessera.config import StatsPolicy
from tessera.errors import BadSignature, InvalidInput, Refused
from tessera.timestamps import to_datetime
from tessera.v1 import common_pb2 as common_pb
from tessera.v1 import stats_pb2 as stats_pb

__all__ = [
    "KNOWN_DIMENSIONS",
    "AcceptedRound",
    "NeedFact",
    "build_share",
    "check_round",
    "local_table",
    "period_of",
    "round_digest",
    "spec_from_pb",
    "spec_to_pb",
]

KNOWN_DIMENSIONS: Final = ("need_category", "need_status")


@dataclass(frozen=True)
class NeedFact:
    """What the table needs of one need row: whose, which category and status, last update."""

    case_id: str
    category: str
    status: str
    updated_at: dt.datetime


@dataclass(frozen=True)
class AcceptedRound:
    """A round this node checked and accepts, with what building and submitting need."""

    round: stats_pb.Round
    body: bytes
    digest: bytes
    spec: dp.TableSpec
    noise: dp.RoundNoise


def period_of(moment: dt.datetime) -> str:
    """The "YYYY-MM" a moment falls in (UTC)."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.UTC)
    return f"{moment.year:04d}-{moment.month:02d}"


def spec_from_pb(table: stats_pb.TableSpec) -> dp.TableSpec:
    """The dp table of a wire TableSpec; InvalidInput if malformed or with unknown dimensions."""
    for dimension in table.dimensions:
        if dimension.name not in KNOWN_DIMENSIONS:
            raise InvalidInput(f"this node cannot group by {dimension.name!r}")
    return dp.TableSpec(
        name=table.name,
        dimensions=tuple((d.name, tuple(d.values)) for d in table.dimensions),
        contribution_bound=int(table.contribution_bound),
    )


def spec_to_pb(spec: dp.TableSpec) -> stats_pb.TableSpec:
    """The wire TableSpec of a dp table."""
    return stats_pb.TableSpec(
        name=spec.name,
        dimensions=[
            stats_pb.TableDimension(name=name, values=list(values))
            for name, values in spec.dimensions
        ],
        contribution_bound=spec.contribution_bound,
    )


def local_table(
    needs: Iterable[NeedFact], spec: dp.TableSpec, period: str, rng: dp.Rng, bins: int = 0
) -> list[int]:
    """The node's vector for ``period``: the bounded counts (dp.bounded_counts, ``rng`` choosing
    what a record over the bound keeps), then ``bins`` histogram bins if asked.

    A need belongs to the period its last update falls in. A need whose category or status is
    not a value of the table's dimensions is not counted.
    """
    names = [name for name, _ in spec.dimensions]
    for name in names:
        if name not in KNOWN_DIMENSIONS:
            raise InvalidInput(f"this node cannot group by {name!r}")
    allowed = dict(spec.dimensions)
    per_case: dict[str, list[tuple[str, ...]]] = defaultdict(list)
    for need in needs:
        if period_of(need.updated_at) != period:
            continue
        values = {"need_category": need.category, "need_status": need.status}
        coordinates = tuple(values[name] for name in names)
        if all(value in allowed[name] for name, value in zip(names, coordinates, strict=True)):
            per_case[need.case_id].append(coordinates)
    records = list(per_case.values())
    counts = dp.bounded_counts(records, spec, rng)
    if bins:
        counts += dp.contribution_histogram(records, spec, bins)
    return counts


def round_digest(body: bytes) -> bytes:
    """digest(LABEL_ROUND, body of the signed Round): SubmitShareRequest.round_digest."""
    return crypto.digest(labels.LABEL_ROUND, body)


def verified_participants(
    round_: stats_pb.Round,
    own_id: str,
    cache: directory_sync.DirectoryCache,
    trusted: Sequence[str] = (),
) -> list[str]:
    """The round's participants that count toward our threshold: ourselves, and every other
    participant our administrator verified out of band or our configuration trusts
    (``[stats] trusted_agencies``), whose pinned record is not revoked."""
    counted = []
    for agency in round_.participants:
        record = cache.records.get(agency)
        vouched = agency in cache.verified or agency in trusted
        if agency == own_id or (vouched and record is not None and not record.revoked):
            counted.append(agency)
    return counted


def _signed_round(blob: common_pb.SignedBlob, link: directory_sync.BrokerLink) -> stats_pb.Round:
    """The Round in the blob, once the pinned broker key's signature verifies."""
    body, signature = bytes(blob.body), bytes(blob.signature)
    if bytes(blob.signer) != link.broker_key:
        raise Refused("the round is not signed by the pinned broker key")
    try:
        crypto.verify(link.broker_key, labels.LABEL_ROUND, body, signature)
    except BadSignature:
        raise Refused("the round's broker signature does not verify") from None
    round_ = stats_pb.Round()
    try:
        round_.ParseFromString(body)
    except Exception:
        raise Refused("the signed round cannot be parsed") from None
    return round_


def _check_shape(round_: stats_pb.Round, link: directory_sync.BrokerLink) -> dp.TableSpec:
    """Region, period, participants, mode, threshold and table; the spec if all is well."""
    if not round_.round_id or round_.attempt < 1:
        raise Refused("the round has no id or attempt")
    if round_.region != link.region:
        raise Refused(f"the round is for region {round_.region!r}, not ours ({link.region!r})")
    try:
        check_period(round_.period)
    except InvalidInput as exc:
        raise Refused(f"the round's period is malformed: {exc}") from None
    participants = list(round_.participants)
    if link.agency_id not in participants:
        raise Refused(f"we ({link.agency_id}) are not a participant of the round")
    if participants != sorted(participants, key=str.encode) or len(set(participants)) != len(
        participants
    ):
        raise Refused("the round's participants are not distinct and in ascending byte order")
    if round_.mode not in (stats_pb.ROUND_MODE_PRIVATE, stats_pb.ROUND_MODE_LOCAL_NOISE):
        raise Refused("the round's noise mode is not one this node supports")
    if round_.threshold < 1:
        raise Refused("the round's threshold must be at least 1")
    try:
        spec = spec_from_pb(round_.table)
    except InvalidInput as exc:
        raise Refused(f"the round's table is not acceptable: {exc}") from None
    return spec


def _check_noise(round_: stats_pb.Round, spec: dp.TableSpec) -> dp.RoundNoise:
    """The round's noise scales, once ε and the histogram are of a shape this node accepts."""
    epsilon = round_.epsilon
    if not math.isfinite(epsilon) or epsilon <= 0:
        raise Refused("the round's epsilon must be a positive finite number")
    bins, histogram_epsilon = 0, 0.0
    if round_.HasField("histogram"):
        bins, histogram_epsilon = int(round_.histogram.bins), round_.histogram.epsilon
        if bins != dp.histogram_bins(spec):
            raise Refused(
                f"the round's histogram has {bins} bins; this table's has {dp.histogram_bins(spec)}"
            )
    try:
        noise = dp.round_noise(spec, epsilon, bins, histogram_epsilon)
    except InvalidInput as exc:
        raise Refused(f"the round's noise is not acceptable: {exc}") from None
    if noise.cells > crypto.MAX_MASK_CELLS:
        raise Refused("the round's table has too many cells")
    return noise


def check_round(
    blob: common_pb.SignedBlob,
    link: directory_sync.BrokerLink,
    cache: directory_sync.DirectoryCache,
    remaining_budget: float,
    now: dt.datetime,
    policy: StatsPolicy | None = None,
) -> AcceptedRound:
    """Accept a broker-signed round, or raise Refused saying why (module docstring)."""
    policy = policy or StatsPolicy()
    round_ = _signed_round(blob, link)
    spec = _check_shape(round_, link)
    noise = _check_noise(round_, spec)
    counted = verified_participants(round_, link.agency_id, cache, policy.trusted_agencies)
    private = round_.mode == stats_pb.ROUND_MODE_PRIVATE
    if private and round_.threshold < policy.min_threshold:
        raise Refused(
            f"the round's threshold {round_.threshold} is below this node's minimum"
            f" {policy.min_threshold}",
            hint="ask the coordinator for a round with a higher threshold",
        )
    if private and round_.threshold > len(counted):
        raise Refused(
            f"the round's threshold {round_.threshold} is above the {len(counted)} participants"
            " this node counts (itself, agencies its administrator verified, and trusted ones)",
            hint="verify the other agencies' fingerprints with `tessera agency verify`",
        )
    epsilon = round_.epsilon
    if epsilon > remaining_budget + 1e-9:
        raise Refused(
            f"epsilon {epsilon:g} is above the {remaining_budget:g} left of this node's"
            f" budget for {round_.period}"
        )
    if round_.HasField("deadline") and to_datetime(round_.deadline, "the round's deadline") < now:
        raise Refused("the round's attempt is past its deadline")
    for agency in round_.participants:
        record = cache.records.get(agency)
        if agency != link.agency_id and (record is None or record.revoked):
            raise Refused(f"participant {agency!r} has no valid pinned directory record")
    body = bytes(blob.body)
    return AcceptedRound(round_, body, round_digest(body), spec, noise)


def build_share(
    identity: crypto.Identity,
    accepted: AcceptedRound,
    counts: Sequence[int],
    cache: directory_sync.DirectoryCache,
    own_id: str,
    rng: dp.Rng,
) -> list[int]:
    """The masked cells to submit (module docstring: the recipe)."""
    round_, noise = accepted.round, accepted.noise
    if len(counts) != noise.cells:
        raise InvalidInput(f"the round's vector has {noise.cells} entries, got {len(counts)}")
    if round_.mode == stats_pb.ROUND_MODE_LOCAL_NOISE:
        local = dp.round_noise_share(noise, 1, rng)
        return dp.mask_share([c + n for c, n in zip(counts, local, strict=True)])
    share = dp.round_noise_share(noise, int(round_.threshold), rng)
    values = [c + n for c, n in zip(counts, share, strict=True)]
    keyed: list[tuple[str, crypto.PublicIdentity]] = []
    for agency in round_.participants:
        if agency == own_id:
            keyed.append((agency, identity.public))
        else:
            keyed.append((agency, cache.records[agency].identity))
    net = dp.pair_masks(
        identity,
        list(round_.participants).index(own_id),
        keyed,
        round_.round_id,
        int(round_.attempt),
        noise.cells,
    )
    return dp.mask_share(values, [net])
