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
from node.referrals.model import ReferralRecord
from tessera import config
from tessera.config import StatsPolicy
from tessera.errors import Conflict, NotFound, TesseraError, Unavailable
from tessera.needs import NeedCategory, NeedStatus
from tests import crashsupport as cs
from tests.crashsupport import Kill, Server, Servers, Tally
from tests.nodefixtures import db_url_fixture, extra_postgres_database  # noqa: F401 - fixture
from tests.support import PASSPHRASE, make_broker, make_node, unlock

pytestmark = pytest.mark.slow

REGION = "north"
SHELTER, CLINIC = "harbour-shelter", "lantern-clinic"
IMPORT_ROWS = 2000 if not cs.full_size() else 3000
LEASE_SECONDS = 4.0
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
    # Short leases, so that what a killed broker had leased out comes back soon.
    with (home / config.CONFIG_FILE).open("a", encoding="utf-8") as toml:
        toml.write(f"\n[limits]\ndelivery_lease_seconds = {LEASE_SECONDS}\n")
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
        return status if status.escrow in {"confirmed", "not_enrolled", "unspecified"} else None

    return cs.until(confirmed, f"{node.name} to answer with its escrow confirmed")


@contextlib.contextmanager
def _phase(tally: Tally, name: str) -> Iterator[None]:
    began, kills = time.monotonic(), tally.kills
    try:
        yield
    finally:
        tally.notes.append(f"{name}: {tally.kills - kills} kills, {time.monotonic() - began:.1f} s")


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


def _audit(
    node: Server, kill: Kill | str, tally: Tally, servers: Servers, command: bool = False
) -> None:
    """The node's audit chain verifies: with ``command``, as ``tessera node audit verify`` (exit
    0), else through the same call from this process (quicker)."""
    if command:
        ok, output = cs.audit_intact(node.home)
    else:
        with _client(node.home) as client:
            report = client.verify_audit()
        ok, output = report.intact, repr(report)
    if not ok:
        tally.audit_breaks += 1
    _check(ok, kill, f"the audit log of {node.name} does not verify:\n{output}", servers)


# --- one node: imports, erasures, backups ---------------------------------------------------


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
            with _phase(tally, "imports"):
                records = _imports(tmp_path, node, engine, rng, tally, servers)
            with _phase(tally, "erasures"):
                _erasures(tmp_path, node, broker, engine, records, rng, tally, servers)
            with _phase(tally, "backups"):
                _backups(tmp_path, node, engine, rng, tally, servers)
            # Every case left decrypts, and the audit chain verifies end to end.
            _ready(node)
            exported = tmp_path / "all.csv"
            done = cs.cli(node.home, "case", "export", str(exported))
            _check(done.returncode == 0, "end", f"export failed: {done.stderr}", servers)
            live = _count(engine, "SELECT count(*) FROM case_record")
            rows = sum(1 for _row in htcds.read_table(exported))
            _check(rows == live, "end", f"{rows} cases exported of {live}", servers)
            _audit(node, "end", tally, servers, command=True)
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
    """(shown, found): whether the node opens the case (as ``case show`` asks), and whether a
    search by its email (``case find --email``) lists it."""
    with _client(node.home) as client:
        try:
            client.get_case(case_id)
            shown = True
        except NotFound:
            shown = False
        found = {c.case_id for c in client.find_cases({"prs_Email": email})}
    return shown, case_id in found


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
                raise AssertionError(
                    f"{kill}: the backup {path.name} does not open: {exc}"
                ) from None
            held = len(snapshot["case_record"])
            _check(held == cases, kill, f"{path.name} holds {held} of {cases} cases", servers)
        if cs.full_size() or number == planned:
            _audit(node, kill, tally, servers)


# --- a region: referrals between two nodes, statistics rounds ----------------------------------


# When to kill: wait until this is true, then this many seconds more; kill these; described so.
Moment = tuple[Callable[[], bool], float, list[Server], str]


