"""``tessera broker``: create, run and operate the regional broker (issue 5)."""

from __future__ import annotations

from typing import Annotated

import typer

from cli import context

app = typer.Typer(no_args_is_help=True)


@app.command("init")
def init(
    ctx: typer.Context,
    region: Annotated[str, typer.Option(help="The region this broker serves, e.g. north.")],
    name: Annotated[str, typer.Option(help="A name for this broker.")] = "Regional broker",
    operator: Annotated[str, typer.Option(help="Name of the first operator.")] = "operator",
    listen: Annotated[str, typer.Option(help="host:port to serve on.")] = "127.0.0.1:7440",
    database_url: Annotated[
        str, typer.Option(help="PostgreSQL URL; default: SQLite file in the home.")
    ] = "",
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
