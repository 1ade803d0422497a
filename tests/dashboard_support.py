"""Helpers for the dashboard's tests and its screenshot: a real region with real releases, a
release altered in the broker's database, and the real ``tessera stats dashboard`` command
running in a subprocess on a loopback port chosen at start."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tessera import crypto, dp, labels
from tessera.v1 import stats_pb2 as stats_pb
from tests.support import Agency, BackgroundBroker, enrol
from tests.test_broker_stats import SMALL, build_share, coordinator, submit

AGENCIES = ("alder-house", "birch-clinic", "cedar-aid")
CHROMIUM = "/usr/bin/chromium"


@dataclass
class Region:
    """A running broker and three agencies enrolled with it."""

    broker: BackgroundBroker
    agencies: list[Agency]

    @property
    def home(self) -> Path:
        return self.broker.settings.home


def enrol_all(broker: BackgroundBroker, tmp_path: Path) -> Region:
    return Region(broker, [enrol(broker, tmp_path, name) for name in AGENCIES])


def make_release(
    region: Region,
    period: str,
    tables: Sequence[Sequence[int]],
    *,
    table: dp.TableSpec | None = SMALL,
    noise: bool = False,
) -> stats_pb.Release:
    """Run one round to its release (each agency submits its table) and return the release as
    the broker signed it, its signature checked here against the broker's key."""
    with coordinator(region.broker) as client:
        blob = client.open_round("north", period, threshold=2, epsilon=1.0, table=table)
    release_id = ""
    for agency, counts in zip(region.agencies, tables, strict=True):
        share = build_share(agency, blob, list(counts), noise=noise)
        release_id = submit(agency, share).release_id
    assert release_id
    with coordinator(region.broker) as client:
        signed = client.release(release_id=release_id)
    key = region.agencies[0].link.broker_key
    crypto.verify(key, labels.LABEL_RELEASE, signed.body, signed.signature)
    return stats_pb.Release.FromString(signed.body)


def tamper_release(region: Region, release_id: str, add: int = 5) -> None:
    """Alter a stored release's body in the broker's SQLite database (its signature is left as
    it was): every cell's value gains ``add``, as someone with the database's file could do."""
    database = region.home / "tessera.db"
    with sqlite3.connect(database) as connection:
        (body,) = connection.execute(
            "SELECT body FROM broker_stats_release WHERE release_id = ?", (release_id,)
        ).fetchone()
        release = stats_pb.Release.FromString(body)
        for cell in release.cells:
            cell.value += add
        connection.execute(
            "UPDATE broker_stats_release SET body = ? WHERE release_id = ?",
            (release.SerializeToString(), release_id),
        )
    connection.close()


def tessera_exe() -> str:
    exe = shutil.which("tessera", path=os.path.dirname(sys.executable))
    assert exe, "the tessera console script is not installed next to this Python"
    return exe


@dataclass
class CliDashboard:
    process: subprocess.Popen[str]
    url: str
    lines: list[str]  # standard output up to the URL's line


@contextmanager
def cli_dashboard(home: Path, *args: str, timeout: float = 30.0) -> Iterator[CliDashboard]:
    """``tessera --home HOME stats dashboard ARGS`` in a subprocess: yields once it prints the
    URL it serves; stopped afterwards with SIGTERM to its own pid, as Ctrl-C would."""
    with tempfile.TemporaryFile(mode="w+") as stderr:
        process = subprocess.Popen(
            [tessera_exe(), "--home", str(home), "stats", "dashboard", *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        assert process.stdout is not None
        found: queue.Queue[str | None] = queue.Queue()
        pump = threading.Thread(target=_pump, args=(process.stdout, found), daemon=True)
        pump.start()
        try:
            lines = _until_url(found, timeout)
            if not lines[-1:] or " serving on " not in lines[-1]:
                process.kill()
                process.wait()
                stderr.seek(0)
                raise AssertionError(f"the dashboard printed no URL: {lines!r} {stderr.read()}")
            yield CliDashboard(process, lines[-1].split()[-1], lines)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            pump.join(timeout=5)
            process.stdout.close()


def _pump(stream: IO[str], found: queue.Queue[str | None]) -> None:
    for line in stream:
        found.put(line.rstrip("\n"))
    found.put(None)


def _until_url(found: queue.Queue[str | None], timeout: float) -> list[str]:
    """Lines up to the one naming the URL (or all there were, if none did in time)."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = found.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
        lines.append(line)
        if " serving on " in line:
            break
    return lines