def _reached(done: Callable[[], int], after: int) -> Callable[[], bool]:
    return lambda: done() >= after


def _after_progress(
    rng: random.Random,
    count: int,
    total: int,
    done: Callable[[], int],
    victims: Callable[[], list[Server]],
    what: str,
) -> list[Moment]:
    """``count`` kills, each a little after ``done()`` reached a random point of ``total``."""
    plan: list[tuple[int, Moment]] = []
    for _ in range(count):
        after = rng.randrange(total)
        chosen = victims()
        delay = rng.uniform(0.0, 0.3)
        moment = f"{delay:.3f} s after {after} {what}"
        plan.append((after, (_reached(done, after), delay, chosen, moment)))
    return [m for _after, m in sorted(plan, key=lambda p: p[0])]


class Killer:
    """A thread that SIGKILLs servers at the moments planned for it, then starts them again;
    the work goes on in the test's own thread meanwhile (retrying what a dead server refused)."""

    def __init__(self, scenario: str, tally: Tally, servers: Servers) -> None:
        self.scenario, self.tally, self.servers = scenario, tally, servers
        self.kills: list[Kill] = []
        self.errors: list[str] = []
        self._thread: threading.Thread | None = None
        self.stop = threading.Event()

    def run(self, plan: list[Moment]) -> None:
        """For each (wait until this is true, then this many seconds more, kill these servers,
        described so), in order."""

        def body() -> None:
            try:
                for number, (ready, delay, victims, moment) in enumerate(plan, start=1):
                    deadline = time.monotonic() + cs.SETTLE_TIMEOUT
                    while not self.stop.is_set() and not ready():
                        if time.monotonic() > deadline:
                            raise AssertionError(f"the moment {moment!r} never came")
                        time.sleep(0.005)
                    if self.stop.is_set():
                        return
                    time.sleep(delay)
                    names = " and ".join(v.name for v in victims)
                    self.kills.append(Kill(self.scenario, number, names, moment))
                    for victim in victims:
                        victim.kill()
                        self.tally.kills += 1
                    _revive(*victims)
            except BaseException as exc:  # reported by join()
                self.errors.append(f"{exc!r}")

        self._thread = threading.Thread(target=body, name=f"killer-{self.scenario}", daemon=True)
        self._thread.start()

    def join(self) -> None:
        assert self._thread is not None
        self._thread.join(timeout=cs.SETTLE_TIMEOUT * 3)
        _check(not self.errors, self.last, f"the killer failed: {self.errors}", self.servers)

    @property
    def last(self) -> str:
        return "; ".join(str(k) for k in self.kills) or f"{self.scenario} (no kill yet)"


def _retrying(call: Callable[[], Any], what: str) -> Any:
    """``call()`` until a node or broker that is down or still starting answers it."""
    deadline = time.monotonic() + cs.SETTLE_TIMEOUT
    while True:
        try:
            return call()
        except Unavailable:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: no answer in {cs.SETTLE_TIMEOUT} s") from None
            time.sleep(0.1)


def _call(home: Path, method: str, *args: Any, **kwargs: Any) -> Any:
    """One NodeClient call on a fresh connection, retried while the node is down."""

    def once() -> Any:
        with _client(home) as client:
            return getattr(client, method)(*args, **kwargs)

    return _retrying(once, f"{home.name} {method}")


@dataclass
class Region:
    broker: Server
    shelter: Server
    clinic: Server
    tally: Tally
    servers: Servers
    rng: random.Random
    cases: list[str] = field(default_factory=list)
    consents: dict[str, str] = field(default_factory=dict)

    def outgoing(self) -> list[ReferralRecord]:
        rows: list[ReferralRecord] = _call(
            self.shelter.home, "referrals", "outgoing", limit=100_000
        )
        return rows

    def inbox(self) -> list[ReferralRecord]:
        rows: list[ReferralRecord] = _call(self.clinic.home, "inbox", True)
        return rows


