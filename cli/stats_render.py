"""Released statistics as documents, download files and charts (DESIGN.md section 7).

A broker-signed Release (``proto/tessera/v1/stats.proto``) becomes a plain document in exactly
one place, :func:`release_document` (and :func:`cell_document` for its cells). The JSON and CSV
texts the CLI prints and writes with ``--out`` come from that document only, as strings, so a
later dashboard can serve byte-identical downloads by calling :func:`release_json` and
:func:`release_csv`. The same holds for a trend across months (:func:`trend_document`,
:func:`trend_json`, :func:`trend_csv`).

Charts may clamp at zero, which is free post-processing of a DP release. The rule
(:func:`clamp_at_zero`) clamps the value and both interval ends together, so a drawn value always
lies inside its drawn interval; each chart says so in :data:`CLAMP_NOTE`. Documents and files
always carry the numbers as released, never clamped.

Nothing here talks to the network; the protobuf and matplotlib imports happen inside the
functions that need them, so ``tessera --help`` stays fast.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tessera.errors import InvalidInput

if TYPE_CHECKING:
    from tessera.v1 import stats_pb2 as stats_pb

# The release-level columns of a CSV download, before the dimensions and the cell's own fields.
CSV_RELEASE_COLUMNS = (
    "release_id",
    "region",
    "period",
    "epsilon",
    "participants",
    "interval_level",
)
# The release-level fields each month of a trend carries, besides its cell's fields.
TREND_RELEASE_FIELDS = ("release_id", "released_at", "epsilon", "participants", "interval_level")
# RFC 4180 line ends, the csv module's default, for every CSV text.
CSV_LINE_END = "\r\n"
# The longest trend one command draws: three years of monthly releases.
MAX_TREND_MONTHS = 36
# What a month without a (matching) release shows instead of a number.
NO_RELEASE = "no release"
RELEASED = "released"
# The dimensions a trend's cell is found by.
CATEGORY_DIMENSION = "need_category"
STATUS_DIMENSION = "need_status"
CLAMP_NOTE = (
    "* raised to 0: a negative noisy count or interval end is drawn as 0 (free "
    "post-processing); `tessera stats show` prints the released numbers"
)
_PERIOD = re.compile(r"^([0-9]{4})-(0[1-9]|1[0-2])$")


# --- the one serializer of a release ------------------------------------------------------------


def release_document(release: stats_pb.Release) -> dict[str, Any]:
    """A verified Release as a plain document, keys in a fixed order.

    A new Release field is one more line here; a new ReleasedCell field one more line in
    :func:`cell_document`. JSON, CSV, tables and charts all read this document.
    """
    names = dimension_names(release)
    return {
        "release_id": release.release_id,
        "round_id": release.round_id,
        "region": release.region,
        "period": release.period,
        "table": release.table.name,
        "dimensions": [
            {"name": d.name, "values": list(d.values)} for d in release.table.dimensions
        ],
        "mode": mode_name(release.mode),
        "epsilon": release.epsilon,
        "table_epsilon": release.table_epsilon,
        "alpha": release.alpha,
        "interval_level": interval_level(release.alpha),
        "participants": release.participants,
        "mechanism": release.mechanism,
        "noise_scale": release.noise_scale,
        "accuracy": release.accuracy,
        "released_at": released_at(release),
        "contribution_bound": release.table.contribution_bound,
        "dropped_fraction": release.dropped_fraction,
        "suggested_bound": release.suggested_bound,
        "cells": [cell_document(cell, names, release.release_id) for cell in release.cells],
        "contributions": {
            "accuracy": release.contributions_accuracy,
            "bins": [
                {
                    "cells": int(c.coordinates[0]),
                    "value": c.value,
                    "lower": c.lower,
                    "upper": c.upper,
                }
                for c in release.contributions
            ],
        },
    }


def cell_document(
    cell: stats_pb.ReleasedCell, names: Sequence[str], release_id: str = ""
) -> dict[str, Any]:
    """One released cell: its coordinates by dimension name, then its own fields in order."""
    if len(cell.coordinates) != len(names):
        raise InvalidInput(
            f"release {release_id or '?'} has a cell with {len(cell.coordinates)} coordinates"
            f" for {len(names)} dimensions",
            hint="the broker produced a malformed release: report it to the broker's operator",
        )
    return {
        "coordinates": dict(zip(names, cell.coordinates, strict=True)),
        "value": cell.value,
        "lower": cell.lower,
        "upper": cell.upper,
    }


def dimension_names(release: stats_pb.Release) -> list[str]:
    """The release's dimension names, in cell-coordinate order."""
    return [d.name for d in release.table.dimensions]


