"""``tessera stats dashboard``: parse the options, check the transport, serve until stopped.

Everything heavy (aiohttp, jinja2, gRPC) is imported inside the command, so ``tessera --help``
stays fast.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cli import context

if TYPE_CHECKING:
    from cli.dashboard.server import DashboardSettings

LISTEN_DEFAULT = "127.0.0.1:0"


def register(app: typer.Typer) -> None:
    """Add ``dashboard`` to ``tessera stats``."""
    app.command("dashboard")(dashboard)


def dashboard(
    ctx: typer.Context,
    listen: Annotated[
        str,
        typer.Option(help="HOST:PORT to serve on; port 0 picks a free one. Loopback unless TLS."),
    ] = LISTEN_DEFAULT,
    tls: Annotated[
        bool,
        typer.Option(
            "--tls",
            help="Serve HTTPS with the home's TLS material (the broker's, in its home), else a"
            " self-signed certificate kept in the home's dashboard-tls/.",
        ),
    ] = False,
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", help="Serve HTTPS with this PEM certificate.")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option("--tls-key", help="The PEM key of --tls-cert.")
    ] = None,
    region: Annotated[str, typer.Option(help="Default: the broker's region.")] = "",
) -> None:
    """Serve a read-only web dashboard of the region's broker-signed releases.

    Shows each period's newest release (unmet needs with their intervals, a heat map of every
    need, a trend across months) and offers its CSV and JSON, the same bytes as `stats show`.
    Every release's signature is checked; one that fails is shown as refused, never drawn.
    Plain HTTP is for loopback only: another --listen needs --tls or --tls-cert/--tls-key.

    \b
    Example:
      tessera stats dashboard --listen 127.0.0.1:8443
      tessera stats dashboard --listen 0.0.0.0:8443 --tls
    """
    from cli.dashboard.listen import check_transport, parse_listen, tls_files
    from cli.dashboard.releases import DashboardLimits
    from cli.dashboard.server import DashboardSettings

    home = context.get(ctx).home
    address = parse_listen(listen)
    material = tls_files(home, tls, tls_cert, tls_key)
    check_transport(address, material)
    settings = DashboardSettings(address, material, DashboardLimits())
    asyncio.run(_serve(home, region, settings))


async def _serve(home: Path, region: str, settings: DashboardSettings) -> None:
    from cli.dashboard.releases import ReleaseSource
    from cli.dashboard.server import start_dashboard
    from cli.stats_client import StatsClient

    with StatsClient(home) as client:
        source = await asyncio.to_thread(ReleaseSource, client, region, settings.limits)
        running = await start_dashboard(source, settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        if settings.tls is not None:
            made = " (made now)" if settings.tls.made else ""
            sys.stdout.write(
                f"TLS certificate {settings.tls.cert}{made}, SHA-256 {settings.tls.fingerprint}\n"
            )
        sys.stdout.write(f"dashboard for region {source.region} serving on {running.url}\n")
        sys.stdout.write("press Ctrl-C to stop\n")
        sys.stdout.flush()
        try:
            await stop.wait()
        finally:
            await running.stop()
    sys.stdout.write("dashboard stopped\n")
