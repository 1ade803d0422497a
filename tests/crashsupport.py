"""Real ``tessera node serve`` / ``tessera broker serve`` processes, SIGKILLed at seeded moments.

The crash suite (tests/test_crash_suite.py) runs every server as a child process of its own, drives
it through the ``tessera`` command line and the public clients (node.client.NodeClient,
broker.stats.StatsClient), and kills it with SIGKILL: no shutdown code runs, the run file stays
behind, transactions in flight die with the process.

Sizes: ``TESSERA_CRASH=full`` (``make adversarial``) kills many times per scenario; otherwise a
handful, so that the whole suite fits CI. Seeds: ``TESSERA_CRASH_SEED`` (default fixed); every
failure names the seed and the kill (scenario, victim, moment) so that it replays.
``TESSERA_CRASH_REPORT``, when set, names a file each scenario appends one JSON line of what it
saw to (``make adversarial`` sums them into its summary line).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from tessera import config
from tessera.credential import RUN_FILE
from tests.support import PASSPHRASE

T = TypeVar("T")

DEFAULT_SEED = 16_004
START_TIMEOUT = 90.0  # two busy cores, other suites running: starting can be slow
CLI_TIMEOUT = 180.0
SETTLE_TIMEOUT = 120.0


def full_size() -> bool:
    return os.environ.get("TESSERA_CRASH", "").strip().lower() == "full"


def kills(ci: int, full: int) -> int:
    """How many kills a scenario makes: ``ci`` in CI, ``full`` under TESSERA_CRASH=full."""
    return full if full_size() else ci


def seed() -> int:
    raw = os.environ.get("TESSERA_CRASH_SEED", "").strip()
    return int(raw) if raw else DEFAULT_SEED


def scenario_rng(scenario: str) -> random.Random:
    """The scenario's own generator: the suite seed and the scenario name, so scenarios do not
    shift one another's kill moments when one is added or run alone."""
    return random.Random(f"{seed()}/{scenario}")


def tessera_command() -> str:
    beside = Path(sys.executable).with_name("tessera")
    found = str(beside) if beside.exists() else shutil.which("tessera")
    assert found, "the `tessera` console script is not installed"
    return found


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any TESSERA_ setting, plus the node passphrase."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
    env.update(TESSERA_PASSPHRASE=PASSPHRASE, TESSERA_LOG_FORMAT="json", COLUMNS="200")
    env.update(extra)
    return env


def free_address() -> str:
    """A loopback address no one listens on now (a server keeps it across its restarts)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def pin_address(home: Path) -> str:
    """Make the server of ``home`` listen on a fixed loopback port (its clients keep it)."""
    settings = config.load(home, {})
    address = free_address()
    config.write(dataclasses.replace(settings, listen=address))
    return address


@dataclasses.dataclass
class Kill:
    """One kill, as a failure message names it."""

    scenario: str
    number: int
    victim: str
    moment: str

    def __str__(self) -> str:
        return (
            f"TESSERA_CRASH_SEED={seed()} scenario {self.scenario} kill #{self.number}: "
            f"SIGKILL {self.victim} {self.moment}"
        )


class Server:
    """A real ``tessera --home HOME node|broker serve`` process, restartable after SIGKILL."""

    def __init__(self, name: str, home: Path, role: str, logs: Path) -> None:
        self.name, self.home, self.role = name, home, role
        self.log_path = logs / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        """Start and wait until this start's run file names it (a killed process leaves its
        own behind: the new process must recognise it as stale)."""
        assert not self.alive
        self.starts += 1
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [tessera_command(), "--home", str(self.home), self.role, "serve"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=clean_env(),
            )
        run_file = self.home / RUN_FILE
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.proc.returncode} while starting "
                    f"(start {self.starts}, after {self.kills} kills):\n{self.log_tail()}"
                )
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                if json.loads(run_file.read_text())["pid"] == self.proc.pid:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not start in time:\n{self.log_tail()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the process (it must be running) and reap it."""
        assert self.proc is not None and self.alive, f"{self.name} is not running"
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.kills += 1

    def restart(self) -> None:
        if self.alive:
            self.kill()
        self.start()

    def stop(self) -> None:
        """SIGTERM (graceful), SIGKILL if it hangs; only this process."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


class Servers:
    """The servers of one test; every one still running is stopped at the end."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.all: list[Server] = []

    def add(self, name: str, home: Path, role: str) -> Server:
        server = Server(name, home, role, self.logs)
        self.all.append(server)
        return server

    def close(self) -> None:
        for server in self.all:
            with contextlib.suppress(Exception):
                server.stop()

    def logs_text(self) -> str:
        return "\n".join(f"== {s.name}:\n{s.log_tail()}" for s in self.all)