def _region(root: Path, db_url: str, servers: Servers, tally: Tally, rng: random.Random) -> Region:
    with contextlib.ExitStack() as stack:
        urls = ["", "", ""]
        if db_url:
            urls = [db_url, *(stack.enter_context(extra_postgres_database(db_url)) for _ in "ab")]
        broker = _broker(root, servers, urls[1])
        shelter = _node(root, servers, SHELTER, urls[0], broker)
        clinic = _node(root, servers, CLINIC, urls[2], broker)
        for node in (shelter, clinic):
            identity = open_keyring(node.home, PASSPHRASE).identity
            directory_sync.sync(node.home, identity, directory_sync.load_link(node.home))
            for other in (SHELTER, CLINIC):
                if other != node.home.name:
                    directory_sync.mark_verified(node.home, other)
            node.start()
        region = Region(broker, shelter, clinic, tally, servers, rng)
        # The databases outlive this function: dropped when the test's stack closes.
        region_stack.append(stack.pop_all())
        return region


region_stack: list[contextlib.ExitStack] = []


@pytest.fixture
def databases() -> Iterator[None]:
    try:
        yield
    finally:
        while region_stack:
            region_stack.pop().close()


def test_a_region_killed_during_referrals_and_statistics_rounds(
    tmp_path: Path, db_url: str, servers: Servers, databases: None
) -> None:
    backend = "postgresql" if db_url else "sqlite"
    rng = cs.scenario_rng(f"region-{backend}")
    with cs.tallied(f"region-{backend}") as tally:
        region = _region(tmp_path, db_url, servers, tally, rng)
        referrals = cs.kills(8, 30)
        for _ in range(referrals):
            case = _call(
                region.shelter.home,
                "create_case",
                {"prs_FirstName": "Tamsir", "prs_SecondName": "Velko"},
                "",
                [(NeedCategory.MEDICAL, NeedStatus.IDENTIFIED)],
            )
            consent = _call(
                region.shelter.home,
                "grant_consent",
                case.case_id,
                CLINIC,
                NeedCategory.MEDICAL,
                ("identity",),
                NEXT_YEAR,
                "verbal",
            )
            region.cases.append(case.case_id)
            region.consents[case.case_id] = consent.consent_id
        with _phase(tally, "sends"):
            sent = _sends(region)
        with _phase(tally, "deliveries"):
            _deliveries(region, sent)
        with _phase(tally, "answers"):
            _answers(region, sent)
        with _phase(tally, "rounds"):
            _rounds(region)
        for node in (region.shelter, region.clinic):
            _audit(node, "end", tally, servers, command=True)


def _sends(region: Region) -> dict[str, str]:
    """Send one referral per case, killing the sender (and sometimes the broker) meanwhile; the
    clinic is down throughout, so envelopes wait at the broker. Case id -> referral id."""
    region.clinic.stop()
    sent: dict[str, str] = {}
    killer = Killer("send", region.tally, region.servers)
    total = len(region.cases)
    plan = _after_progress(
        region.rng,
        cs.kills(2, 8),
        total,
        lambda: len(sent),
        lambda: [region.shelter] if region.rng.random() < 0.6 else [region.broker],
        "referrals were accepted",
    )
    killer.run(plan)
    for case_id in region.cases:
        key = f"crash-{case_id}"

        def send(case_id: str = case_id, key: str = key) -> dict[str, Any]:
            referral: dict[str, Any] = _call(
                region.shelter.home,
                "send_referral",
                case_id,
                CLINIC,
                NeedCategory.MEDICAL,
                consent_id=region.consents[case_id],
                idempotency_key=key,
            )
            return referral

        sent[case_id] = send().referral_id
    killer.join()
    outgoing = region.outgoing()
    by_case = Counter(r.case_id for r in outgoing)
    duplicated = sum(n - 1 for n in by_case.values() if n > 1)
    lost = sorted(set(sent.values()) - {r.referral_id for r in outgoing})
    region.tally.duplicated += duplicated
    region.tally.lost += len(lost)
    _check(not duplicated, killer.last, f"referrals sent twice: {by_case}", region.servers)
    _check(not lost, killer.last, f"accepted referrals missing: {lost}", region.servers)
    _check(
        {r.referral_id for r in outgoing} == set(sent.values()),
        killer.last,
        f"outgoing {sorted(r.referral_id for r in outgoing)} != sent {sorted(sent.values())}",
        region.servers,
    )
    return sent


