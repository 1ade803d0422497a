"""``tessera broker``: create, run and operate the regional broker (issue 5)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli import context
from cli.output import FORMAT_OPTION, OutputFormat, render, render_one
from tessera import config

app = typer.Typer(no_args_is_help=True)
coordinator_app = typer.Typer(
    no_args_is_help=True, help="Issue, list and withdraw regional coordinators' credentials."
)
app.add_typer(coordinator_app, name="coordinator")


@app.command("init")
def init(
    ctx: typer.Context,
    region: Annotated[str, typer.Option(help="The region this broker serves, e.g. north.")],
    name: Annotated[str, typer.Option(help="A name for this broker.")] = "Regional broker",
    operator: Annotated[str, typer.Option(help="Name of the first operator.")] = "operator",
    listen: Annotated[str, typer.Option(help="host:port to serve on.")] = config.BROKER_LISTEN,
    database_url: Annotated[
        str, typer.Option(help="PostgreSQL URL; default: SQLite file in the home.")
    ] = config.EMBEDDED_DATABASE,
) -> None:
    """Create a broker in --home: signing key, TLS, database, first operator credential.

    \b
    Example:
      TESSERA_HOME=/var/lib/tessera/broker tessera broker init --region north
    """
    from broker.setup import BrokerInit, init_broker

    settings = init_broker(
        BrokerInit(
            home=context.get(ctx).home,
            name=name,
            region=region,
            operator_name=operator,
            listen=listen,
            database_url=database_url,
        )
    )
    typer.echo(f"Broker for region {settings.region!r} created in {settings.home}")
    typer.echo(f"Start it with: tessera --home {settings.home} broker serve")


@app.command("serve")
def serve(ctx: typer.Context) -> None:
    """Run the broker's gRPC server until interrupted (Ctrl-C or SIGTERM).

    \b
    Example:
      TESSERA_HOME=/var/lib/tessera/broker tessera broker serve
    """
    import asyncio

    from broker.server import serve_until_signalled
    from tessera import config, logs

    cli = context.get(ctx)
    settings = config.load(cli.home, cli.environ)
    logs.configure(settings.log_format)
    asyncio.run(serve_until_signalled(settings))


@app.command("enrol-token")
def enrol_token(
    ctx: typer.Context,
    agency: Annotated[str, typer.Option(help="The agency id to bind, e.g. harbour-shelter.")],
    days: Annotated[int, typer.Option(help="Days before the code expires.")] = 7,
) -> None:
    """Issue a one-time enrolment code for an agency; give it to their administrator.

    \b
    Example:
      tessera broker enrol-token --agency harbour-shelter --days 3
    """
    from broker.operator_client import OperatorClient

    with OperatorClient(context.get(ctx).home) as client:
        code = client.enrolment_code(agency, days)
    typer.echo(code)


@app.command("revoke")
def revoke(
    ctx: typer.Context,
    agency: Annotated[str, typer.Argument(help="The agency id to withdraw.")],
    reason: Annotated[str, typer.Option(help="Why (recorded in the directory).")] = "",
) -> None:
    """Withdraw an agency from the directory at once (e.g. a lost laptop).

    \b
    Example:
      tessera broker revoke harbour-shelter --reason "laptop lost"
    """
    from broker.operator_client import OperatorClient

    with OperatorClient(context.get(ctx).home) as client:
        client.revoke(agency, reason)
    typer.echo(f"Revoked {agency}; its key is refused from now on.")


@coordinator_app.command("add")
def coordinator_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The coordinator's name, e.g. north-coordinator.")],
    out_home: Annotated[
        Path,
        typer.Option(
            help="New folder for the coordinator's credential (their --home).", file_okay=False
        ),
    ],
    address: Annotated[
        str,
        typer.Option(
            help="host:port the coordinator reaches the broker at (default: where it runs now)."
        ),
    ] = "",
    fmt: OutputFormat = FORMAT_OPTION,
) -> None:
    """Issue a coordinator credential: a new key pair in OUT_HOME, its public key listed here.

    The coordinator then opens rounds and reads releases with `tessera --home OUT_HOME stats ...`.

    \b
    Example:
      tessera broker coordinator add north-coordinator --out-home /media/usb/north-coordinator
    """
    from broker.coordinators import add_coordinator, person_row
    from tessera import config

    cli = context.get(ctx)
    issued = add_coordinator(config.load(cli.home, cli.environ), name, out_home, address)
    render_one(
        {**person_row(issued.operator), "home": str(issued.home), "broker": issued.broker_address},
        fmt,
        title="coordinator added",
    )
    if fmt is OutputFormat.TABLE:
        typer.echo(f"They can now use the broker with: tessera --home {issued.home} stats ...")


@coordinator_app.command("list")
def coordinator_list(ctx: typer.Context, fmt: OutputFormat = FORMAT_OPTION) -> None:
    """List everyone in the broker's operators.json: operators and coordinators.

    \b
    Example:
      tessera broker coordinator list --format json
    """
    from broker.coordinators import list_people, person_row
    from tessera import config

    cli = context.get(ctx)
    rows = [person_row(o) for o in list_people(config.load(cli.home, cli.environ))]
    render(rows, fmt, columns=["name", "role", "signing_key", "added_at"], title="operators.json")


@coordinator_app.command("remove")
def coordinator_remove(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The coordinator to withdraw.")],
) -> None:
    """Withdraw a coordinator: the broker refuses their credential from the next request on.

    \b
    Example:
      tessera broker coordinator remove north-coordinator
    """
    from broker.coordinators import remove_coordinator
    from tessera import config

    cli = context.get(ctx)
    removed = remove_coordinator(config.load(cli.home, cli.environ), name)
    typer.echo(f"Removed coordinator {removed.name}; their credential is refused from now on.")
