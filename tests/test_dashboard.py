"""``tessera stats dashboard`` without a browser: which releases it may draw, where it may
listen, and what its HTTP answers carry (headers, downloads, TLS), against a real broker.

The browser's view of the same pages is tests/test_dashboard_browser.py.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.dashboard import svg, views
from cli.dashboard.listen import Listen, check_transport, parse_listen, tls_files
from cli.dashboard.releases import (
    SIGNATURE_REFUSED,
    RefusedRelease,
    VerifiedRelease,
    build_board,
    check_release,
)
from cli.main import app
from tessera import crypto, labels
from tessera.errors import InvalidInput, Refused
from tessera.v1 import common_pb2 as common_pb
from tessera.v1 import stats_pb2 as stats_pb
from tests.dashboard_support import Region, cli_dashboard, enrol_all, make_release, tamper_release
from tests.support import BackgroundBroker, make_broker
from tests.test_node_cli import tessera

TABLES = [[1, 2, 3, 4], [2, 0, 5, 1], [0, 1, 2, 3]]  # totals 3, 3, 10, 8


@pytest.fixture(name="region")
def region_fixture(tmp_path: Path) -> Iterator[Region]:
    running = BackgroundBroker(make_broker(tmp_path / "broker"))
    try:
        yield enrol_all(running, tmp_path)
    finally:
        running.stop()


# --- checking each release on its own (no I/O) ----------------------------------------------


def signed(identity: crypto.Identity, release: stats_pb.Release) -> common_pb.SignedBlob:
    body = release.SerializeToString()
    return common_pb.SignedBlob(
        body=body,
        signature=identity.sign(labels.LABEL_RELEASE, body),
        signer=identity.public.signing_key,
    )


def a_release(release_id: str, period: str, seconds: int = 100) -> stats_pb.Release:
    release = stats_pb.Release(release_id=release_id, region="north", period=period)
    release.released_at.seconds = seconds
    return release


def test_a_release_is_drawn_only_if_the_brokers_key_signed_it_unaltered() -> None:
    broker, other = crypto.Identity(os.urandom(32)), crypto.Identity(os.urandom(32))
    key = broker.public.signing_key
    good = signed(broker, a_release("r-1", "2026-10"))
    checked = check_release(good, key)
    assert isinstance(checked, VerifiedRelease) and checked.release_id == "r-1"
    assert checked.document["period"] == "2026-10"

    altered = common_pb.SignedBlob()
    altered.CopyFrom(good)
    altered.body = a_release("r-1", "2026-10", seconds=101).SerializeToString()
    by_other = signed(other, a_release("r-2", "2026-10"))
    relabelled = signed(other, a_release("r-3", "2026-10"))
    relabelled.signer = key  # claims the broker's key, signed by another
    garbage = common_pb.SignedBlob(body=b"\xff\xff\xff", signature=b"\0" * 64, signer=key)
    for blob, claimed in ((altered, "r-1"), (by_other, "r-2"), (relabelled, "r-3"), (garbage, "")):
        refused = check_release(blob, key)
        assert isinstance(refused, RefusedRelease), blob
        assert refused.reason.startswith(SIGNATURE_REFUSED)
        assert refused.claimed_id == claimed
    other_key = check_release(by_other, key)
    assert isinstance(other_key, RefusedRelease) and "other than the broker's" in other_key.reason


def test_a_period_with_any_refused_release_is_refused_whole() -> None:
    broker = crypto.Identity(os.urandom(32))
    key = broker.public.signing_key
    older = check_release(signed(broker, a_release("old", "2026-10", 100)), key)
    newer = check_release(signed(broker, a_release("new", "2026-10", 200)), key)
    south = stats_pb.Release(release_id="s", region="south", period="2026-10")
    elsewhere = check_release(signed(broker, south), key)
    board = build_board("north", [older, newer, elsewhere])
    (october,) = board.periods
    assert october.newest is not None and october.newest.release_id == "new"
    assert [v.release_id for v in october.verified] == ["old", "new"]  # south is not north's
    assert board.downloadable("old") is not None and board.downloadable("s") is None

    bad = RefusedRelease(SIGNATURE_REFUSED, "x", "2026-10")
    lost = RefusedRelease(SIGNATURE_REFUSED, "", "")
    august = check_release(signed(broker, a_release("aug", "2026-08")), key)
    board = build_board("north", [newer, bad, lost, august])
    assert [p.period for p in board.periods] == ["2026-10", "2026-08"]
    refused = board.period("2026-10")
    assert refused is not None and refused.refused == (bad,) and refused.newest is None
    assert board.downloadable("new") is None  # nothing of a refused period is offered
    assert board.unplaced == (lost,)
    months = board.trend_months("2026-10", lambda _r: True, limit=36)
    assert [(m, v is not None, r) for m, v, r in months] == [
        ("2026-08", True, False),
        ("2026-09", False, False),
        ("2026-10", False, True),
    ]


# --- drawing: clamped together, levels, ticks ----------------------------------------------


def test_bars_and_heat_levels_follow_the_clamping_rule() -> None:
    broker = crypto.Identity(os.urandom(32))
    from broker.serde import spec_to_proto
    from tests.test_broker_stats import SMALL

    release = a_release("neg", "2026-10")
    release.table.CopyFrom(spec_to_proto(SMALL))
    values = {
        ("safe_housing", "unmet"): (-6, -9.0, -3.0),
        ("safe_housing", "met"): (-1, -4.0, 2.0),
        ("medical", "unmet"): (-1, -4.0, 2.0),
        ("medical", "met"): (12, 8.0, 16.0),
    }
    for coordinates in SMALL.cells:
        value, lower, upper = values[coordinates]
        release.cells.add(coordinates=coordinates, value=value, lower=lower, upper=upper)
    verified = check_release(signed(broker, release), broker.public.signing_key)
    assert isinstance(verified, VerifiedRelease)
    view = views.release_view(verified)
    assert [
        (r.category, r.value, r.drawn.value, r.drawn.upper, r.drawn.clamped) for r in view.unmet
    ] == [
        ("safe_housing", -6, 0, 0, True),
        ("medical", -1, 0, 2, True),
    ]
    assert view.any_clamped
    assert all(b.width >= 0 and b.whisker_from <= b.whisker_to for b in view.chart.bars)
    heat = view.heat
    assert heat is not None and heat.statuses == ("unmet", "met")
    levels = [[c.level if c else None for c in row.cells] for row in heat.rows]
    assert levels == [[0, 0], [0, views.HEAT_LEVELS - 1]]
    assert svg.nice_ticks(0) == [0, 1] and svg.nice_ticks(17) == [0, 5, 10, 15, 20]
    assert svg.nice_ticks(3) == [0, 1, 2, 3]


# --- where it may listen ---------------------------------------------------------------------


def test_listen_addresses_and_the_plain_http_rule(tmp_path: Path) -> None:
    assert parse_listen("127.0.0.1:8443") == Listen("127.0.0.1", 8443)
    assert parse_listen("[::1]:0") == Listen("::1", 0)
    assert parse_listen("[::1]:0").url_host() == "[::1]"
    assert Listen("0.0.0.0", 1).url_host() == "127.0.0.1"
    for text in ("8443", "127.0.0.1", "host:port", ":80", "127.0.0.1:70000"):
        with pytest.raises(InvalidInput):
            parse_listen(text)
    for host in ("127.0.0.1", "127.0.0.9", "::1", "localhost"):
        check_transport(Listen(host, 0), None)
    for host in ("0.0.0.0", "::", "192.0.2.7", "dashboard.example"):
        with pytest.raises(Refused):
            check_transport(Listen(host, 0), None)
    made = tls_files(tmp_path, True, None, None)
    assert made is not None and made.made and made.cert.parent.name == "dashboard-tls"
    assert oct(made.key.stat().st_mode & 0o777) == "0o600"
    check_transport(Listen("0.0.0.0", 0), made)
    again = tls_files(tmp_path, True, None, None)  # kept: the browser's exception still holds
    assert again is not None and not again.made and again.fingerprint == made.fingerprint
    with pytest.raises(InvalidInput):
        tls_files(tmp_path, False, made.cert, None)


def test_plain_http_off_loopback_is_refused_with_exit_code_8(tmp_path: Path) -> None:
    # No credential in the home: the transport is checked before anything else.
    done = tessera(tmp_path, "stats", "dashboard", "--listen", "0.0.0.0:8443")
    assert done.returncode == 8, done.stderr
    assert "not a loopback address" in done.stderr and "plain HTTP" in done.stderr
    assert "what to do: add --tls" in done.stderr
    half = tessera(tmp_path, "stats", "dashboard", "--tls-cert", str(tmp_path / "c.pem"))
    assert half.returncode == 7 and "--tls-cert and --tls-key go together" in half.stderr


# --- what it answers, over HTTP and HTTPS -----------------------------------------------------


def get(
    url: str, path: str, *, host: str | None = None, method: str = "GET", tls: Path | None = None
) -> tuple[int, dict[str, str], bytes]:
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    connection: http.client.HTTPConnection
    if parts.scheme == "https":
        context = ssl.create_default_context(cafile=str(tls))
        connection = http.client.HTTPSConnection(parts.hostname, parts.port, context=context)
    else:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        headers = {"Host": host} if host is not None else {}
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def show(region: Region, period: str, fmt: str) -> bytes:
    home = str(region.home)
    result = CliRunner().invoke(
        app, ["--home", home, "stats", "show", "--period", period, "-f", fmt]
    )
    assert result.exit_code == 0, result.output
    return result.stdout_bytes


def test_pages_and_downloads_carry_strict_headers_and_the_show_bytes(region: Region) -> None:
    release = make_release(region, "2026-10", TABLES)
    with cli_dashboard(region.home) as running:
        assert running.url.startswith("http://127.0.0.1:")
        status, headers, page = get(running.url, "/")
        assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
        assert release.release_id.encode() in page and b"<script" not in page
        csp = headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src" not in csp  # no script at all
        assert "style-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert (
            headers["Cache-Control"] == "no-store" and headers["Referrer-Policy"] == "no-referrer"
        )
        for fmt in ("csv", "json"):
            status, headers, body = get(running.url, f"/release/{release.release_id}.{fmt}")
            assert status == 200 and body == show(region, "2026-10", fmt)
            assert headers["Cache-Control"] == "no-store"
            assert headers["Content-Disposition"] == (
                f'attachment; filename="needs_small-north-2026-10.{fmt}"'
            )
        assert json.loads(body)["release_id"] == release.release_id
        status, headers, _css = get(running.url, "/static/dashboard.css")
        assert status == 200 and headers["X-Content-Type-Options"] == "nosniff"
        for path in ("/period/2026-11", "/release/nope.csv", "/nowhere"):
            status, headers, _body = get(running.url, path)
            assert status == 404 and headers["Cache-Control"] == "no-store", path
            assert "Content-Security-Policy" in headers
        status, _h, _b = get(running.url, "/period/2026-10?category=<script>")
        assert status == 400 and b"<script>" not in _b and b"&lt;script&gt;" in _b
        assert get(running.url, "/", method="POST")[0] == 405  # read-only
        # DNS rebinding: a page elsewhere naming this port under its own host name.
        assert get(running.url, "/", host=f"attacker.example:{running.url.split(':')[2]}")[0] == 421


def test_a_tampered_release_is_refused_and_not_offered(region: Region) -> None:
    release = make_release(region, "2026-09", TABLES)
    tamper_release(region, release.release_id)
    with cli_dashboard(region.home) as running:
        status, _headers, page = get(running.url, "/period/2026-09")
        assert status == 200 and SIGNATURE_REFUSED.encode() in page
        assert b'class="value"' not in page and b"download-csv" not in page
        assert get(running.url, f"/release/{release.release_id}.csv")[0] == 404


def test_tls_with_the_brokers_material_or_a_self_signed_certificate(
    region: Region, tmp_path: Path
) -> None:
    make_release(region, "2026-10", TABLES)
    with cli_dashboard(region.home, "--tls") as running:
        assert running.url.startswith("https://127.0.0.1:")
        cert = region.home / "tls" / "server.crt"
        assert f"TLS certificate {cert}" in running.lines[0]
        status, headers, page = get(running.url, "/", tls=cert)
        assert status == 200 and b"Unmet needs, north, 2026-10" in page
        assert headers["Content-Security-Policy"]
    coordinator = tmp_path / "north-stats"
    added = tessera(
        region.home, "broker", "coordinator", "add", "north-stats", "--out-home", str(coordinator)
    )
    assert added.returncode == 0, added.stderr
    with cli_dashboard(coordinator, "--tls") as running:
        assert "(made now)" in running.lines[0]
        made = coordinator / "dashboard-tls" / "server.crt"
        assert get(running.url, "/", tls=made)[0] == 200
        with pytest.raises(ssl.SSLCertVerificationError):
            get(running.url, "/", tls=region.home / "tls" / "server.crt")


def test_no_release_yet_and_a_broker_gone_are_pages_saying_so(tmp_path: Path) -> None:
    running = BackgroundBroker(make_broker(tmp_path / "broker"))
    stopped = False
    try:
        with cli_dashboard(running.settings.home) as dashboard:
            status, _headers, page = get(dashboard.url, "/")
            assert status == 200 and b"No release yet" in page
            running.stop()
            stopped = True
            status, headers, page = get(dashboard.url, "/")
            assert status == 503 and headers["Cache-Control"] == "no-store"
            assert b"cannot reach the server" in page and b"What to do" in page
            assert b"Traceback" not in page
    finally:
        if not stopped:
            running.stop()
