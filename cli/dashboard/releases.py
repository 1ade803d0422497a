"""Which releases the dashboard may draw (DESIGN.md section 7; docs/statistics.md, "How a node
builds its share", step 5: a release is read only after its signature verifies under
``labels.LABEL_RELEASE``).

Every blob the broker lists is checked on its own against the broker's signing key by
:func:`check_release`, which does no I/O: a blob that verifies becomes a :class:`VerifiedRelease`,
any other a :class:`RefusedRelease` that says why and carries no number. A period in which any
listed release is refused is refused as a whole (it fails closed): the broker served something
it did not sign, so which of that period's releases is the newest cannot be trusted either.

:class:`ReleaseSource` is the dashboard's only way to the broker: it lists signed releases with
the coordinator's credential and nothing else (no round, no agency, no survivor data).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cli.stats_render import MAX_TREND_MONTHS, month_range, newest_release, release_document
from tessera import labels
from tessera.errors import BadSignature, InvalidInput, Refused

if TYPE_CHECKING:
    from cli.stats_client import StatsClient
    from tessera.v1 import stats_pb2 as stats_pb

#: What a refused release is shown as, whatever the detail.
SIGNATURE_REFUSED = "signature does not verify"
_PERIOD = re.compile(r"^[0-9]{4}-(0[1-9]|1[0-2])$")
# The most characters of an unverified claim (an id, a period) the dashboard repeats.
_CLAIM_CHARS = 80


@dataclass(frozen=True)
class DashboardLimits:
    """Safety limits of one page view (named defaults, not literals in the code)."""

    max_releases: int = 1000  # the newest releases listed and checked per page
    trend_months: int = MAX_TREND_MONTHS  # the longest trend drawn


@dataclass(frozen=True)
class VerifiedRelease:
    """A release whose broker signature verified; ``document`` is
    :func:`cli.stats_render.release_document` of it, the one source of every number shown."""

    release: stats_pb.Release
    document: dict[str, Any] = field(compare=False)

    @property
    def release_id(self) -> str:
        return self.release.release_id


@dataclass(frozen=True)
class RefusedRelease:
    """A listed blob that is not drawn, and why. ``claimed_id`` and ``claimed_period`` come from
    its unverified body (empty if unreadable): they only say where to show the refusal."""

    reason: str
    claimed_id: str
    claimed_period: str


Checked = VerifiedRelease | RefusedRelease


def check_release(blob: Any, broker_key: bytes) -> Checked:
    """Verify one broker-signed release blob (a ``SignedBlob``) against ``broker_key``."""
    from google.protobuf.message import DecodeError

    from cli.stats_client import open_signed
    from tessera.v1 import stats_pb2 as stats_pb

    claimed_id, claimed_period = _claims(bytes(blob.body))

    def refused(reason: str) -> RefusedRelease:
        return RefusedRelease(reason, claimed_id, claimed_period)

    try:
        release = open_signed(blob, broker_key, labels.LABEL_RELEASE, stats_pb.Release())
    except Refused:
        return refused(f"{SIGNATURE_REFUSED}: it is signed by a key other than the broker's")
    except BadSignature:
        return refused(f"{SIGNATURE_REFUSED} under the broker's key")
    except DecodeError:
        return refused("signed, but not a readable release")
    try:
        document = release_document(release)
    except InvalidInput as exc:
        return refused(f"signed, but malformed: {exc.message}")
    return VerifiedRelease(release, document)


def _claims(body: bytes) -> tuple[str, str]:
    """The release id and period an unverified body claims, shortened ("" if unreadable)."""
    from google.protobuf.message import DecodeError

    from tessera.v1 import stats_pb2 as stats_pb

    try:
        claimed = stats_pb.Release.FromString(body)
    except DecodeError:
        return "", ""
    return claimed.release_id[:_CLAIM_CHARS], claimed.period[:_CLAIM_CHARS]


@dataclass(frozen=True)
class PeriodReleases:
    """Every checked release the broker listed for one period (verified ones of the region)."""

    period: str
    region: str
    verified: tuple[VerifiedRelease, ...]
    refused: tuple[RefusedRelease, ...]

    @property
    def newest(self) -> VerifiedRelease | None:
        """The release shown for the period: its newest verified one, none if any is refused."""
        return self.newest_with(lambda _release: True)

    def newest_with(self, accept: Callable[[stats_pb.Release], bool]) -> VerifiedRelease | None:
        """The newest verified release ``accept`` takes (as ``stats trend`` chooses), or None;
        always None for a refused period."""
        if self.refused:
            return None
        chosen = newest_release([v.release for v in self.verified], self.region, accept)
        return next((v for v in self.verified if v.release is chosen), None)


@dataclass(frozen=True)
class Board:
    """What the broker lists, checked: the region's periods, newest first."""

    region: str
    periods: tuple[PeriodReleases, ...]
    unplaced: tuple[RefusedRelease, ...]  # refused blobs naming no readable period
    truncated: bool  # more releases exist than DashboardLimits.max_releases

    def period(self, period: str) -> PeriodReleases | None:
        return next((p for p in self.periods if p.period == period), None)

    def downloadable(self, release_id: str) -> VerifiedRelease | None:
        """A verified release of a period that is not refused, by its id."""
        for entry in self.periods:
            for verified in () if entry.refused else entry.verified:
                if verified.release_id == release_id:
                    return verified
        return None

    def trend_months(
        self, last: str, accept: Callable[[stats_pb.Release], bool], limit: int
    ) -> list[tuple[str, VerifiedRelease | None, bool]]:
        """Each month up to ``last`` (from the board's earliest period, at most ``limit``
        months): the newest verified release ``accept`` takes, and whether the month is
        refused."""
        earliest = min((p.period for p in self.periods), default=last)
        months = month_range(min(earliest, last), last, limit=10_000)[-limit:]
        out: list[tuple[str, VerifiedRelease | None, bool]] = []
        for month in months:
            entry = self.period(month)
            if entry is None:
                out.append((month, None, False))
            else:
                out.append((month, entry.newest_with(accept), bool(entry.refused)))
        return out