def _compare(region: Region, sent: dict[str, str], kill: str) -> list[dict[str, Any]]:
    """The clinic's inbox holds every referral the shelter sent, each once; returns it."""
    inbox = region.inbox()
    counts = Counter(r.referral_id for r in inbox)
    duplicated = sum(n - 1 for n in counts.values() if n > 1)
    lost = sorted(set(sent.values()) - set(counts))
    region.tally.duplicated += duplicated
    region.tally.lost += len(lost)
    _check(not duplicated, kill, f"delivered twice: {counts}", region.servers)
    _check(not lost, kill, f"never delivered: {lost}", region.servers)
    _check(set(counts) == set(sent.values()), kill, f"strangers: {counts}", region.servers)
    return inbox


def _deliveries(region: Region, sent: dict[str, str]) -> None:
    """Start the clinic; kill it (or the broker) while the waiting envelopes come in."""
    total = len(sent)
    killer = Killer("deliver", region.tally, region.servers)

    def received() -> int:
        try:
            engine = _engine(_database_url(region.clinic.home))
            try:
                return _count(engine, "SELECT count(*) FROM incoming_referral")
            finally:
                engine.dispose()
        except Exception:
            return 0

    plan: list[Moment] = []
    for number in range(cs.kills(2, 8)):
        victims = [region.clinic] if region.rng.random() < 0.7 else [region.broker]
        delay = region.rng.uniform(0.0, 1.5)
        plan.append(
            (
                (lambda: region.clinic.alive) if number else (lambda: True),
                delay,
                victims,
                f"{delay:.3f} s into a delivery run",
            )
        )
    region.clinic.start()
    killer.run(plan)
    killer.join()

    def all_delivered() -> bool:
        states = Counter(r.state for r in region.outgoing())
        return received() == total and states.get("delivered", 0) == total

    cs.until(all_delivered, f"{killer.last}: every referral delivered and confirmed")
    _compare(region, sent, killer.last)


def _answers(region: Region, sent: dict[str, str]) -> None:
    """The clinic accepts or declines each referral while the clinic, the broker or the shelter
    is killed; in the end both sides agree on every answer."""
    expected = {
        referral_id: ("accepted" if n % 2 == 0 else "declined")
        for n, referral_id in enumerate(sorted(sent.values()))
    }
    answered: list[str] = []
    killer = Killer("answer", region.tally, region.servers)
    plan = _after_progress(
        region.rng,
        cs.kills(2, 8),
        len(expected),
        lambda: len(answered),
        lambda: [region.rng.choice([region.clinic, region.clinic, region.broker, region.shelter])],
        "answers",
    )
    killer.run(plan)
    for referral_id, state in expected.items():
        answer = "accept" if state == "accepted" else "decline"
        reason = "" if answer == "accept" else "no_capacity"
        try:
            _call(region.clinic.home, "answer_referral", referral_id, answer, reason)
        except Conflict:
            # Answered by the try a kill cut short: it must hold the answer given.
            shown = _call(region.clinic.home, "show_referral", referral_id)
            _check(shown.state == state, killer.last, f"{referral_id}: {shown}", region.servers)
        answered.append(referral_id)
    killer.join()

    def agreed() -> dict[str, str] | None:
        outgoing = {r.referral_id: r.state for r in region.outgoing()}
        return outgoing if outgoing == expected else None

    try:
        cs.until(agreed, "the shelter to see every answer")
    except AssertionError:
        outgoing = {r.referral_id: r.state for r in region.outgoing()}
        wrong = {k: (v, expected[k]) for k, v in outgoing.items() if v != expected.get(k)}
        region.tally.lost += len(wrong)
        raise AssertionError(f"{killer.last}: answers lost (seen, given): {wrong}") from None
    inbox = _compare(region, sent, killer.last)
    states = {r.referral_id: r.state for r in inbox}
    _check(states == expected, killer.last, f"inbox {states} != {expected}", region.servers)


