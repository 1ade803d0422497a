"""Shared fixtures: real temporary directories, real SQLite files, a real PostgreSQL database.

PostgreSQL tests read the server's URL from ``TESSERA_TEST_POSTGRES_URL`` (``.ci/run`` sets it, so
in CI they always run). Each test gets a database of its own, dropped afterwards.

In CI (``CI`` set, as ``.ci/run`` does) no test may skip: a skip there is reported as a failure,
so a missing service or tool can never pass for a green run.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

IN_CI = bool(os.environ.get("CI"))

POSTGRES_ENV = "TESSERA_TEST_POSTGRES_URL"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test; dropped when the test ends."""
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        if IN_CI:
            pytest.fail(f"{POSTGRES_ENV} must be set in CI")
        pytest.skip(f"set {POSTGRES_ENV} to run PostgreSQL tests")
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"tessera_test_{secrets.token_hex(6)}"
    admin = make_url(base).set(drivername="postgresql")
    admin_dsn = admin.render_as_string(hide_password=False)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """In CI, a skipped test fails: what a skip would hide is exactly what CI must run."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every test must run: {report.longrepr}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """After a run that fuzzed (tests/fuzzkit.py), one line: requests, INTERNAL replies,
    crashes (``make adversarial`` shows it)."""
    import sys

    fuzzkit = sys.modules.get("tests.fuzzkit")
    tally = getattr(fuzzkit, "TALLY", None)
    if tally is not None and (tally.requests or tally.files):
        terminalreporter.write_line(tally.summary())
        report = os.environ.get("TESSERA_FUZZ_REPORT")
        if report:
            fields = ("requests", "internal", "crashes", "files")
            Path(report).write_text(json.dumps({f: getattr(tally, f) for f in fields}))
