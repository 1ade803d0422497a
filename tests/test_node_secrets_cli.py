"""Secrets at rest outside the database, attacked from the command line (issue 14 items 5 and 6).

A staff credential's secret key is never in its file in clear; a wrong passphrase is named and
exits 4; a weak new passphrase (node or staff) is refused with the estimator's advice and exit 7;
an old credential in clear still works, with a warning, until `node credential protect` locks it.
A node killed with SIGKILL leaves a stale run file that no longer blocks `node restore`, while a
node that really serves still does. Real `tessera` subprocesses and a real node throughout.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tessera import config, credential, crypto
from tessera.errors import ConfigError, Conflict
from tests.test_node_cli import PASSPHRASE, _env, tessera

ANA = "ledger orchid tramline quiet"
WEAK = "harbour2026"


def _secret_forms(identity: crypto.Identity) -> list[bytes]:
    """Every way the private key could sit in a file: the seed and the Ed25519 key it derives,
    raw, hex and base64."""
    seeds = [identity.to_secret_bytes(), bytes(identity._signing)]
    forms: list[bytes] = []
    for raw in seeds:
        forms += [raw, raw.hex().encode(), raw.hex().upper().encode(), base64.b64encode(raw)]
        forms.append(base64.urlsafe_b64encode(raw).rstrip(b"="))
    return forms


def _add_ana(
    served_home: Path, ana: Path, passphrase: str = ANA
) -> subprocess.CompletedProcess[str]:
    return tessera(
        served_home,
        "node",
        "staff",
        "add",
        "Ana Ruiz",
        "--out-home",
        str(ana),
        TESSERA_NEW_PASSPHRASE=passphrase,
    )


def _serve(node_home: Path) -> subprocess.Popen[str]:
    exe = shutil.which("tessera", path=os.path.dirname(sys.executable))
    assert exe
    process = subprocess.Popen(
        [exe, "--home", str(node_home), "node", "serve"],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not (node_home / credential.RUN_FILE).exists():
        assert process.poll() is None, "the node exited"
        assert time.monotonic() < deadline, "the node did not start"
        time.sleep(0.05)
    return process


def _stop(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "shelter"
    made = tessera(path, "node", "init", "--name", "Harbour Shelter", "--listen", "127.0.0.1:0")
    assert made.returncode == 0, made.stderr
    return path


@pytest.fixture
def served(home: Path) -> Iterator[Path]:
    process = _serve(home)
    try:
        yield home
    finally:
        _stop(process)


def test_a_staff_credential_holds_no_private_key_in_clear(served: Path, tmp_path: Path) -> None:
    ana = tmp_path / "ana"
    assert _add_ana(served, ana).returncode == 0
    content = (ana / "credential.json").read_bytes()
    held = credential.read(ana, lambda: ANA)
    assert [f for f in _secret_forms(held.identity) if f in content] == []
    assert json.loads(content)["lock"] == "passphrase"
    # The administrator's credential in the node's home is locked too, by the node passphrase.
    admin_file = (served / "credential.json").read_bytes()
    admin = credential.read(served, lambda: PASSPHRASE)
    assert [f for f in _secret_forms(admin.identity) if f in admin_file] == []

    # The right passphrase signs requests the node accepts.
    shown = tessera(ana, "node", "status", "-f", "json", TESSERA_PASSPHRASE=ANA)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["your_role"] == "caseworker"
    assert "warning" not in shown.stderr


def test_a_wrong_credential_passphrase_is_named_and_exits_4(served: Path, tmp_path: Path) -> None:
    ana = tmp_path / "ana"
    assert _add_ana(served, ana).returncode == 0
    wrong = tessera(ana, "node", "status", TESSERA_PASSPHRASE="ledger orchid tramline loud")
    assert wrong.returncode == 4
    assert f"the passphrase does not open the staff credential in {ana}" in wrong.stderr
    assert "what to do:" in wrong.stderr
    missing = tessera(ana, "node", "status", TESSERA_PASSPHRASE="")
    assert missing.returncode == 3
    assert f"a passphrase of the credential in {ana} is needed" in missing.stderr


def test_a_weak_staff_passphrase_is_refused_and_nobody_is_added(
    served: Path, tmp_path: Path
) -> None:
    ana = tmp_path / "ana"
    weak = _add_ana(served, ana, WEAK)
    assert weak.returncode == 7
    assert "too weak" in weak.stderr and "Add another word or two" in weak.stderr
    assert not (ana / "credential.json").exists()
    listed = json.loads(tessera(served, "node", "staff", "list", "-f", "json").stdout)
    assert [s["name"] for s in listed] == ["admin"]
    # The staff member's own name is among the first guesses.
    named = _add_ana(served, ana, "Ana Ruiz Ana Ruiz")
    assert named.returncode == 7


def test_a_weak_node_passphrase_is_refused_at_init_and_at_rotation(
    served: Path, tmp_path: Path
) -> None:
    weak_init = tessera(
        tmp_path / "weak", "node", "init", "--name", "Harbour Shelter", TESSERA_PASSPHRASE="a"
    )
    assert weak_init.returncode == 7
    assert "node passphrase is too weak" in weak_init.stderr
    assert not (tmp_path / "weak" / config.CONFIG_FILE).exists()
    # The agency's own name does not make a passphrase.
    named = tessera(
        tmp_path / "named",
        "node",
        "init",
        "--name",
        "Harbour Shelter",
        TESSERA_PASSPHRASE="Harbour Shelter 2026",
    )
    assert named.returncode == 7

    rotated = tessera(served, "node", "rotate-kek", TESSERA_NEW_PASSPHRASE=WEAK)
    assert rotated.returncode == 7
    assert "too weak" in rotated.stderr
    # Nothing changed: the old passphrase still opens the node's credential and the node.
    assert tessera(served, "node", "status").returncode == 0


def test_rotation_relocks_the_admin_credential_in_the_node_home(served: Path) -> None:
    new = "cobalt meadow lantern seventeen"
    rotated = tessera(served, "node", "rotate-kek", TESSERA_NEW_PASSPHRASE=new)
    assert rotated.returncode == 0, rotated.stderr
    assert tessera(served, "node", "status", TESSERA_PASSPHRASE=new).returncode == 0
    assert tessera(served, "node", "status").returncode == 4  # the old one opens nothing now


def test_an_old_credential_in_clear_warns_until_it_is_protected(
    served: Path, tmp_path: Path
) -> None:
    ana = tmp_path / "ana"
    assert _add_ana(served, ana).returncode == 0
    held = credential.read(ana, lambda: ANA)
    (ana / "credential.json").unlink()
    credential.write(ana, held, None)  # as versions before locking wrote it
    assert json.loads((ana / "credential.json").read_text())["secret"] == (
        held.identity.to_secret_bytes().hex()
    )

    old = tessera(ana, "node", "status", "-f", "json", TESSERA_PASSPHRASE="")
    assert old.returncode == 0, old.stderr
    assert "holds its secret key in clear" in old.stderr
    assert "tessera node credential protect" in old.stderr

    weak = tessera(ana, "node", "credential", "protect", TESSERA_NEW_PASSPHRASE=WEAK)
    assert weak.returncode == 7
    locked = tessera(ana, "node", "credential", "protect", TESSERA_NEW_PASSPHRASE=ANA)
    assert locked.returncode == 0, locked.stderr
    content = (ana / "credential.json").read_bytes()
    assert [f for f in _secret_forms(held.identity) if f in content] == []
    after = tessera(ana, "node", "status", TESSERA_PASSPHRASE=ANA)
    assert after.returncode == 0 and "warning" not in after.stderr
    assert credential.read(ana, lambda: ANA).identity.public == held.identity.public


# --- item 6: a stale run file no longer blocks a restore -------------------------------------


@pytest.fixture
def backup_file(home: Path) -> Path:
    process = _serve(home)
    try:
        made = tessera(home, "node", "backup", "-f", "json")
        assert made.returncode == 0, made.stderr
    finally:
        _stop(process)
    return Path(json.loads(made.stdout)["path"])


def test_a_node_killed_with_sigkill_no_longer_blocks_a_restore(
    home: Path, backup_file: Path
) -> None:
    process = _serve(home)
    run_file = home / credential.RUN_FILE
    recorded = json.loads(run_file.read_text())
    assert recorded["pid"] == process.pid

    # While it really serves, a restore is refused, naming the process.
    refused = tessera(home, "node", "restore", str(backup_file))
    assert refused.returncode == 9
    assert f"a node is serving from {home} (pid {process.pid})" in refused.stderr
    assert "stop `tessera node serve` first" in refused.stderr

    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert run_file.exists()  # the crash left its run file behind

    restored = tessera(home, "node", "restore", str(backup_file))
    assert restored.returncode == 0, restored.stderr
    assert "left by a node that stopped without cleaning up was removed" in restored.stdout
    assert f"Restored {backup_file.name}" in restored.stdout
    assert not run_file.exists()

    # And the node serves again afterwards.
    again = _serve(home)
    try:
        assert tessera(home, "node", "status").returncode == 0
    finally:
        _stop(again)


def test_no_node_starts_while_a_restore_holds_the_home(home: Path) -> None:
    with credential.lock_stopped_home(home):
        started = tessera(home, "node", "serve")
        assert started.returncode == 9
        assert "a restore is running" in started.stderr
    # Released: the home serves again, and a second lock sees it serving.
    process = _serve(home)
    try:
        with pytest.raises(Conflict, match="a node is serving"):
            credential.lock_stopped_home(home)
    finally:
        _stop(process)
    credential.lock_stopped_home(home).release()  # a graceful stop releases it too


def test_a_home_is_served_by_one_process_only(home: Path) -> None:
    """A second `node serve` of a home that is serving is refused, naming the first, and the
    first keeps serving (gRPC's port sharing is off, so it could not split the calls either)."""
    first = _serve(home)
    try:
        second = tessera(home, "node", "serve")
        assert second.returncode == 9, second.stderr
        assert f"a node is already serving from {home} (pid {first.pid})" in second.stderr
        assert tessera(home, "node", "status").returncode == 0
    finally:
        _stop(first)


def test_two_servers_cannot_share_a_port(tmp_path: Path) -> None:
    import asyncio

    from tests.support import BackgroundBroker, make_broker

    broker = BackgroundBroker(make_broker(tmp_path / "one"))
    try:
        port = broker.address.rsplit(":", 1)[1]
        other = make_broker(tmp_path / "two")
        taken = dataclasses.replace(other, listen=f"127.0.0.1:{port}")
        from broker.server import start_broker

        with pytest.raises(ConfigError, match="cannot listen"):
            asyncio.run(start_broker(taken))
    finally:
        broker.stop()
