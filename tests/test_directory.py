"""Tests for the directory core (DESIGN.md section 5; directory.proto header): real PyNaCl.

A small simulated broker builds the log with the module's own broker functions, and a simulated
node syncs it with the node functions, as python-tuf tests a client against a simulated
repository. Then each property is attacked: altered, dropped and reordered entries, foreign and
wrong-region heads, rewritten history, truncation, substituted keys, rotations not signed by the
pinned key or without proof of possession, revoked agencies coming back, malformed statements.
The hash chain is recomputed independently with hashlib's BLAKE2b, so the spec and code agree.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

import pytest

from tessera import crypto, labels
from tessera.crypto import Identity
from tessera.directory import (
    GENESIS_CHAIN,
    POSSESSION_LABEL,
    AgencyRecord,
    BadDirectoryData,
    DirectoryInconsistent,
    EntryKind,
    KeyChanged,
    VerifiedHead,
    append,
    apply_to_pins,
    check_statement,
    enrol_statement,
    leaf_hash,
    next_chain,
    revoke_statement,
    rotate_statement,
    sign_head,
    verify_consistency,
    verify_entry,
    verify_extension,
    verify_head,
)
from tessera.errors import (
    BadSignature,
    Conflict,
    ErrorKind,
    InvalidInput,
    NotFound,
    Refused,
)
from tessera.labels import LABEL_KEY_ROTATION
from tessera.v1 import common_pb2 as common_pb
from tessera.v1 import directory_pb2 as directory_pb

REGION = "north"
T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
SHELTER = "shelter-north-01"
LEGAL = "legal-aid-north"


def identity(n: int) -> Identity:
    return Identity.from_seed(bytes([n]) * 32)


BROKER = identity(200)
BROKER_KEY = BROKER.public.signing_key


# --- a simulated broker and node -------------------------------------------------------------


@dataclass
class SimBroker:
    """A broker's log in memory, built only with tessera.directory's broker functions."""

    me: Identity = BROKER
    region: str = REGION
    entries: list[common_pb.SignedBlob] = field(default_factory=list)
    chains: list[bytes] = field(default_factory=lambda: [GENESIS_CHAIN])  # chain(0..size)
    records: dict[str, AgencyRecord] = field(default_factory=dict)
    clock: datetime = T0

    @property
    def key(self) -> bytes:
        return self.me.public.signing_key

    def now(self) -> datetime:
        self.clock += timedelta(minutes=1)
        return self.clock

    def submit(self, statement: common_pb.SignedBlob, possession: bytes = b"") -> AgencyRecord:
        """The honest path: check_statement, then append."""
        agency_id = directory_pb.DirectoryEntry.FromString(statement.body).agency_id
        record = check_statement(
            statement,
            self.records.get(agency_id),
            possession,
            self.key,
            region=self.region,
            sequence=len(self.entries) + 1,
        )
        self.force(statement, possession)
        self.records[agency_id] = record
        return record

    def force(self, statement: common_pb.SignedBlob, possession: bytes = b"") -> None:
        """A malicious broker: append whatever it likes, correctly chained and signed."""
        entry, chain = append(
            self.me, self.chains[-1], len(self.entries) + 1, statement, possession, self.now()
        )
        self.entries.append(entry)
        self.chains.append(chain)

    def head(self, size: int | None = None) -> common_pb.SignedBlob:
        size = len(self.entries) if size is None else size
        return sign_head(self.me, self.region, size, self.chains[size], self.now())


@dataclass
class SimNode:
    """A node's directory state: the last verified head and its pins."""

    size: int = 0
    chain: bytes = GENESIS_CHAIN
    pins: dict[str, AgencyRecord] = field(default_factory=dict)

    def sync(
        self, entries: Sequence[common_pb.SignedBlob], head: common_pb.SignedBlob
    ) -> VerifiedHead:
        verified_head, verified = verify_extension(
            BROKER_KEY, REGION, self.size, self.chain, entries, head
        )
        pins = apply_to_pins(self.pins, verified)
        self.size, self.chain, self.pins = verified_head.size, verified_head.chain, pins
        return verified_head

    def sync_from(self, broker: SimBroker) -> VerifiedHead:
        return self.sync(broker.entries[self.size :], broker.head())


@dataclass
class Log:
    broker: SimBroker
    shelter: Identity
    shelter_new: Identity
    legal: Identity