def _charged_beyond(
    charges: Callable[[Server], int], victim: Server, number: int
) -> Callable[[], bool]:
    return lambda: charges(victim) > number


def _rounds(region: Region) -> None:
    """Open statistics rounds for both nodes and kill nodes and broker while they take part:
    each node charges an attempt once at most, and exactly the rounds the broker has its share
    of."""
    from broker.stats import StatsClient
    from node import stats
    from tessera.v1 import stats_pb2 as stats_pb

    period = stats.period_of(dt.datetime.now(dt.UTC))
    count = cs.kills(2, 6)
    round_ids: list[str] = []
    nodes = (region.shelter, region.clinic)

    def open_round() -> str:
        with StatsClient(region.broker.home) as coordinator:
            blob = coordinator.open_round(REGION, period, 2, 0.1, participants=[SHELTER, CLINIC])
        return str(stats_pb.Round.FromString(blob.body).round_id)

    def charges(node: Server) -> int:
        try:
            engine = _engine(_database_url(node.home))
            try:
                return _count(engine, "SELECT count(*) FROM budget_charge")
            finally:
                engine.dispose()
        except Exception:
            return -1

    killer = Killer("round", region.tally, region.servers)
    plan: list[Moment] = []
    for number in range(count):
        victim = region.rng.choice(nodes)
        if region.rng.random() < 0.5:
            # Just as the node has charged its budget, before its share reaches the broker.
            plan.append(
                (
                    _charged_beyond(charges, victim, number),
                    0.0,
                    [victim],
                    f"right after {victim.name} charged a round",
                )
            )
        else:
            delay = region.rng.uniform(0.0, 6.0)
            others = [victim] if region.rng.random() < 0.7 else [region.broker]
            plan.append((lambda: True, delay, others, f"{delay:.3f} s into a round"))
    for _ in range(count):
        round_ids.append(_retrying(open_round, "open a round"))
    killer.run(plan)
    killer.join()

    def statuses() -> dict[str, Any]:
        with StatsClient(region.broker.home) as coordinator:
            return {r: coordinator.round(r) for r in round_ids}

    def settled() -> dict[str, Any] | None:
        seen = statuses()
        done = all(s.state == stats_pb.ROUND_STATE_RELEASED for s in seen.values())
        return seen if done else None

    try:
        final = cs.until(settled, "every round released", timeout=60)
    except AssertionError:
        final = statuses()
    for node in nodes:
        (ledger,) = [p for p in _call(node.home, "budget", period) if p.period == period]
        got = Counter((c.round_id, c.attempt) for c in ledger.charges)
        twice = {k: n for k, n in got.items() if n > 1}
        charged = {r for (r, _a) in got if r in round_ids}
        submitted = {r for r, s in final.items() if node.name in s.submitted}
        region.tally.budget_errors += len(twice) + len(charged ^ submitted)
        _check(not twice, killer.last, f"{node.name} charged twice: {twice}", region.servers)
        _check(
            charged == submitted,
            killer.last,
            f"{node.name}: charged without a share at the broker "
            f"{sorted(charged - submitted)}, a share without a charge "
            f"{sorted(submitted - charged)}",
            region.servers,
        )
