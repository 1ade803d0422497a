"""The dashboard in a real browser: Debian's chromium, headless, driven by Playwright.

A real broker makes real releases from three enrolled agencies' masked shares (no noise, so the
numbers are known); one release is then altered in the broker's database. The real
``tessera stats dashboard`` command serves them on a loopback port it picks. The browser reads
the numbers drawn (the SVG bars' labelled attributes) and the tables behind them and checks
them against ``tessera stats show --format json``; it downloads the CSV and JSON and compares
their bytes with ``stats show``'s; the altered release is shown as refused, with no bar.

chromium is Debian's package (``.ci/run`` installs it); Playwright never downloads a browser
here. In CI a missing browser fails the tests (tests/conftest.py turns skips into failures).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli.main import app
from cli.stats_render import clamp_at_zero, number
from tessera.errors import BadSignature
from tests.dashboard_support import (
    CHROMIUM,
    Region,
    cli_dashboard,
    enrol_all,
    make_release,
    tamper_release,
)
from tests.support import BackgroundBroker, make_broker

TABLES = [[1, 2, 3, 4], [2, 0, 5, 1], [0, 1, 2, 3]]  # totals 3, 3, 10, 8
NEGATIVE = [[0, 0, -4, 0], [0, 0, -3, 0], [0, 0, 0, 0]]  # medical unmet -7
PHONE = {"width": 390, "height": 844}
LAPTOP = {"width": 1366, "height": 900}
_INTERVAL = re.compile(r"^\[(-?[0-9.]+), (-?[0-9.]+)\]")


@dataclass
class Served:
    region: Region
    url: str
    released: dict[str, Any]  # period -> release


@pytest.fixture(name="served", scope="module")
def served_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp_path = tmp_path_factory.mktemp("dashboard")
    running = BackgroundBroker(make_broker(tmp_path / "broker"))
    try:
        region = enrol_all(running, tmp_path)
        released = {
            "2026-08": make_release(region, "2026-08", NEGATIVE),
            "2026-09": make_release(region, "2026-09", TABLES),
            "2026-10": make_release(region, "2026-10", TABLES),
        }
        tamper_release(region, released["2026-09"].release_id)
        with cli_dashboard(region.home) as dashboard:
            yield Served(region, dashboard.url, released)
    finally:
        running.stop()


@pytest.fixture(name="browser", scope="module")
def browser_fixture() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no {CHROMIUM}: apt-get install chromium (.ci/run does)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: pip install -e '.[dev]'")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(name="page")
def page_fixture(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport=LAPTOP, accept_downloads=True)
    page = context.new_page()
    messages: list[str] = []
    page.on("console", lambda message: messages.append(message.text))
    try:
        yield page
    finally:
        context.close()
    # No Content-Security-Policy violation: no inline style or script anywhere.
    assert not [m for m in messages if "Content Security Policy" in m], messages


def show(served: Served, period: str, fmt: str) -> bytes:
    result = CliRunner().invoke(
        app, ["--home", str(served.region.home), "stats", "show", "--period", period, "-f", fmt]
    )
    assert result.exit_code == 0, result.output
    return result.stdout_bytes


def interval(text: str) -> tuple[float, float]:
    match = _INTERVAL.match(text.strip())
    assert match, text
    return float(match.group(1)), float(match.group(2))


def unmet_cells(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in document["cells"] if c["coordinates"]["need_status"] == "unmet"]


def drawn_bars(page: Any, chart: str, key: str) -> dict[str, tuple[float, float, float, bool]]:
    """Each SVG bar's drawn numbers, read from its labelled attributes."""
    return {
        rect.get_attribute(key): (
            float(rect.get_attribute("data-value")),
            float(rect.get_attribute("data-lower")),
            float(rect.get_attribute("data-upper")),
            rect.get_attribute("data-clamped") == "true",
        )
        for rect in page.locator(f"#{chart} rect.value").all()
    }


def test_the_page_draws_the_signed_release_as_stats_show_prints_it(
    served: Served, page: Any, tmp_path: Path
) -> None:
    shown = json.loads(show(served, "2026-10", "json"))
    page.goto(served.url)  # the newest period
    assert page.locator("h1").inner_text() == "Unmet needs, north, 2026-10"
    assert page.locator("#release-id").inner_text() == shown["release_id"]
    assert page.locator("#release-epsilon").inner_text() == number(shown["epsilon"])
    assert page.locator("#release-participants").inner_text() == str(shown["participants"])
    note = page.locator("#interval-note").inner_text()
    assert "95% interval" in note and "raised to 0" in note and "as released" in note

    # The table behind the chart: the numbers as released.
    rows = page.locator("#unmet-table tbody tr").all()
    expected = unmet_cells(shown)
    assert [r.get_attribute("data-category") for r in rows] == [
        c["coordinates"]["need_category"] for c in expected
    ]
    for row, cell in zip(rows, expected, strict=True):
        assert float(row.locator("td.value").inner_text()) == cell["value"]
        assert interval(row.locator("td.interval").inner_text()) == (cell["lower"], cell["upper"])
    # The bars: the same numbers through the clamping rule, and lengths in proportion.
    bars = drawn_bars(page, "unmet-chart", "data-category")
    for cell in expected:
        want = clamp_at_zero("", cell["value"], cell["lower"], cell["upper"])
        assert bars[cell["coordinates"]["need_category"]] == (
            want.value,
            want.lower,
            want.upper,
            want.clamped,
        )
    widths = {
        r.get_attribute("data-category"): float(r.get_attribute("width"))
        for r in page.locator("#unmet-chart rect.value").all()
    }
    assert widths["medical"] == pytest.approx(widths["safe_housing"] * 10 / 3, rel=0.01)
    # The heat map: every cell, category by status.
    for cell in shown["cells"]:
        coordinates = cell["coordinates"]
        td = page.locator(
            f'#heat-table tr[data-category="{coordinates["need_category"]}"]'
            f' td[data-status="{coordinates["need_status"]}"]'
        )
        assert float(td.locator(".value").inner_text()) == cell["value"]

    # Downloads: the bytes `stats show` prints.
    for fmt in ("csv", "json"):
        with page.expect_download() as caught:
            page.locator(f"#download-{fmt}").click()
        download = caught.value
        saved = tmp_path / download.suggested_filename
        download.save_as(saved)
        assert saved.read_bytes() == show(served, "2026-10", fmt), fmt
    page.screenshot(path=str(tmp_path / "laptop.png"), full_page=True)
    assert (tmp_path / "laptop.png").read_bytes().startswith(b"\x89PNG")