def build_log() -> Log:
    """enrol, enrol, rotate, revoke: the honest history every attack starts from."""
    broker = SimBroker()
    shelter, shelter_new, legal = identity(1), identity(2), identity(3)
    broker.submit(
        enrol_statement(
            shelter, SHELTER, "Harbour Shelter", REGION, ["medical", "safe_housing"], broker.now()
        )
    )
    broker.submit(enrol_statement(legal, LEGAL, "North Legal Aid", REGION, [], broker.now()))
    broker.submit(*rotate_statement(shelter, shelter_new, broker.records[SHELTER], broker.now()))
    broker.submit(revoke_statement(BROKER, broker.records[LEGAL], "closed", broker.now()))
    return Log(broker, shelter, shelter_new, legal)


@pytest.fixture
def log() -> Log:
    return build_log()


def raw_statement(
    signer: Identity, *, when: datetime = T0, signer_key: bytes | None = None, **fields: Any
) -> common_pb.SignedBlob:
    """A hand-made statement (for malformed and malicious cases), signed under the right label."""
    values: dict[str, Any] = {"region": REGION, "name": "Some Agency", **fields}
    message = directory_pb.DirectoryEntry(**values)
    message.valid_from.FromDatetime(when)
    message.created_at.FromDatetime(when)
    body = message.SerializeToString()
    return common_pb.SignedBlob(
        body=body,
        signature=signer.sign(LABEL_KEY_ROTATION, body),
        signer=signer.public.signing_key if signer_key is None else signer_key,
    )


def rotate_body(
    old_key: bytes, new: Identity, when: datetime, agency_id: str = SHELTER
) -> dict[str, Any]:
    return {
        "kind": directory_pb.ENTRY_KIND_ROTATE,
        "agency_id": agency_id,
        "signing_key": new.public.signing_key,
        "encryption_key": new.public.encryption_key,
        "previous_signing_key": old_key,
        "when": when,
    }


def resigned(
    blob: common_pb.SignedBlob, signer: Identity, label: bytes, body: bytes
) -> common_pb.SignedBlob:
    return common_pb.SignedBlob(body=body, signature=signer.sign(label, body), signer=blob.signer)


# --- the wire contract -----------------------------------------------------------------------


def _frame(*parts: bytes) -> bytes:
    return b"".join(len(p).to_bytes(8, "big") + p for p in parts)


def _reference_digest(label: bytes, data: bytes) -> bytes:
    """common.proto convention 3, independently: BLAKE2b-256, person tessera:v1:dgst."""
    return hashlib.blake2b(_frame(label, data), digest_size=32, person=b"tessera:v1:dgst").digest()


def test_hash_chain_is_the_one_in_the_proto_header(log: Log) -> None:
    assert bytes(32) == GENESIS_CHAIN
    assert leaf_hash(b"abc") == _reference_digest(b"tessera/v1/directory-entry", b"abc")
    prev, leaf = bytes(range(32)), bytes(range(32, 64))
    assert next_chain(prev, leaf) == _reference_digest(b"tessera/v1/directory-head", prev + leaf)
    chain = bytes(32)
    for n, entry in enumerate(log.broker.entries, start=1):
        message = directory_pb.LogEntry.FromString(entry.body)
        assert message.sequence == n
        assert message.previous_chain == chain
        chain = _reference_digest(
            b"tessera/v1/directory-head",
            chain + _reference_digest(b"tessera/v1/directory-entry", entry.body),
        )
    head = directory_pb.LogHead.FromString(log.broker.head().body)
    assert (head.region, head.size, head.chain) == (REGION, 4, chain)


