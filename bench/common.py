"""Shared timing helpers: best-of-N wall time and a results table."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Figure:
    """One measured figure against its same-run baseline."""

    benchmark: str
    measured: str
    value: float
    baseline_name: str
    baseline: float
    unit: str
    higher_is_better: bool = True
    target: float | None = None
    note: str = ""  # printed under the table (conditions that qualify the figure)

    @property
    def ratio(self) -> float:
        """measured / baseline (for rates) or baseline / measured (for times): 1.0 = as fast."""
        if self.higher_is_better:
            return self.value / self.baseline
        return self.baseline / self.value


def best_of(runs: int, func: Callable[[], object]) -> float:
    """The fastest of ``runs`` timings of ``func`` in seconds (least disturbed by noise)."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        func()
        times.append(time.perf_counter() - started)
    return min(times)


def median_of(runs: int, func: Callable[[], object]) -> float:
    """The median of ``runs`` timings of ``func`` in seconds."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        func()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def percentile(samples: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile (0.5 = median, 0.99 = p99) of ``samples``, interpolated
    linearly between the two closest ranks."""
    if not samples or not 0.0 <= fraction <= 1.0:
        raise ValueError("percentile needs samples and a fraction between 0 and 1")
    ordered = sorted(samples)
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def print_table(figures: list[Figure]) -> None:
    """Print every figure with its baseline and ratio (rich table)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Tessera benchmarks (ratios against same-run baselines)")
    for column in (
        "benchmark",
        "measured",
        "value",
        "baseline",
        "baseline value",
        "ratio",
        "target",
    ):
        table.add_column(column)
    notes: list[str] = []
    for f in figures:
        marker = ""
        if f.note:
            if f.note not in notes:
                notes.append(f.note)
            marker = f" [{notes.index(f.note) + 1}]"
        table.add_row(
            f.benchmark,
            f.measured + marker,
            f"{f.value:,.1f} {f.unit}",
            f.baseline_name,
            f"{f.baseline:,.1f} {f.unit}",
            f"{f.ratio:.2f}",
            ""
            if f.target is None
            else (f"≥ {f.target:.2f} " + ("ok" if f.ratio >= f.target else "MISSED")),
        )
    console = Console()
    console.print(table)
    for number, note in enumerate(notes, 1):
        console.print(f"[{number}] {note}", markup=False, highlight=False)
