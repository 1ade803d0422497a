"""The crash suite (issue 16 item 4): real node and broker processes SIGKILLed at seeded moments.

Every server is a ``tessera node serve`` / ``tessera broker serve`` child process (TLS gRPC, SQLite
in its home or a fresh PostgreSQL database), driven through the ``tessera`` command line and the
public clients, killed with SIGKILL in the middle of the work, started again, and asked for the
truth:

- case imports (``tessera case import`` of a few thousand HTCDS rows): all or nothing, the count
  of cases is the count before or before plus every row, an acknowledged import is all there,
  every case decrypts (``tessera case export``);
- erasures (``tessera case erase``): a case is either wholly erased (not shown, not found by its
  identifiers) or wholly there; an acknowledged erase is never undone, whichever of node and
  broker died;
- backups (``tessera node backup``): every ``.tbk`` left opens and holds every case; an
  acknowledged backup exists;
- referral sends, deliveries and answers between two nodes through the broker: the sender's
  outgoing list and the receiver's inbox hold the same referral ids, each once, in the state the
  receiver answered;
- statistics rounds: each node charges a (round, attempt) at most once, and only and every round
  the broker has its share of;
- through all of it the audit chain of every node verifies (``tessera node audit verify``).

Kill moments come from ``random.Random`` seeded by TESSERA_CRASH_SEED (default fixed); a failure
names the seed and the kill. ``TESSERA_CRASH=full`` (``make adversarial``) kills many more times.
tests/crashsupport.py has the process handling.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text

from broker.operator_client import OperatorClient
from node import directory_sync, htcds
from node.backup import read_backup
from node.client import NodeClient
from node.keyring import open_keyring
from tessera import config
from tessera.config import StatsPolicy
from tessera.errors import Conflict, TesseraError, Unavailable
from tessera.needs import NeedCategory, NeedStatus
from tests import crashsupport as cs
from tests.crashsupport import Kill, Server, Servers, Tally
from tests.nodefixtures import db_url_fixture, extra_postgres_database  # noqa: F401 - fixture
from tests.support import PASSPHRASE, make_broker, make_node, unlock

pytestmark = pytest.mark.slow

REGION = "north"
SHELTER, CLINIC = "harbour-shelter", "lantern-clinic"
IMPORT_ROWS = 2000 if not cs.full_size() else 3000
NEXT_YEAR = dt.date.today() + dt.timedelta(days=365)


# --- the homes -----------------------------------------------------------------------------------


def _engine(url: str) -> Engine:
    return create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))


def _count(engine: Engine, statement: str, **params: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(statement), params).scalar_one())


def _broker(root: Path, servers: Servers, database_url: str = "") -> Server:
    home = root / "broker"
    make_broker(home, database_url=database_url)
    cs.pin_address(home)
    broker = servers.add("broker", home, "broker")
    broker.start()
    return broker


def _node(
    root: Path, servers: Servers, agency_id: str, database_url: str, broker: Server | None
) -> Server:
    """A node home (cheap Argon2, pinned port), enrolled with ``broker`` if given; not started."""
    home = root / agency_id
    settings = make_node(home, name=agency_id.replace("-", " ").title(), database_url=database_url)
    # Many rounds in one month: the cap must not be what stops a node taking part.
    config.write(dataclasses.replace(settings, stats=StatsPolicy(budget_cap=1000.0)))
    cs.pin_address(home)
    if broker is not None:
        identity = open_keyring(home, PASSPHRASE).identity
        with OperatorClient(broker.home) as operator:
            code = operator.enrolment_code(agency_id, 1)
        directory_sync.enrol(home, identity, code, settings.name, ["safe_housing", "medical"])
    return servers.add(agency_id, home, "node")


def _revive(*servers: Server) -> None:
    """Start again each server that was killed."""
    for server in servers:
        if not server.alive:
            server.start()


def _database_url(home: Path) -> str:
    return config.load(home, {}).effective_database_url


@contextlib.contextmanager
def _client(home: Path) -> Iterator[NodeClient]:
    with NodeClient(home, unlock=unlock) as client:
        yield client


def _ready(node: Server) -> dict[str, Any]:
    """The node's status once it answers and its escrow is confirmed (an enrolled node opens no
    case before)."""

    def confirmed() -> dict[str, Any] | None:
        with _client(node.home) as client:
            status = client.status()
        return status if status["escrow"] in {"confirmed", "not_enrolled", "unspecified"} else None

    return cs.until(confirmed, f"{node.name} to answer with its escrow confirmed")


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    started = Servers(tmp_path / "logs")
    try:
        yield started
    finally:
        started.close()


def _check(condition: bool, kill: Kill | str, message: str, servers: Servers) -> None:
    if not condition:
        raise AssertionError(f"{kill}: {message}\n{servers.logs_text()}")


def _audit(node: Server, kill: Kill | str, tally: Tally, servers: Servers) -> None:
    ok, output = cs.audit_intact(node.home)
    if not ok:
        tally.audit_breaks += 1
    _check(ok, kill, f"the audit log of {node.name} does not verify:\n{output}", servers)


# --- one node: imports, erasures, backups ----------------------------------------------------------


@dataclass
class Killed:
    """A background command and the kill that hit it (or not)."""

    returncode: int
    output: str
    victim_killed: bool


def _kill_during(
    command: list[str],
    home: Path,
    out: Path,
    delay: float,
    victims: list[Server],
) -> Killed:
    """Run ``tessera --home HOME COMMAND`` in the background; ``delay`` seconds later SIGKILL the
    victims still running (unless the command already finished); then wait for the command."""
    proc = cs.start_cli(home, *command, out=out)
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    killed = False
    if proc.poll() is None:
        for victim in victims:
            victim.kill()
        killed = True
    try:
        proc.wait(timeout=cs.CLI_TIMEOUT)
    except Exception:
        proc.kill()
        proc.wait(timeout=30)
    return Killed(proc.returncode, out.read_text(errors="replace"), killed)


def _estimate(timings: list[float], fallback: float) -> float:
    return max(timings) if timings else fallback


def test_a_node_killed_during_imports_erasures_and_backups(
    tmp_path: Path, db_url: str, servers: Servers
) -> None:
    backend = "postgresql" if db_url else "sqlite"
    rng = cs.scenario_rng(f"node-{backend}")
    with cs.tallied(f"node-{backend}") as tally:
        broker = _broker(tmp_path, servers)
        node = _node(tmp_path, servers, SHELTER, db_url, broker)
        node.start()
        _ready(node)
        engine = _engine(_database_url(node.home))
        try:
            records = _imports(tmp_path, node, engine, rng, tally, servers)
            _erasures(tmp_path, node, broker, engine, records, rng, tally, servers)
            _backups(tmp_path, node, engine, rng, tally, servers)
            # Every case left decrypts, and the audit chain verifies end to end.
            _ready(node)
            exported = tmp_path / "all.csv"
            done = cs.cli(node.home, "case", "export", str(exported))
            _check(done.returncode == 0, "end", f"export failed: {done.stderr}", servers)
            live = _count(engine, "SELECT count(*) FROM case_record")
            rows = sum(1 for _row in htcds.read_table(exported))
            _check(rows == live, "end", f"{rows} cases exported of {live}", servers)
            _audit(node, "end", tally, servers)
        finally:
            engine.dispose()


def _imports(
    tmp_path: Path, node: Server, engine: Engine, rng: random.Random, tally: Tally, servers: Servers
) -> dict[str, dict[str, str]]:
    """Imports of IMPORT_ROWS rows, the first whole (it sizes the kill window), then one per kill;
    returns the imported records by email."""
    records: dict[str, dict[str, str]] = {}
    timings: list[float] = []
    planned = cs.kills(2, 10)
    for number in range(planned + 1):
        batch = htcds.synthetic_records(IMPORT_ROWS, rng.randrange(1 << 30))
        source = tmp_path / f"import-{number}.csv"
        htcds.write_csv(source, batch)
        before = _count(engine, "SELECT count(*) FROM case_record")
        command = ["case", "import", str(source), "--on-duplicate", "new"]
        if number == 0:
            began = time.monotonic()
            done = cs.cli(node.home, *command)
            timings.append(time.monotonic() - began)
            _check(done.returncode == 0, "first import", done.stdout + done.stderr, servers)
            outcome = Killed(0, done.stdout, False)
            kill = Kill("import", 0, "nobody", "(the whole import, to size the window)")
        else:
            delay = rng.uniform(0.0, _estimate(timings, 5.0))
            kill = Kill("import", number, node.name, f"{delay:.3f} s into the import")
            began = time.monotonic()
            outcome = _kill_during(command, node.home, tmp_path / "out.txt", delay, [node])
            if not outcome.victim_killed:
                timings.append(time.monotonic() - began)
                kill.moment += " (it had finished)"
            tally.kills += outcome.victim_killed
            _revive(node)
        _ready(node)
        after = _count(engine, "SELECT count(*) FROM case_record")
        if after not in (before, before + IMPORT_ROWS):
            tally.half_written += 1
        _check(
            after in (before, before + IMPORT_ROWS),
            kill,
            f"half an import: {before} cases before, {after} after ({IMPORT_ROWS} rows)",
            servers,
        )
        if outcome.returncode == 0:
            _check(after == before + IMPORT_ROWS, kill, "an acknowledged import is gone", servers)
        if after > before:
            records.update({r["prs_Email"]: r for r in batch})
        if cs.full_size() or number == planned:
            _audit(node, kill, tally, servers)
    return records


def _case_state(node: Server, case_id: str, email: str) -> tuple[bool, bool]:
    """(shown, found): whether ``case show`` opens it, and ``case find --email`` lists it."""
    shown = cs.cli(node.home, "case", "show", case_id, "--format", "json")
    assert shown.returncode in (0, 6), shown.stdout + shown.stderr
    found = cs.cli(node.home, "case", "find", "--email", email, "--format", "json")
    assert found.returncode == 0, found.stdout + found.stderr
    return shown.returncode == 0, case_id in {c["case_id"] for c in json.loads(found.stdout)}


def _erasures(
    tmp_path: Path,
    node: Server,
    broker: Server,
    engine: Engine,
    records: dict[str, dict[str, str]],
    rng: random.Random,
    tally: Tally,
    servers: Servers,
) -> None:
    """Erase cases, killing the node (or the node and the broker) in the middle."""
    timings: list[float] = []
    planned = cs.kills(2, 10)
    emails = sorted(records)
    rng.shuffle(emails)
    acknowledged: list[tuple[str, str]] = []
    for number in range(planned + 1):
        email = emails[number]
        (found,) = cs.cli_json(node.home, "case", "find", "--email", email)
        case_id = found["case_id"]
        command = ["case", "erase", case_id, "--yes", "--reason", "crash suite"]
        if number == 0:
            began = time.monotonic()
            done = cs.cli(node.home, *command)
            timings.append(time.monotonic() - began)
            _check(done.returncode == 0, "first erase", done.stdout + done.stderr, servers)
            outcome = Killed(0, done.stdout, False)
            kill = Kill("erase", 0, "nobody", "(a whole erase, to size the window)")
        else:
            victims = [node] if rng.random() < 0.7 else [node, broker]
            delay = rng.uniform(0.0, _estimate(timings, 2.0))
            names = " and ".join(v.name for v in victims)
            kill = Kill("erase", number, names, f"{delay:.3f} s into `case erase {case_id}`")
            began = time.monotonic()
            outcome = _kill_during(command, node.home, tmp_path / "out.txt", delay, victims)
            if not outcome.victim_killed:
                timings.append(time.monotonic() - began)
                kill.moment += " (it had finished)"
            tally.kills += outcome.victim_killed * len(victims)
            _revive(*victims)
        _ready(node)
        shown, listed = _case_state(node, case_id, email)
        stored = _count(engine, "SELECT count(*) FROM case_record WHERE case_id = :c", c=case_id)
        erased = _count(engine, "SELECT count(*) FROM erasure WHERE case_id = :c", c=case_id)
        _check(
            (stored, erased) in {(1, 0), (0, 1)} and bool(stored) == shown,
            kill,
            f"half an erasure in the database: case rows {stored}, erasure rows {erased}, "
            f"shown {shown}",
            servers,
        )
        if shown != listed:
            tally.erasure_errors += 1
        _check(
            shown == listed,
            kill,
            f"half an erasure: case {case_id} shown {shown}, found by its email {listed}",
            servers,
        )
        if outcome.returncode == 0:
            acknowledged.append((case_id, email))
        # Every acknowledged erase, this one and all before, stays erased.
        for erased_id, erased_email in acknowledged:
            state = _case_state(node, erased_id, erased_email)
            if state != (False, False):
                tally.erasure_errors += 1
            _check(
                state == (False, False),
                kill,
                f"case {erased_id}, erased with an acknowledgement, came back: {state}",
                servers,
            )
        if cs.full_size() or number == planned:
            _audit(node, kill, tally, servers)


def _backups(
    tmp_path: Path, node: Server, engine: Engine, rng: random.Random, tally: Tally, servers: Servers
) -> None:
    """Back up, killing the node in the middle; every backup file left must open whole."""
    folder = node.home / "backups"
    timings: list[float] = []
    planned = cs.kills(2, 8)
    cases = _count(engine, "SELECT count(*) FROM case_record")
    for number in range(planned + 1):
        before = set(folder.glob("*.tbk")) if folder.exists() else set()
        command = ["node", "backup"]
        if number == 0:
            began = time.monotonic()
            done = cs.cli(node.home, *command)
            timings.append(time.monotonic() - began)
            _check(done.returncode == 0, "first backup", done.stdout + done.stderr, servers)
            outcome = Killed(0, done.stdout, False)
            kill = Kill("backup", 0, "nobody", "(a whole backup, to size the window)")
        else:
            delay = rng.uniform(0.0, _estimate(timings, 2.0))
            kill = Kill("backup", number, node.name, f"{delay:.3f} s into `node backup`")
            began = time.monotonic()
            outcome = _kill_during(command, node.home, tmp_path / "out.txt", delay, [node])
            if not outcome.victim_killed:
                timings.append(time.monotonic() - began)
                kill.moment += " (it had finished)"
            tally.kills += outcome.victim_killed
            _revive(node)
            _ready(node)
        made = set(folder.glob("*.tbk")) - before
        if outcome.returncode == 0:
            _check(len(made) == 1, kill, f"an acknowledged backup left {made}", servers)
        for path in made:
            try:
                _header, _keyring, snapshot = read_backup(path, PASSPHRASE)
            except TesseraError as exc:
                raise AssertionError(f"{kill}: the backup {path.name} does not open: {exc}") from None
            held = len(snapshot["case_record"])
            _check(held == cases, kill, f"{path.name} holds {held} of {cases} cases", servers)
        if cs.full_size() or number == planned:
            _audit(node, kill, tally, servers)
