"""``tessera demo``: the system on this machine, end to end, saying what it does at each step.

It runs what is built: a broker and three agency nodes (TLS gRPC on loopback, SQLite, encrypted
stores), enrolment, fingerprint verification, synthetic HTCDS cases, a consented referral sent,
received and accepted, staff roles, erasure, backup and the audit log. The statistics round joins
it with issue 7.
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
    serve: Annotated[
        bool, typer.Option("--serve", help="Keep the broker and nodes running until Ctrl-C.")
    ] = False,
) -> None:
    """Run the whole system on this machine: a broker and three agency nodes on loopback.

    \b
    Example:
      tessera demo --dir /tmp/tessera-demo --cases 24
    """
    from cli.demo_run import run_demo

    del ctx
    run_demo(directory.resolve(), cases, context.CliContext(None, {}), keep_serving=serve)
