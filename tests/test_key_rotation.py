"""An agency rotates its own keys (`tessera node rotate-keys`, issue 16): the old key signs the
change, peers pin the new one, the broker refuses the old one from then on, and nothing sealed to
the old key is lost: referrals already on their way, the node's escrowed erasures, its audit log
and its backups. A rotation cut short is finished, never half-applied."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker.operator_client import OperatorClient
from node import directory_sync
from node import keyring as keyring_mod
from node.backup import restore_backup
from node.client import NodeClient
from node.htcds import NeedCategory, NeedStatus
from node.keyring import open_keyring
from node.server import start_node
from node.store.database import open_database
from tessera import crypto, directory
from tessera.config import Settings
from tessera.errors import ConfigError, NotFound, Refused, Unauthenticated
from tests.support import (
    PASSPHRASE,
    BackgroundBroker,
    BackgroundNode,
    enrolled_node,
    make_broker,
    unlock,
    wait_for,
)

HARBOUR, LIGHTHOUSE = "harbour-shelter", "lighthouse-clinic"
NEXT_YEAR = dt.date.today() + dt.timedelta(days=365)


@dataclass
class Pair:
    broker: BackgroundBroker
    settings: dict[str, Settings]
    nodes: dict[str, BackgroundNode | None]

    def client(self, agency_id: str) -> NodeClient:
        return NodeClient(self.settings[agency_id].home, unlock=unlock)

    def start(self, agency_id: str) -> None:
        self.nodes[agency_id] = BackgroundNode(self.settings[agency_id])

    def stop(self, agency_id: str) -> None:
        node = self.nodes[agency_id]
        if node is not None:
            node.stop()
        self.nodes[agency_id] = None


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    broker = BackgroundBroker(make_broker(tmp_path / "broker"))
    settings = {a: enrolled_node(broker, tmp_path, a) for a in (HARBOUR, LIGHTHOUSE)}
    pair = Pair(broker, settings, {a: None for a in settings})
    try:
        for agency_id in settings:
            pair.start(agency_id)
        yield pair
    finally:
        for agency_id in settings:
            pair.stop(agency_id)
        broker.stop()


def _tessera(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("tessera", path=os.path.dirname(sys.executable))
    assert exe
    result = subprocess.run(
        [exe, "--home", str(home), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "TESSERA_PASSPHRASE": PASSPHRASE, "COLUMNS": "200"},
        timeout=120,
        check=False,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def _send(pair: Pair, name: str, to: str = LIGHTHOUSE) -> str:
    with pair.client(HARBOUR) as harbour:
        case: dict[str, Any] = harbour.create_case(
            {"prs_FirstName": name, "prs_Email": f"{name.lower()}@example.org"},
            "",
            [(NeedCategory.MEDICAL, NeedStatus.IDENTIFIED)],
        )
        consent = harbour.grant_consent(
            case["case_id"], to, NeedCategory.MEDICAL, ("identity",), NEXT_YEAR, "verbal"
        )
        sent = harbour.send_referral(
            case["case_id"], to, NeedCategory.MEDICAL, consent_id=consent["consent_id"]
        )
    return str(sent["referral_id"])


def _arrived(pair: Pair, referral_id: str) -> dict[str, Any]:
    with pair.client(LIGHTHOUSE) as lighthouse:
        wait_for(
            lambda: [r for r in lighthouse.inbox(True) if r["referral_id"] == referral_id],
            f"referral {referral_id} at {LIGHTHOUSE}",
            timeout=30,
        )
        shown: dict[str, Any] = lighthouse.show_referral(referral_id)
        return shown


def test_a_rotation_locks_out_the_old_key_and_loses_nothing_sealed_to_it(
    pair: Pair, tmp_path: Path
) -> None:
    home = pair.settings[LIGHTHOUSE].home
    old = open_keyring(home, PASSPHRASE).identity
    first = _send(pair, "Orlaith")
    assert _arrived(pair, first)["fields"]["prs_FirstName"] == "Orlaith"
    with pair.client(LIGHTHOUSE) as lighthouse:
        erased = lighthouse.create_case({"prs_FirstName": "Tamsin"}, "", [])["case_id"]
        lighthouse.erase_case(erased, "survivor asked")
        wait_for(lambda: lighthouse.status()["tombstones_waiting"] == 0, "the tombstone escrowed")
        before_rotation = Path(lighthouse.backup(None)["path"])

    # Lighthouse goes offline; a referral for it waits at the broker, sealed to its old key.
    pair.stop(LIGHTHOUSE)
    in_flight = _send(pair, "Benedek")
    rotated = _tessera(home, "node", "rotate-keys")
    assert rotated.returncode == 0, rotated.stderr
    new = open_keyring(home, PASSPHRASE)
    assert new.identity.public.fingerprint() in rotated.stdout
    assert old.public.fingerprint() in rotated.stdout
    assert new.identity.public.signing_key != old.public.signing_key
    assert [r.public.signing_key for r in new.retired] == [old.public.signing_key]

    # Whoever kept a copy of the old key can no longer act as the agency at the broker.
    with pytest.raises(Unauthenticated):
        directory_sync.sync(tmp_path / "thief", old, directory_sync.load_link(home))

    pair.start(LIGHTHOUSE)
    assert _arrived(pair, in_flight)["fields"]["prs_FirstName"] == "Benedek"
    assert _arrived(pair, first)["fields"]["prs_FirstName"] == "Orlaith"
    with pair.client(LIGHTHOUSE) as lighthouse:
        # The escrow (a tombstone sealed to the old key) opened: the node serves cases.
        assert lighthouse.status()["escrow"] == "confirmed"
        with pytest.raises(NotFound):
            lighthouse.get_case(erased)
        report = lighthouse.verify_audit()
        assert report["intact"], report["problems"]
        actions = [e["action"] for e in lighthouse.audit_entries(actions=["keys.rotate"])]
        assert actions == ["keys.rotate"]

    # The partner pins the new key from the directory, and what it sends now opens too.
    with pair.client(HARBOUR) as harbour:
        pinned = {a["agency_id"]: a for a in harbour.agencies()}[LIGHTHOUSE]
        assert pinned["fingerprint"] == new.identity.public.fingerprint()
    after = _send(pair, "Cosmin")
    assert _arrived(pair, after)["fields"]["prs_FirstName"] == "Cosmin"

    # A backup taken before the rotation is still this node's, and restores.
    pair.stop(LIGHTHOUSE)
    engine = open_database(pair.settings[LIGHTHOUSE].effective_database_url, new)
    try:
        restore_backup(home, engine, before_rotation, PASSPHRASE)
    finally:
        engine.dispose()
    assert open_keyring(home, PASSPHRASE).identity.public == new.identity.public


def _begin(home: Path, *, recorded: bool) -> crypto.Identity:
    """Start a rotation as rotate-keys does and stop short, as a kill would: after the keyring
    holds the pending identity, and (``recorded``) after the broker recorded it."""
    keyring = open_keyring(home, PASSPHRASE)
    link = directory_sync.load_link(home)
    record = directory_sync.sync(home, keyring.identity, link).records[link.agency_id]
    pending = crypto.Identity.generate()
    keyring_mod.begin_identity_change(home, keyring, pending, PASSPHRASE)
    if recorded:
        statement, possession = directory.rotate_statement(
            keyring.identity, pending, record, dt.datetime.now(dt.UTC)
        )
        directory_sync.rotate_keys(link, keyring.identity, statement, possession)
    return pending


@pytest.mark.parametrize("recorded", [True, False], ids=["broker-recorded", "never-sent"])
def test_a_rotation_cut_short_is_finished_before_the_node_serves_again(
    pair: Pair, recorded: bool
) -> None:
    home = pair.settings[LIGHTHOUSE].home
    pair.stop(LIGHTHOUSE)
    before = open_keyring(home, PASSPHRASE).identity
    pending = _begin(home, recorded=recorded)

    # Half-rotated, the node refuses to serve and says how to finish.
    with pytest.raises(ConfigError, match="rotate-keys"):
        asyncio.run(start_node(pair.settings[LIGHTHOUSE], PASSPHRASE))

    again = _tessera(home, "node", "rotate-keys")
    assert again.returncode == 0, again.stderr
    keyring = open_keyring(home, PASSPHRASE)
    assert keyring.pending is None
    assert keyring.retired[0].public == before.public
    if recorded:
        # The broker already had the pending key: it became current.
        assert "Finished the interrupted rotation" in again.stdout
        assert keyring.identity.public == pending.public
    else:
        # The broker never saw it: forgotten, and a fresh rotation done.
        assert "Rotated the keys" in again.stdout
        assert keyring.identity.public not in {pending.public, before.public}
    pair.start(LIGHTHOUSE)
    with pair.client(HARBOUR) as harbour:
        pinned = {a["agency_id"]: a for a in harbour.agencies()}[LIGHTHOUSE]
        assert pinned["fingerprint"] == keyring.identity.public.fingerprint()
    referral = _send(pair, "Iolanthe")
    assert _arrived(pair, referral)["fields"]["prs_FirstName"] == "Iolanthe"


def test_rotate_keys_is_refused_while_the_node_serves(pair: Pair) -> None:
    home = pair.settings[LIGHTHOUSE].home
    before = open_keyring(home, PASSPHRASE).identity.public
    refused = _tessera(home, "node", "rotate-keys")
    assert refused.returncode == 9, refused.stdout + refused.stderr
    assert open_keyring(home, PASSPHRASE).identity.public == before


def test_the_compromise_runbook_revoke_re_enrol_re_verify(pair: Pair, tmp_path: Path) -> None:
    """docs/operations.md, "A compromised agency key", step by step."""
    home = pair.settings[LIGHTHOUSE].home
    link = directory_sync.load_link(home)
    with pair.client(LIGHTHOUSE) as lighthouse:
        erased = lighthouse.create_case({"prs_FirstName": "Wenna"}, "", [])["case_id"]
        lighthouse.erase_case(erased, "survivor asked")
        wait_for(lambda: lighthouse.status()["tombstones_waiting"] == 0, "the tombstone escrowed")
    with pair.client(HARBOUR) as harbour:
        fingerprint = {a["agency_id"]: a for a in harbour.agencies()}[LIGHTHOUSE]["fingerprint"]
        harbour.verify_agency(LIGHTHOUSE, fingerprint)

    # A thief with a copy of the keyring (and its passphrase) rotates the agency to their key.
    stolen = open_keyring(home, PASSPHRASE).identity
    thief = crypto.Identity.generate()
    scratch = tmp_path / "thief"
    record = directory_sync.sync(scratch, stolen, link).records[LIGHTHOUSE]
    statement, possession = directory.rotate_statement(
        stolen, thief, record, dt.datetime.now(dt.UTC)
    )
    directory_sync.rotate_keys(link, stolen, statement, possession)

    # The agency's own rotation now fails, saying what happened and what to do.
    pair.stop(LIGHTHOUSE)
    refused = _tessera(home, "node", "rotate-keys")
    assert refused.returncode == 9, refused.stdout + refused.stderr
    assert "re-enrol" in refused.stderr and "stolen" in refused.stderr

    # 1. The broker operator revokes the agency: the thief's key is refused from then on, and
    #    partners stop sending to it.
    revoked = _tessera(pair.broker.settings.home, "broker", "revoke", LIGHTHOUSE, "--reason", "key")
    assert revoked.returncode == 0, revoked.stderr
    with pytest.raises(Unauthenticated):
        directory_sync.sync(scratch, thief, link)
    with pair.client(HARBOUR) as harbour:
        assert {a["agency_id"] for a in harbour.agencies()} == {HARBOUR}
    with pytest.raises(Refused):
        _send(pair, "Ysolde")

    # 2. A new enrolment code, for a new agency id, and `node re-enrol` at the agency.
    renamed = f"{LIGHTHOUSE}-2"
    with OperatorClient(pair.broker.settings.home) as operator:
        code = operator.enrolment_code(renamed, 1)
    again = _tessera(home, "node", "re-enrol", code)
    assert again.returncode == 0, again.stderr
    keyring = open_keyring(home, PASSPHRASE)
    assert keyring.identity.public.fingerprint() in again.stdout
    assert {r.public for r in keyring.retired} >= {stolen.public}
    pair.start(LIGHTHOUSE)
    with pair.client(LIGHTHOUSE) as lighthouse:
        assert lighthouse.status()["fingerprint"] == keyring.identity.public.fingerprint()
        assert directory_sync.load_link(home).agency_id == renamed
        # Every erasure went into the new agency's escrow, and the survivor stays erased.
        wait_for(lambda: lighthouse.status()["tombstones_waiting"] == 0, "tombstones re-escrowed")
        assert lighthouse.status()["escrow"] == "confirmed"
        with pytest.raises(NotFound):
            lighthouse.get_case(erased)
        assert lighthouse.verify_audit()["intact"]

    # 3. The partner re-verifies by phone, then referrals flow to the new agency id.
    with pair.client(HARBOUR) as harbour:
        listed = {a["agency_id"]: a for a in harbour.agencies()}[renamed]
        assert not listed["verified"]
        assert listed["fingerprint"] == keyring.identity.public.fingerprint()
        harbour.verify_agency(renamed, listed["fingerprint"])
    referral = _send(pair, "Elowen", to=renamed)
    assert _arrived(pair, referral)["fields"]["prs_FirstName"] == "Elowen"
