"""``tessera referral``: send, receive and answer consented referrals (DESIGN.md section 6)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from cli import context
from cli.output import FORMAT_OPTION, OutputFormat, render, render_one
from node.referrals.model import ANSWERS, Answer, ReferralStatus  # light: no crypto, no protobuf
from node.referrals.model import DeclineReason as Reason

app = typer.Typer(no_args_is_help=True)

_COLUMNS = ["referral_id", "direction", "agency", "need", "state", "decline_reason", "waiting"]


def _client(ctx: typer.Context) -> Any:
    return context.get(ctx).node_client()


@app.command("send")
def send(
    ctx: typer.Context,
    case_id: Annotated[str, typer.Argument(help="The survivor's case.")],
    to: Annotated[str, typer.Option("--to", help="The receiving agency's directory id.")],
    need: Annotated[str, typer.Option(help="The need category the referral is for.")],
    consent: Annotated[
        str, typer.Option(help="The consent to send under (default: the active one).")
    ] = "",
    note: Annotated[
        str, typer.Option(help="A note for the receiving caseworker (needs 'notes' consent).")
    ] = "",
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Send a referral: only the fields the survivor consented to leave the node.

    \b
    Example:
      tessera referral send 7c9e6679-7425-40de-944b-e07fc1f90ae7 \\
        --to lighthouse-clinic --need medical
    """
    from cli.case import _category

    with _client(ctx) as client:
        referral = client.send_referral(case_id, to, _category(need), consent_id=consent, note=note)
    render_one(referral, fmt, title="referral queued")


@app.command("list")
def list_referrals(
    ctx: typer.Context,
    case_id: Annotated[str, typer.Option("--case", help="Only referrals from this case.")] = "",
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Referrals sent and received, most recently changed first, with how long each waited.

    \b
    Example:
      tessera referral list --case 7c9e6679-7425-40de-944b-e07fc1f90ae7
    """
    with _client(ctx) as client:
        rows = client.referrals(case_id=case_id)
    render(rows, fmt, columns=_COLUMNS, title="referrals")


@app.command("inbox")
def inbox(
    ctx: typer.Context,
    everything: Annotated[
        bool, typer.Option("--all", help="Include referrals already answered.")
    ] = False,
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Referrals received and waiting for an answer, oldest first.

    \b
    Example:
      tessera referral inbox --all
    """
    with _client(ctx) as client:
        rows = client.inbox(include_answered=everything)
    render(rows, fmt, columns=_COLUMNS, title="inbox")


@app.command("show")
def show(
    ctx: typer.Context,
    referral_id: Annotated[str, typer.Argument(help="The referral.")],
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Show one referral with the survivor's fields (the read is recorded in the audit log).

    \b
    Example:
      tessera referral show b3e1c2d4-5f60-4a7b-8c9d-0e1f2a3b4c5d
    """
    with _client(ctx) as client:
        referral = client.show_referral(referral_id)
    render_one(referral, fmt, title="referral")


@app.command("decline")
def decline(
    ctx: typer.Context,
    referral_id: Annotated[str, typer.Argument(help="The referral.")],
    reason: Annotated[Reason, typer.Option(help="Why.")],
    text: Annotated[
        str, typer.Option(help="Words for the sender (required with 'other'); no survivor data.")
    ] = "",
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Decline a received referral with a reason (the sender is told).

    \b
    Example:
      tessera referral decline b3e1c2d4-5f60-4a7b-8c9d-0e1f2a3b4c5d --reason no_capacity
    """
    with _client(ctx) as client:
        answered = client.answer_referral(referral_id, "decline", reason.value, text)
    render_one(answered, fmt, title="declined")


def _answer_command(status: ReferralStatus, answer: Answer) -> None:
    """``tessera referral VERB ID``: one command for each answer that needs nothing more than
    the referral (node.referrals.model.ANSWERS; decline, which needs a reason, is above)."""

    def command(
        ctx: typer.Context,
        referral_id: Annotated[str, typer.Argument(help="The referral.")],
        fmt: OutputFormat = FORMAT_OPTION,
    ) -> None:
        with _client(ctx) as client:
            render_one(client.answer_referral(referral_id, answer.verb), fmt, title=status.value)

    command.__doc__ = (
        f"{answer.help}\n\n\b\nExample:\n"
        f"  tessera referral {answer.verb} b3e1c2d4-5f60-4a7b-8c9d-0e1f2a3b4c5d"
    )
    app.command(answer.verb)(command)


for _status, _answer in ANSWERS.items():
    if _status is not ReferralStatus.DECLINED:
        _answer_command(_status, _answer)
