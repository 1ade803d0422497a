"""Shared timing helpers: best-of-N wall time and a results table."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
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
    for f in figures:
        table.add_row(
            f.benchmark,
            f.measured,
            f"{f.value:,.1f} {f.unit}",
            f.baseline_name,
            f"{f.baseline:,.1f} {f.unit}",
            f"{f.ratio:.2f}",
            ""
            if f.target is None
            else (f"≥ {f.target:.2f} " + ("ok" if f.ratio >= f.target else "MISSED")),
        )
    Console().print(table)