def build_board(region: str, checked: Iterable[Checked], truncated: bool = False) -> Board:
    """Group checked releases by period (a refused one by the period it claims)."""
    verified: dict[str, list[VerifiedRelease]] = {}
    refused: dict[str, list[RefusedRelease]] = {}
    unplaced: list[RefusedRelease] = []
    for item in checked:
        if isinstance(item, VerifiedRelease):
            if item.release.region == region and _PERIOD.match(item.release.period):
                verified.setdefault(item.release.period, []).append(item)
        elif _PERIOD.match(item.claimed_period):
            refused.setdefault(item.claimed_period, []).append(item)
        else:
            unplaced.append(item)
    periods = sorted({*verified, *refused}, reverse=True)
    return Board(
        region=region,
        periods=tuple(
            PeriodReleases(p, region, tuple(verified.get(p, ())), tuple(refused.get(p, ())))
            for p in periods
        ),
        unplaced=tuple(unplaced),
        truncated=truncated,
    )


class ReleaseSource:
    """The broker as the dashboard reads it: signed releases, listed and checked, nothing else.

    The broker's signing key and region are fetched once, over the TLS channel the coordinator's
    credential pins, and every later blob is checked against that key.
    """

    def __init__(self, client: StatsClient, region: str, limits: DashboardLimits) -> None:
        self._client = client
        self._limits = limits
        self.broker_key = client.broker_key()
        self.region = region or str(client.info().region)

    def board(self) -> Board:
        """The newest releases (up to the limit), each checked, grouped by period."""
        blobs: Sequence[Any] = self._client.signed_releases("", self._limits.max_releases + 1)
        truncated = len(blobs) > self._limits.max_releases
        checked = [check_release(b, self.broker_key) for b in blobs[: self._limits.max_releases]]
        return build_board(self.region, checked, truncated)
