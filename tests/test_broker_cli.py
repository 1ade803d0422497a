"""The broker and agency commands, run as an operator and two administrators would.

Real processes: ``tessera broker serve`` and two ``tessera node serve``, each a subprocess; every
other command is the installed console script. Expected failures exit with their documented code
and no stack trace.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tests.test_node_cli import _env, tessera


@contextlib.contextmanager
def serving(home: Path, group: str) -> Iterator[None]:
    exe = shutil.which("tessera", path=os.path.dirname(sys.executable))
    assert exe
    run_file = home / "run" / "node.json"
    run_file.unlink(missing_ok=True)
    log = (home / f"{group}.log").open("w")
    process = subprocess.Popen(
        [exe, "--home", str(home), group, "serve"], env=_env(), stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 30
        while not run_file.exists():
            assert process.poll() is None, (home / f"{group}.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        log.close()


def test_operator_enrols_two_agencies_who_verify_each_other(tmp_path: Path) -> None:
    broker = tmp_path / "broker"
    created = tessera(broker, "broker", "init", "--region", "north", "--listen", "127.0.0.1:0")
    assert created.returncode == 0, created.stderr
    homes = {"harbour-shelter": tmp_path / "shelter", "lantern-clinic": tmp_path / "clinic"}
    with serving(broker, "broker"):
        for agency_id, home in homes.items():
            assert (
                tessera(
                    home,
                    "node",
                    "init",
                    "--name",
                    agency_id.title(),
                    "--region",
                    "north",
                    "--listen",
                    "127.0.0.1:0",
                ).returncode
                == 0
            )
            code = tessera(broker, "broker", "enrol-token", "--agency", agency_id)
            assert code.returncode == 0, code.stderr
            enrolled = tessera(home, "node", "enrol", code.stdout.strip(), "--service", "medical")
            assert enrolled.returncode == 0, enrolled.stderr
            assert "fingerprint" in enrolled.stdout
            reused = tessera(home, "node", "enrol", code.stdout.strip())
            assert reused.returncode == 4, reused.stderr  # a code works once
        with serving(homes["harbour-shelter"], "node"), serving(homes["lantern-clinic"], "node"):
            shelter, clinic = homes["harbour-shelter"], homes["lantern-clinic"]
            listed = json.loads(tessera(shelter, "agency", "list", "-f", "json").stdout)
            assert {a["agency_id"] for a in listed} == set(homes)
            assert all(not a["verified"] for a in listed)
            clinic_print = json.loads(tessera(clinic, "node", "status", "-f", "json").stdout)[
                "fingerprint"
            ]
            wrong = tessera(
                shelter, "agency", "verify", "lantern-clinic", "--fingerprint", "AAAA-BBBB"
            )
            assert wrong.returncode == 8
            assert "does not match" in wrong.stderr
            right = tessera(
                shelter,
                "agency",
                "verify",
                "lantern-clinic",
                "--fingerprint",
                clinic_print.lower().replace("-", " "),
            )
            assert right.returncode == 0, right.stderr
            listed = json.loads(tessera(shelter, "agency", "list", "-f", "json").stdout)
            assert {a["agency_id"]: a["verified"] for a in listed} == {
                "harbour-shelter": False,
                "lantern-clinic": True,
            }
            revoked = tessera(broker, "broker", "revoke", "lantern-clinic", "--reason", "test")
            assert revoked.returncode == 0, revoked.stderr
            after = json.loads(tessera(shelter, "agency", "list", "--revoked", "-f", "json").stdout)
            assert {a["agency_id"]: a["revoked"] for a in after}["lantern-clinic"] is True


def test_enrolling_against_a_stopped_broker_is_unavailable(tmp_path: Path) -> None:
    broker = tmp_path / "broker"
    assert (
        tessera(broker, "broker", "init", "--region", "north", "--listen", "127.0.0.1:0").returncode
        == 0
    )
    with serving(broker, "broker"):
        code = tessera(broker, "broker", "enrol-token", "--agency", "a").stdout.strip()
    node = tmp_path / "node"
    assert tessera(node, "node", "init", "--name", "A", "--listen", "127.0.0.1:0").returncode == 0
    result = tessera(node, "node", "enrol", code)
    assert result.returncode == 10
    assert "cannot reach the broker" in result.stderr
    garbage = tessera(node, "node", "enrol", "not-a-code")
    assert garbage.returncode == 7
