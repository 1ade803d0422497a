"""The referral store, honest and attacked (DESIGN.md sections 4 to 6; node.referrals).

A consent and a referral are written with everything that goes with them in one transaction or
not at all; a retried send never makes a second referral; statuses move referrals and needs only
forward and each message applies once; an incoming referral is never on disk in clear, is stored
once however often it is redelivered, fails loudly when altered, and after a revocation leaves
only a tombstone, with its key gone from the database file itself. Every envelope here is built
and opened by the real pure core (node.consent, node.envelopes); the databases are real SQLite
files and real PostgreSQL databases.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import event

from node import serde
from node.backup import create_backup, read_ledger, restore_backup
from node.consent import (
    Consent,
    ConsentMethod,
    ConsentRefused,
    Refusal,
    commitment,
    minimise,
    receipt_blob,
)
from node.envelopes import (
    DeclineReason,
    ReceivedPurgeConfirmation,
    ReceivedReferral,
    ReceivedRevocation,
    ReceivedStatus,
    ReferralStatus,
    open_envelope,
    purge_confirmation_envelope,
    referral_envelope,
    revocation_envelope,
    status_envelope,
)
from node.htcds.synthetic import synthetic_records
from node.referrals.model import (
    OutboxKind,
    OutgoingEnvelope,
    OutgoingReferral,
    ReferralState,
)
from node.referrals.stores import ReferralStores
from node.store.cases import NewCase
from tessera import crypto
from tessera.directory import AgencyRecord
from tessera.errors import Conflict, InvalidInput, NotFound, Refused, TamperedCiphertext
from tessera.needs import NeedCategory, NeedStatus
from tessera.v1 import node_pb2 as node_pb
from tests.nodefixtures import (
    PASSPHRASE,
    Node,
    NodeFactory,
    db_url_fixture,  # noqa: F401  (fixture)
    flip_byte,
    found_in,
    identifying_values,
    nodes_fixture,  # noqa: F401  (fixture)
    pg_dump_data,
)

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
ALICE_ID, BOB_ID, MALLORY_ID = "shelter-north-01", "legal-aid-02", "clinic-03"
# The agencies outside the node under test (fixed seeds); the node's own keys come from its home.
ALICE = crypto.Identity.from_seed(bytes([21]) * 32)
BOB = crypto.Identity.from_seed(bytes([22]) * 32)
MALLORY = crypto.Identity.from_seed(bytes([23]) * 32)
NEED = NeedCategory.IMMIGRATION
# Survivor data of the incoming referrals: distinctive, so a byte search cannot miss or misfire.
CANARY_FIELDS = {
    "prs_FirstName": "Zorbanelle",
    "prs_SecondName": "Quintavessa",
    "prs_Email": "zq.canary@example.org",
    "prs_MobilePhone": "+44 7700 900123",
    "prs_MailingStreet": "17 Larkspur Canary Row",
}
NOTE = "Speaks Tigrinya; prefers Thursday mornings at Wexcombe Hall."
CONTACT = "ana.ortiz.contact@shelter-north.example"
DECLINE_TEXT = "Our Vantrell office lost its only immigration lawyer."


def agency(identity: crypto.Identity, agency_id: str) -> AgencyRecord:
    return AgencyRecord(
        agency_id=agency_id,
        name=agency_id.title(),
        region="north",
        services=("immigration", "legal_civil"),
        identity=identity.public,
        valid_from=NOW - dt.timedelta(days=365),
        valid_until=None,
        revoked=False,
        sequence=1,
    )


def new_id() -> str:
    return str(uuid.uuid4())


def count(node: Node, table: str, where: str = "", **params: Any) -> int:
    clause = f" WHERE {where}" if where else ""
    return int(node.sql(f"SELECT COUNT(*) FROM {table}{clause}", **params)[0][0])


def actions(node: Node, action: str) -> int:
    return len(node.store.audit_entries(actions=(action,)))


def raw_bytes(node: Node) -> bytes:
    """What an attacker with the disk gets: the SQLite file and WAL, or a pg_dump."""
    return node.disk_bytes() if node.is_sqlite else pg_dump_data(node.url)


def raw_forms(value: bytes) -> list[bytes]:
    """How bytes sit in the raw data: as they are (SQLite) or hex-escaped (pg_dump bytea)."""
    return [value, value.hex().encode()]


REFERRAL_TABLES = {
    "consent": "consent_id",
    "outgoing_referral": "referral_id",
    "outbox": "id",
    "incoming_referral": "referral_id",
    "processed_message": "message_id",
    "referral_event": "id",
    "need": "id",
}

# The referral tables and the audit log: what a write that failed must have left untouched.
WITH_AUDIT = {**REFERRAL_TABLES, "audit_log": "seq"}


def referral_rows(node: Node, tables: Mapping[str, str] = REFERRAL_TABLES) -> dict[str, list[Any]]:
    return {
        table: [tuple(r) for r in node.sql(f"SELECT * FROM {table} ORDER BY {key}")]
        for table, key in tables.items()
    }


# --- the sending node (Alice's shelter, referring to Bob's legal aid) --------------------------


@dataclass
class Sender:
    node: Node
    store: ReferralStores
    case_id: str
    fields: dict[str, str]

    @property
    def identity(self) -> crypto.Identity:
        return self.node.keyring.identity

    @property
    def record(self) -> AgencyRecord:
        return agency(self.identity, ALICE_ID)

    def consent(self, categories: tuple[str, ...] = ("identity", "demographics")) -> Consent:
        return Consent(
            consent_id=new_id(),
            case_id=self.case_id,
            recipient_agency_id=BOB_ID,
            purpose=NEED,
            categories=frozenset(categories),
            method=ConsentMethod.WRITTEN,
            witnessed_by="staff:Ana Ortiz",
            granted_at=NOW - dt.timedelta(days=1),
            expires_at=NOW + dt.timedelta(days=30),
            revoked_at=None,
            survivor_pseudonym=self.store.consents.survivor_pseudonym(self.case_id, BOB_ID),
        )

    def grant(self, categories: tuple[str, ...] = ("identity", "demographics")) -> Consent:
        """A new consent for Bob, recorded at this node."""
        return self.store.consents.grant("staff:maria", self.consent(categories))

    def send(
        self,
        consent: Consent,
        *,
        key: str | None = None,
        referral_id: str | None = None,
        message_id: str | None = None,
        case_id: str | None = None,
    ) -> OutgoingReferral:
        receipt = receipt_blob(self.identity, ALICE_ID, consent)
        fields = minimise(self.fields, consent)
        referral_id = referral_id or new_id()
        message_id = message_id or new_id()
        sealed = referral_envelope(
            self.identity,
            ALICE_ID,
            agency(BOB, BOB_ID),
            referral_id,
            NEED,
            fields,
            "",
            receipt,
            NOW,
            message_id,
        )
        return self.store.outgoing.record_sent(
            "staff:maria",
            referral_id,
            case_id or self.case_id,
            consent,
            BOB_ID,
            "Legal Aid North",
            NEED,
            list(fields),
            key or new_id(),
            sealed,
            message_id,
            consent_commitment=commitment(receipt),
            now=NOW,
        )

    def status_from_bob(
        self,
        referral_id: str,
        status: ReferralStatus,
        reason: DeclineReason | None = None,
        text: str = "",
        *,
        signer: crypto.Identity = BOB,
        signer_id: str = BOB_ID,
        message_id: str | None = None,
    ) -> ReceivedStatus:
        sealed = status_envelope(
            signer,
            signer_id,
            self.record,
            referral_id,
            status,
            reason,
            text,
            NOW,
            message_id or new_id(),
        )
        opened = open_envelope(self.identity, ALICE_ID, agency(signer, signer_id), sealed, NOW)
        assert isinstance(opened, ReceivedStatus)
        return opened

    def apply(self, status: ReceivedStatus) -> OutgoingReferral:
        return self.store.outgoing.apply_status(
            "system:relay",
            status.referral_id,
            status.sender_agency_id,
            status.status,
            status.decline_reason,
            status.decline_text,
            status.message_id,
        )

    def need_status(self) -> str:
        # Needs are sealed under the survivor's key (node.store.needs): read them as stored.
        (need,) = [n for n in self.node.store.summary(self.case_id).needs if n.category is NEED]
        return need.status.value


def make_sender(nodes: NodeFactory, db_url: str) -> Sender:
    node = nodes.make(db_url, name="alice")
    fields = synthetic_records(1, seed=5)[0]
    (case_id,) = node.store.create_cases(
        "staff:maria", [NewCase(fields=fields, needs=((NEED, NeedStatus.IDENTIFIED),))]
    )
    return Sender(node, ReferralStores(node.store), case_id, fields)


# --- the receiving node (Bob's legal aid, referred to by Alice's shelter) ----------------------


@dataclass
class Receiver:
    node: Node
    store: ReferralStores

    @property
    def identity(self) -> crypto.Identity:
        return self.node.keyring.identity

    @property
    def record(self) -> AgencyRecord:
        return agency(self.identity, BOB_ID)

    def referral(
        self,
        *,
        referral_id: str | None = None,
        message_id: str | None = None,
        consent_id: str | None = None,
        sender: crypto.Identity = ALICE,
        sender_id: str = ALICE_ID,
    ) -> ReceivedReferral:
        """A referral another agency sealed to this node, opened and verified as the servicer
        would."""
        consent = Consent(
            consent_id=consent_id or new_id(),
            case_id="case-at-alice-0042",
            recipient_agency_id=BOB_ID,
            purpose=NEED,
            categories=frozenset({"identity", "contact", "notes"}),
            method=ConsentMethod.VERBAL,
            witnessed_by="staff:Ana Ortiz",
            granted_at=NOW - dt.timedelta(days=1),
            expires_at=NOW + dt.timedelta(days=30),
            revoked_at=None,
            survivor_pseudonym="psn-" + uuid.uuid4().hex,
        )
        receipt = receipt_blob(sender, sender_id, consent)
        sealed = referral_envelope(
            sender,
            sender_id,
            self.record,
            referral_id or new_id(),
            NEED,
            minimise(CANARY_FIELDS, consent),
            NOTE,
            receipt,
            NOW,
            message_id or new_id(),
            sender_contact=CONTACT,
        )
        opened = open_envelope(
            self.identity,
            BOB_ID,
            agency(sender, sender_id),
            sealed,
            NOW,
            delivery_commitment=commitment(receipt),
        )
        assert isinstance(opened, ReceivedReferral)
        return opened

    def status(self, referral_id: str, status: ReferralStatus, **kw: Any) -> OutgoingEnvelope:
        message_id = new_id()
        sealed = status_envelope(
            self.identity,
            BOB_ID,
            agency(ALICE, ALICE_ID),
            referral_id,
            status,
            kw.get("reason"),
            kw.get("text", ""),
            NOW,
            message_id,
        )
        return OutgoingEnvelope(ALICE_ID, message_id, sealed)

    def revocation(
        self,
        received: ReceivedReferral,
        *,
        sender: crypto.Identity = ALICE,
        sender_id: str = ALICE_ID,
        message_id: str | None = None,
    ) -> ReceivedRevocation:
        sealed = revocation_envelope(
            sender,
            sender_id,
            self.record,
            received.referral_id,
            received.receipt.consent_id,
            NOW,
            NOW,
            message_id or new_id(),
        )
        opened = open_envelope(self.identity, BOB_ID, agency(sender, sender_id), sealed, NOW)
        assert isinstance(opened, ReceivedRevocation)
        return opened

    def confirmer(
        self, revocation: ReceivedRevocation
    ) -> Callable[[tuple[str, ...]], OutgoingEnvelope]:
        def confirm(names: tuple[str, ...]) -> OutgoingEnvelope:
            message_id = new_id()
            sealed = purge_confirmation_envelope(
                self.identity,
                BOB_ID,
                agency(ALICE, ALICE_ID),
                revocation.referral_id,
                revocation.consent_id,
                names,
                NOW,
                NOW,
                message_id,
            )
            return OutgoingEnvelope(ALICE_ID, message_id, sealed)

        return confirm

    def ciphertext(self, referral_id: str) -> tuple[bytes, bytes, int]:
        ((ciphertext, wrapped_key, version),) = self.node.sql(
            "SELECT ciphertext, wrapped_key, version FROM incoming_referral WHERE referral_id = :r",
            r=referral_id,
        )
        return bytes(ciphertext), bytes(wrapped_key), int(version)

    def set_ciphertext(self, referral_id: str, **values: Any) -> None:
        assignments = ", ".join(f"{name} = :{name}" for name in values)
        self.node.sql(
            f"UPDATE incoming_referral SET {assignments} WHERE referral_id = :r",
            r=referral_id,
            **values,
        )


def make_receiver(nodes: NodeFactory, db_url: str) -> Receiver:
    node = nodes.make(db_url, name="bob")
    return Receiver(node, ReferralStores(node.store))


def block_outbox_key(node: Node, key: str) -> None:
    """Queue an unrelated envelope under ``key``, so the next outbox insert with that
    idempotency key violates its unique constraint: a write that fails after its other rows."""
    node.sql(
        "INSERT INTO outbox (kind, referral_id, recipient_id, idempotency_key, "
        "consent_commitment, sealed, attempts, last_error, created_at) "
        "VALUES ('status_update', :r, :to, :k, :b, :b, 0, '', :t)",
        r=new_id(),
        to=BOB_ID,
        k=key,
        b=b"",
        t=NOW,
    )


@contextmanager
def statements(node: Node) -> Iterator[list[str]]:
    """Every SQL statement the node's engine sends while the block runs."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(" ".join(statement.split()))

    event.listen(node.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(node.engine, "before_cursor_execute", record)


# --- consents ---------------------------------------------------------------------------------


def test_consents_are_granted_listed_and_revoked_without_survivor_fields(
    nodes: NodeFactory,
) -> None:
    alice = make_sender(nodes, "")
    store = alice.store
    pseudonym = store.consents.survivor_pseudonym(alice.case_id, BOB_ID)
    # Keyed, stable and per recipient; valid as node.consent requires.
    assert pseudonym == store.consents.survivor_pseudonym(alice.case_id, BOB_ID)
    assert pseudonym != store.consents.survivor_pseudonym(alice.case_id, MALLORY_ID)
    assert pseudonym != store.consents.survivor_pseudonym(alice.case_id)
    other_node = ReferralStores(nodes.make(name="other").store)
    assert other_node.consents.survivor_pseudonym(alice.case_id, BOB_ID) != pseudonym
    assert len(pseudonym) == 64 and alice.case_id not in pseudonym

    first = store.consents.grant("staff:maria", alice.consent())
    second = store.consents.grant("staff:maria", alice.consent(("identity", "contact")))
    assert store.consents.get(first.consent_id) == first
    assert {c.consent_id for c in store.consents.of_case(alice.case_id)} == {
        first.consent_id,
        second.consent_id,
    }
    assert store.consents.of_case("no-such-case") == []
    # A retried grant returns the same consent and records nothing more.
    assert store.consents.grant("staff:maria", first) == first
    assert actions(alice.node, "consent.grant") == 2
    with pytest.raises(Conflict):
        store.consents.grant(
            "staff:maria",
            Consent(**{**first.__dict__, "expires_at": NOW + dt.timedelta(days=90)}),
        )
    with pytest.raises(NotFound):
        store.consents.grant("staff:maria", Consent(**{**first.__dict__, "case_id": new_id()}))
    with pytest.raises(InvalidInput):
        store.consents.grant("staff:maria", Consent(**{**first.__dict__, "revoked_at": NOW}))

    # A consent row holds ids, codes and the pseudonym: no survivor field.
    values = identifying_values([alice.fields])
    assert values
    for row in alice.node.sql("SELECT * FROM consent"):
        assert found_in(repr(tuple(row)).encode(), values) == []

    revoked, referrals = store.revoke_consent("staff:maria", first.consent_id, NOW)
    assert revoked.revoked_at == NOW and referrals == []
    assert store.consents.get(first.consent_id).revoked
    # Revoking again changes nothing (revocation is never undone, nor repeated).
    again, _ = store.revoke_consent("staff:maria", first.consent_id, NOW + dt.timedelta(hours=1))
    assert again.revoked_at == NOW
    assert actions(alice.node, "consent.revoke") == 1
    with pytest.raises(NotFound):
        store.revoke_consent("staff:maria", new_id(), NOW)

    # An erased survivor gets no new consent.
    alice.node.store.erase_case("admin", alice.case_id)
    with pytest.raises(NotFound, match="erased"):
        store.consents.grant("staff:maria", alice.consent())
    assert alice.node.store.verify_audit().ok


# --- sending ----------------------------------------------------------------------------------


def test_record_sent_writes_referral_outbox_need_and_disclosure_together(
    nodes: NodeFactory, db_url: str
) -> None:
    alice = make_sender(nodes, db_url)
    consent = alice.grant()
    referral = alice.send(consent)

    assert referral.state is ReferralState.QUEUED
    assert referral.fields == tuple(minimise(alice.fields, consent))
    assert [s.state for s in referral.history] == [ReferralState.QUEUED]
    assert alice.need_status() == NeedStatus.REFERRED.value
    (item,) = alice.store.outbox.pending()
    assert item.kind is OutboxKind.REFERRAL and item.recipient_id == BOB_ID
    assert item.idempotency_key == referral.message_id and item.attempts == 0
    assert item.consent_commitment == referral.consent_commitment
    # The outbox holds the sealed envelope exactly: Bob can open it; no survivor field is in clear.
    opened = open_envelope(BOB, BOB_ID, alice.record, item.sealed, NOW)
    assert isinstance(opened, ReceivedReferral) and opened.referral_id == referral.referral_id
    assert found_in(item.sealed, identifying_values([alice.fields])) == []

    # The accounting of disclosures: who received what (field names only), under which consent.
    (entry,) = alice.node.store.disclosures(alice.case_id)
    assert entry.action == "referral.sent" and entry.actor == "staff:maria"
    assert entry.detail["fields"] == list(referral.fields)
    disclosure = serde.disclosure_pb(entry)
    assert disclosure.recipient.agency_id == BOB_ID
    assert disclosure.recipient.name == "Legal Aid North"
    assert (disclosure.referral_id, disclosure.consent_id) == (
        referral.referral_id,
        consent.consent_id,
    )
    assert disclosure.purpose == serde.need_category_pb(NEED)
    assert list(disclosure.fields) == list(referral.fields)
    assert found_in(repr(entry.detail).encode(), identifying_values([alice.fields])) == []

    # The relay worker: the broker accepted it.
    assert alice.store.outbox.mark_sent(item.id, b"relay-receipt-1")
    assert alice.store.outbox.pending() == []
    sent = alice.store.outgoing.get(referral.referral_id)
    assert sent.state is ReferralState.SENT and sent.relay_receipt == b"relay-receipt-1"
    assert alice.store.outgoing.sent(alice.case_id) == [sent]
    assert alice.store.outgoing.sent(consent_id=new_id()) == []
    assert not alice.store.outbox.mark_sent(item.id, b"again")
    assert alice.node.store.verify_audit().ok


def test_a_failure_midway_through_record_sent_writes_nothing(
    nodes: NodeFactory, db_url: str
) -> None:
    alice = make_sender(nodes, db_url)
    consent = alice.grant()
    message_id = new_id()
    # A conflicting outbox row: the last insert of record_sent will violate its unique key.
    block_outbox_key(alice.node, message_id)
    before = referral_rows(alice.node, WITH_AUDIT)

    with statements(alice.node) as sent, pytest.raises(Conflict, match="nothing was written"):
        alice.send(consent, message_id=message_id)
    # It got that far: the referral row and the need were written before the outbox failed.
    inserts = [s.split(" (")[0] for s in sent if s.startswith(("INSERT", "UPDATE"))]
    assert inserts.index("INSERT INTO outgoing_referral") < inserts.index("INSERT INTO outbox")
    assert any(s.startswith("UPDATE need") for s in inserts)
    assert referral_rows(alice.node, WITH_AUDIT) == before
    assert alice.need_status() == NeedStatus.IDENTIFIED.value

    alice.node.sql("DELETE FROM outbox")
    referral = alice.send(consent, message_id=message_id)
    assert referral.state is ReferralState.QUEUED
    assert alice.node.store.verify_audit().ok


def test_a_repeated_idempotency_key_never_makes_a_second_referral(
    nodes: NodeFactory, db_url: str
) -> None:
    alice = make_sender(nodes, db_url)
    consent = alice.grant()
    referral_id, key = new_id(), new_id()
    first = alice.send(consent, key=key, referral_id=referral_id)
    # The retry (say after a lost answer) seals afresh with a new message id: nothing new.
    again = alice.send(consent, key=key, referral_id=referral_id)
    assert again == first
    assert count(alice.node, "outgoing_referral") == 1
    assert count(alice.node, "outbox") == 1
    assert actions(alice.node, "referral.sent") == 1
    # Still the same after the consent was revoked: the referral was recorded before.
    alice.store.revoke_consent("staff:maria", consent.consent_id, NOW)
    assert alice.send(consent, key=key, referral_id=referral_id).referral_id == referral_id
    with pytest.raises(Conflict):
        alice.send(consent, key=key)  # the key of another referral
    assert count(alice.node, "outgoing_referral") == 1

    # Concurrent retries through separate processes' stores: still one referral, no error.
    other = alice.grant()
    senders = [
        Sender(alice.node, ReferralStores(alice.node.another_store()), alice.case_id, alice.fields)
        for _ in range(4)
    ]
    racing_id, racing_key = new_id(), new_id()
    with ThreadPoolExecutor(len(senders)) as pool:
        results = list(
            pool.map(lambda s: s.send(other, key=racing_key, referral_id=racing_id), senders)
        )
    assert all(r == results[0] for r in results)
    assert count(alice.node, "outgoing_referral", "consent_id = :c", c=other.consent_id) == 1
    assert count(alice.node, "outbox", "referral_id = :r", r=racing_id) == 1
    assert alice.node.store.verify_audit().ok


def test_record_sent_refuses_what_the_stored_consent_does_not_cover(nodes: NodeFactory) -> None:
    alice = make_sender(nodes, "")
    narrow = alice.grant(("demographics",))
    wide = alice.consent(("identity", "demographics"))
    # The caller's copy of a consent says more than the stored one: the stored one decides.
    forged = Consent(**{**wide.__dict__, "consent_id": narrow.consent_id})
    with pytest.raises(ConsentRefused) as refused:
        alice.send(forged)
    assert refused.value.reason is Refusal.FIELD_NOT_COVERED
    with pytest.raises(NotFound):
        alice.send(wide)  # never recorded
    (other_case,) = alice.node.store.create_cases("staff:maria", [NewCase(fields={})])
    with pytest.raises(Refused, match="another case"):
        alice.send(narrow, case_id=other_case)
    # Revoked at the node a moment ago, while the caller still holds the unrevoked copy.
    alice.store.revoke_consent("staff:maria", narrow.consent_id, NOW)
    with pytest.raises(ConsentRefused) as refused:
        alice.send(narrow)
    assert refused.value.reason is Refusal.REVOKED
    assert count(alice.node, "outgoing_referral") == count(alice.node, "outbox") == 0
    assert count(alice.node, "referral_event") == actions(alice.node, "referral.sent") == 0
    assert alice.need_status() == NeedStatus.IDENTIFIED.value
    assert alice.node.store.verify_audit().ok


def test_statuses_move_the_referral_and_the_need_forward_once(
    nodes: NodeFactory, db_url: str
) -> None:
    alice = make_sender(nodes, db_url)
    consent = alice.grant()
    referral = alice.send(consent)
    rid = referral.referral_id

    delivered = alice.status_from_bob(rid, ReferralStatus.DELIVERED)
    assert alice.apply(delivered).state is ReferralState.DELIVERED
    assert alice.need_status() == NeedStatus.REFERRED.value
    # The same message again (the relay delivers at least once): nothing happens.
    assert alice.apply(delivered).state is ReferralState.DELIVERED
    assert actions(alice.node, "referral.delivered") == 1

    assert alice.apply(alice.status_from_bob(rid, ReferralStatus.ACCEPTED)).state is (
        ReferralState.ACCEPTED
    )
    assert alice.need_status() == NeedStatus.IN_PROGRESS.value
    # Stale or contradictory statuses are ignored.
    stale = alice.apply(alice.status_from_bob(rid, ReferralStatus.DELIVERED))
    assert stale.state is ReferralState.ACCEPTED
    late_decline = alice.status_from_bob(rid, ReferralStatus.DECLINED, DeclineReason.NO_CAPACITY)
    assert alice.apply(late_decline).state is ReferralState.ACCEPTED
    assert alice.need_status() == NeedStatus.IN_PROGRESS.value

    done = alice.apply(alice.status_from_bob(rid, ReferralStatus.COMPLETED))
    assert done.state is ReferralState.COMPLETED
    assert alice.need_status() == NeedStatus.MET.value
    assert [s.state.value for s in done.history] == [
        "queued",
        "delivered",
        "accepted",
        "completed",
    ]
    # Only the recipient reports a referral's status.
    mallory = alice.status_from_bob(
        rid,
        ReferralStatus.DECLINED,
        DeclineReason.NOT_ELIGIBLE,
        signer=MALLORY,
        signer_id=MALLORY_ID,
    )
    with pytest.raises(Refused):
        alice.apply(mallory)
    with pytest.raises(NotFound):
        alice.apply(alice.status_from_bob(new_id(), ReferralStatus.ACCEPTED))
    assert [e.action for e in alice.node.store.disclosures(alice.case_id)] == [
        "referral.sent",
        "referral.delivered",
    ]
    assert actions(alice.node, "referral.status") == 2
    # Each distinct message from Bob about the referral was recorded once (five; the repeated
    # delivery was not applied twice, and nothing is recorded for an unknown referral).
    assert count(alice.node, "processed_message", "sender_id = :s", s=BOB_ID) == 5
    assert alice.node.store.verify_audit().ok


def test_a_decline_makes_the_need_unmet_and_its_text_is_shredded_with_the_survivor(
    nodes: NodeFactory, db_url: str
) -> None:
    alice = make_sender(nodes, db_url)
    consent = alice.grant()
    rid = alice.send(consent).referral_id
    declined = alice.apply(
        alice.status_from_bob(rid, ReferralStatus.DECLINED, DeclineReason.OTHER, DECLINE_TEXT)
    )
    assert declined.state is ReferralState.DECLINED
    assert declined.decline_reason is DeclineReason.OTHER
    assert declined.decline_text == DECLINE_TEXT
    assert DECLINE_TEXT not in repr(declined)
    assert alice.need_status() == NeedStatus.UNMET.value
    assert found_in(raw_bytes(alice.node), [DECLINE_TEXT]) == []
    # Completed after declined is ignored.
    assert alice.apply(alice.status_from_bob(rid, ReferralStatus.COMPLETED)).state is (
        ReferralState.DECLINED
    )

    alice.node.store.erase_case("admin", alice.case_id)
    after = alice.store.outgoing.get(rid)
    assert after.decline_reason is DeclineReason.OTHER and after.decline_text == ""
    assert alice.node.store.verify_audit().ok


def test_a_revocation_withdraws_queued_envelopes_and_closes_with_a_purge_confirmation(
    nodes: NodeFactory,
) -> None:
    alice = make_sender(nodes, "")
    consent = alice.grant()
    sent = alice.send(consent)
    (sent_item,) = alice.store.outbox.pending()
    alice.store.outbox.mark_sent(sent_item.id, b"receipt")
    queued = alice.send(consent)
    assert len(alice.store.outbox.pending()) == 1
    with pytest.raises(Conflict, match="not revoked"):
        alice.store.outgoing.record_revocation_sent("staff:maria", sent.referral_id, b"x", new_id())

    revoked, to_revoke = alice.store.revoke_consent("staff:maria", consent.consent_id, NOW)
    assert revoked.revoked
    assert {r.referral_id for r in to_revoke} == {sent.referral_id, queued.referral_id}
    # The envelope that had not left yet never will.
    assert alice.store.outbox.pending() == []
    assert not alice.store.outbox.mark_sent(sent_item.id + 1, b"late")

    for referral in to_revoke:
        message_id = new_id()
        sealed = revocation_envelope(
            alice.identity,
            ALICE_ID,
            agency(BOB, BOB_ID),
            referral.referral_id,
            consent.consent_id,
            NOW,
            NOW,
            message_id,
        )
        after = alice.store.outgoing.record_revocation_sent(
            "staff:maria", referral.referral_id, sealed, message_id
        )
        assert after.state is ReferralState.REVOKED
        # Repeating it queues nothing more.
        alice.store.outgoing.record_revocation_sent(
            "staff:maria", referral.referral_id, sealed, new_id()
        )
    items = alice.store.outbox.pending()
    assert [i.kind for i in items] == [OutboxKind.REVOCATION] * 2
    assert all(i.consent_commitment == b"" for i in items)
    assert alice.store.revoke_consent("staff:maria", consent.consent_id, NOW)[1] == []

    # Bob purged and confirms; only Bob, and only for that consent.
    def confirmation(signer: crypto.Identity, signer_id: str) -> ReceivedPurgeConfirmation:
        sealed = purge_confirmation_envelope(
            signer,
            signer_id,
            alice.record,
            sent.referral_id,
            consent.consent_id,
            list(sent.fields),
            NOW,
            NOW,
            new_id(),
        )
        opened = open_envelope(alice.identity, ALICE_ID, agency(signer, signer_id), sealed, NOW)
        assert isinstance(opened, ReceivedPurgeConfirmation)
        return opened

    with pytest.raises(Refused):
        alice.store.outgoing.record_purge_confirmation(
            "system:relay", confirmation(MALLORY, MALLORY_ID)
        )
    confirmed = confirmation(BOB, BOB_ID)
    purged = alice.store.outgoing.record_purge_confirmation("system:relay", confirmed)
    assert purged.state is ReferralState.PURGED
    assert alice.store.outgoing.record_purge_confirmation("system:relay", confirmed) == purged
    # Statuses no longer move it.
    assert alice.apply(alice.status_from_bob(sent.referral_id, ReferralStatus.ACCEPTED)).state is (
        ReferralState.PURGED
    )

    events = [serde.disclosure_pb(e) for e in alice.node.store.disclosures(alice.case_id)]
    assert [(d.event, d.referral_id) for d in events] == [
        (node_pb.DISCLOSURE_EVENT_REFERRAL_SENT, sent.referral_id),
        (node_pb.DISCLOSURE_EVENT_REFERRAL_SENT, queued.referral_id),
        (node_pb.DISCLOSURE_EVENT_REVOCATION_SENT, sent.referral_id),
        (node_pb.DISCLOSURE_EVENT_REVOCATION_SENT, queued.referral_id),
        (node_pb.DISCLOSURE_EVENT_PURGE_CONFIRMED, sent.referral_id),
    ]
    assert list(events[-1].fields) == sorted(sent.fields)
    assert alice.node.store.verify_audit().ok


def test_the_outbox_keeps_an_envelope_until_the_broker_accepts_it(nodes: NodeFactory) -> None:
    alice = make_sender(nodes, "")
    consent = alice.grant()
    referral = alice.send(consent)
    (item,) = alice.store.outbox.pending()
    alice.store.outbox.failed(item.id, "broker unavailable: connection refused")
    alice.store.outbox.failed(item.id, "x" * 2000)
    # A restarted node (another engine on the same home and database) finds it still there.
    restarted = ReferralStores(alice.node.another_store())
    (again,) = restarted.outbox.pending()
    assert (again.id, again.sealed, again.attempts) == (item.id, item.sealed, 2)
    assert len(again.last_error) == 500 and again.last_attempt_at is not None
    assert restarted.outbox.mark_sent(item.id, b"receipt")
    assert alice.store.outbox.pending() == []
    assert alice.store.outgoing.get(referral.referral_id).state is ReferralState.SENT
    alice.store.outbox.failed(item.id, "gone")  # no longer there: nothing happens
    assert alice.node.store.verify_audit().ok


# --- receiving --------------------------------------------------------------------------------


def test_an_incoming_referral_is_encrypted_at_rest_and_read_back_audited(
    nodes: NodeFactory, db_url: str
) -> None:
    bob = make_receiver(nodes, db_url)
    received = bob.referral()
    reply = bob.status(received.referral_id, ReferralStatus.DELIVERED)
    stored = bob.store.incoming.store(received, "delivery-0001", reply=reply)
    assert stored.state is ReferralState.DELIVERED and stored.content is None
    assert (stored.sender_id, stored.consent_id, stored.need) == (
        ALICE_ID,
        received.receipt.consent_id,
        NEED,
    )
    secrets_ = [*CANARY_FIELDS.values(), NOTE, CONTACT, received.receipt.survivor_pseudonym]
    data = raw_bytes(bob.node)
    assert found_in(data, [ALICE_ID, received.referral_id]) == [ALICE_ID, received.referral_id]
    assert found_in(data, secrets_) == []
    for entry in bob.node.store.audit_entries():
        assert found_in(repr(entry.detail).encode(), secrets_) == []

    shown = bob.store.incoming.read(received.referral_id, "staff:bea")
    assert shown.content is not None
    assert dict(shown.content.fields) == dict(received.fields)
    assert (shown.content.note, shown.content.sender_contact) == (NOTE, CONTACT)
    assert shown.content.receipt_body == received.receipt.body
    assert shown.content.receipt_signer == ALICE.public.signing_key
    assert found_in(repr(shown).encode(), secrets_) == []
    (read,) = bob.node.store.audit_entries(actions=("referral.read",))
    assert read.actor == "staff:bea"
    (item,) = bob.store.outbox.pending()
    assert (item.kind, item.recipient_id, item.sealed) == (
        OutboxKind.STATUS_UPDATE,
        ALICE_ID,
        reply.sealed,
    )
    assert bob.store.incoming.inbox() == [stored]
    assert bob.store.incoming.inbox([ReferralState.ACCEPTED]) == []
    with pytest.raises(InvalidInput):  # a reply goes to the referral's sender only
        bob.store.incoming.store(
            bob.referral(), "delivery-0002", reply=OutgoingEnvelope(MALLORY_ID, new_id(), b"x")
        )
    assert bob.node.store.verify_audit().ok


def test_a_redelivered_referral_is_stored_once(nodes: NodeFactory, db_url: str) -> None:
    bob = make_receiver(nodes, db_url)
    referral_id, message_id = new_id(), new_id()
    received = bob.referral(referral_id=referral_id, message_id=message_id)
    first = bob.store.incoming.store(
        received, "delivery-1", reply=bob.status(referral_id, ReferralStatus.DELIVERED)
    )
    # The relay redelivers the same envelope; the sender sends it again under a new message id;
    # the same delivery comes back again.
    again = [
        bob.store.incoming.store(
            received, "delivery-1", reply=bob.status(referral_id, ReferralStatus.DELIVERED)
        ),
        bob.store.incoming.store(received, "delivery-2"),
        bob.store.incoming.store(bob.referral(referral_id=referral_id), "delivery-3"),
    ]
    assert all(r == first for r in again)
    assert count(bob.node, "incoming_referral") == 1
    assert count(bob.node, "outbox") == 1
    assert actions(bob.node, "referral.received") == 1
    assert count(bob.node, "processed_message") == 2  # two distinct messages, applied once each
    # A delivery id already applied to another message is not silently reused.
    with pytest.raises(Conflict):
        bob.store.incoming.store(bob.referral(), "delivery-1")
    # Another agency cannot take over a referral id.
    with pytest.raises(Conflict):
        bob.store.incoming.store(
            bob.referral(referral_id=referral_id, sender=MALLORY, sender_id=MALLORY_ID), "d-4"
        )
    assert count(bob.node, "incoming_referral") == 1
    assert bob.node.store.verify_audit().ok


def test_a_failure_midway_through_storing_or_purging_writes_nothing_and_is_retried(
    nodes: NodeFactory, db_url: str
) -> None:
    # Exactly once in effect means the message is marked applied only with its effect: a
    # failed write must leave it unapplied, or the redelivery would be dropped as a repeat.
    bob = make_receiver(nodes, db_url)
    received = bob.referral()
    rid = received.referral_id
    reply = bob.status(rid, ReferralStatus.DELIVERED)
    block_outbox_key(bob.node, reply.message_id)
    before = referral_rows(bob.node, WITH_AUDIT)
    with statements(bob.node) as seen, pytest.raises(Conflict, match="nothing was written"):
        bob.store.incoming.store(received, "d-1", reply=reply)
    assert any(s.startswith("INSERT INTO incoming_referral") for s in seen)
    assert referral_rows(bob.node, WITH_AUDIT) == before
    bob.node.sql("DELETE FROM outbox")
    # Redelivered (same message, same delivery): now stored, once.
    assert bob.store.incoming.store(received, "d-1", reply=reply).state is (ReferralState.DELIVERED)
    assert count(bob.node, "incoming_referral") == count(bob.node, "processed_message") == 1

    # The purge on revocation: its confirmation cannot be queued, so nothing is purged, nothing
    # is marked applied, and no ledger line claims a purge that did not happen.
    revocation = bob.revocation(received)
    confirm = bob.confirmer(revocation)
    confirmation = confirm(())
    block_outbox_key(bob.node, confirmation.message_id)
    before = referral_rows(bob.node, WITH_AUDIT)
    with pytest.raises(Conflict):
        bob.store.incoming.purge(rid, "system:relay", revocation, confirm=lambda _: confirmation)
    assert referral_rows(bob.node, WITH_AUDIT) == before
    assert bob.ciphertext(rid)[:2] != (b"", b"")
    assert ("referral-purged", rid) not in read_ledger(bob.node.home)
    bob.node.sql("DELETE FROM outbox WHERE idempotency_key = :k", k=confirmation.message_id)
    # The same revocation redelivered purges.
    assert bob.store.incoming.purge(rid, "system:relay", revocation, confirm=confirm) == sorted(
        CANARY_FIELDS
    )
    assert bob.ciphertext(rid)[:2] == (b"", b"")
    assert ("referral-purged", rid) in read_ledger(bob.node.home)
    assert actions(bob.node, "referral.purged") == 1
    assert bob.node.store.verify_audit().ok


def test_answers_follow_the_allowed_transitions(nodes: NodeFactory) -> None:
    bob = make_receiver(nodes, "")
    kept = bob.store.incoming.store(bob.referral(), "d-1").referral_id
    with pytest.raises(Conflict):
        bob.store.incoming.answer("staff:bea", kept, ReferralStatus.COMPLETED, None, "")
    with pytest.raises(InvalidInput):
        bob.store.incoming.answer("staff:bea", kept, ReferralStatus.DELIVERED, None, "")
    with pytest.raises(InvalidInput):  # a decline needs a reason
        bob.store.incoming.answer("staff:bea", kept, ReferralStatus.DECLINED, None, "")
    reply = bob.status(kept, ReferralStatus.ACCEPTED)
    accepted = bob.store.incoming.answer(
        "staff:bea", kept, ReferralStatus.ACCEPTED, None, "", reply=reply
    )
    assert accepted.state is ReferralState.ACCEPTED
    # Answering again (a retry) changes nothing and queues nothing more.
    assert (
        bob.store.incoming.answer("staff:bea", kept, ReferralStatus.ACCEPTED, None, "", reply=reply)
        == accepted
    )
    with pytest.raises(Conflict):
        bob.store.incoming.answer(
            "staff:bea", kept, ReferralStatus.DECLINED, DeclineReason.NO_CAPACITY, ""
        )
    done = bob.store.incoming.answer("staff:bea", kept, ReferralStatus.COMPLETED, None, "")
    assert [s.state.value for s in done.history] == ["delivered", "accepted", "completed"]
    assert count(bob.node, "outbox") == 1

    refused = bob.store.incoming.store(bob.referral(), "d-2").referral_id
    declined = bob.store.incoming.answer(
        "staff:bea", refused, ReferralStatus.DECLINED, DeclineReason.OTHER, DECLINE_TEXT
    )
    assert declined.decline_reason is DeclineReason.OTHER
    assert bob.ciphertext(refused)[2] == 2  # the text went into a new ciphertext version
    assert found_in(raw_bytes(bob.node), [DECLINE_TEXT]) == []
    assert bob.store.incoming.read(refused, "staff:bea").decline_text == DECLINE_TEXT
    assert bob.store.incoming.inbox([ReferralState.DELIVERED]) == []
    assert actions(bob.node, "referral.answered") == 3
    assert bob.node.store.verify_audit().ok


def test_a_purge_leaves_a_tombstone_and_no_key_or_ciphertext_on_disk(
    nodes: NodeFactory, db_url: str
) -> None:
    bob = make_receiver(nodes, db_url)
    received = bob.referral()
    rid = received.referral_id
    bob.store.incoming.store(received, "d-1")
    bob.store.incoming.answer("staff:bea", rid, ReferralStatus.ACCEPTED, None, "")
    ciphertext, wrapped_key, _version = bob.ciphertext(rid)
    data = raw_bytes(bob.node)
    assert any(form in data for form in raw_forms(wrapped_key))  # the search sees it first

    with pytest.raises(Refused):  # only the sender revokes its referral
        bob.store.incoming.purge(
            rid, "system:relay", bob.revocation(received, sender=MALLORY, sender_id=MALLORY_ID)
        )
    revocation = bob.revocation(received)
    names = bob.store.incoming.purge(
        rid, "system:relay", revocation, confirm=bob.confirmer(revocation)
    )
    assert names == sorted(CANARY_FIELDS)
    assert bob.ciphertext(rid)[:2] == (b"", b"")
    (tombstone,) = bob.store.incoming.inbox()
    assert tombstone.state is ReferralState.PURGED and tombstone.purged_at is not None
    assert tombstone.purged_fields == tuple(names)
    assert tombstone.referral_id == rid and tombstone.sender_id == ALICE_ID
    assert bob.store.incoming.read(rid, "staff:bea").content is None

    data = raw_bytes(bob.node)
    assert not any(form in data for form in raw_forms(wrapped_key))
    assert not any(form in data for form in raw_forms(ciphertext[:48]))
    assert found_in(data, [*CANARY_FIELDS.values(), NOTE, CONTACT]) == []
    (item,) = bob.store.outbox.pending()
    assert item.kind is OutboxKind.PURGE_CONFIRMATION
    confirmation = open_envelope(ALICE, ALICE_ID, bob.record, item.sealed, NOW)
    assert isinstance(confirmation, ReceivedPurgeConfirmation)
    assert confirmation.purged_fields == tuple(names)

    # The same revocation again, and the referral redelivered: nothing comes back.
    confirm = bob.confirmer(revocation)
    assert bob.store.incoming.purge(rid, "system:relay", revocation, confirm=confirm) == names
    assert bob.store.incoming.store(received, "d-9").state is ReferralState.PURGED
    assert bob.ciphertext(rid)[:2] == (b"", b"")
    assert actions(bob.node, "referral.purged") == 1
    assert count(bob.node, "outbox") == 1
    # A new revocation message (the sender asks again) is confirmed again, from the tombstone.
    asked_again = bob.revocation(received)
    again = bob.store.incoming.purge(
        rid, "system:relay", asked_again, confirm=bob.confirmer(asked_again)
    )
    assert again == names and count(bob.node, "outbox") == 2
    assert actions(bob.node, "referral.purged") == 1
    with pytest.raises(Conflict):
        bob.store.incoming.answer("staff:bea", rid, ReferralStatus.COMPLETED, None, "")
    # The purge is in the ledger, for restores.
    assert ("referral-purged", rid) in read_ledger(bob.node.home)
    assert bob.node.store.verify_audit().ok


def test_a_revocation_that_overtakes_its_referral_keeps_the_referral_out(
    nodes: NodeFactory,
) -> None:
    bob = make_receiver(nodes, "")
    received = bob.referral()
    revocation = bob.revocation(received)
    assert bob.store.incoming.purge(received.referral_id, "system:relay", revocation) == []
    stored = bob.store.incoming.store(received, "d-1")
    assert stored.state is ReferralState.PURGED and stored.need is None
    assert bob.ciphertext(received.referral_id)[:2] == (b"", b"")
    assert actions(bob.node, "referral.received") == 0
    assert found_in(raw_bytes(bob.node), list(CANARY_FIELDS.values())) == []
    assert bob.node.store.verify_audit().ok


def test_an_altered_incoming_referral_fails_loudly(nodes: NodeFactory) -> None:
    bob = make_receiver(nodes, "")
    one = bob.store.incoming.store(bob.referral(), "d-1").referral_id
    received_two = bob.referral()
    two = bob.store.incoming.store(received_two, "d-2").referral_id
    ct_one, key_one, _ = bob.ciphertext(one)
    ct_two, key_two, _ = bob.ciphertext(two)

    bob.set_ciphertext(one, ciphertext=flip_byte(ct_one, 40))
    with pytest.raises(TamperedCiphertext):
        bob.store.incoming.read(one, "staff:bea")
    # Moved between rows: a ciphertext, or ciphertext and key together.
    bob.set_ciphertext(one, ciphertext=ct_two)
    with pytest.raises(TamperedCiphertext):
        bob.store.incoming.read(one, "staff:bea")
    bob.set_ciphertext(one, ciphertext=ct_two, wrapped_key=key_two)
    with pytest.raises(TamperedCiphertext):
        bob.store.incoming.read(one, "staff:bea")
    bob.set_ciphertext(one, ciphertext=ct_one, wrapped_key=key_one)
    assert bob.store.incoming.read(one, "staff:bea").content is not None
    assert bob.store.incoming.read(two, "staff:bea").content is not None  # the other is untouched

    # Rolled back: the ciphertext before the decline put back over the newer version.
    bob.store.incoming.answer(
        "staff:bea", one, ReferralStatus.DECLINED, DeclineReason.OTHER, "full"
    )
    bob.set_ciphertext(one, ciphertext=ct_one)
    with pytest.raises(TamperedCiphertext):
        bob.store.incoming.read(one, "staff:bea")
    # An altered referral is still purged on revocation (its field names are then unknown).
    bob.set_ciphertext(two, ciphertext=flip_byte(ct_two, 50))
    assert bob.store.incoming.purge(two, "system:relay", bob.revocation(received_two)) == []
    assert bob.ciphertext(two)[:2] == (b"", b"")
    (purged,) = bob.node.store.audit_entries(actions=("referral.purged",))
    assert purged.detail["unreadable"] is True
    assert bob.node.store.verify_audit().ok


# --- backups ----------------------------------------------------------------------------------


def test_backup_and_restore_round_trip_the_referral_tables(nodes: NodeFactory, db_url: str) -> None:
    alice = make_sender(nodes, db_url)
    consent = alice.grant()
    sent = alice.send(consent)
    alice.apply(
        alice.status_from_bob(
            sent.referral_id, ReferralStatus.DECLINED, DeclineReason.OTHER, DECLINE_TEXT
        )
    )
    queued = alice.send(consent)
    # The same node also receives referrals (it is Bob to someone else).
    bob = Receiver(alice.node, alice.store)
    received = bob.referral()
    bob.store.incoming.store(
        received, "d-1", reply=bob.status(received.referral_id, ReferralStatus.DELIVERED)
    )
    made = create_backup(alice.node.store, alice.node.home, alice.node.home / "backups", "admin")
    tables = {k: v for k, v in REFERRAL_TABLES.items() if k != "need"}
    at_backup = referral_rows(alice.node, tables)
    assert all(at_backup[t] for t in tables), "every referral table has rows to round-trip"
    assert found_in(made.path.read_bytes(), [DECLINE_TEXT, NOTE, *CANARY_FIELDS.values()]) == []

    # After the backup: a revocation and a purge, which a restore must not undo for good.
    alice.store.revoke_consent("staff:maria", consent.consent_id, NOW)
    bob.store.incoming.purge(received.referral_id, "system:relay", bob.revocation(received))

    restore_backup(alice.node.home, alice.node.engine, made.path, PASSPHRASE)
    restored = ReferralStores(alice.node.another_store())
    assert restored.outgoing.get(sent.referral_id).decline_text == DECLINE_TEXT
    # The restore itself re-applied the ledger: the revocation and the purge made after the
    # backup hold, while everything else came back as it was.
    assert restored.consents.get(consent.consent_id).revoked
    assert restored.incoming.read(received.referral_id, "staff:bea").content is None
    assert [i.kind for i in restored.outbox.pending()] == [OutboxKind.STATUS_UPDATE]
    assert queued.referral_id not in {i.referral_id for i in restored.outbox.pending()}
    assert restored.reapply_ledger("system:restore", read_ledger(alice.node.home)) == 0
    # New rows after a restore (PostgreSQL sequences moved past the restored ids).
    other = restored.consents.grant("staff:maria", alice.consent())
    assert Sender(alice.node, restored, alice.case_id, alice.fields).send(other).state is (
        ReferralState.QUEUED
    )
    assert alice.node.store.verify_audit().ok
