"""Take the dashboard's screenshot for the docs from a real region.

A broker and three enrolled agencies on loopback run six monthly private rounds over the full
needs table, each agency adding its real noise share and pairwise masks; the real
``tessera stats dashboard`` serves the releases and headless chromium takes the picture.

    .venv/bin/python -m tests.screenshot_dashboard docs/dashboard.png
"""

from __future__ import annotations

import random
import sys
import tempfile
from pathlib import Path

from tessera import dp
from tests.dashboard_support import CHROMIUM, cli_dashboard, enrol_all, make_release
from tests.support import BackgroundBroker, make_broker

MONTHS = ("2026-05", "2026-06", "2026-07", "2026-08", "2026-09", "2026-10")
# How many survivors an agency has, per status, before a per-category weight.
STATUS_SCALE = {
    "identified": 24,
    "referred": 20,
    "in_progress": 32,
    "met": 40,
    "unmet": 28,
    "declined": 4,
}


def synthetic_counts(
    spec: dp.TableSpec, weights: dict[str, float], rng: random.Random, month: int
) -> list[int]:
    """One agency's table: made-up counts from its per-category weights, unmet needs growing."""
    counts = []
    for category, status in spec.cells:
        trend = 1 + 0.08 * month if status == "unmet" else 1.0
        mean = STATUS_SCALE.get(status, 3) * weights[category] * trend
        counts.append(max(0, round(rng.gauss(mean, mean / 4))))
    return counts


def main(out: Path) -> None:
    spec = dp.default_needs_table()
    rng = random.Random(18)  # the made-up truth is repeatable; the noise is not
    with tempfile.TemporaryDirectory() as scratch:
        running = BackgroundBroker(make_broker(Path(scratch) / "broker"))
        try:
            region = enrol_all(running, Path(scratch))
            categories = dict(spec.dimensions)["need_category"]
            weights = [{c: rng.uniform(0.1, 1.6) for c in categories} for _a in region.agencies]
            for i, month in enumerate(MONTHS):
                tables = [synthetic_counts(spec, w, rng, i) for w in weights]
                make_release(region, month, tables, table=None, noise=True)
            with cli_dashboard(region.home) as dashboard:
                shoot(f"{dashboard.url}period/{MONTHS[-1]}?category=mental_health", out)
        finally:
            running.stop()
    sys.stdout.write(f"screenshot written to {out}\n")


def shoot(url: str, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/dashboard.png"))