def mode_name(mode: int) -> str:
    """``private`` or ``local_noise`` (the RoundMode name without its prefix, lower case)."""
    from tessera.v1 import stats_pb2 as stats_pb

    try:
        return stats_pb.RoundMode.Name(mode).removeprefix("ROUND_MODE_").lower()  # type: ignore[arg-type]
    except ValueError:
        return f"unknown ({mode})"


def interval_level(alpha: float) -> float:
    """The confidence level 1 - alpha, rounded so 0.05 gives 0.95 and not 0.9500000000000001."""
    return round(1.0 - alpha, 12)


def released_at(release: stats_pb.Release) -> str | None:
    """When the release was made, ISO 8601 in UTC with a ``Z`` (None if the broker left it out)."""
    from tessera.timestamps import to_datetime

    if not release.HasField("released_at"):
        return None
    stamp = to_datetime(release.released_at, "released_at")
    return stamp.isoformat(timespec="microseconds").replace("+00:00", "Z")


def release_json(release: stats_pb.Release) -> str:
    """The JSON text of :func:`release_document`: what ``stats show -f json`` prints."""
    return json.dumps(release_document(release), indent=2, sort_keys=False) + "\n"


def release_csv(release: stats_pb.Release) -> str:
    """The CSV text of a release: one row per cell, what ``stats show -f csv`` prints.

    Columns: :data:`CSV_RELEASE_COLUMNS`, the dimension names, then every field of a cell
    document but its coordinates (value, lower, upper).
    """
    document = release_document(release)
    names = [d["name"] for d in document["dimensions"]]
    fields = cell_fields()
    clash = set(names) & {*CSV_RELEASE_COLUMNS, *fields}
    if clash:
        raise InvalidInput(
            f"release {document['release_id']} names a dimension like a column: {sorted(clash)}",
            hint="use --format json, which keeps coordinates apart",
        )
    head = [document[c] for c in CSV_RELEASE_COLUMNS]
    rows = [
        [*head, *(cell["coordinates"][n] for n in names), *(cell[f] for f in fields)]
        for cell in document["cells"]
    ]
    return csv_text([*CSV_RELEASE_COLUMNS, *names, *fields], rows)


def release_rows(release: stats_pb.Release) -> list[dict[str, Any]]:
    """One flat row per released cell (coordinates, value, lower, upper): tables and charts."""
    return [
        {**cell["coordinates"], **{k: v for k, v in cell.items() if k != "coordinates"}}
        for cell in release_document(release)["cells"]
    ]


def cell_fields() -> list[str]:
    """The fields of a cell document besides its coordinates (value, lower, upper, ...)."""
    from tessera.v1 import stats_pb2 as stats_pb

    return [k for k in cell_document(stats_pb.ReleasedCell(), []) if k != "coordinates"]