def test_negative_counts_are_drawn_at_zero_and_kept_in_the_table(served: Served, page: Any) -> None:
    shown = json.loads(show(served, "2026-08", "json"))
    page.goto(f"{served.url}period/2026-08")
    medical = next(c for c in unmet_cells(shown) if c["coordinates"]["need_category"] == "medical")
    assert medical["value"] == -7 and medical["upper"] < 0
    row = page.locator('#unmet-table tr[data-category="medical"]')
    assert row.locator("td.value").inner_text() == "-7"
    assert interval(row.locator("td.interval").inner_text()) == (medical["lower"], medical["upper"])
    assert row.locator("td.drawn").inner_text() == "0 [0, 0] *"
    assert drawn_bars(page, "unmet-chart", "data-category")["medical"] == (0, 0, 0, True)
    svg_text = page.locator("#unmet-chart").inner_html()
    assert "-7" not in svg_text and "[-" not in svg_text  # nothing negative is drawn


def test_a_tampered_release_is_refused_and_never_drawn(served: Served, page: Any) -> None:
    # The CLI refuses it too: its signature no longer verifies.
    result = CliRunner().invoke(
        app, ["--home", str(served.region.home), "stats", "show", "--period", "2026-09"]
    )
    assert isinstance(result.exception, BadSignature)

    page.goto(f"{served.url}period/2026-09")
    refused = page.locator("#refused")
    assert refused.is_visible() and refused.get_attribute("role") == "alert"
    assert "Refused: signature does not verify" in refused.inner_text()
    assert served.released["2026-09"].release_id in refused.inner_text()  # claimed, unverified
    assert page.locator("rect.value").count() == 0  # no bar, no chart at all
    assert page.locator("#unmet-table, #heat-table, #download-csv, #download-json").count() == 0
    assert page.locator("main svg, main table, main .value").count() == 0  # no number at all
    nav = page.locator('nav.periods li:has(a[href="/period/2026-09"])').inner_text()
    assert "refused" in nav
    # Its release id cannot be downloaded either.
    answer = page.request.get(f"{served.url}release/{served.released['2026-09'].release_id}.csv")
    assert answer.status == 404


def test_the_trend_by_keyboard_at_phone_width(served: Served, browser: Any, tmp_path: Path) -> None:
    context = browser.new_context(viewport=PHONE, accept_downloads=True)
    try:
        page = context.new_page()
        page.goto(served.url)
        # Nothing wider than a phone: charts and tables scroll inside their own boxes.
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"], width
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.className") == "skip"
        for _ in range(60):  # Tab along to the trend's need selector
            page.keyboard.press("Tab")
            if page.evaluate("document.activeElement.id") == "trend-category":
                break
        assert page.evaluate("document.activeElement.id") == "trend-category"
        assert page.locator("#trend-category").input_value() == "safe_housing"
        page.keyboard.press("ArrowDown")  # to medical
        assert page.locator("#trend-category").input_value() == "medical"
        page.keyboard.press("Tab")  # the status selector
        page.keyboard.press("Tab")  # the button
        with page.expect_navigation():
            page.keyboard.press("Enter")
        assert "category=medical" in page.url and "status=unmet" in page.url
        assert page.locator("#trend-title").inner_text().startswith("Trend: unmet medical")

        rows = {
            r.get_attribute("data-period"): r for r in page.locator("#trend-table tbody tr").all()
        }
        assert list(rows) == ["2026-08", "2026-09", "2026-10"]
        assert rows["2026-09"].get_attribute("data-state") == "refused"
        assert "signature does not verify" in rows["2026-09"].inner_text()
        drawn = drawn_bars(page, "trend-chart", "data-period")
        assert set(drawn) == {"2026-08", "2026-10"}  # the refused month has no bar
        for period in ("2026-08", "2026-10"):
            cell = next(
                c
                for c in unmet_cells(json.loads(show(served, period, "json")))
                if c["coordinates"]["need_category"] == "medical"
            )
            assert float(rows[period].locator("td.value").inner_text()) == cell["value"]
            assert interval(rows[period].locator("td.interval").inner_text()) == (
                cell["lower"],
                cell["upper"],
            )
            want = clamp_at_zero("", cell["value"], cell["lower"], cell["upper"])
            assert drawn[period] == (want.value, want.lower, want.upper, want.clamped)
        page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
    finally:
        context.close()
