"""``tessera stats``: privacy budgets, statistics rounds and releases (DESIGN.md section 7).

``budget`` asks the caller's node (node staff); ``round open``, ``round status``, ``show``,
``chart`` and ``trend`` talk to the broker's Stats service with the coordinator's or operator's
credential in ``--home`` (``credential.json``, as the operator's client does for the Directory).
Every round and release the broker returns is checked against the broker's signing key before it
is shown. What a release looks like as JSON, CSV, a table or a chart is :mod:`cli.stats_render`'s
business; the commands here fetch, choose and print.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from cli import context, stats_rounds
from cli.dashboard import command as dashboard_command
from cli.output import FORMAT_OPTION, OutputFormat, record, render, render_one
from cli.stats_client import StatsClient
from cli.stats_render import (
    CATEGORY_DIMENSION,
    NO_RELEASE,
    STATUS_DIMENSION,
    find_cell,
    interval_level,
    month_range,
    newest_release,
    number,
    parse_period,
    png_chart,
    release_csv,
    release_json,
    release_rows,
    terminal_chart,
    trend_csv,
    trend_document,
    trend_json,
    trend_png,
)

# The chart helpers stay importable from here (the demo draws its chart with them).
__all__ = ["StatsClient", "app", "png_chart", "release_rows", "terminal_chart"]

app = typer.Typer(no_args_is_help=True)
round_app = typer.Typer(no_args_is_help=True)
app.add_typer(round_app, name="round", help="Open statistics rounds and follow them.")

_TABLES = ("needs",)


@app.command("budget")
def budget(
    ctx: typer.Context,
    period: Annotated[str, typer.Option(help="Only this period (YYYY-MM).")] = "",
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Show this node's privacy budget: the cap, what was spent, and every charge.

    \b
    Example:
      tessera stats budget --period 2026-10
    """
    with context.get(ctx).node_client() as client:
        periods = client.budget(period)
    if fmt is OutputFormat.JSON:
        sys.stdout.write(json.dumps([record(p) for p in periods], indent=2, default=str) + "\n")
        return
    render(
        [{k: v for k, v in record(p).items() if k != "charges"} for p in periods],
        fmt,
        columns=["period", "cap", "spent", "remaining"],
        title="privacy budget",
    )
    charges = [{"period": p.period, **record(c)} for p in periods for c in p.charges]
    if charges and fmt is OutputFormat.TABLE:
        render(charges, fmt, title="charges (one per submitted share)")