def csv_text(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A CSV text with a header line; None is an empty field, numbers as Python prints them."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator=CSV_LINE_END)
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    return buffer.getvalue()


# --- choosing releases --------------------------------------------------------------------------


def newest_release(
    releases: Iterable[stats_pb.Release],
    region: str,
    accept: Callable[[stats_pb.Release], bool] = lambda _release: True,
) -> stats_pb.Release | None:
    """The newest of ``releases`` (by their signed released_at) for ``region`` that ``accept``
    takes, or None. On equal times the first listed wins (the broker lists newest first)."""
    matching = [r for r in releases if r.region == region and accept(r)]
    if not matching:
        return None
    return max(matching, key=lambda r: (r.released_at.seconds, r.released_at.nanos))


def find_cell(release: stats_pb.Release, coordinates: Mapping[str, str]) -> dict[str, Any] | None:
    """The cell document whose coordinates include ``coordinates``, or None."""
    for cell in release_document(release)["cells"]:
        if all(cell["coordinates"].get(k) == v for k, v in coordinates.items()):
            found: dict[str, Any] = cell
            return found
    return None


# --- a trend across months ----------------------------------------------------------------------


def parse_period(period: str, option: str) -> tuple[int, int]:
    """(year, month) of a "YYYY-MM", or InvalidInput naming the option it came from."""
    match = _PERIOD.match(period)
    if match is None:
        raise InvalidInput(
            f"{option} must be a month as YYYY-MM, not {period!r}",
            hint=f"for example {option} 2026-10",
        )
    return int(match.group(1)), int(match.group(2))


def month_range(first: str, last: str, limit: int = MAX_TREND_MONTHS) -> list[str]:
    """Every month from ``first`` to ``last`` inclusive, at most ``limit`` of them."""
    year, month = parse_period(first, "--from")
    end_year, end_month = parse_period(last, "--to")
    start, end = year * 12 + month - 1, end_year * 12 + end_month - 1
    if start > end:
        raise InvalidInput(
            f"--from {first} is after --to {last}", hint="give the earlier month as --from"
        )
    if end - start + 1 > limit:
        raise InvalidInput(
            f"{first} to {last} is {end - start + 1} months; a trend covers at most {limit}",
            hint="ask for a shorter range, or several",
        )
    return [f"{m // 12:04d}-{m % 12 + 1:02d}" for m in range(start, end + 1)]


def trend_document(
    region: str,
    category: str,
    status: str,
    months: Sequence[tuple[str, stats_pb.Release | None]],
) -> dict[str, Any]:
    """One cell (``category``, ``status``) across months: each month the release chosen for it
    (or None: "no release", never zero) with its value and interval as released."""
    wanted = {CATEGORY_DIMENSION: category, STATUS_DIMENSION: status}
    fields = [*TREND_RELEASE_FIELDS, *cell_fields()]
    entries: list[dict[str, Any]] = []
    for period, release in months:
        cell = find_cell(release, wanted) if release is not None else None
        if release is None or cell is None:
            entries.append({"period": period, "state": NO_RELEASE, **dict.fromkeys(fields)})
            continue
        document = release_document(release)
        entry: dict[str, Any] = {"period": period, "state": RELEASED}
        entry.update({f: document[f] for f in TREND_RELEASE_FIELDS})
        entry.update({k: v for k, v in cell.items() if k != "coordinates"})
        entries.append(entry)
    return {
        "region": region,
        CATEGORY_DIMENSION: category,
        STATUS_DIMENSION: status,
        "from": months[0][0] if months else None,
        "to": months[-1][0] if months else None,
        "months": entries,
    }


def trend_json(trend: Mapping[str, Any]) -> str:
    """The JSON text of a :func:`trend_document`."""
    return json.dumps(trend, indent=2, sort_keys=False) + "\n"


def trend_csv(trend: Mapping[str, Any]) -> str:
    """The CSV text of a :func:`trend_document`: one row per month, in order."""
    months: list[dict[str, Any]] = list(trend["months"])
    columns = ["period", "state", *TREND_RELEASE_FIELDS, *cell_fields()]
    return csv_text(columns, ([m[c] for c in columns] for m in months))


# --- charts: clamping at zero, consistently -----------------------------------------------------


@dataclass(frozen=True)
class Bar:
    """One drawn bar with its interval, all at or above 0: ``0 <= lower <= value <= upper``.

    ``clamped`` is true when any of the three differs from the released numbers.
    """

    label: str
    value: float
    lower: float
    upper: float
    clamped: bool

    def __post_init__(self) -> None:
        if not 0.0 <= self.lower <= self.value <= self.upper:
            raise ValueError(f"a drawn bar needs 0 <= lower <= value <= upper, not {self}")


def clamp_at_zero(label: str, value: float, lower: float, upper: float) -> Bar:
    """The bar to draw for a released value and its interval.

    upper' = max(0, upper); value' = min(max(0, value), upper'); lower' = max(0, lower), which is
    never above value' for a released cell (lower <= value); it is capped at value' so even a
    malformed cell draws a value inside its arms.
    """
    high = max(0.0, float(upper))
    shown = min(max(0.0, float(value)), high)
    low = min(max(0.0, float(lower)), shown)
    clamped = (shown, low, high) != (float(value), float(lower), float(upper))
    return Bar(label, shown, low, high, clamped)


def unmet_bars(rows: Sequence[Mapping[str, Any]]) -> list[Bar]:
    """The clamped bar of every unmet-need cell of :func:`release_rows`, labelled by category."""
    return [
        clamp_at_zero(str(r.get(CATEGORY_DIMENSION, "?")), r["value"], r["lower"], r["upper"])
        for r in rows
        if r.get(STATUS_DIMENSION, "unmet") == "unmet"
    ]


@dataclass(frozen=True)
class ErrorBars:
    """What matplotlib draws: bar heights and the (non-negative) arms below and above them."""

    heights: list[float]
    below: list[float]
    above: list[float]


def error_bars(bars: Sequence[Bar]) -> ErrorBars:
    """Heights and arms of clamped bars: below = value' - lower', above = upper' - value'."""
    return ErrorBars(
        heights=[b.value for b in bars],
        below=[b.value - b.lower for b in bars],
        above=[b.upper - b.value for b in bars],
    )


def number(value: float) -> str:
    """A count as people read it: whole numbers without a decimal point, else two decimals."""
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.2f}".rstrip("0").rstrip(".")


