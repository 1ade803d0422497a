"""Run every benchmark and print one table of ratios: ``python -m bench [NAME ...]``."""

from __future__ import annotations

import sys
from collections.abc import Callable

from bench import cli_help, flood, relay, soak, stats, store
from bench.common import Figure, print_table

BENCHMARKS: dict[str, Callable[[], list[Figure]]] = {
    "cli": cli_help.run,
    "store": store.run,
    "relay": relay.run,
    "stats": stats.run,
    "flood": flood.run,
    "soak": soak.run,
}


def main(names: list[str]) -> int:
    """Run the named benchmarks (all by default) and print their figures."""
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
        return 2
    figures: list[Figure] = []
    for name in names or list(BENCHMARKS):
        print(f"running {name} ...", flush=True)
        figures += BENCHMARKS[name]()
    print_table(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