@round_app.command("open")
def open_round(
    ctx: typer.Context,
    period: Annotated[str, typer.Option(help="The month counted, YYYY-MM.")],
    epsilon: Annotated[float, typer.Option(help="Privacy loss of the release.")],
    table: Annotated[str, typer.Option(help="The table: needs.")] = "needs",
    participants: Annotated[
        str, typer.Option(help="Comma-separated agency ids; empty means every enrolled agency.")
    ] = "",
    threshold: Annotated[
        int,
        typer.Option(
            help="Least participants giving the full noise; 0: the broker's default, the least"
            " keeping the error within 1.2x of central (docs/privacy.md)."
        ),
    ] = 0,
    local_noise: Annotated[
        bool, typer.Option("--local-noise", help="Each node adds the full noise (baseline).")
    ] = False,
    bound: Annotated[
        int,
        typer.Option(
            help="Most cells one survivor may add to; 0: sized by the broker from the newest"
            " release's histogram, else 6."
        ),
    ] = 0,
    region: Annotated[str, typer.Option(help="Default: the broker's region.")] = "",
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Open a statistics round on the broker (coordinator or operator credential).

    \b
    Example:
      tessera stats round open --period 2026-10 --epsilon 0.5 \\
        --participants harbour-shelter,lighthouse-clinic,northside-legal
    """
    from tessera import dp
    from tessera.errors import InvalidInput

    if table not in _TABLES:
        raise InvalidInput(f"unknown table {table!r}", hint=f"choose one of {', '.join(_TABLES)}")
    if bound < 0 or threshold < 0:
        raise InvalidInput("--bound and --threshold take 0 (the broker's choice) or more")
    spec = dp.default_needs_table()
    chosen = [p.strip() for p in participants.split(",") if p.strip()]
    with StatsClient(context.get(ctx).home) as client:
        # A bound of 0 asks the broker to size it.
        opened = client.open_round(
            spec, region, period, chosen, threshold, epsilon, local_noise, bound=bound
        )
    render_one(opened, fmt, title="round opened")


@round_app.command("status")
def round_status(
    ctx: typer.Context,
    round_id: Annotated[str, typer.Argument(help="The round's id.")],
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Show a round's current attempt, who has submitted, who declined and why, and the reason
    it was cancelled if it was.

    \b
    Example:
      tessera stats round status 0f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a
    """
    with StatsClient(context.get(ctx).home) as client:
        stats_rounds.show_round(client.round_status(round_id), fmt, title="round")


stats_rounds.register(round_app)  # round restart, cancel, list


def _latest_release(client: StatsClient, region: str, period: str) -> Any:
    from tessera.errors import NotFound

    region = region or client.info().region
    release = newest_release(client.releases(period), region)
    if release is None:
        raise NotFound(
            f"no release for region {region!r} and period {period}",
            hint=f"ask a coordinator to run `tessera stats round open --period {period}"
            " --epsilon 0.5 --participants ...`",
        )
    return release


def _emit(text: str, out: Path | None) -> None:
    """Print ``text``, or write exactly its UTF-8 bytes to ``out`` (and say so on stderr)."""
    from tessera.files import atomic_write

    if out is None:
        sys.stdout.write(text)
        return
    data = text.encode("utf-8")
    atomic_write(out, data)
    sys.stderr.write(f"written to {out} ({len(data)} bytes)\n")


OUT_OPTION: Any = typer.Option(
    "--out", help="Write the json or csv to this file instead of standard output (same bytes)."
)


@app.command("show")
def show(
    ctx: typer.Context,
    period: Annotated[str, typer.Option(help="The month, YYYY-MM.")],
    region: Annotated[str, typer.Option(help="Default: the broker's region.")] = "",
    fmt: OutputFormat = FORMAT_OPTION,
    out: Annotated[Path | None, OUT_OPTION] = None,
) -> None:
    """Print the newest release for a region and period, each cell with its error bar.

    json is the whole release (every field, cells with coordinates by dimension name); csv is
    one row per cell. Both are the numbers as released (a noisy count may be negative).

    \b
    Example:
      tessera stats show --period 2026-10 --format csv --out needs-2026-10.csv
    """
    from tessera.errors import InvalidInput

    parse_period(period, "--period")
    if out is not None and fmt is OutputFormat.TABLE:
        raise InvalidInput(
            "--out writes a file for scripts, not a table", hint="add --format csv or --format json"
        )
    with StatsClient(context.get(ctx).home) as client:
        release = _latest_release(client, region, period)
    if fmt is OutputFormat.JSON:
        _emit(release_json(release), out)
    elif fmt is OutputFormat.CSV:
        _emit(release_csv(release), out)
    else:
        render(release_rows(release), fmt, title=_title(release))


def _title(release: Any) -> str:
    return (
        f"{release.table.name} {release.region} {release.period}: ε={release.epsilon:g},"
        f" {release.participants} agencies, ±{release.accuracy:g}"
        f" at {interval_level(release.alpha):.0%} (release {release.release_id})"
    )


@app.command("chart")
def chart(
    ctx: typer.Context,
    period: Annotated[str, typer.Option(help="The month, YYYY-MM.")],
    out: Annotated[Path | None, typer.Option(help="Also write the chart to this PNG file.")] = None,
    region: Annotated[str, typer.Option(help="Default: the broker's region.")] = "",
) -> None:
    """Chart unmet needs by category with error bars: in the terminal, and as a PNG with --out.

    Negative noisy counts and interval ends are drawn as 0 (marked *); `stats show` prints the
    released numbers.

    \b
    Example:
      tessera stats chart --period 2026-10 --out unmet-2026-10.png
    """
    from tessera.timestamps import to_datetime

    parse_period(period, "--period")
    with StatsClient(context.get(ctx).home) as client:
        release = _latest_release(client, region, period)
    stamp = to_datetime(release.released_at) if release.HasField("released_at") else None
    title = f"unmet needs, {release.region} {release.period} (released {stamp})"
    rows = release_rows(release)
    if out is not None:
        png_chart(rows, title, out, level=interval_level(release.alpha))
        sys.stdout.write(f"chart written to {out}\n")
    sys.stdout.write(f"{title}\n")
    sys.stdout.write(terminal_chart(rows))


@app.command("trend")
def trend(
    ctx: typer.Context,
    category: Annotated[str, typer.Option(help="The need category, e.g. medical.")],
    first: Annotated[str, typer.Option("--from", help="The first month, YYYY-MM.")],
    last: Annotated[str, typer.Option("--to", help="The last month, YYYY-MM (36 at most).")],
    status: Annotated[str, typer.Option(help="The need status.")] = "unmet",
    region: Annotated[str, typer.Option(help="Default: the broker's region.")] = "",
    fmt: OutputFormat = FORMAT_OPTION,
    out: Annotated[
        Path | None, typer.Option("--out", help="Also draw the trend to this PNG file.")
    ] = None,
) -> None:
    """One cell month by month: the newest verified release of each month, its value and interval.

    A month without a release (of a table with this cell) shows "no release", never 0.

    \b
    Example:
      tessera stats trend --category medical --from 2026-01 --to 2026-10 --out medical.png
    """
    from tessera.errors import InvalidInput

    months = month_range(first, last)
    wanted = {CATEGORY_DIMENSION: category, STATUS_DIMENSION: status}
    chosen: list[tuple[str, Any]] = []
    seen: dict[str, set[str]] = {CATEGORY_DIMENSION: set(), STATUS_DIMENSION: set()}

    def has_cell(release: Any) -> bool:
        return find_cell(release, wanted) is not None

    with StatsClient(context.get(ctx).home) as client:
        region = region or client.info().region
        for month in months:
            listed = [r for r in client.releases(month) if r.region == region]
            for release in listed:
                for dimension in release.table.dimensions:
                    seen.get(dimension.name, set()).update(dimension.values)
            chosen.append((month, newest_release(listed, region, has_cell)))
    if all(release is None for _month, release in chosen):
        for name, value in wanted.items():
            if seen[name] and value not in seen[name]:
                raise InvalidInput(
                    f"no release in {first} to {last} has {name} {value!r}",
                    hint=f"choose one of {', '.join(sorted(seen[name]))}",
                )
    document = trend_document(region, category, status, chosen)
    if out is not None:
        trend_png(document, out)
        sys.stderr.write(f"chart written to {out}\n")
    if fmt is OutputFormat.JSON:
        sys.stdout.write(trend_json(document))
    elif fmt is OutputFormat.CSV:
        sys.stdout.write(trend_csv(document))
    else:
        render(
            [_trend_row(m) for m in document["months"]],
            fmt,
            columns=["period", "value", "interval", "level", "epsilon", "participants", "release"],
            title=f"{status} {category}, {region}, {months[0]} to {months[-1]}",
        )


def _trend_row(month: dict[str, Any]) -> dict[str, Any]:
    if month["state"] == NO_RELEASE:
        return {"period": month["period"], "value": NO_RELEASE}
    return {
        "period": month["period"],
        "value": number(month["value"]),
        "interval": f"[{number(month['lower'])}, {number(month['upper'])}]",
        "level": f"{month['interval_level']:.0%}",
        "epsilon": f"{month['epsilon']:g}",
        "participants": month["participants"],
        "release": month["release_id"],
    }


dashboard_command.register(app)  # stats dashboard (cli/dashboard/)
