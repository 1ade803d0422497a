"""How fast ``tessera --help`` answers, against ``python -c pass`` (issue 3)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from bench.common import Figure, median_of


def run(runs: int = 15) -> list[Figure]:
    """Median wall time of both commands, each a fresh process."""
    exe = shutil.which("tessera", path=os.path.dirname(sys.executable)) or "tessera"

    def help_() -> None:
        subprocess.run([exe, "--help"], capture_output=True, check=True)

    def bare() -> None:
        subprocess.run([sys.executable, "-c", "pass"], capture_output=True, check=True)

    help_(), bare()  # warm the file cache
    baseline = median_of(runs, bare)
    measured = median_of(runs, help_)
    return [
        Figure(
            "cli",
            "tessera --help",
            measured * 1000,
            "python -c pass",
            baseline * 1000,
            "ms",
            higher_is_better=False,
        )
    ]
