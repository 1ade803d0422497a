"""``tessera agency``: the agencies in the region's directory, as this node verified them."""

from __future__ import annotations

from typing import Annotated

import typer

from cli import context
from cli.output import FORMAT_OPTION, OutputFormat, render, render_one

app = typer.Typer(no_args_is_help=True)


@app.command("list")
def list_agencies(
    ctx: typer.Context,
    revoked: Annotated[bool, typer.Option("--revoked", help="Include revoked agencies.")] = False,
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """List agencies with their pinned key fingerprints (the node syncs the directory first).

    \b
    Example:
      tessera agency list --revoked
    """
    with context.get(ctx).node_client() as client:
        rows = client.agencies(include_revoked=revoked)
    render(
        rows,
        fmt,
        columns=["agency_id", "name", "region", "fingerprint", "verified", "revoked", "services"],
    )


@app.command("verify")
def verify(
    ctx: typer.Context,
    agency_id: Annotated[str, typer.Argument(help="The agency's directory id.")],
    fingerprint: Annotated[
        str | None,
        typer.Option(help="The fingerprint the other agency read out to you (else shown only)."),
    ] = None,
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Show an agency's key fingerprint, or record that you compared it out of band.

    Call the agency on a number you already know; each reads out their fingerprint
    (`tessera node status`). Only verified agencies count toward statistics thresholds.

    \b
    Example:
      tessera agency verify lighthouse-clinic --fingerprint K7QX-M2RD-4FHN-ZP3A-W6TB-C8JE-5VYL-9GSU
    """
    from tessera.errors import NotFound

    with context.get(ctx).node_client() as client:
        if fingerprint is None:
            match = [a for a in client.agencies(True) if a.agency_id == agency_id]
            if not match:
                raise NotFound(f"no agency {agency_id!r} in the directory")
            render_one(match[0], fmt, title="compare this fingerprint out of band")
            return
        render_one(client.verify_agency(agency_id, fingerprint), fmt, title="verified")
