"""Coordinator credentials: `tessera broker coordinator add|list|remove` (DESIGN.md §1, §7).

A real broker serves on a loopback port chosen at start-up, with two enrolled agencies; every
command is the installed console script, run as the operator (the broker's home) or as the
coordinator (the folder ``coordinator add`` wrote). A coordinator's credential opens a round; once
removed, the same credential is refused at its next request while the broker keeps running.
"""

from __future__ import annotations

import datetime as dt
import json
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import identity
from broker.identity import BrokerRole, Operator
from tessera import credential, crypto
from tessera.errors import Conflict, NotFound, Refused
from tests.support import BackgroundBroker, enrol, make_broker
from tests.test_node_cli import tessera

PERIOD = "2026-10"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BackgroundBroker]:
    running = BackgroundBroker(make_broker(tmp_path / "broker"))
    try:
        yield running
    finally:
        running.stop()


def _add(broker_home: Path, name: str, out_home: Path) -> dict[str, str]:
    added = tessera(
        broker_home, "broker", "coordinator", "add", name, "--out-home", str(out_home), "-f", "json"
    )
    assert added.returncode == 0, added.stderr
    record: dict[str, str] = json.loads(added.stdout)
    return record


def _listed(broker_home: Path) -> dict[str, dict[str, str]]:
    listed = tessera(broker_home, "broker", "coordinator", "list", "-f", "json")
    assert listed.returncode == 0, listed.stderr
    return {row["name"]: row for row in json.loads(listed.stdout)}


def _open_round(home: Path) -> tuple[int, str, str]:
    opened = tessera(
        home,
        "stats",
        "round",
        "open",
        "--period",
        PERIOD,
        "--epsilon",
        "0.5",
        "--participants",
        "alder-house,birch-clinic",
        "--threshold",
        "2",
        "-f",
        "json",
    )
    return opened.returncode, opened.stdout, opened.stderr


def test_a_coordinator_is_issued_used_and_withdrawn_without_a_restart(
    broker: BackgroundBroker, tmp_path: Path
) -> None:
    for agency_id in ("alder-house", "birch-clinic"):
        enrol(broker, tmp_path, agency_id)
    home = broker.settings.home
    coordinator = tmp_path / "north-coordinator"

    added = _add(home, "north-coordinator", coordinator)
    assert added["role"] == "coordinator"
    assert added["broker"] == broker.address
    held = credential.read(coordinator)
    assert held.node_address == broker.address  # no run file in the coordinator's home
    assert held.node_certificate == broker.settings.cert_path.read_bytes()
    assert held.identity.public.signing_key.hex() == added["signing_key"]
    assert stat.S_IMODE((coordinator / credential.CREDENTIAL_FILE).stat().st_mode) == 0o600

    people = _listed(home)
    assert people["north-coordinator"]["role"] == "coordinator"
    assert people["north-coordinator"]["signing_key"] == added["signing_key"]
    assert dt.datetime.fromisoformat(people["north-coordinator"]["added_at"]).tzinfo is not None
    assert people["operator"]["role"] == "operator"

    code, out, err = _open_round(coordinator)
    assert code == 0, err
    round_id = json.loads(out)["round_id"]
    status = tessera(coordinator, "stats", "round", "status", round_id, "-f", "json")
    assert status.returncode == 0, status.stderr
    # A coordinator is not an operator: issuing an enrolment token is refused by role.
    token = tessera(coordinator, "broker", "enrol-token", "--agency", "cedar-aid")
    assert token.returncode == 5, token.stderr

    removed = tessera(home, "broker", "coordinator", "remove", "north-coordinator")
    assert removed.returncode == 0, removed.stderr
    assert "north-coordinator" not in _listed(home)

    # The same running broker refuses the withdrawn credential at once, for every method...
    refused = tessera(coordinator, "stats", "round", "status", round_id)
    assert refused.returncode == 4, refused.stderr
    assert "no enrolled agency or operator" in refused.stderr
    code, _out, err = _open_round(coordinator)
    assert code == 4, err
    # ...and still serves everyone else.
    still = tessera(home, "stats", "round", "status", round_id, "-f", "json")
    assert still.returncode == 0, still.stderr
    assert json.loads(still.stdout)["round_id"] == round_id


