"""An audit trail that cannot be rewound (DESIGN.md section 6; issue 14 item 3).

A restore appends to the node's audit log and never replaces it, so the disclosures made after
the backup stay in the accounting; the node checkpoints its head at the broker, and a log
truncated or rewound behind its last checkpoint is reported by `audit verify`, naming the
checkpoint, and never overwritten at the broker; `audit show` answers "who opened this case,
when". Real broker and node servers, real referrals between two agencies, SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from broker.operator_client import OperatorClient
from broker.store.escrow import EscrowStore as BrokerEscrowStore
from node import directory_sync
from node.backup import restore_backup
from node.client import NodeClient
from node.domain import StaffRole
from node.keyring import open_keyring
from node.store.database import open_database
from tessera import credential, crypto
from tessera.errors import ErrorKind, PermissionDenied
from tessera.needs import NeedCategory, NeedStatus
from tests.escrowfixtures import (
    AGENCY,
    Site,
    attempt,
    site_fixture,  # noqa: F401  (fixture)
)
from tests.nodefixtures import db_url_fixture  # noqa: F401  (fixture)
from tests.support import CASEWORKER_PASSPHRASE, PASSPHRASE, BackgroundNode, make_node

T = TypeVar("T")
CLINIC = "lighthouse-clinic"
NEXT_YEAR = dt.date.today() + dt.timedelta(days=365)


def wait_for(probe: Callable[[], T | None], what: str, timeout: float = 20.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _clinic(site: Site) -> BackgroundNode:
    settings = make_node(site.root / CLINIC, name="Lighthouse Clinic")
    identity = open_keyring(settings.home, PASSPHRASE).identity
    with OperatorClient(site.broker.settings.home) as operator:
        code = operator.enrolment_code(CLINIC, 1)
    directory_sync.enrol(settings.home, identity, code, settings.name, ["medical"])
    return BackgroundNode(settings)


def _refer(client: NodeClient, case_id: str) -> str:
    consent = client.grant_consent(
        case_id, CLINIC, NeedCategory.MEDICAL, ("identity",), NEXT_YEAR, "verbal"
    )
    sent = client.send_referral(
        case_id, CLINIC, NeedCategory.MEDICAL, consent_id=consent["consent_id"]
    )
    return str(sent["referral_id"])


def _staff_home(site: Site, name: str, role: StaffRole, folder: Path) -> Path:
    """A credential folder for a new staff member, pointing at the running node."""
    assert site.node is not None
    identity = crypto.Identity.generate()
    with site.client() as client:
        client.add_staff(name, role, identity.public.signing_key)
    credential.write(
        folder,
        credential.Credential(
            name=name,
            identity=identity,
            node_address=site.node.address,
            node_certificate=site.settings.cert_path.read_bytes(),
        ),
        credential.PassphraseLock(CASEWORKER_PASSPHRASE, crypto.Argon2Params.TEST_CHEAP),
    )
    return folder


def test_disclosures_made_after_the_backup_outlive_its_restore(site: Site) -> None:
    clinic = _clinic(site)
    try:
        with site.client() as client:
            case_id = str(
                client.create_case(
                    {"prs_FirstName": "Mirelka", "prs_SecondName": "Dovanto"},
                    "",
                    [(NeedCategory.MEDICAL, NeedStatus.IDENTIFIED)],
                )["case_id"]
            )
            made = client.backup(None)
            # After the backup: the survivor's data goes to the clinic.
            referral_id = _refer(client, case_id)
            wait_for(
                lambda: (
                    "DISCLOSURE_EVENT_REFERRAL_DELIVERED"
                    in {d["event"] for d in client.disclosures(case_id)}
                ),
                "the delivery",
            )
            before = client.disclosures(case_id)
        site.stop()
        engine = open_database(site.url)
        try:
            restore_backup(site.home, engine, Path(made["path"]), PASSPHRASE)
        finally:
            engine.dispose()
        site.start()

        with site.client() as client:
            # The referral row itself came back as it was at the backup, but the accounting
            # of disclosures kept every entry made after it.
            assert client.disclosures(case_id) == before
            shown = client.audit_entries(case_id=case_id)
            assert {"referral.sent", "referral.delivered"} <= {e["action"] for e in shown}
            assert any(referral_id in e["detail"] for e in shown)
            restored = client.audit_entries(actions=["node.restored"])
            assert len(restored) == 1 and restored[0]["actor"] == "system:restore"
            assert restored[0]["seq"] > max(e["seq"] for e in shown)
            report = client.verify_audit()
        assert report["intact"], report["problems"]
        assert report["checkpoint"] != "none"
    finally:
        clinic.stop()


def test_a_log_truncated_behind_its_checkpoint_is_reported_naming_the_checkpoint(
    site: Site,
) -> None:
    ids = site.seed(3)
    with site.client() as client:
        for case_id in ids:
            client.get_case(case_id)
        client.erase_case(ids[0], "survivor asked")  # sensitive: checkpointed at once
    site.worker.step()
    broker_store = BrokerEscrowStore(site.broker.running.store.engine)
    checkpoint = broker_store.latest_checkpoint(AGENCY)
    assert checkpoint is not None
    with site.client() as client:
        assert client.verify_audit()["intact"]
        number = int(client.verify_audit()["checkpoint"].split()[0].lstrip("#"))
    site.stop()

    # Someone with the database drops the newest entries, the head row and the home's copy.
    ((head,),) = site.sql("SELECT seq FROM audit_head")
    keep = head - 3  # the erasure and the reads before it
    site.sql("DELETE FROM audit_log WHERE seq > :k", k=keep)
    ((entry_hash,),) = site.sql("SELECT entry_hash FROM audit_log WHERE seq = :k", k=keep)
    site.sql("UPDATE audit_head SET seq = :k, entry_hash = :h", k=keep, h=bytes(entry_hash))
    (site.home / "audit-head").unlink()
    site.start()

    with site.client() as client:
        report = client.verify_audit()
        assert client.status()["escrow"] == "rolled_back"
    assert not report["intact"]
    named = [p for p in report["problems"] if f"broker checkpoint #{number}" in p]
    assert named and "rolled back" in named[0], report["problems"]
    # The evidence at the broker was not overwritten by the rewound log.
    site.worker.step()
    assert broker_store.latest_checkpoint(AGENCY) == checkpoint


def test_a_log_rewound_under_the_running_node_is_caught_and_not_checkpointed(
    site: Site,
) -> None:
    site.seed(2)
    site.worker.step()
    with site.client() as client:
        client.audit_entries()
    checkpoint = BrokerEscrowStore(site.broker.running.store.engine).latest_checkpoint(AGENCY)
    ((head,),) = site.sql("SELECT seq FROM audit_head")
    site.sql("DELETE FROM audit_log WHERE seq > :k", k=head - 2)
    ((entry_hash,),) = site.sql("SELECT entry_hash FROM audit_log WHERE seq = :k", k=head - 2)
    site.sql("UPDATE audit_head SET seq = :k, entry_hash = :h", k=head - 2, h=bytes(entry_hash))

    site.worker.step()
    with site.client() as client:
        assert client.status()["escrow"] == "rolled_back"
        refused = attempt(client.list_cases, None, None, None, False, 10)
        assert refused.kind is ErrorKind.INTEGRITY, refused
        report = client.verify_audit()
    assert not report["intact"]
    assert BrokerEscrowStore(site.broker.running.store.engine).latest_checkpoint(AGENCY) == (
        checkpoint
    )


def test_audit_show_says_who_opened_a_case_and_when_for_administrators_only(
    site: Site, tmp_path: Path
) -> None:
    ids = site.seed(2)
    ana = _staff_home(site, "Ana Ruiz", StaffRole.CASEWORKER, tmp_path / "ana")
    started = dt.datetime.now(dt.UTC)
    with NodeClient(ana, unlock=lambda: CASEWORKER_PASSPHRASE) as client:
        client.get_case(ids[0])
        client.get_case(ids[1])
        refused = attempt(client.audit_entries, ids[0])
        assert isinstance(refused, PermissionDenied), refused
    with site.client() as admin:
        opened = admin.audit_entries(case_id=ids[0], actions=["case.read"])
        assert [(e["actor"], e["case_id"]) for e in opened] == [("staff:Ana Ruiz", ids[0])]
        assert opened[0]["at"] >= started
        assert {e["case_id"] for e in admin.audit_entries(actor="Ana Ruiz")} >= set(ids)
        assert admin.audit_entries(since=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)) == []
        everything = admin.audit_entries()
        assert [e["seq"] for e in everything] == sorted(e["seq"] for e in everything)
        assert len(admin.audit_entries(limit=3)) == 3
        # No survivor field is ever in an entry.
        for record in site.records:
            assert not any(record["prs_Email"] in e["detail"] for e in everything)