def cli(
    home: Path, *args: str, stdin: str | None = None, timeout: float = CLI_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """``tessera --home HOME ARGS`` to completion (an administrator at the terminal)."""
    result = subprocess.run(
        [tessera_command(), "--home", str(home), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=timeout,
        check=False,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def cli_json(home: Path, *args: str) -> Any:
    result = cli(home, *args, "--format", "json")
    assert result.returncode == 0, f"tessera {' '.join(args)}: {result.stdout}{result.stderr}"
    return json.loads(result.stdout)


def start_cli(home: Path, *args: str, out: Path) -> subprocess.Popen[bytes]:
    """``tessera --home HOME ARGS`` in the background, its output to ``out``."""
    with out.open("wb") as handle:
        return subprocess.Popen(
            [tessera_command(), "--home", str(home), *args],
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=clean_env(),
        )


def until(probe: Callable[[], T | None], what: str, timeout: float = SETTLE_TIMEOUT) -> T:
    """``probe()`` once it returns something truthy, retrying while it raises or returns a
    falsy value (servers come back and catch up in the background)."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = probe()
            if value:
                return value
        except Exception as exc:  # a server still coming back: any error, retried
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last error: {last!r})")
        time.sleep(0.2)


def audit_intact(home: Path) -> tuple[bool, str]:
    """``tessera node audit verify`` of a running node: (exit 0, its output)."""
    result = cli(home, "node", "audit", "verify", "--format", "json")
    return result.returncode == 0, result.stdout + result.stderr


@dataclasses.dataclass
class Tally:
    """What one scenario saw, reported to ``TESSERA_CRASH_REPORT`` for the summary."""

    scenario: str
    kills: int = 0
    lost: int = 0
    duplicated: int = 0
    half_written: int = 0
    audit_breaks: int = 0
    budget_errors: int = 0
    erasure_errors: int = 0
    seconds: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)

    def write(self) -> None:
        target = os.environ.get("TESSERA_CRASH_REPORT")
        if not target:
            return
        line = json.dumps({**dataclasses.asdict(self), "seed": seed(), "full": full_size()})
        with open(target, "a", encoding="utf-8") as out:
            out.write(line + "\n")


@contextlib.contextmanager
def tallied(scenario: str) -> Iterator[Tally]:
    """A tally written to the report however the scenario ends (a failure too)."""
    began = time.monotonic()
    tally = Tally(scenario)
    try:
        yield tally
    except AssertionError as exc:
        text = str(exc)
        if f"TESSERA_CRASH_SEED={seed()}" not in text:
            text = f"TESSERA_CRASH_SEED={seed()} scenario {scenario}: {text}"
        raise AssertionError(text) from None
    finally:
        tally.seconds = round(time.monotonic() - began, 1)
        print(f"crash {scenario}: {tally}")
        tally.write()


def summary(report: Path) -> str:
    """One line over every scenario of a report file (``make adversarial`` prints it)."""
    tallies = []
    if report.exists():
        tallies = [json.loads(line) for line in report.read_text().splitlines() if line.strip()]

    def total(key: str) -> int:
        return sum(int(t.get(key, 0)) for t in tallies)

    seeds = sorted({t["seed"] for t in tallies})
    return (
        f"crash suite: {len(tallies)} scenario runs, {total('kills')} kills survived, "
        f"referrals lost {total('lost')}, duplicated {total('duplicated')}, "
        f"half-written cases {total('half_written')}, audit breaks {total('audit_breaks')} "
        f"(budget errors {total('budget_errors')}, erasure errors {total('erasure_errors')}; "
        f"seed {','.join(map(str, seeds)) or '-'})"
    )


if __name__ == "__main__":
    print(summary(Path(sys.argv[1])))
