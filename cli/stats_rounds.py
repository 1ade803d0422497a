"""``tessera stats round restart``, ``cancel`` and ``list``, and how a round is shown.

A coordinator's tools for a round that is not going to finish as opened (DESIGN.md section 7,
docs/statistics.md "The round lifecycle"): see who declined and why (``round status``), restart
the current attempt without the participants that declined or never submitted, or give the round
up. They talk to the broker's Stats service through :class:`cli.stats_client.StatsClient`, which
checks the broker's signature on every round before it is shown. :func:`register` adds the
commands to ``tessera stats round``.

Decline and cancel reasons come from other parties (any participating agency, any coordinator),
so tables show them as plain text: never interpreted as terminal markup.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import typer

from cli import context
from cli.output import FORMAT_OPTION, OutputFormat, render, render_one


class RoundState(enum.StrEnum):
    """A round's state as ``--state`` takes it (tessera.v1.RoundState, without UNSPECIFIED)."""

    OPEN = "open"
    RELEASED = "released"
    ABANDONED = "abandoned"


# The numbers of tessera.v1.RoundState (a test keeps them equal; importing the generated module
# here would slow every command's start).
STATE_NUMBERS = {RoundState.OPEN: 1, RoundState.RELEASED: 2, RoundState.ABANDONED: 3}
_DECLINE_COLUMNS = ["agency_id", "reason", "declined_at"]
_LIST_COLUMNS = [
    "round_id",
    "attempt",
    "state",
    "period",
    "table",
    "submitted",
    "declined",
    "release_id",
    "cancel_reason",
]


def participants_to_drop(
    status: Mapping[str, Any], named: Sequence[str], *, declined: bool, missing: bool
) -> list[str]:
    """Who a restart leaves out: the ``named`` agencies, plus (``declined``) every participant
    that declined the current attempt and (``missing``) every one that has not submitted to it.
    Ascending byte order, each once."""
    chosen = set(named)
    if declined:
        chosen.update(d["agency_id"] for d in status["declines"])
    if missing:
        submitted = set(status["submitted"])
        chosen.update(p for p in status["participants"] if p not in submitted)
    return sorted(chosen, key=str.encode)


def _plain_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], title: str) -> None:
    """A table for people whose cells are shown exactly as text (no rich markup)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, show_lines=False)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(Text(_text(row.get(c))) for c in columns))
    Console().print(table)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ";".join(str(v) for v in value)
    return str(value)


def show_round(record: Mapping[str, Any], fmt: OutputFormat, title: str) -> None:
    """Print one round: its fields, then each decline (agency, reason, when); the cancel reason
    only once it was cancelled. JSON is the whole record, declines nested."""
    if fmt is OutputFormat.JSON:
        render_one(record, fmt)
        return
    declines = list(record.get("declines", []))
    fields = {
        k: v for k, v in record.items() if k != "declines" and not (k == "cancel_reason" and not v)
    }
    if fmt is OutputFormat.CSV:
        # One field,value document: a decline is a row of its own.
        for d in declines:
            fields[f"declined by {d['agency_id']}"] = f"{d['reason']} (at {d['declined_at']})"
        render_one(fields, fmt)
        return
    _plain_table([{"field": k, "value": v} for k, v in fields.items()], ["field", "value"], title)
    if declines:
        _plain_table(declines, _DECLINE_COLUMNS, f"declines of attempt {record['attempt']}")


def _list_row(record: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "round_id": record["round_id"],
        "attempt": record["attempt"],
        "state": record["state"],
        "period": record["period"],
        "table": record["table"],
        "submitted": f"{len(record['submitted'])}/{len(record['participants'])}",
        "declined": [d["agency_id"] for d in record["declines"]],
        "release_id": record["release_id"],
        "cancel_reason": record["cancel_reason"],
    }


def restart(
    ctx: typer.Context,
    round_id: Annotated[str, typer.Argument(help="The round's id.")],
    drop: Annotated[
        str, typer.Option("--drop", help="Comma-separated agency ids to leave out.")
    ] = "",
    drop_declined: Annotated[
        bool,
        typer.Option("--drop-declined", help="Leave out every participant that declined."),
    ] = False,
    drop_missing: Annotated[
        bool,
        typer.Option("--drop-missing", help="Leave out every participant that has not submitted."),
    ] = False,
    reason: Annotated[
        str, typer.Option(help="Why, for the round's history (never survivor data).")
    ] = "",
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Restart a round's current attempt: its shares are discarded unread and a new attempt,
    with fresh masks, waits for every remaining participant (each submits again).

    \b
    Example:
      tessera stats round restart 0f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a --drop-declined \\
        --reason "cedar-aid declined: budget spent"
    """
    from cli.stats_client import StatsClient

    named = [a.strip() for a in drop.split(",") if a.strip()]
    with StatsClient(context.get(ctx).home) as client:
        current = client.round_status(round_id)
        dropped = participants_to_drop(current, named, declined=drop_declined, missing=drop_missing)
        restarted = client.restart(round_id, int(current["attempt"]), dropped, reason)
    left_out = ", ".join(dropped) or "nobody"
    show_round(
        restarted,
        fmt,
        title=f"round restarted: attempt {restarted['attempt']} (left out: {left_out})",
    )


def cancel(
    ctx: typer.Context,
    round_id: Annotated[str, typer.Argument(help="The round's id.")],
    reason: Annotated[
        str, typer.Option(help="Why, for the round's history (never survivor data).")
    ],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Cancel an open round: no release will be made and its shares are discarded unread.

    Participants that submitted have spent their budget on it all the same.

    \b
    Example:
      tessera stats round cancel 0f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a \\
        --reason "too few agencies this month" --yes
    """
    from cli.stats_client import StatsClient

    if not yes and not typer.confirm(f"Cancel round {round_id}? No release will be made."):
        raise typer.Exit(1)
    with StatsClient(context.get(ctx).home) as client:
        cancelled = client.cancel(round_id, reason)
    show_round(cancelled, fmt, title="round cancelled")


def list_rounds(
    ctx: typer.Context,
    state: Annotated[RoundState | None, typer.Option(help="Only rounds in this state.")] = None,
    period: Annotated[str, typer.Option(help="Only rounds for this month, YYYY-MM.")] = "",
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """List statistics rounds, newest first: progress, declines, release or cancel reason.

    \b
    Example:
      tessera stats round list --state open --period 2026-10
    """
    from broker.stats import check_period
    from cli.stats_client import StatsClient

    if period:
        check_period(period)
    with StatsClient(context.get(ctx).home) as client:
        rounds = client.rounds(STATE_NUMBERS[state] if state is not None else 0, period)
    if fmt is OutputFormat.JSON:
        render(rounds, fmt)
        return
    rows = [_list_row(r) for r in rounds]
    if fmt is OutputFormat.CSV:
        render(rows, fmt, columns=_LIST_COLUMNS)
        return
    _plain_table(rows, _LIST_COLUMNS, "rounds")


def register(round_app: typer.Typer) -> None:
    """Add ``restart``, ``cancel`` and ``list`` to ``tessera stats round``."""
    round_app.command("restart")(restart)
    round_app.command("cancel")(cancel)
    round_app.command("list")(list_rounds)
