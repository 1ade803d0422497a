"""What the dashboard's templates show, built from verified releases only (no I/O).

Every number comes from :func:`cli.stats_render.release_document` of a
:class:`~cli.dashboard.releases.VerifiedRelease` (or :func:`~cli.stats_render.trend_document`
of such releases): tables show the numbers as released, charts and heat-map colours the bars
:func:`~cli.stats_render.clamp_at_zero` makes of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cli.dashboard import svg
from cli.dashboard.releases import Board, VerifiedRelease
from cli.stats_render import (
    CATEGORY_DIMENSION,
    NO_RELEASE,
    RELEASED,
    STATUS_DIMENSION,
    Bar,
    clamp_at_zero,
    find_cell,
    release_rows,
    trend_bars,
    trend_document,
    unmet_bars,
)
from tessera.errors import InvalidInput

#: A trend month whose period the dashboard refused (a release there failed its check).
REFUSED = "refused"
HEAT_LEVELS = 6  # heat-0 (nothing) to heat-5 (the region's largest cell)
UNMET = "unmet"


@dataclass(frozen=True)
class UnmetRow:
    """One category's unmet need: as released, and as drawn."""

    category: str
    value: int
    lower: float
    upper: float
    drawn: Bar


@dataclass(frozen=True)
class HeatCell:
    value: int
    lower: float
    upper: float
    level: int
    clamped: bool


@dataclass(frozen=True)
class HeatRow:
    category: str
    cells: tuple[HeatCell | None, ...]  # None: the table has no such cell


@dataclass(frozen=True)
class HeatMap:
    statuses: tuple[str, ...]
    rows: tuple[HeatRow, ...]
    top: float  # the largest drawn value, heat-5


@dataclass(frozen=True)
class ReleaseView:
    """A verified release as the period page shows it."""

    document: Mapping[str, Any]
    unmet: tuple[UnmetRow, ...]
    chart: svg.BarChart
    heat: HeatMap | None
    any_clamped: bool


def release_view(verified: VerifiedRelease) -> ReleaseView:
    """Bars of the unmet needs (clamped together with their intervals) and the heat map."""
    rows = release_rows(verified.release)
    unmet_rows = [r for r in rows if r.get(STATUS_DIMENSION, UNMET) == UNMET]
    bars = unmet_bars(unmet_rows)
    unmet = tuple(
        UnmetRow(bar.label, row["value"], row["lower"], row["upper"], bar)
        for row, bar in zip(unmet_rows, bars, strict=True)
    )
    heat = heat_map(verified)
    return ReleaseView(
        document=verified.document,
        unmet=unmet,
        chart=svg.bar_chart(bars),
        heat=heat,
        any_clamped=any(b.clamped for b in bars)
        or (
            heat is not None
            and any(c is not None and c.clamped for r in heat.rows for c in r.cells)
        ),
    )


def dimension_values(document: Mapping[str, Any], name: str) -> tuple[str, ...]:
    """The values of the release's dimension ``name`` (empty if it has none)."""
    for dimension in document["dimensions"]:
        if dimension["name"] == name:
            return tuple(dimension["values"])
    return ()


def heat_map(verified: VerifiedRelease) -> HeatMap | None:
    """Category by status, each cell's colour level from its clamped value (None if the table
    lacks either dimension)."""
    document = verified.document
    categories = dimension_values(document, CATEGORY_DIMENSION)
    statuses = dimension_values(document, STATUS_DIMENSION)
    if not categories or not statuses:
        return None
    found: dict[tuple[str, str], tuple[Mapping[str, Any], Bar]] = {}
    for category in categories:
        for status in statuses:
            cell = find_cell(
                verified.release, {CATEGORY_DIMENSION: category, STATUS_DIMENSION: status}
            )
            if cell is not None:
                bar = clamp_at_zero(category, cell["value"], cell["lower"], cell["upper"])
                found[(category, status)] = (cell, bar)
    top = max([0.0, *(bar.value for _cell, bar in found.values())])

    def heat_cell(category: str, status: str) -> HeatCell | None:
        if (category, status) not in found:
            return None
        cell, bar = found[(category, status)]
        return HeatCell(
            cell["value"], cell["lower"], cell["upper"], level(bar.value, top), bar.clamped
        )

    return HeatMap(
        statuses=statuses,
        rows=tuple(HeatRow(c, tuple(heat_cell(c, s) for s in statuses)) for c in categories),
        top=top,
    )


def level(value: float, top: float) -> int:
    """0 for nothing, else 1 to HEAT_LEVELS - 1 in proportion to ``top``."""
    if value <= 0 or top <= 0:
        return 0
    return 1 + min(HEAT_LEVELS - 2, int((HEAT_LEVELS - 1) * value / top))


@dataclass(frozen=True)
class TrendMonth:
    """One month of a trend: its entry of the trend document and what the page says of it."""

    entry: Mapping[str, Any]
    state: str  # RELEASED, NO_RELEASE or REFUSED
    drawn: Bar | None


@dataclass(frozen=True)
class TrendView:
    category: str
    status: str
    categories: tuple[str, ...]
    statuses: tuple[str, ...]
    document: Mapping[str, Any]
    months: tuple[TrendMonth, ...]
    chart: svg.TrendChart


def trend_view(
    board: Board, shown: VerifiedRelease, query: Mapping[str, str], limit: int
) -> TrendView:
    """One cell (``category``, ``status`` from the query; defaults: the shown release's first
    category, unmet) month by month up to the shown release's period."""
    categories = dimension_values(shown.document, CATEGORY_DIMENSION)
    statuses = dimension_values(shown.document, STATUS_DIMENSION)
    category = _choice(query, "category", categories, categories[0] if categories else "")
    status = _choice(
        query, "status", statuses, UNMET if UNMET in statuses else statuses[0] if statuses else ""
    )
    wanted = {CATEGORY_DIMENSION: category, STATUS_DIMENSION: status}
    months = board.trend_months(
        shown.release.period, lambda r: find_cell(r, wanted) is not None, limit
    )
    document = trend_document(
        board.region,
        category,
        status,
        [(month, None if chosen is None else chosen.release) for month, chosen, _r in months],
    )
    drawn = trend_bars(document)
    trend = tuple(
        TrendMonth(entry, _state(entry, refused), bar)
        for entry, bar, (_m, _c, refused) in zip(document["months"], drawn, months, strict=True)
    )
    return TrendView(
        category=category,
        status=status,
        categories=categories,
        statuses=statuses,
        document=document,
        months=trend,
        chart=svg.trend_chart(
            [m.entry["period"] for m in trend],
            [m.drawn for m in trend],
            [m.state for m in trend],
        ),
    )


def _state(entry: Mapping[str, Any], refused: bool) -> str:
    if refused:
        return REFUSED
    return RELEASED if entry["state"] == RELEASED else NO_RELEASE


def _choice(query: Mapping[str, str], name: str, allowed: Sequence[str], default: str) -> str:
    value = query.get(name, "") or default
    if allowed and value not in allowed:
        raise InvalidInput(
            f"this release's table has no {name} {value[:40]!r}",
            hint=f"choose one of {', '.join(allowed)}",
        )
    return value
