"""``tessera demo``: the system on this machine, end to end, saying what it does at each step.

Today it runs what is built: a real agency node (TLS gRPC on loopback, SQLite, encrypted store)
with synthetic HTCDS cases, staff roles, search, erasure, backup and the audit log. The broker,
referral and statistics steps join it as those layers land (issues 5 to 8).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli import context

MARKER = ".tessera-demo"


def command(
    ctx: typer.Context,
    directory: Annotated[
        Path, typer.Option("--dir", help="Where to keep the demo's homes (reset on each run).")
    ] = Path("demo-run"),
    cases: Annotated[int, typer.Option(help="Synthetic cases to import.")] = 36,
) -> None:
    """Run a real node on loopback with synthetic cases and show what it does.

    Example: tessera demo --dir /tmp/tessera-demo
    """
    from cli.demo_run import run_demo

    del ctx
    run_demo(directory.resolve(), cases, context.CliContext(None, {}))
