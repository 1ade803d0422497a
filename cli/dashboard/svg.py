"""The geometry of the dashboard's SVG charts, computed here from clamped bars and drawn by the
templates (``templates/charts.html``). No I/O and no markup: coordinates in the SVG's own units.

Bars come from :func:`cli.stats_render.clamp_at_zero`, so every drawn value lies inside its
drawn interval and nothing is drawn below 0 (docs/cli.md, "Charts clamp at zero").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from cli.stats_render import Bar, number

# The unmet-needs chart: horizontal bars, one row per category.
BAR_WIDTH = 560.0
BAR_LABEL = 140.0  # room for the category names
BAR_RIGHT = 100.0  # room for the "12 [4, 20]" text after the longest bar
BAR_ROW = 26.0
BAR_THICKNESS = 16.0
BAR_TOP = 8.0
AXIS_ROOM = 28.0
# The trend chart: vertical bars, one slot per month.
TREND_WIDTH = 560.0
TREND_HEIGHT = 260.0
TREND_LEFT = 48.0
TREND_RIGHT = 12.0
TREND_TOP = 12.0
TREND_BOTTOM = 64.0  # room for the rotated month labels
TREND_MAX_LABELS = 12
TICKS = 5


@dataclass(frozen=True)
class Tick:
    """One gridline of the value axis: its value, its position and its label."""

    value: float
    position: float
    label: str


def nice_ticks(top: float, count: int = TICKS) -> list[float]:
    """Gridline values from 0 past ``top`` in steps of 1, 2 or 5 times a power of ten."""
    top = max(1.0, top)
    raw = top / count
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1.0, 2.0, 5.0, 10.0) if m * power >= raw)
    step = max(1.0, step)  # counts: whole-number gridlines
    return [i * step for i in range(math.ceil(top / step - 1e-9) + 1)]


def bar_text(bar: Bar) -> str:
    """The drawn numbers beside a bar: ``value [lower, upper]``, ``*`` if any was raised to 0."""
    mark = " *" if bar.clamped else ""
    return f"{number(bar.value)} [{number(bar.lower)}, {number(bar.upper)}]{mark}"


@dataclass(frozen=True)
class HorizontalBar:
    """One category's bar and its interval whisker, in SVG units."""

    bar: Bar
    row_y: float  # the middle of the row
    x: float
    y: float
    width: float
    height: float
    whisker_from: float
    whisker_to: float
    text_x: float
    text: str


@dataclass(frozen=True)
class BarChart:
    width: float
    height: float
    plot_left: float
    plot_right: float
    axis_y: float
    bars: tuple[HorizontalBar, ...]
    ticks: tuple[Tick, ...]


def bar_chart(bars: Sequence[Bar]) -> BarChart:
    """Horizontal bars with whiskers for their intervals, on a shared axis from 0."""
    left, right = BAR_LABEL, BAR_WIDTH - BAR_RIGHT
    values = nice_ticks(max([1.0, *(b.upper for b in bars)]))
    axis_top = values[-1]

    def x(value: float) -> float:
        return left + (right - left) * value / axis_top

    drawn = []
    for i, bar in enumerate(bars):
        middle = BAR_TOP + BAR_ROW * i + BAR_ROW / 2
        drawn.append(
            HorizontalBar(
                bar=bar,
                row_y=middle,
                x=left,
                y=middle - BAR_THICKNESS / 2,
                width=x(bar.value) - left,
                height=BAR_THICKNESS,
                whisker_from=x(bar.lower),
                whisker_to=x(bar.upper),
                text_x=x(bar.upper) + 6,
                text=bar_text(bar),
            )
        )
    axis_y = BAR_TOP + BAR_ROW * len(bars)
    return BarChart(
        width=BAR_WIDTH,
        height=axis_y + AXIS_ROOM,
        plot_left=left,
        plot_right=right,
        axis_y=axis_y,
        bars=tuple(drawn),
        ticks=tuple(Tick(v, x(v), number(v)) for v in values),
    )


@dataclass(frozen=True)
class VerticalBar:
    """One month's slot: its bar and whisker when it has a release, else a marker text."""

    label: str
    center: float
    show_label: bool
    bar: Bar | None
    x: float
    y: float
    width: float
    height: float
    whisker_top: float
    whisker_bottom: float
    marker: str  # "" when drawn; else what the empty slot says ("no release", "refused")


@dataclass(frozen=True)
class TrendChart:
    width: float
    height: float
    plot_left: float
    plot_right: float
    plot_top: float
    axis_y: float
    slots: tuple[VerticalBar, ...]
    ticks: tuple[Tick, ...]


def trend_chart(
    labels: Sequence[str], bars: Sequence[Bar | None], markers: Sequence[str]
) -> TrendChart:
    """Vertical bars with whiskers, one slot per label; a slot without a bar shows its marker."""
    left, right = TREND_LEFT, TREND_WIDTH - TREND_RIGHT
    top, bottom = TREND_TOP, TREND_HEIGHT - TREND_BOTTOM
    values = nice_ticks(max([1.0, *(b.upper for b in bars if b is not None)]))
    axis_top = values[-1]

    def y(value: float) -> float:
        return bottom - (bottom - top) * value / axis_top

    slot = (right - left) / max(1, len(labels))
    every = max(1, math.ceil(len(labels) / TREND_MAX_LABELS))
    slots = []
    for i, (label, bar, marker) in enumerate(zip(labels, bars, markers, strict=True)):
        center = left + slot * (i + 0.5)
        width = min(slot * 0.6, 40.0)
        value = bar.value if bar is not None else 0.0
        slots.append(
            VerticalBar(
                label=label,
                center=center,
                show_label=(len(labels) - 1 - i) % every == 0,  # the newest month always
                bar=bar,
                x=center - width / 2,
                y=y(value),
                width=width,
                height=bottom - y(value),
                whisker_top=y(bar.upper) if bar is not None else bottom,
                whisker_bottom=y(bar.lower) if bar is not None else bottom,
                marker="" if bar is not None else marker,
            )
        )
    return TrendChart(
        width=TREND_WIDTH,
        height=TREND_HEIGHT,
        plot_left=left,
        plot_right=right,
        plot_top=top,
        axis_y=bottom,
        slots=tuple(slots),
        ticks=tuple(Tick(v, y(v), number(v)) for v in values),
    )
