"""The root of the ``tessera`` command: wires the sub-apps and turns typed errors into exit codes.

This module is the one place where a :class:`~tessera.errors.TesseraError` becomes a message on
standard error and an exit code (docs/cli.md lists them); commands just raise.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from cli import context
from cli.groups import GROUPS
from tessera.errors import TesseraError

app = typer.Typer(
    name="tessera",
    help=(
        "Tessera: consent-gated referrals and differentially private statistics for agencies "
        "that serve survivors of human trafficking."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from tessera import __version__

        typer.echo(f"tessera {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    home: Annotated[
        Path | None,
        typer.Option(
            "--home",
            help="The node's or broker's directory (default: $TESSERA_HOME, else ~/.tessera).",
            file_okay=False,
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Root options shared by every command."""
    ctx.obj = context.CliContext(home_option=home, environ=dict(os.environ))


for group in GROUPS:
    group.attach(app)


def main() -> None:
    """Console entry point: run the app, map expected failures to a message and an exit code."""
    try:
        app()
    except TesseraError as exc:
        sys.stderr.write(f"error: {exc.message}\n")
        if exc.hint:
            sys.stderr.write(f"  what to do: {exc.hint}\n")
        sys.exit(exc.kind.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)


if __name__ == "__main__":
    main()
