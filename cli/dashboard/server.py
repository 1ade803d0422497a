"""The dashboard's web application (aiohttp, jinja2): read-only pages over checked releases.

Routes (all GET): ``/`` (the newest period), ``/period/YYYY-MM`` (``?category=&status=`` pick
the trend's cell), ``/release/ID.csv`` and ``/release/ID.json`` (the bytes of
``tessera stats show --format csv|json``, from the same functions), ``/static/...``.

Every response carries a strict Content-Security-Policy (no script at all, styles and images
from this origin only), ``X-Content-Type-Options: nosniff``, no framing and no referrer; pages and
downloads are ``Cache-Control: no-store``. Templates autoescape everything. Over plain HTTP
(loopback only), a request whose ``Host`` is not this server's loopback address is refused, so
a web page elsewhere cannot reach the dashboard through DNS rebinding.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import jinja2
from aiohttp import web

from cli.dashboard import views
from cli.dashboard.listen import Listen, TlsFiles
from cli.dashboard.releases import SIGNATURE_REFUSED, Board, DashboardLimits, ReleaseSource
from cli.stats_render import CLAMP_NOTE, interval_level, number, release_csv, release_json
from tessera.errors import Conflict, ErrorKind, NotFound, TesseraError

log = logging.getLogger(__name__)

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self';"
        " base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), interest-cohort=()",
}
NO_STORE = "no-store"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
STATIC_CACHE = "max-age=3600"
_STATUS = {
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.INVALID_INPUT: 400,
    ErrorKind.UNAVAILABLE: 503,
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class DashboardSettings:
    listen: Listen
    tls: TlsFiles | None
    limits: DashboardLimits = field(default_factory=DashboardLimits)


def templates() -> jinja2.Environment:
    """The package's templates, every value escaped."""
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("cli.dashboard", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["number"] = number
    environment.filters["percent"] = lambda v: f"{v:.0%}"
    environment.filters["svgnum"] = lambda v: f"{v:.2f}".rstrip("0").rstrip(".")
    environment.filters["when"] = _when
    environment.globals.update(
        CLAMP_NOTE=CLAMP_NOTE,
        SIGNATURE_REFUSED=SIGNATURE_REFUSED,
        REFUSED=views.REFUSED,
        interval_level=interval_level,
    )
    return environment


class Pages:
    """The route handlers: each fetches a checked board (off the event loop) and renders it."""

    def __init__(self, source: ReleaseSource, limits: DashboardLimits) -> None:
        self._source = source
        self._limits = limits
        self._templates = templates()

    async def _board(self) -> Board:
        return await asyncio.to_thread(self._source.board)

    def _page(self, name: str, status: int = 200, **context: Any) -> web.Response:
        html = self._templates.get_template(name).render(**context)
        return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")

    async def index(self, request: web.Request) -> web.StreamResponse:
        board = await self._board()
        if not board.periods:
            return self._page("empty.html", board=board)
        return self._period_page(request, board, board.periods[0].period)

    async def period(self, request: web.Request) -> web.StreamResponse:
        board = await self._board()
        return self._period_page(request, board, request.match_info["period"])

    def _period_page(self, request: web.Request, board: Board, period: str) -> web.Response:
        entry = board.period(period)
        if entry is None:
            raise NotFound(
                f"no release for region {board.region} and period {period}",
                hint="choose a period from the list",
            )
        shown = entry.newest
        release = views.release_view(shown) if shown is not None else None
        trend = (
            views.trend_view(board, shown, request.query, self._limits.trend_months)
            if shown is not None
            else None
        )
        return self._page("period.html", board=board, entry=entry, release=release, trend=trend)

    async def download(self, request: web.Request) -> web.StreamResponse:
        release_id, fmt = request.match_info["release_id"], request.match_info["format"]
        board = await self._board()
        verified = board.downloadable(release_id)
        if verified is None:
            raise NotFound(
                f"no release {release_id[:80]!r} that the dashboard may show",
                hint="it does not exist, or its period was refused: open the period's page",
            )
        release = verified.release
        text, content_type = (
            (release_csv(release), "text/csv")
            if fmt == "csv"
            else (release_json(release), "application/json")
        )
        name = f"{release.table.name}-{release.region}-{release.period}.{fmt}"
        return web.Response(
            body=text.encode("utf-8"),
            content_type=content_type,
            charset="utf-8",
            headers={"Content-Disposition": f'attachment; filename="{_safe(name)}"'},
        )

    def error(self, exc: TesseraError) -> web.Response:
        status = _STATUS.get(exc.kind, 502)
        return self._page("error.html", status=status, error=exc, status_code=status)


def _when(stamp: str) -> str:
    """An ISO 8601 UTC time as people read it: ``2026-10-31 17:05 UTC``."""
    import datetime as dt

    try:
        moment = dt.datetime.fromisoformat(stamp)
    except ValueError:
        return stamp
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def make_app(
    source: ReleaseSource, settings: DashboardSettings, port: Callable[[], int]
) -> web.Application:
    """The application; ``port`` says which port was bound (for the Host check)."""
    pages = Pages(source, settings.limits)
    hosts = {*LOOPBACK_HOSTS, settings.listen.url_host()}

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if settings.tls is None and not _loopback_host(request.host, hosts, port()):
            return web.Response(
                status=421, text="this dashboard answers on its loopback address only\n"
            )
        try:
            return await handler(request)
        except TesseraError as exc:
            if exc.kind not in _STATUS:
                log.warning("dashboard page failed", extra={"kind": exc.kind.name})
            return pages.error(exc)

    app = web.Application(middlewares=[guard])
    app.on_response_prepare.append(_headers)
    app.router.add_get("/", pages.index)
    app.router.add_get(r"/period/{period:[0-9]{4}-(0[1-9]|1[0-2])}", pages.period)
    app.router.add_get(
        r"/release/{release_id:[A-Za-z0-9_-]{1,100}}.{format:csv|json}", pages.download
    )
    static = resources.files("cli.dashboard") / "static"
    app.router.add_static("/static/", str(static), follow_symlinks=False)
    return app


def _loopback_host(host: str, names: set[str], port: int) -> bool:
    return host in {f"{name}:{port}" for name in names}


async def _headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)
    static = request.path.startswith("/static/") and response.status == 200
    response.headers["Cache-Control"] = STATIC_CACHE if static else NO_STORE


class RunningDashboard:
    """A dashboard bound and serving; ``url`` is where (the port actually bound)."""

    def __init__(self, runner: web.AppRunner, url: str) -> None:
        self._runner = runner
        self.url = url

    async def stop(self) -> None:
        await self._runner.cleanup()


async def start_dashboard(source: ReleaseSource, settings: DashboardSettings) -> RunningDashboard:
    """Bind ``settings.listen`` and serve; over TLS when ``settings.tls`` is set."""
    bound: list[int] = []
    app = make_app(source, settings, lambda: bound[0])
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    context = settings.tls.context() if settings.tls is not None else None
    site = web.TCPSite(runner, settings.listen.host, settings.listen.port, ssl_context=context)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise Conflict(
            f"cannot listen on {settings.listen.host}:{settings.listen.port}: {exc.strerror}",
            hint="choose another --listen (port 0: any free port)",
        ) from exc
    bound.append(int(runner.addresses[0][1]))
    scheme = "https" if context is not None else "http"
    return RunningDashboard(runner, f"{scheme}://{settings.listen.url_host()}:{bound[0]}/")