def test_refusals_keep_credentials_and_the_list_intact(
    broker: BackgroundBroker, tmp_path: Path
) -> None:
    home = broker.settings.home
    first = tmp_path / "first"
    _add(home, "north-coordinator", first)
    before = (home / identity.OPERATORS_FILE).read_bytes()
    held = (first / credential.CREDENTIAL_FILE).read_bytes()

    again = tessera(
        home, "broker", "coordinator", "add", "north-coordinator", "--out-home", str(tmp_path / "x")
    )
    assert again.returncode == 9
    assert "already listed" in again.stderr
    assert not (tmp_path / "x").exists()
    as_operator = tessera(
        home, "broker", "coordinator", "add", "operator", "--out-home", str(tmp_path / "y")
    )
    assert as_operator.returncode == 9

    # An existing credential folder, or any folder with something in it, is never written to.
    over = tessera(home, "broker", "coordinator", "add", "other", "--out-home", str(first))
    assert over.returncode == 9
    assert "not an empty folder" in over.stderr
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    into_busy = tessera(home, "broker", "coordinator", "add", "other", "--out-home", str(busy))
    assert into_busy.returncode == 9
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    assert (first / credential.CREDENTIAL_FILE).read_bytes() == held
    assert (home / identity.OPERATORS_FILE).read_bytes() == before

    # An empty folder made beforehand is fine.
    empty = tmp_path / "empty"
    empty.mkdir()
    _add(home, "south-coordinator", empty)

    not_a_coordinator = tessera(home, "broker", "coordinator", "remove", "operator")
    assert not_a_coordinator.returncode == 8
    assert "not coordinator" in not_a_coordinator.stderr
    unknown = tessera(home, "broker", "coordinator", "remove", "nobody")
    assert unknown.returncode == 6
    assert set(_listed(home)) == {"operator", "north-coordinator", "south-coordinator"}
    # The coordinator's own folder is not a broker's home.
    wrong_home = tessera(first, "broker", "coordinator", "list")
    assert wrong_home.returncode == 3


def test_a_stopped_broker_on_a_port_chosen_at_start_up_needs_an_address(tmp_path: Path) -> None:
    home = tmp_path / "broker"
    created = tessera(home, "broker", "init", "--region", "north", "--listen", "127.0.0.1:0")
    assert created.returncode == 0, created.stderr
    out = tmp_path / "coordinator"
    unknown = tessera(home, "broker", "coordinator", "add", "c", "--out-home", str(out))
    assert unknown.returncode == 3
    assert "--address" in unknown.stderr
    assert not out.exists()
    bad = tessera(
        home, "broker", "coordinator", "add", "c", "--out-home", str(out), "--address", "nowhere"
    )
    assert bad.returncode == 7
    given = tessera(
        home,
        "broker",
        "coordinator",
        "add",
        "c",
        "--out-home",
        str(out),
        "--address",
        "broker.example.org:7440",
    )
    assert given.returncode == 0, given.stderr
    assert credential.read(out).node_address == "broker.example.org:7440"


# --- operators.json itself --------------------------------------------------------------------


def _person(name: str, role: BrokerRole = BrokerRole.COORDINATOR) -> Operator:
    return Operator(name, role, crypto.Identity.generate().public.signing_key)


def test_a_file_written_before_added_at_existed_is_read(tmp_path: Path) -> None:
    key = crypto.Identity.generate().public.signing_key
    (tmp_path / identity.OPERATORS_FILE).write_text(
        json.dumps([{"name": "operator", "role": "operator", "signing_key": key.hex()}])
    )
    assert identity.load_operators(tmp_path) == [Operator("operator", BrokerRole.OPERATOR, key)]
    identity.add_operator(tmp_path, _person("c"))
    assert [o.name for o in identity.load_operators(tmp_path)] == ["operator", "c"]
    assert identity.load_operators(tmp_path)[0].added_at is None


def test_every_rewrite_is_seen_even_within_one_clock_tick(tmp_path: Path) -> None:
    identity.add_operator(tmp_path, _person("operator", BrokerRole.OPERATOR))
    for round_ in range(50):
        identity.add_operator(tmp_path, _person(f"c{round_}"))
        assert f"c{round_}" in {o.name for o in identity.load_operators(tmp_path)}
        identity.remove_operator(tmp_path, f"c{round_}", BrokerRole.COORDINATOR)
        assert f"c{round_}" not in {o.name for o in identity.load_operators(tmp_path)}


def test_concurrent_additions_are_all_kept(tmp_path: Path) -> None:
    identity.add_operator(tmp_path, _person("operator", BrokerRole.OPERATOR))
    threads = [
        threading.Thread(target=identity.add_operator, args=(tmp_path, _person(f"c{i}")))
        for i in range(16)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(identity.load_operators(tmp_path)) == 17


def test_the_last_operator_and_duplicates_are_refused(tmp_path: Path) -> None:
    only = _person("operator", BrokerRole.OPERATOR)
    identity.add_operator(tmp_path, only)
    with pytest.raises(Conflict):
        identity.add_operator(tmp_path, Operator("other", BrokerRole.COORDINATOR, only.signing_key))
    with pytest.raises(Refused, match="last operator"):
        identity.remove_operator(tmp_path, "operator", BrokerRole.OPERATOR)
    with pytest.raises(NotFound):
        identity.remove_operator(tmp_path, "nobody", BrokerRole.COORDINATOR)
    identity.add_operator(tmp_path, _person("second", BrokerRole.OPERATOR))
    assert identity.remove_operator(tmp_path, "operator", BrokerRole.OPERATOR) == only
    assert [o.name for o in identity.load_operators(tmp_path)] == ["second"]