def test_signatures_use_the_labels_and_signers_of_the_contract(log: Log) -> None:
    entries = log.broker.entries
    for entry in entries:
        assert entry.signer == BROKER_KEY
        crypto.verify(BROKER_KEY, labels.LABEL_DIRECTORY_ENTRY, entry.body, entry.signature)
    head = log.broker.head()
    crypto.verify(BROKER_KEY, labels.LABEL_DIRECTORY_HEAD, head.body, head.signature)
    statements = [directory_pb.LogEntry.FromString(e.body) for e in entries]
    enrol, rotate, revoke = statements[0], statements[2], statements[3]
    assert enrol.statement.signer == log.shelter.public.signing_key  # self-signed
    assert rotate.statement.signer == log.shelter.public.signing_key  # the old key
    assert revoke.statement.signer == BROKER_KEY
    for s in statements:
        crypto.verify(
            s.statement.signer, LABEL_KEY_ROTATION, s.statement.body, s.statement.signature
        )
        assert bool(s.possession_signature) == (s is rotate)
    crypto.verify(
        log.shelter_new.public,
        LABEL_KEY_ROTATION,
        rotate.statement.body,
        rotate.possession_signature,
    )
    body = directory_pb.DirectoryEntry.FromString(enrol.statement.body)
    assert list(body.services) == [
        common_pb.NEED_CATEGORY_SAFE_HOUSING,
        common_pb.NEED_CATEGORY_MEDICAL,
    ]  # ascending enum order, whatever order they were given in
    revoked = directory_pb.DirectoryEntry.FromString(revoke.statement.body)
    assert (revoked.signing_key, revoked.encryption_key) == (b"", b"")
    assert revoked.previous_signing_key == log.legal.public.signing_key


# --- the honest log --------------------------------------------------------------------------


def test_honest_log_verifies_and_yields_the_right_pins(log: Log) -> None:
    node = SimNode()
    head = node.sync_from(log.broker)
    assert (head.region, head.size) == (REGION, 4)
    shelter, legal = node.pins[SHELTER], node.pins[LEGAL]
    assert shelter.identity == log.shelter_new.public
    assert shelter.services == ("safe_housing", "medical")
    assert (shelter.name, shelter.region, shelter.revoked, shelter.sequence) == (
        "Harbour Shelter",
        REGION,
        False,
        3,
    )
    assert legal.identity == log.legal.public  # a revoked record keeps the keys it had
    assert (legal.revoked, legal.sequence) == (True, 4)
    assert legal.valid_until is not None
    # Broker and node run the same rules: the broker's records are the node's pins.
    assert node.pins == log.broker.records


def test_incremental_sync_and_consistency_agree_with_full_sync(log: Log) -> None:
    node = SimNode()
    node.sync(log.broker.entries[:2], log.broker.head(2))
    assert node.pins[SHELTER].identity == log.shelter.public
    node.sync_from(log.broker)
    assert node.pins == build_log().broker.records
    # A node already at size 4 accepts an unchanged head with no entries.
    assert node.sync([], log.broker.head()).size == 4
    # GetConsistency: leaf hashes from size 1 to 4 recompute the signed head.
    leaves = [leaf_hash(e.body) for e in log.broker.entries[1:]]
    head = verify_head(log.broker.head(), BROKER_KEY, REGION)
    assert verify_consistency(1, log.broker.chains[1], leaves, head) == head


def test_verified_entries_say_what_they_are(log: Log) -> None:
    _, entries = verify_extension(
        BROKER_KEY, REGION, 0, GENESIS_CHAIN, log.broker.entries, log.broker.head()
    )
    assert [e.kind for e in entries] == [
        EntryKind.ENROL,
        EntryKind.ENROL,
        EntryKind.ROTATE,
        EntryKind.REVOKE,
    ]
    assert [e.chain for e in entries] == log.broker.chains[1:]
    assert entries[3].statement.reason == "closed"
    assert verify_entry(log.broker.entries[2], BROKER_KEY, REGION) == entries[2]


def test_an_empty_log_verifies() -> None:
    head = verify_head(SimBroker().head(), BROKER_KEY, REGION)
    assert (head.size, head.chain) == (0, GENESIS_CHAIN)
    with pytest.raises(InvalidInput):
        sign_head(BROKER, REGION, 0, b"\x01" * 32, T0)


# --- attacks on the log ----------------------------------------------------------------------