def terminal_chart(rows: Sequence[Mapping[str, Any]], width: int = 40) -> str:
    """Unmet needs per category as text bars with their drawn interval [lower', upper'], a
    ``*`` on every clamped bar and :data:`CLAMP_NOTE` under the chart."""
    bars = unmet_bars(rows)
    if not bars:
        return "no unmet-need cells in this release\n"
    top = max(1.0, *(b.upper for b in bars))
    label = max(len(b.label) for b in bars)
    lines = []
    for b in bars:
        drawn = "#" * round(width * b.value / top)
        mark = " *" if b.clamped else ""
        lines.append(
            f"{b.label:<{label}} {drawn:<{width}} {number(b.value)}"
            f"  [{number(b.lower)}, {number(b.upper)}]{mark}"
        )
    return "\n".join([*lines, CLAMP_NOTE]) + "\n"


def png_chart(
    rows: Sequence[Mapping[str, Any]], title: str, out: Path, level: float = 0.95
) -> None:
    """A PNG bar chart of unmet needs per category with their error bars (matplotlib, Agg)."""
    bars = unmet_bars(rows)
    draw_png([b.label for b in bars], list(bars), title, _ylabel(level), out)


def trend_bars(trend: Mapping[str, Any]) -> list[Bar | None]:
    """The clamped bar of each month of a :func:`trend_document` (None: no release)."""
    return [
        clamp_at_zero(m["period"], m["value"], m["lower"], m["upper"])
        if m["state"] == RELEASED
        else None
        for m in trend["months"]
    ]


def trend_png(trend: Mapping[str, Any], out: Path) -> None:
    """A PNG of a :func:`trend_document`: one bar per month with its error bar; a month without a
    release has no bar and says "no release"."""
    levels = {m["interval_level"] for m in trend["months"] if m["state"] == RELEASED}
    title = (
        f"{trend[STATUS_DIMENSION]} {trend[CATEGORY_DIMENSION]}, {trend['region']}"
        f" {trend['from']} to {trend['to']}"
    )
    level = next(iter(levels)) if len(levels) == 1 else None
    labels = [m["period"] for m in trend["months"]]
    draw_png(labels, trend_bars(trend), title, _ylabel(level), out)


def _ylabel(level: float | None) -> str:
    interval = f"{level:.0%} interval" if level is not None else "interval"
    return f"survivors (noisy count, {interval})"


def draw_png(
    labels: Sequence[str], bars: Sequence[Bar | None], title: str, ylabel: str, out: Path
) -> None:
    """Draw clamped bars with their arms (None: a labelled gap), :data:`CLAMP_NOTE` below."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    from matplotlib import pyplot
    from matplotlib.ticker import MaxNLocator

    drawn = [(x, b) for x, b in enumerate(bars) if b is not None]
    geometry = error_bars([b for _x, b in drawn])
    ticks = [
        f"{label} *" if b is not None and b.clamped else label
        for label, b in zip(labels, bars, strict=True)
    ]
    figure, axes = pyplot.subplots(figsize=(10, 5.5))
    xs = [x for x, _b in drawn]
    axes.bar(xs, geometry.heights, color="#4a7ab5")
    if drawn:
        axes.errorbar(
            xs,
            geometry.heights,
            yerr=[geometry.below, geometry.above],
            fmt="none",
            ecolor="#222222",
            capsize=3,
        )
    for x, b in enumerate(bars):
        if b is None:
            axes.annotate(
                NO_RELEASE, (x, 0), ha="center", va="bottom", rotation=90, color="#777777"
            )
    axes.set_xticks(range(len(labels)), ticks)
    axes.set_xlim(-0.6, max(len(labels), 1) - 0.4)
    # Counts: whole-number ticks, and an axis from 0 even when every drawn bar is 0.
    axes.set_ylim(0, max([1.0, *(b.upper for _x, b in drawn)]) * 1.05)
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title(title)
    axes.set_ylabel(ylabel)
    axes.tick_params(axis="x", labelrotation=60)
    figure.text(0.01, 0.01, CLAMP_NOTE, fontsize=8, color="#444444")
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    figure.savefig(out, format="png", dpi=100)
    pyplot.close(figure)
