"""Consent-gated referrals end to end: one real broker and real enrolled nodes on loopback, each
with its relay worker (DESIGN.md section 6)."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlmodel import Session, select

from node.client import NodeClient
from node.referrals.model import ReferralDetail
from node.store.tables import IncomingReferralRow, OutboxRow
from tessera import labels
from tessera.errors import Refused
from tessera.needs import NeedCategory
from tests.support import (
    BackgroundBroker,
    BackgroundNode,
    enrolled_node,
    make_broker,
    unlock,
    wait_for,
)

T = TypeVar("T")

HARBOUR, LIGHTHOUSE, MERIDIAN = "harbour-shelter", "lighthouse-clinic", "meridian-legal"
FIELDS = {
    "prs_FirstName": "Mirelka",
    "prs_SecondName": "Dovanto",
    "prs_Email": "mirelka@example.org",
    "prs_MobilePhone": "+441234567890",
    "prs_Gender": "Feminine",
}
NEXT_YEAR = dt.date.today() + dt.timedelta(days=365)


@dataclass
class Net:
    root: Path
    broker: BackgroundBroker
    nodes: dict[str, BackgroundNode]

    def client(self, agency_id: str) -> NodeClient:
        return NodeClient(self.nodes[agency_id].settings.home, unlock=unlock)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    root = tmp_path_factory.mktemp("referrals")
    broker = BackgroundBroker(make_broker(root / "broker"))
    nodes: dict[str, BackgroundNode] = {}
    try:
        settings = [enrolled_node(broker, root, a) for a in (HARBOUR, LIGHTHOUSE, MERIDIAN)]
        for s in settings:
            nodes[s.home.name] = BackgroundNode(s)
        yield Net(root, broker, nodes)
    finally:
        for node in nodes.values():
            node.stop()
        broker.stop()


def new_case(client: NodeClient, need: NeedCategory = NeedCategory.MEDICAL) -> str:
    from tessera.needs import NeedStatus

    case = client.create_case(FIELDS, "", [(need, NeedStatus.IDENTIFIED)])
    return str(case.case_id)


def grant(
    client: NodeClient,
    case_id: str,
    to: str = LIGHTHOUSE,
    need: NeedCategory = NeedCategory.MEDICAL,
    share: tuple[str, ...] = ("identity",),
) -> str:
    consent = client.grant_consent(case_id, to, need, share, NEXT_YEAR, "verbal")
    return str(consent.consent_id)


def need_status(client: NodeClient, case_id: str, need: NeedCategory) -> str:
    case = client.get_case(case_id)
    return next(str(n.status) for n in case.needs if n.category == need.value)


def outgoing_state(client: NodeClient, referral_id: str) -> str:
    rows = [r for r in client.referrals("outgoing") if r.referral_id == referral_id]
    return str(rows[0].state) if rows else ""


def incoming_row(node: BackgroundNode, referral_id: str) -> IncomingReferralRow | None:
    with Session(node.running.store.engine) as session:
        return session.get(IncomingReferralRow, referral_id)


def outbox_rows(node: BackgroundNode) -> list[OutboxRow]:
    with Session(node.running.store.engine) as session:
        return list(session.exec(select(OutboxRow)).all())


def received(net: Net, agency_id: str, referral_id: str) -> ReferralDetail:
    with net.client(agency_id) as client:
        wait_for(
            lambda: [r for r in client.inbox(True) if r.referral_id == referral_id],
            f"referral {referral_id} at {agency_id}",
        )
        return client.show_referral(referral_id)


def test_a_consented_referral_arrives_with_exactly_the_consented_fields(net: Net) -> None:
    with net.client(HARBOUR) as harbour:
        case_id = new_case(harbour)
        consent_id = grant(harbour, case_id)
        sent = harbour.send_referral(
            case_id, LIGHTHOUSE, NeedCategory.MEDICAL, consent_id=consent_id
        )
        assert sent.state in {"queued", "sent"}
        shown = received(net, LIGHTHOUSE, sent.referral_id)
        assert shown.fields == {"prs_FirstName": "Mirelka", "prs_SecondName": "Dovanto"}
        assert shown.direction == "incoming"
        assert shown.agency_id == HARBOUR
        wait_for(lambda: outgoing_state(harbour, sent.referral_id) == "delivered", "DELIVERED")
        assert need_status(harbour, case_id, NeedCategory.MEDICAL) == "referred"
        # The accounting of disclosures lists the send and the delivery, with field names only.
        events = [(d.event, tuple(d.fields)) for d in harbour.disclosures(case_id)]
        assert ("DISCLOSURE_EVENT_REFERRAL_SENT", ("prs_FirstName", "prs_SecondName")) in events
        assert "DISCLOSURE_EVENT_REFERRAL_DELIVERED" in {e for e, _ in events}
    # The third agency received nothing.
    with net.client(MERIDIAN) as meridian:
        assert meridian.inbox(True) == []


def test_without_consent_nothing_leaves_the_node(net: Net) -> None:
    harbour_node = net.nodes[HARBOUR]
    with net.client(HARBOUR) as harbour:
        case_id = new_case(harbour)
        before = len(harbour.referrals("outgoing"))
        with pytest.raises(Refused):
            harbour.send_referral(case_id, LIGHTHOUSE, NeedCategory.MEDICAL)
        # A consent for another recipient, or too narrow for the fields asked, refuses too.
        consent_id = grant(harbour, case_id, to=MERIDIAN)
        with pytest.raises(Refused):
            harbour.send_referral(case_id, LIGHTHOUSE, NeedCategory.MEDICAL, consent_id=consent_id)
        consent_id = grant(harbour, case_id)
        with pytest.raises(Refused):
            harbour.send_referral(
                case_id,
                LIGHTHOUSE,
                NeedCategory.MEDICAL,
                consent_id=consent_id,
                fields=["prs_Email"],
            )
        assert len(harbour.referrals("outgoing")) == before
        assert [r for r in outbox_rows(harbour_node) if r.kind == "referral"] == []


def test_answers_travel_back_and_move_the_need(net: Net) -> None:
    with net.client(HARBOUR) as harbour, net.client(LIGHTHOUSE) as lighthouse:
        accepted_case = new_case(harbour)
        declined_case = new_case(harbour)
        ids = []
        for case_id in (accepted_case, declined_case):
            consent_id = grant(harbour, case_id)
            sent = harbour.send_referral(
                case_id, LIGHTHOUSE, NeedCategory.MEDICAL, consent_id=consent_id
            )
            ids.append(sent.referral_id)
            received(net, LIGHTHOUSE, sent.referral_id)
        accept_id, decline_id = ids
        assert lighthouse.answer_referral(accept_id, "accept").state == "accepted"
        assert lighthouse.answer_referral(decline_id, "decline", "no_capacity").state == "declined"
        wait_for(
            lambda: need_status(harbour, accepted_case, NeedCategory.MEDICAL) == "in_progress",
            "in_progress",
        )
        wait_for(
            lambda: need_status(harbour, declined_case, NeedCategory.MEDICAL) == "unmet",
            "unmet",
        )
        declined = [r for r in harbour.referrals("outgoing") if r.referral_id == decline_id]
        assert declined[0].decline_reason == "no_capacity"
        assert lighthouse.answer_referral(accept_id, "complete").state == "completed"
        wait_for(lambda: need_status(harbour, accepted_case, NeedCategory.MEDICAL) == "met", "met")
        assert outgoing_state(harbour, accept_id) == "completed"


def test_revoking_after_delivery_purges_at_the_recipient_and_is_confirmed(net: Net) -> None:
    with net.client(HARBOUR) as harbour:
        case_id = new_case(harbour)
        consent_id = grant(harbour, case_id, share=("identity", "contact"))
        sent = harbour.send_referral(
            case_id, LIGHTHOUSE, NeedCategory.MEDICAL, consent_id=consent_id
        )
        referral_id = sent.referral_id
        assert received(net, LIGHTHOUSE, referral_id).fields["prs_Email"] == FIELDS["prs_Email"]
        wait_for(lambda: outgoing_state(harbour, referral_id) == "delivered", "DELIVERED")
        revoked = harbour.revoke_consent(consent_id)
        assert revoked.state == "revoked"
        assert revoked.revoked_referrals == (referral_id,)
        wait_for(lambda: outgoing_state(harbour, referral_id) == "purged", "PURGED")
        confirmed = [
            d for d in harbour.disclosures(case_id) if d.event == "DISCLOSURE_EVENT_PURGE_CONFIRMED"
        ]
        assert confirmed and "prs_Email" in confirmed[0].fields
        audit = net.nodes[HARBOUR].running.store.audit_entries(case_id, ("purge.confirmed",))
        assert len(audit) == 1
    row = incoming_row(net.nodes[LIGHTHOUSE], referral_id)
    assert row is not None
    assert row.state == "purged" and row.ciphertext == b"" and row.wrapped_key == b""
    with net.client(LIGHTHOUSE) as lighthouse:
        assert lighthouse.show_referral(referral_id).fields == {}


def test_revoking_before_delivery_means_it_is_never_delivered(net: Net) -> None:
    late = enrolled_node(net.broker, net.root, "delta-house")
    with net.client(HARBOUR) as harbour:
        case_id = new_case(harbour)
        consent_id = grant(harbour, case_id, to="delta-house")
        sent = harbour.send_referral(
            case_id, "delta-house", NeedCategory.MEDICAL, consent_id=consent_id
        )
        referral_id = sent.referral_id
        wait_for(lambda: outgoing_state(harbour, referral_id) == "sent", "SENT")
        revoked = harbour.revoke_consent(consent_id)
        assert revoked.envelopes_purged == 1
        node = BackgroundNode(late)  # the recipient comes online only now
        try:
            wait_for(lambda: outgoing_state(harbour, referral_id) == "purged", "PURGED")
            row = incoming_row(node, referral_id)
            assert row is not None and row.state == "purged" and row.need is None
            assert row.ciphertext == b""
            refs = node.running.store.audit_entries(actions=("referral.received",))
            assert refs == []
        finally:
            node.stop()


def test_a_duplicate_send_makes_one_referral(net: Net) -> None:
    with net.client(HARBOUR) as harbour:
        case_id = new_case(harbour)
        consent_id = grant(harbour, case_id)
        key = str(uuid.uuid4())
        first = harbour.send_referral(
            case_id, LIGHTHOUSE, NeedCategory.MEDICAL, consent_id=consent_id, idempotency_key=key
        )
        second = harbour.send_referral(
            case_id, LIGHTHOUSE, NeedCategory.MEDICAL, consent_id=consent_id, idempotency_key=key
        )
        assert first.referral_id == second.referral_id
        received(net, LIGHTHOUSE, first.referral_id)
        mine = [r for r in harbour.referrals("outgoing", case_id=case_id)]
        assert len(mine) == 1
        sends = [
            d for d in harbour.disclosures(case_id) if d.event == "DISCLOSURE_EVENT_REFERRAL_SENT"
        ]
        assert len(sends) == 1
    with net.client(LIGHTHOUSE) as lighthouse:
        assert [r.referral_id for r in lighthouse.inbox(True)].count(first.referral_id) == 1


def test_forged_and_tampered_envelopes_are_refused_and_dropped(net: Net) -> None:
    from node import directory_sync
    from node.keyring import open_keyring
    from tessera import crypto
    from tests.support import PASSPHRASE, Agency, seal, send

    def agency(agency_id: str) -> Agency:
        home = net.nodes[agency_id].settings.home
        identity = open_keyring(home, PASSPHRASE).identity
        return Agency(home, agency_id, identity, directory_sync.load_link(home))

    meridian, lighthouse = agency(MERIDIAN), agency(LIGHTHOUSE)
    genuine = bytearray(seal(meridian, lighthouse, b"\x0a\x03abc"))
    genuine[len(genuine) // 2] ^= 0x01  # tampered on the way
    impostor = crypto.Identity.generate()  # signs as Meridian without Meridian's key
    forged = crypto.seal(
        impostor,
        directory_sync.sync(meridian.home, meridian.identity, meridian.link)
        .records[LIGHTHOUSE]
        .identity,
        labels.LABEL_ENVELOPE,
        b"\x0a\x03abc",
    )
    for sealed in (b"not an envelope", bytes(genuine), forged):
        send(meridian, lighthouse, b"", str(uuid.uuid4()), sealed=sealed)
    store = net.nodes[LIGHTHOUSE].running.store

    def refusals() -> list[Any]:
        return [
            e
            for e in store.audit_entries(actions=("envelope.refused",))
            if e.detail.get("sender_id") == MERIDIAN
        ]

    wait_for(lambda: len(refusals()) >= 3, "three refusals")
    time.sleep(1.0)  # acknowledged: none of them comes back
    assert len(refusals()) == 3
    with net.client(LIGHTHOUSE) as client:
        assert [r for r in client.inbox(True) if r.agency_id == MERIDIAN] == []


def test_the_cli_grants_sends_answers_and_accounts(net: Net) -> None:
    import json

    from tests.test_node_cli import tessera

    harbour_home = net.nodes[HARBOUR].settings.home
    lighthouse_home = net.nodes[LIGHTHOUSE].settings.home
    with net.client(HARBOUR) as harbour:
        case_id = new_case(harbour)
    refused = tessera(
        harbour_home, "referral", "send", case_id, "--to", LIGHTHOUSE, "--need", "medical"
    )
    assert refused.returncode == 8 and "consent" in refused.stderr
    granted = tessera(
        harbour_home,
        "consent",
        "grant",
        case_id,
        "--to",
        LIGHTHOUSE,
        "--purpose",
        "medical",
        "--share",
        "identity",
        "--expires",
        NEXT_YEAR.isoformat(),
        "--method",
        "written",
        "--format",
        "json",
    )
    assert granted.returncode == 0, granted.stderr
    consent_id = json.loads(granted.stdout)["consent_id"]
    listed = tessera(harbour_home, "consent", "list", case_id, "--format", "json")
    assert [c["consent_id"] for c in json.loads(listed.stdout)] == [consent_id]
    sent = tessera(
        harbour_home,
        "referral",
        "send",
        case_id,
        "--to",
        LIGHTHOUSE,
        "--need",
        "medical",
        "--format",
        "json",
    )
    assert sent.returncode == 0, sent.stderr
    referral_id = json.loads(sent.stdout)["referral_id"]
    received(net, LIGHTHOUSE, referral_id)
    inbox = tessera(lighthouse_home, "referral", "inbox", "--format", "json")
    assert referral_id in {r["referral_id"] for r in json.loads(inbox.stdout)}
    shown = tessera(lighthouse_home, "referral", "show", referral_id, "--format", "json")
    assert json.loads(shown.stdout)["fields"]["prs_FirstName"] == "Mirelka"
    declined = tessera(
        lighthouse_home, "referral", "decline", referral_id, "--reason", "not_eligible"
    )
    assert declined.returncode == 0, declined.stderr
    with net.client(HARBOUR) as harbour:
        wait_for(lambda: outgoing_state(harbour, referral_id) == "declined", "DECLINED")
    listed = tessera(harbour_home, "referral", "list", "--case", case_id, "--format", "json")
    assert json.loads(listed.stdout)[0]["decline_reason"] == "not_eligible"
    accounting = tessera(harbour_home, "case", "disclosures", case_id, "--format", "json")
    assert "DISCLOSURE_EVENT_REFERRAL_SENT" in {d["event"] for d in json.loads(accounting.stdout)}
    revoked = tessera(harbour_home, "consent", "revoke", consent_id, "--format", "json")
    assert json.loads(revoked.stdout)["state"] == "revoked"


def test_the_cli_offers_exactly_the_decline_reasons_the_envelopes_carry() -> None:
    from cli.referral import Reason
    from node.envelopes import DeclineReason

    assert [r.value for r in Reason] == [r.value for r in DeclineReason]