@pytest.mark.parametrize("index", range(4))
def test_an_altered_entry_byte_is_detected_naming_its_sequence(log: Log, index: int) -> None:
    entries = list(log.broker.entries)
    body = bytearray(entries[index].body)
    body[len(body) // 2] ^= 0x01
    entries[index] = common_pb.SignedBlob(
        body=bytes(body), signature=entries[index].signature, signer=entries[index].signer
    )
    with pytest.raises(BadDirectoryData) as caught:
        SimNode().sync(entries, log.broker.head())
    assert caught.value.sequence == index + 1
    assert caught.value.kind is ErrorKind.INTEGRITY


def test_the_broker_cannot_substitute_a_key_inside_an_agency_statement(log: Log) -> None:
    """The broker re-signs entry 1 and the head around an enrolment with its own encryption key."""
    entry = directory_pb.LogEntry.FromString(log.broker.entries[0].body)
    statement = directory_pb.DirectoryEntry.FromString(entry.statement.body)
    statement.encryption_key = identity(66).public.encryption_key
    entry.statement.body = statement.SerializeToString()
    forged = SimBroker()
    forged.force(entry.statement)
    with pytest.raises(BadDirectoryData) as caught:
        SimNode().sync(forged.entries, forged.head())
    assert caught.value.sequence == 1
    assert isinstance(caught.value.__cause__, BadSignature)


def test_a_dropped_entry_is_detected(log: Log) -> None:
    entries = log.broker.entries
    with pytest.raises(DirectoryInconsistent) as caught:
        SimNode().sync([entries[0], entries[2], entries[3]], log.broker.head(3))
    assert caught.value.sequence == 2
    with pytest.raises(InvalidInput):  # fewer entries than the head commits to
        SimNode().sync(entries[:3], log.broker.head())


@pytest.mark.parametrize("order", [(0, 2, 1, 3), (1, 0, 2, 3), (0, 1, 1, 3)])
def test_reordered_or_repeated_entries_are_detected(log: Log, order: tuple[int, ...]) -> None:
    entries = [log.broker.entries[i] for i in order]
    first_wrong = next(n for n, i in enumerate(order) if i != n)
    with pytest.raises(DirectoryInconsistent) as caught:
        SimNode().sync(entries, log.broker.head())
    assert caught.value.sequence == first_wrong + 1


def test_entries_beyond_the_head_are_refused(log: Log) -> None:
    with pytest.raises(DirectoryInconsistent):
        SimNode().sync(log.broker.entries, log.broker.head(3))


def test_an_entry_that_lies_about_its_link_or_sequence_is_detected(log: Log) -> None:
    node = SimNode()
    node.sync(log.broker.entries[:2], log.broker.head(2))
    third = directory_pb.LogEntry.FromString(log.broker.entries[2].body)
    for change in ({"previous_chain": b"\x07" * 32}, {"sequence": 7}):
        lying = directory_pb.LogEntry()
        lying.CopyFrom(third)
        for name, value in change.items():
            setattr(lying, name, value)
        body = lying.SerializeToString()
        blob = resigned(log.broker.entries[2], BROKER, labels.LABEL_DIRECTORY_ENTRY, body)
        with pytest.raises(DirectoryInconsistent) as caught:
            node.sync([blob], log.broker.head(3))
        assert caught.value.sequence == 3


def test_a_head_signed_by_another_key_is_refused(log: Log) -> None:
    impostor = SimBroker(me=identity(201))
    for entry in log.broker.entries:
        impostor.force(directory_pb.LogEntry.FromString(entry.body).statement)
    with pytest.raises(BadDirectoryData):  # signer is not the pinned broker key
        SimNode().sync(log.broker.entries, impostor.head())
    genuine = log.broker.head()
    claims_broker = resigned(genuine, identity(201), labels.LABEL_DIRECTORY_HEAD, genuine.body)
    with pytest.raises(BadDirectoryData):  # claims the broker's key, signature is not its
        SimNode().sync(log.broker.entries, claims_broker)
    wrong_label = resigned(genuine, BROKER, labels.LABEL_DIRECTORY_ENTRY, genuine.body)
    with pytest.raises(BadDirectoryData):  # right key, wrong label
        SimNode().sync(log.broker.entries, wrong_label)


def test_a_head_for_another_region_is_refused(log: Log) -> None:
    south = SimBroker(region="south", entries=log.broker.entries, chains=log.broker.chains)
    with pytest.raises(BadDirectoryData):
        SimNode().sync(log.broker.entries, south.head())


def test_a_statement_for_another_region_is_refused(log: Log) -> None:
    other = raw_statement(
        identity(9), kind=directory_pb.ENTRY_KIND_ENROL, agency_id="clinic-south",
        region="south", signing_key=identity(9).public.signing_key,
        encryption_key=identity(9).public.encryption_key,
    )  # fmt: skip
    with pytest.raises(InvalidInput):
        log.broker.submit(other)
    node = SimNode()
    node.sync_from(log.broker)
    log.broker.force(other)
    with pytest.raises(BadDirectoryData) as caught:
        node.sync_from(log.broker)
    assert caught.value.sequence == 5


def test_rewritten_history_after_a_node_saw_the_head_is_a_fork(log: Log) -> None:
    node = SimNode()
    node.sync_from(log.broker)
    seen_head = log.broker.head()
    # The broker rewrites sequence 2: legal aid "enrols" with a key the broker holds, then it
    # replays the rest and appends a new entry, all correctly signed and chained.
    fake = identity(99)
    rewritten = SimBroker()
    original = [directory_pb.LogEntry.FromString(e.body) for e in log.broker.entries]
    rewritten.submit(original[0].statement)
    rewritten.submit(enrol_statement(fake, LEGAL, "North Legal Aid", REGION, [], T0))
    rewritten.submit(original[2].statement, original[2].possession_signature)
    rewritten.submit(revoke_statement(BROKER, rewritten.records[LEGAL], "closed", T0))
    clinic = identity(10)
    rewritten.submit(enrol_statement(clinic, "clinic-north", "Clinic", REGION, [], T0))

    with pytest.raises(DirectoryInconsistent) as caught:  # entry 5 does not link to chain(4)
        node.sync(rewritten.entries[4:], rewritten.head())
    assert caught.value.sequence == 5
    # Entry 5 re-signed to claim the node's chain(4): the head no longer recomputes.
    fifth = directory_pb.LogEntry.FromString(rewritten.entries[4].body)
    fifth.previous_chain = node.chain
    patched = resigned(
        rewritten.entries[4], BROKER, labels.LABEL_DIRECTORY_ENTRY, fifth.SerializeToString()
    )
    with pytest.raises(DirectoryInconsistent):
        node.sync([patched], rewritten.head())
    # A rewritten head of the same size, or leaf hashes from the rewritten log: same verdict.
    with pytest.raises(DirectoryInconsistent):
        node.sync([], rewritten.head(4))
    leaves = [leaf_hash(rewritten.entries[4].body)]
    with pytest.raises(DirectoryInconsistent):
        verify_consistency(4, node.chain, leaves, verify_head(rewritten.head(), BROKER_KEY, REGION))
    # The node's state is untouched: it still holds the head it saw.
    assert verify_head(seen_head, BROKER_KEY, REGION).chain == node.chain
    assert node.pins[LEGAL].identity == log.legal.public


def test_a_new_node_cannot_tell_a_fork_it_never_saw(log: Log) -> None:
    """The limit documented in docs/directory.md: a fresh node trusts the first log it sees,
    which is why fingerprints are compared out of band (`tessera agency verify`)."""
    fake = identity(99)
    rewritten = SimBroker()
    rewritten.submit(enrol_statement(fake, LEGAL, "North Legal Aid", REGION, [], T0))
    node = SimNode()
    node.sync_from(rewritten)
    assert node.pins[LEGAL].identity.fingerprint() != log.legal.public.fingerprint()


def test_a_head_smaller_than_known_is_refused(log: Log) -> None:
    node = SimNode()
    node.sync_from(log.broker)
    with pytest.raises(DirectoryInconsistent):
        node.sync([], log.broker.head(2))
    head = verify_head(log.broker.head(2), BROKER_KEY, REGION)
    with pytest.raises(DirectoryInconsistent):
        verify_consistency(4, node.chain, [], head)
    with pytest.raises(DirectoryInconsistent):  # wrong number of leaf hashes
        verify_consistency(
            2, log.broker.chains[2], [], verify_head(log.broker.head(), BROKER_KEY, REGION)
        )


# --- attacks on keys (pinning) -------------------------------------------------------------


def synced(log: Log) -> SimNode:
    node = SimNode()
    node.sync_from(log.broker)
    return node


def test_an_enrol_for_a_pinned_agency_with_another_key_is_key_changed(log: Log) -> None:
    node = synced(log)
    fake = identity(77)
    statement = enrol_statement(fake, SHELTER, "Harbour Shelter", REGION, [], T0)
    with pytest.raises(Conflict):
        log.broker.submit(statement)
    log.broker.force(statement)
    with pytest.raises(KeyChanged) as caught:
        node.sync_from(log.broker)
    assert caught.value.sequence == 5
    assert node.pins[SHELTER].identity == log.shelter_new.public
    assert node.size == 4


def test_an_enrol_must_be_self_signed(log: Log) -> None:
    someone = identity(78)
    statement = raw_statement(
        BROKER,
        kind=directory_pb.ENTRY_KIND_ENROL,
        agency_id="clinic-north",
        signing_key=someone.public.signing_key,
        encryption_key=someone.public.encryption_key,
    )
    with pytest.raises(BadSignature):
        log.broker.submit(statement)
    node = synced(log)
    log.broker.force(statement)
    with pytest.raises(BadDirectoryData):
        node.sync_from(log.broker)


def test_a_rotate_signed_by_the_new_key_is_refused(log: Log) -> None:
    node = synced(log)
    current, newer = log.shelter_new, identity(12)
    later = log.broker.clock + timedelta(hours=1)
    names_old = raw_statement(newer, **rotate_body(current.public.signing_key, newer, later))
    names_new = raw_statement(newer, **rotate_body(newer.public.signing_key, newer, later))
    for statement in (names_old, names_new):
        possession = newer.sign(POSSESSION_LABEL, statement.body)
        with pytest.raises(KeyChanged):
            log.broker.submit(statement, possession)
    # A malicious broker logs them anyway: the node refuses both.
    log.broker.force(names_old, newer.sign(POSSESSION_LABEL, names_old.body))
    with pytest.raises(BadDirectoryData) as caught:
        synced_copy = dataclasses.replace(node, pins=dict(node.pins))
        synced_copy.sync_from(log.broker)
    assert caught.value.sequence == 5
    assert isinstance(caught.value.__cause__, KeyChanged)
    log.broker.entries.pop()
    log.broker.chains.pop()
    log.broker.force(names_new, newer.sign(POSSESSION_LABEL, names_new.body))
    with pytest.raises(KeyChanged) as caught_pin:
        node.sync_from(log.broker)
    assert caught_pin.value.sequence == 5
    assert node.pins[SHELTER].identity == current.public


def _possessions(statement: common_pb.SignedBlob, old: Identity, new: Identity) -> list[bytes]:
    return [
        b"",
        b"\x00" * 64,
        b"short",
        old.sign(POSSESSION_LABEL, statement.body),  # the old key proves nothing
        identity(13).sign(POSSESSION_LABEL, statement.body),  # some other key
        new.sign(POSSESSION_LABEL, statement.body + b"x"),  # another body
        new.sign(labels.LABEL_DIRECTORY_ENTRY, statement.body),  # another label
    ]


def test_a_rotate_without_valid_possession_is_refused(log: Log) -> None:
    node = synced(log)
    newer = identity(12)
    statement, good = rotate_statement(
        log.shelter_new, newer, log.broker.records[SHELTER], log.broker.now()
    )
    for bad in _possessions(statement, log.shelter_new, newer):
        with pytest.raises(BadSignature):
            log.broker.submit(statement, bad)
    for bad in _possessions(statement, log.shelter_new, newer):
        evil = SimBroker(entries=list(log.broker.entries), chains=list(log.broker.chains))
        evil.force(statement, bad)
        with pytest.raises(BadDirectoryData) as caught:
            dataclasses.replace(node, pins=dict(node.pins)).sync_from(evil)
        assert caught.value.sequence == 5
    log.broker.submit(statement, good)
    node.sync_from(log.broker)
    assert node.pins[SHELTER].identity == newer.public


def test_a_revoked_agency_cannot_come_back(log: Log) -> None:
    node = synced(log)
    later = log.broker.clock + timedelta(hours=1)
    again_new_key = enrol_statement(identity(14), LEGAL, "North Legal Aid", REGION, [], later)
    again_same_key = enrol_statement(log.legal, LEGAL, "North Legal Aid", REGION, [], later)
    rotate_out = raw_statement(
        log.legal, **rotate_body(log.legal.public.signing_key, identity(14), later, LEGAL)
    )
    rotate_possession = identity(14).sign(POSSESSION_LABEL, rotate_out.body)
    attempts = [(again_new_key, b""), (again_same_key, b""), (rotate_out, rotate_possession)]
    for statement, possession in attempts:
        with pytest.raises(Refused):
            log.broker.submit(statement, possession)
    with pytest.raises(Refused):
        revoke_statement(BROKER, log.broker.records[LEGAL], "again", later)
    with pytest.raises(Refused):
        rotate_statement(log.legal, identity(14), log.broker.records[LEGAL], later)
    for statement, possession in attempts:
        evil = SimBroker(entries=list(log.broker.entries), chains=list(log.broker.chains))
        evil.force(statement, possession)
        with pytest.raises(KeyChanged):
            dataclasses.replace(node, pins=dict(node.pins)).sync_from(evil)
    assert node.pins[LEGAL].revoked


def test_a_replayed_old_rotation_is_refused(log: Log) -> None:
    """A1 -> A2 -> A1: the first rotation, replayed, would move the agency back to A2."""
    back, back_possession = rotate_statement(
        log.shelter_new, log.shelter, log.broker.records[SHELTER], log.broker.now()
    )
    log.broker.submit(back, back_possession)
    node = synced(log)
    first = directory_pb.LogEntry.FromString(log.broker.entries[2].body)
    with pytest.raises(KeyChanged):
        log.broker.submit(first.statement, first.possession_signature)
    log.broker.force(first.statement, first.possession_signature)
    with pytest.raises(KeyChanged):
        node.sync_from(log.broker)
    assert node.pins[SHELTER].identity == log.shelter.public


def test_changes_to_an_agency_that_never_enrolled_are_refused(log: Log) -> None:
    ghost = identity(15)
    rotate = raw_statement(
        ghost, **rotate_body(ghost.public.signing_key, identity(16), T0, "ghost-agency")
    )
    possession = identity(16).sign(POSSESSION_LABEL, rotate.body)
    with pytest.raises(NotFound):
        log.broker.submit(rotate, possession)
    node = synced(log)
    log.broker.force(rotate, possession)
    with pytest.raises(DirectoryInconsistent) as caught:
        node.sync_from(log.broker)
    assert caught.value.sequence == 5


def test_a_revoke_must_be_signed_by_the_broker_and_name_the_pinned_key(log: Log) -> None:
    by_agency = raw_statement(
        log.shelter_new,
        kind=directory_pb.ENTRY_KIND_REVOKE,
        agency_id=SHELTER,
        previous_signing_key=log.shelter_new.public.signing_key,
    )
    with pytest.raises(BadSignature):
        log.broker.submit(by_agency)
    wrong_key = raw_statement(
        BROKER,
        kind=directory_pb.ENTRY_KIND_REVOKE,
        agency_id=SHELTER,
        previous_signing_key=log.shelter.public.signing_key,  # the rotated-away key
    )
    with pytest.raises(KeyChanged):
        log.broker.submit(wrong_key)


def test_failed_pinning_leaves_the_pins_untouched(log: Log) -> None:
    node = synced(log)
    frozen = MappingProxyType(dict(node.pins))
    log.broker.force(enrol_statement(identity(79), "clinic-north", "Clinic", REGION, [], T0))
    log.broker.force(enrol_statement(identity(80), SHELTER, "Harbour Shelter", REGION, [], T0))
    _, entries = verify_extension(
        BROKER_KEY, REGION, 4, node.chain, log.broker.entries[4:], log.broker.head()
    )
    with pytest.raises(KeyChanged):
        apply_to_pins(frozen, entries)
    assert dict(frozen) == node.pins
    assert "clinic-north" not in frozen
    with pytest.raises(DirectoryInconsistent):  # applying the same entries twice
        apply_to_pins(apply_to_pins(frozen, entries[:1]), entries[:1])


# --- malformed statements -------------------------------------------------------------------


def _malformed() -> dict[str, common_pb.SignedBlob]:
    a, b = identity(20), identity(21)
    keys = {"signing_key": a.public.signing_key, "encryption_key": a.public.encryption_key}
    enrol: dict[str, Any] = {"kind": directory_pb.ENTRY_KIND_ENROL, "agency_id": "x-1", **keys}
    b_key = b.public.signing_key
    revoke_with_keys = {
        **enrol,
        "kind": directory_pb.ENTRY_KIND_REVOKE,
        "previous_signing_key": a.public.signing_key,
    }
    return {
        "short signing key": raw_statement(a, **{**enrol, "signing_key": b"\x01" * 31}),
        "long encryption key": raw_statement(a, **{**enrol, "encryption_key": b"\x01" * 33}),
        "no encryption key": raw_statement(a, **{**enrol, "encryption_key": b""}),
        "short signer": raw_statement(a, signer_key=a.public.signing_key[:31], **enrol),
        "short previous key": raw_statement(
            a, **{**rotate_body(b"\x02" * 31, b, T0, "x-1"), "previous_signing_key": b"\x02" * 31}
        ),
        "enrol with previous key": raw_statement(a, previous_signing_key=b_key, **enrol),
        "revoke with keys": raw_statement(BROKER, **revoke_with_keys),
        "unset kind": raw_statement(a, **{**enrol, "kind": directory_pb.ENTRY_KIND_UNSPECIFIED}),
        "unsorted services": raw_statement(a, services=[3, 1], **enrol),
        "repeated service": raw_statement(a, services=[1, 1], **enrol),
        "unset service": raw_statement(a, services=[0], **enrol),
        "spaces in id": raw_statement(a, **{**enrol, "agency_id": "shelter north"}),
        "empty id": raw_statement(a, **{**enrol, "agency_id": ""}),
        "bidi override in name": raw_statement(a, **{**enrol, "name": "Shelter\u202egnp.exe"}),
        "empty name": raw_statement(a, **{**enrol, "name": "  "}),
        "reason on enrol": raw_statement(a, reason="why", **enrol),
        "not a message": common_pb.SignedBlob(
            body=b"\xff\xff\xff", signature=a.sign(LABEL_KEY_ROTATION, b"\xff\xff\xff"),
            signer=a.public.signing_key,
        ),
    }  # fmt: skip


@pytest.mark.parametrize("case", sorted(_malformed()))
def test_malformed_statements_are_invalid_input(case: str) -> None:
    statement = _malformed()[case]
    with pytest.raises(InvalidInput):
        check_statement(statement, None, b"", BROKER_KEY, region=REGION)
    node_log = SimBroker()
    node_log.force(statement)
    with pytest.raises(BadDirectoryData) as caught:  # and nodes refuse them too
        SimNode().sync_from(node_log)
    assert isinstance(caught.value.__cause__, InvalidInput)


def test_other_invalid_statements_and_inputs() -> None:
    a = identity(22)
    ok = enrol_statement(a, "x-1", "X", REGION, ["legal_civil"], T0)
    with pytest.raises(InvalidInput):  # a possession signature on an ENROL
        check_statement(ok, None, a.sign(POSSESSION_LABEL, ok.body), BROKER_KEY, region=REGION)
    with pytest.raises(InvalidInput):  # another broker's region
        check_statement(ok, None, b"", BROKER_KEY, region="south")
    tampered = common_pb.SignedBlob(
        body=ok.body + b"\x00", signature=ok.signature, signer=ok.signer
    )
    with pytest.raises(BadSignature):
        check_statement(tampered, None, b"", BROKER_KEY, region=REGION)
    with pytest.raises(InvalidInput):
        enrol_statement(a, "x-1", "X", REGION, ["not_a_service"], T0)
    with pytest.raises(InvalidInput):
        enrol_statement(a, "x-1", "X", REGION, [], datetime(2025, 1, 1))  # naive time
    with pytest.raises(InvalidInput):
        enrol_statement(a, "x-1", "X" * 201, REGION, [], T0)
    with pytest.raises(InvalidInput):
        next_chain(b"\x00" * 31, b"\x00" * 32)
    with pytest.raises(InvalidInput):
        verify_extension(BROKER_KEY, REGION, 0, b"\x01" * 32, [], SimBroker().head())
    record = check_statement(ok, None, b"", BROKER_KEY, region=REGION)
    assert (record.services, record.sequence, record.revoked) == (("legal_civil",), 0, False)
    with pytest.raises(InvalidInput):  # the old key must be the current one
        rotate_statement(identity(23), identity(24), record, T0)


def test_a_service_unknown_to_this_version_is_skipped_not_refused() -> None:
    a = identity(25)
    statement = raw_statement(
        a,
        kind=directory_pb.ENTRY_KIND_ENROL,
        agency_id="x-2",
        signing_key=a.public.signing_key,
        encryption_key=a.public.encryption_key,
        services=[1, 99],
    )
    record = check_statement(statement, None, b"", BROKER_KEY, region=REGION)
    assert record.services == ("safe_housing",)


def test_directory_errors_fail_closed_with_hints() -> None:
    for error in (BadDirectoryData, DirectoryInconsistent, KeyChanged):
        instance = error("x", sequence=3)
        assert instance.kind is ErrorKind.INTEGRITY
        assert instance.hint
        assert instance.sequence == 3
