"""``tessera consent``: record, list and revoke a survivor's consent (DESIGN.md section 6)."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Annotated

import typer

from cli import context
from cli.output import FORMAT_OPTION, OutputFormat, render, render_one

if TYPE_CHECKING:
    from node.client import NodeClient

app = typer.Typer(no_args_is_help=True)

_COLUMNS = ["consent_id", "state", "recipient", "purpose", "method", "expires_at", "referrals"]


class Method(enum.StrEnum):
    """How the survivor gave consent."""

    VERBAL = "verbal"
    WRITTEN = "written"
    ELECTRONIC = "electronic"


def _client(ctx: typer.Context) -> NodeClient:
    return context.get(ctx).node_client()


@app.command("grant")
def grant(
    ctx: typer.Context,
    case_id: Annotated[str, typer.Argument(help="The survivor's case.")],
    to: Annotated[str, typer.Option("--to", help="The receiving agency's directory id.")],
    purpose: Annotated[str, typer.Option(help="The need category the referral is for.")],
    share: Annotated[
        list[str],
        typer.Option(help="A data category the survivor agrees to share; repeatable."),
    ],
    expires: Annotated[str, typer.Option(help="When consent lapses (YYYY-MM-DD).")],
    method: Annotated[Method, typer.Option(help="How consent was given.")],
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Record a survivor's consent to one agency receiving some of their data, for one need.

    \b
    Example:
      tessera consent grant 7c9e6679-7425-40de-944b-e07fc1f90ae7 \\
        --to lighthouse-clinic --purpose medical --share identity --share contact \\
        --expires 2027-06-30 --method verbal
    """
    import datetime as dt

    from cli.case import _category
    from tessera.errors import InvalidInput

    try:
        expiry = dt.date.fromisoformat(expires)
    except ValueError:
        raise InvalidInput(f"--expires {expires!r} is not a date (YYYY-MM-DD)") from None
    with _client(ctx) as client:
        consent = client.grant_consent(case_id, to, _category(purpose), share, expiry, method.value)
    render_one(consent, fmt, title="consent recorded")


@app.command("list")
def list_consents(
    ctx: typer.Context,
    case_id: Annotated[str, typer.Argument(help="The survivor's case.")],
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """List a case's consents, newest first.

    \b
    Example:
      tessera consent list 7c9e6679-7425-40de-944b-e07fc1f90ae7
    """
    with _client(ctx) as client:
        rows = client.consents(case_id)
    render(rows, fmt, columns=_COLUMNS, title=f"consents for {case_id}")


@app.command("revoke")
def revoke(
    ctx: typer.Context,
    consent_id: Annotated[str, typer.Argument(help="The consent to withdraw.")],
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Withdraw a consent: undelivered envelopes are purged at the broker, and every agency
    that received a referral under it is told to purge it.

    \b
    Example:
      tessera consent revoke e4d9a1f0-2b3c-4d5e-8f70-91a2b3c4d5e6
    """
    with _client(ctx) as client:
        consent = client.revoke_consent(consent_id)
    render_one(consent, fmt, title="consent revoked")
