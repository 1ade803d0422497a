"""The broker's store, on real SQLite files and a real PostgreSQL (DESIGN.md sections 3-6).

What is attacked here is what the design promises and only the database can keep: an enrolment
token works once even when raced; the directory log never forks or gets a gap; a repeated send
stores nothing new; an envelope leaves the broker only when its own recipient acknowledges it,
and an unacknowledged one comes back under the same id (at-least-once on the wire, exactly-once
in effect); a purged consent refuses later envelopes; several broker processes on one database
hand out every envelope exactly once and lose none; and the database holds ciphertext only where
it should. Nothing is mocked: two "broker processes" are two engines on one database.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, event, inspect, text
from sqlmodel import SQLModel

from broker.domain import AcceptedEnvelope, EnvelopePut, StoredEnvelope
from broker.store import BrokerStore
from broker.store.database import VERSION_TABLE, current_revision, head_revision, open_database
from broker.store.notify import listen_for_mail
from broker.store.tables import BROKER_TABLES
from tessera import crypto, labels
from tessera.directory import GENESIS_CHAIN, leaf_hash, next_chain
from tessera.errors import (
    Conflict,
    InvalidInput,
    NotFound,
    Refused,
    StorageError,
    Unauthenticated,
    Unavailable,
)
from tests.nodefixtures import pg_dump_data

SQLITE = "sqlite"
POSTGRESQL = "postgresql"
T0 = dt.datetime(2026, 3, 1, 9, 0, tzinfo=dt.UTC)
REGION = "north"
T = TypeVar("T")


def at(seconds: float) -> dt.datetime:
    """An instant ``seconds`` after T0."""
    return T0 + dt.timedelta(seconds=seconds)


@dataclass
class Broker:
    """One broker database and a store on it; ``another()`` is a second broker process."""

    url: str
    engine: Engine
    store: BrokerStore
    _engines: list[Engine] = field(default_factory=list, repr=False)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == SQLITE

    def another(self) -> BrokerStore:
        """A second BrokerStore with its own engine (its own connection pool) on the database."""
        engine = open_database(self.url)
        self._engines.append(engine)
        return BrokerStore(engine)

    def sql(self, statement: str, **params: Any) -> list[Any]:
        """Raw SQL in its own transaction (the inspector's tool); rows for a SELECT."""
        with self.engine.begin() as conn:
            result = conn.execute(text(statement), params)
            return list(result) if result.returns_rows else []

    def count(self, table: str) -> int:
        return int(self.sql(f"SELECT count(*) FROM {table}")[0][0])

    def rows(self) -> dict[str, list[dict[str, Any]]]:
        """Every row of every broker table, as column → value."""
        found: dict[str, list[dict[str, Any]]] = {}
        for table in sorted(BROKER_TABLES):
            with self.engine.connect() as conn:
                found[table] = [
                    dict(r._mapping) for r in conn.execute(text(f"SELECT * FROM {table}"))
                ]
        return found

    def raw_bytes(self) -> bytes:
        """What the database holds, as raw bytes: SQLite file plus WAL, or a pg_dump."""
        if not self.is_sqlite:
            return pg_dump_data(self.url)
        path = Path(self.url.removeprefix("sqlite:///"))
        wal = path.with_name(path.name + "-wal")
        return path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")

    def dispose(self) -> None:
        for engine in (self.engine, *self._engines):
            engine.dispose()


@pytest.fixture(params=[SQLITE, pytest.param(POSTGRESQL, marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A SQLite file under ``tmp_path`` or a fresh PostgreSQL database."""
    if request.param == POSTGRESQL:
        url: str = request.getfixturevalue("postgres_url")
        return url
    return f"sqlite:///{tmp_path / 'broker.db'}"


def _open_broker(url: str) -> Iterator[Broker]:
    engine = open_database(url)
    made = Broker(url, engine, BrokerStore(engine))
    try:
        yield made
    finally:
        made.dispose()


@pytest.fixture
def broker(db_url: str) -> Iterator[Broker]:
    """A migrated broker database (SQLite, then PostgreSQL) and a store on it."""
    yield from _open_broker(db_url)


@pytest.fixture
def pg_broker(postgres_url: str) -> Iterator[Broker]:
    """PostgreSQL only: for races between broker processes on one database server."""
    yield from _open_broker(postgres_url)


def in_parallel(count: int, work: Callable[[int], T]) -> list[T | BaseException]:
    """Run ``work(i)`` for i in range(count) on threads released together; results in order."""
    barrier = threading.Barrier(count)
    results: list[T | BaseException] = [RuntimeError("did not run")] * count

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = work(index)
        except BaseException as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def commitment(tag: str) -> bytes:
    """A stand-in consent commitment (32 bytes, as consent.proto's)."""
    return crypto.digest(labels.LABEL_CONSENT_COMMITMENT, tag.encode())


def put(
    store: BrokerStore,
    key: str,
    ciphertext: bytes = b"",
    *,
    sender: str = "agency-a",
    recipient: str = "agency-b",
    consent: bytes = b"",
    when: float = 0.0,
) -> AcceptedEnvelope:
    """Put an envelope (random ciphertext unless given) from A to B at T0 + ``when``."""
    return store.put_envelope(
        sender, recipient, key, consent, ciphertext or secrets.token_bytes(80), at(when)
    )


# --- schema ------------------------------------------------------------------------------------


def _broker_only(obj: object, name: str | None, type_: str, *_: object) -> bool:
    return type_ != "table" or name in BROKER_TABLES


def test_migrations_create_only_broker_tables_and_share_a_database(broker: Broker) -> None:
    tables = set(inspect(broker.engine).get_table_names())
    assert tables == BROKER_TABLES | {VERSION_TABLE}
    assert all(name.startswith("broker_") for name in tables)
    assert current_revision(broker.engine) == head_revision() == "b0004"
    # The migrations build exactly the tables the code declares (no drift to autogenerate).
    with broker.engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"include_object": _broker_only, "version_table": VERSION_TABLE}
        )
        assert compare_metadata(context, SQLModel.metadata) == []
    # Reopening migrates nothing; a node's schema can live beside the broker's (own version table).
    from node.store.database import open_database as open_node_database

    open_database(broker.url).dispose()
    open_node_database(broker.url).dispose()
    assert current_revision(broker.engine) == "b0004"
    assert set(inspect(broker.engine).get_table_names()) > BROKER_TABLES


# --- enrolment tokens -------------------------------------------------------------------------


def test_enrolment_token_works_once_and_only_its_hash_is_stored(broker: Broker) -> None:
    token = broker.store.issue_token("shelter-01", REGION, at(3600))
    raw = base64.b32decode(token + "====")
    assert len(raw) == 32 and len(token) == 52
    (stored,) = broker.sql("SELECT token_hash, agency_id FROM broker_enrolment_token")
    assert bytes(stored[0]) != raw and len(bytes(stored[0])) == 32
    assert token.encode() not in broker.raw_bytes() and raw not in broker.raw_bytes()

    # A person pastes it in lower case with a stray newline: still the same token.
    assert broker.store.consume_token(f"  {token.lower()}\n", at(60)) == ("shelter-01", REGION)
    with pytest.raises(Unauthenticated, match="already been used"):
        broker.store.consume_token(token, at(61))
    with pytest.raises(Unauthenticated, match="unknown"):
        broker.store.consume_token(base64.b32encode(secrets.token_bytes(32)).decode(), at(61))
    with pytest.raises(Unauthenticated, match="not an enrolment token"):
        broker.store.consume_token("not-a-token", at(61))


def test_expired_enrolment_token_is_refused_and_stays_unused(broker: Broker) -> None:
    token = broker.store.issue_token("clinic-02", REGION, at(3600))
    with pytest.raises(Refused, match="expired") as info:
        broker.store.consume_token(token, at(3601))
    assert info.value.hint and "new token" in info.value.hint
    assert broker.sql("SELECT consumed_at FROM broker_enrolment_token") == [(None,)]


@pytest.mark.postgres
def test_enrolment_token_has_one_winner_when_raced(pg_broker: Broker) -> None:
    stores = [pg_broker.store, pg_broker.another()]
    token = pg_broker.store.issue_token("legal-03", REGION, at(3600))
    results = in_parallel(8, lambda i: stores[i % 2].consume_token(token, at(10)))
    winners = [r for r in results if r == ("legal-03", REGION)]
    losers = [r for r in results if isinstance(r, Unauthenticated)]
    assert len(winners) == 1 and len(losers) == 7, results


# --- the directory log ------------------------------------------------------------------------


def append(
    store: BrokerStore,
    size: int,
    agency_id: str,
    signing_key: bytes,
    *,
    revoked: bool = False,
    chain: bytes | None = None,
) -> bytes:
    """Append a stand-in entry onto a log of ``size`` entries, chained as the servicer would."""
    body = f"entry {size + 1}: {agency_id} {secrets.token_hex(4)}".encode()
    if chain is None:
        previous = GENESIS_CHAIN if size == 0 else store.log_entries(size - 1, 1)[0].chain
        chain = next_chain(previous, leaf_hash(body))
    store.append_log_entry(
        size, body, secrets.token_bytes(64), chain, agency_id, signing_key,
        secrets.token_bytes(32), revoked, region=REGION,
    )  # fmt: skip
    return body


def test_directory_log_appends_and_keeps_agency_state(broker: Broker) -> None:
    store = broker.store
    assert store.log_size_and_chain() == (0, GENESIS_CHAIN)
    key_a, key_a2, key_b = (secrets.token_bytes(32) for _ in range(3))
    bodies = [
        append(store, 0, "shelter-a", key_a),
        append(store, 1, "clinic-b", key_b),
        append(store, 2, "shelter-a", key_a2),  # rotation: new keys
        append(store, 3, "clinic-b", key_b, revoked=True),  # revoked: keeps the revoked keys
    ]
    size, chain = store.log_size_and_chain()
    expected = GENESIS_CHAIN
    for body in bodies:
        expected = next_chain(expected, leaf_hash(body))
    assert (size, chain) == (4, expected)

    assert [e.sequence for e in store.log_entries(0, 10)] == [1, 2, 3, 4]
    assert [e.body for e in store.log_entries(0, 10)] == bodies
    assert [e.sequence for e in store.log_entries(2, 1)] == [3]
    assert store.log_entries(4, 10) == [] and store.log_entries(0, 0) == []
    assert store.leaf_bodies(1, 3) == bodies[1:3] and store.leaf_bodies(2, 2) == []
    with pytest.raises(NotFound):
        store.leaf_bodies(0, 5)
    with pytest.raises(InvalidInput):
        store.leaf_bodies(3, 1)

    assert store.agency_by_signing_key(key_a) is None  # rotated away
    shelter = store.agency_by_signing_key(key_a2)
    assert shelter is not None and (shelter.agency_id, shelter.sequence) == ("shelter-a", 3)
    clinic = store.agency("clinic-b")
    assert clinic is not None and clinic.revoked and clinic.signing_key == key_b
    assert store.agency_by_signing_key(key_b) == clinic
    assert [a.agency_id for a in store.agencies(REGION)] == ["clinic-b", "shelter-a"]
    assert store.agencies("elsewhere") == [] and store.agency("nobody") is None


def test_log_append_on_a_stale_or_future_size_conflicts_and_writes_nothing(
    broker: Broker,
) -> None:
    store = broker.store
    key = secrets.token_bytes(32)
    append(store, 0, "shelter-a", key)
    before = broker.rows()
    with pytest.raises(Conflict, match="is at size 1, not 0"):
        append(store, 0, "clinic-b", secrets.token_bytes(32), chain=bytes(32))
    with pytest.raises(Conflict, match="not 2"):  # would leave a gap at sequence 2
        append(store, 2, "clinic-b", secrets.token_bytes(32), chain=bytes(32))
    with pytest.raises(Conflict, match="already uses this signing key"):
        append(store, 1, "clinic-b", key)
    assert broker.rows() == before
    assert store.log_size_and_chain()[0] == 1


@pytest.mark.postgres
def test_appenders_racing_at_one_size_have_one_winner(pg_broker: Broker) -> None:
    # Two broker processes append onto the same head at once: exactly one wins, the other gets
    # Conflict (and would retry on the new head); the log never forks.
    stores = [pg_broker.store, pg_broker.another()]
    for size in range(12):

        def race(i: int, size: int = size) -> bytes:
            return append(stores[i], size, f"agency-{size}-{i}", secrets.token_bytes(32))

        results = in_parallel(2, race)
        assert sum(isinstance(r, bytes) for r in results) == 1, results
        assert sum(isinstance(r, Conflict) for r in results) == 1, results
    entries = pg_broker.store.log_entries(0, 100)
    assert [e.sequence for e in entries] == list(range(1, 13))
    chain = GENESIS_CHAIN
    for entry in entries:  # every entry extends exactly the one before it
        chain = next_chain(chain, leaf_hash(entry.body))
        assert entry.chain == chain
    assert sorted(a.sequence for a in pg_broker.store.agencies()) == list(range(1, 13))


# --- relay: idempotent puts -------------------------------------------------------------------


def test_repeated_put_returns_the_original_and_stores_nothing_new(broker: Broker) -> None:
    store = broker.store
    sealed = secrets.token_bytes(300)
    first = put(store, "key-1", sealed, consent=commitment("c1"), when=0)
    again = put(store, "key-1", sealed, consent=commitment("c1"), when=5)
    assert not first.duplicate and again.duplicate
    assert (again.envelope_id, again.received_at) == (first.envelope_id, T0)
    assert first.envelope_digest == crypto.digest(labels.LABEL_ENVELOPE, sealed)
    assert first.size == 300
    assert broker.count("broker_envelope") == 1 and broker.count("broker_receipt") == 1

    with pytest.raises(Conflict, match="different envelope"):
        put(store, "key-1", secrets.token_bytes(300), consent=commitment("c1"))
    with pytest.raises(Conflict):
        put(store, "key-1", sealed, recipient="agency-c", consent=commitment("c1"))
    # The same key from another sender is another envelope.
    assert (
        put(store, "key-1", sealed, sender="agency-z", recipient="agency-c").envelope_id
        != first.envelope_id
    )

    # Delivered and acknowledged, then the sender retries (it never saw our answer): the retry
    # is still recognised, and the recipient never sees the envelope twice.
    (delivered,) = store.claim("agency-b", "p1", 10, 30, at(10))
    assert store.acknowledge("agency-b", [delivered.envelope_id], at(11)) == [first.envelope_id]
    late = put(store, "key-1", sealed, consent=commitment("c1"), when=20)
    assert late.duplicate and late.envelope_id == first.envelope_id
    assert store.waiting_count("agency-b") == 0
    assert store.claim("agency-b", "p1", 10, 30, at(21)) == []


def test_racing_identical_puts_store_one_envelope(broker: Broker) -> None:
    stores = [broker.store, broker.another()]
    sealed = secrets.token_bytes(64)
    results = in_parallel(6, lambda i: put(stores[i % 2], "same-key", sealed, when=i))
    accepted = [r for r in results if isinstance(r, AcceptedEnvelope)]
    assert len(accepted) == 6, results
    assert len({r.envelope_id for r in accepted}) == 1
    assert sum(not r.duplicate for r in accepted) == 1
    assert broker.count("broker_envelope") == 1 and broker.count("broker_receipt") == 1


def test_batched_puts_each_get_their_own_outcome_in_one_transaction(broker: Broker) -> None:
    # Group commit (broker.group_commit): one transaction for many Sends, yet each put is
    # settled exactly as it would be alone, and a bad one costs the others nothing.
    store = broker.store
    sealed = [secrets.token_bytes(120) for _ in range(4)]
    earlier = put(store, "earlier", sealed[0], consent=commitment("c-ok"))
    store.purge_consent("agency-a", commitment("c-revoked"), at(0))
    before = broker.count("broker_envelope")
    outcomes = store.put_envelopes(
        [
            EnvelopePut("agency-a", "agency-b", "new-1", commitment("c-ok"), sealed[1]),
            EnvelopePut("agency-a", "agency-b", "earlier", commitment("c-ok"), sealed[0]),
            EnvelopePut("agency-a", "agency-b", "earlier", commitment("c-ok"), sealed[2]),
            EnvelopePut("agency-a", "agency-b", "revoked", commitment("c-revoked"), sealed[3]),
            EnvelopePut("agency-a", "agency-b", "", b"", sealed[3]),
            EnvelopePut("agency-a", "agency-b", "new-2", b"", sealed[2]),
            EnvelopePut("agency-a", "agency-b", "new-2", b"", sealed[2]),  # a retry in-batch
            EnvelopePut("agency-a", "agency-b", "new-1", commitment("c-ok"), sealed[3]),
        ],
        at(5),
    )
    new_1, repeat, conflict, refused, invalid, new_2, retry, conflict_in_batch = outcomes
    assert isinstance(new_1, AcceptedEnvelope) and not new_1.duplicate
    assert isinstance(repeat, AcceptedEnvelope) and repeat.duplicate
    assert (repeat.envelope_id, repeat.received_at) == (earlier.envelope_id, T0)
    assert isinstance(conflict, Conflict) and isinstance(conflict_in_batch, Conflict)
    assert isinstance(refused, Refused) and isinstance(invalid, InvalidInput)
    assert isinstance(new_2, AcceptedEnvelope) and not new_2.duplicate
    assert isinstance(retry, AcceptedEnvelope) and retry.duplicate
    assert retry.envelope_id == new_2.envelope_id
    assert new_1.received_at == at(5)
    # Exactly the two new envelopes were stored, once each, and they are delivered as sent.
    assert broker.count("broker_envelope") == before + 2
    claimed = {e.envelope_id: e.ciphertext for e in store.claim("agency-b", "p", 10, 30, at(6))}
    assert claimed[new_1.envelope_id] == sealed[1] and claimed[new_2.envelope_id] == sealed[2]
    assert store.put_envelopes([], at(7)) == []


def test_a_failed_batch_commit_stores_nothing_of_the_batch(tmp_path: Path) -> None:
    _engine, store = _sqlite_store(f"sqlite:///{tmp_path / 'broker.db'}", "PRAGMA busy_timeout=50")
    put(store, "kept")
    holder = sqlite3.connect(tmp_path / "broker.db", timeout=0)
    holder.execute("BEGIN EXCLUSIVE")  # another writer holds the database: the batch cannot commit
    try:
        with pytest.raises(StorageError, match="nothing was written"):
            store.put_envelopes(
                [
                    EnvelopePut("agency-a", "agency-b", f"lost-{i}", b"", b"x" * 10)
                    for i in range(5)
                ],
                at(1),
            )
    finally:
        holder.rollback()
        holder.close()
    assert store.waiting_count() == 1
    # The senders retry with the same keys and the envelopes are stored once.
    retried = store.put_envelopes(
        [EnvelopePut("agency-a", "agency-b", f"lost-{i}", b"", b"x" * 10) for i in range(5)], at(2)
    )
    assert all(isinstance(r, AcceptedEnvelope) and not r.duplicate for r in retried)
    assert store.waiting_count() == 6


# --- relay: claim, lease, acknowledge ---------------------------------------------------------


def test_claim_leases_oldest_first_and_acknowledge_deletes(broker: Broker) -> None:
    store = broker.store
    sent = [put(store, f"k{i}", f"sealed-{i}".encode() * 8, when=i) for i in range(5)]
    put(store, "other", recipient="agency-c")
    first = store.claim("agency-b", "broker-1", 3, 30, at(10))
    assert [e.envelope_id for e in first] == [s.envelope_id for s in sent[:3]]
    assert [e.ciphertext for e in first] == [f"sealed-{i}".encode() * 8 for i in range(3)]
    assert all(e.attempts == 1 and e.lease_owner == "broker-1" for e in first)
    assert all(e.lease_until == at(40) and e.sender_id == "agency-a" for e in first)
    assert [e.received_at for e in first] == [at(0), at(1), at(2)]
    second = store.claim("agency-b", "broker-1", 10, 30, at(10))
    assert [e.envelope_id for e in second] == [s.envelope_id for s in sent[3:]]
    assert store.claim("agency-b", "broker-1", 10, 30, at(10)) == []
    assert store.waiting_count("agency-b") == 5 and store.waiting_count() == 6

    ids = [e.envelope_id for e in first]
    assert store.acknowledge("agency-b", ids, at(12)) == sorted(ids)
    assert store.acknowledge("agency-b", ids, at(13)) == []  # twice is fine
    assert store.acknowledge("agency-b", ["no-such-id", ""], at(13)) == []
    assert store.waiting_count("agency-b") == 2
    acked = broker.sql("SELECT count(*) FROM broker_receipt WHERE acknowledged_at IS NOT NULL")
    assert acked == [(3,)]


def test_unacknowledged_lease_ends_and_the_same_envelope_comes_again(broker: Broker) -> None:
    store = broker.store
    sent = put(store, "once", b"sealed referral" * 4)
    (offered,) = store.claim("agency-b", "broker-1", 10, 30, at(1))
    # broker-1 dies before the recipient acknowledges; nothing else can take it during the lease.
    assert store.claim("agency-b", "broker-2", 10, 30, at(30)) == []
    (again,) = store.claim("agency-b", "broker-2", 10, 30, at(31.5))
    assert again.envelope_id == offered.envelope_id == sent.envelope_id
    assert (again.attempts, again.lease_owner) == (2, "broker-2")
    assert (again.ciphertext, again.received_at) == (offered.ciphertext, offered.received_at)

    # The recipient deduplicates by delivery id: two deliveries, one envelope in effect.
    kept: dict[str, StoredEnvelope] = {}
    for delivery in (offered, again):
        kept.setdefault(delivery.envelope_id, delivery)
    assert list(kept) == [sent.envelope_id]
    assert store.acknowledge("agency-b", list(kept), at(32)) == [sent.envelope_id]
    assert store.claim("agency-b", "broker-2", 10, 30, at(100)) == []


def test_release_returns_a_stopping_process_leases_at_once(broker: Broker) -> None:
    store = broker.store
    for i in range(3):
        put(store, f"k{i}", when=i)
    assert len(store.claim("agency-b", "broker-1", 2, 300, at(5))) == 2
    assert store.release("broker-2") == 0
    assert store.release("broker-1") == 2
    again = store.claim("agency-b", "broker-2", 10, 300, at(6))
    assert [e.attempts for e in again] == [2, 2, 1]


def test_acknowledge_by_another_agency_deletes_nothing(broker: Broker) -> None:
    store = broker.store
    sent = put(store, "k", recipient="agency-b")
    (envelope,) = store.claim("agency-b", "broker-1", 10, 30, at(1))
    assert store.claim("agency-c", "broker-1", 10, 30, at(1)) == []
    assert store.acknowledge("agency-c", [envelope.envelope_id], at(2)) == []
    assert store.acknowledge("agency-a", [envelope.envelope_id], at(2)) == []  # not the sender
    assert store.waiting_count("agency-b") == 1
    assert store.acknowledge("agency-b", [sent.envelope_id], at(3)) == [sent.envelope_id]


# --- relay: consent purge, expiry, revoked recipients --------------------------------------------


def test_purged_consent_deletes_pending_envelopes_and_refuses_later_ones(broker: Broker) -> None:
    store = broker.store
    revoked, other = commitment("revoked"), commitment("other")
    delivered = put(store, "r1", consent=revoked)
    pending = put(store, "r2", consent=revoked, when=1)
    other_sender = put(store, "r3", consent=revoked, sender="agency-z", when=2)
    other_consent = put(store, "r4", consent=other, when=3)
    status = put(store, "s1", when=4)  # a status update carries no consent
    (first,) = store.claim("agency-b", "broker-1", 1, 30, at(5))
    assert first.envelope_id == delivered.envelope_id
    store.acknowledge("agency-b", [first.envelope_id], at(6))

    result = store.purge_consent("agency-a", revoked, at(7))
    assert (result.purged, result.already_delivered) == (1, 1)
    waiting = {e.envelope_id for e in store.claim("agency-b", "broker-1", 10, 30, at(8))}
    assert pending.envelope_id not in waiting
    assert waiting == {other_sender.envelope_id, other_consent.envelope_id, status.envelope_id}
    assert store.is_purged("agency-a", revoked) and not store.is_purged("agency-z", revoked)

    with pytest.raises(Refused, match="revoked"):
        put(store, "r5", consent=revoked, when=9)
    with pytest.raises(Refused):  # nor is a retry of an envelope sent before the purge
        put(store, "r2", consent=revoked, when=9)
    assert put(store, "r6", consent=revoked, sender="agency-z").duplicate is False
    assert put(store, "s2", when=9).duplicate is False  # statuses still travel
    assert broker.sql("SELECT count(*) FROM broker_receipt WHERE idempotency_key = 'r5'") == [(0,)]
    again = store.purge_consent("agency-a", revoked, at(10))  # harmless
    assert (again.purged, again.already_delivered) == (0, 1)


def test_purge_racing_a_put_never_leaves_an_envelope_behind(broker: Broker) -> None:
    # Two broker processes: one accepts an envelope under a consent while the other purges it.
    # Whichever goes first, afterwards nothing may wait under the revoked consent.
    putter, purger = broker.store, broker.another()
    refused = 0
    rounds = 40 if broker.is_sqlite else 60
    for round_ in range(rounds):
        revoked = commitment(f"race-{round_}")

        def act(i: int, revoked: bytes = revoked, round_: int = round_) -> object:
            if i == 0:
                return put(putter, f"k{round_}", consent=revoked)
            return purger.purge_consent("agency-a", revoked, at(1))

        sent, purged = in_parallel(2, act)
        assert not isinstance(purged, BaseException), purged
        assert not isinstance(sent, BaseException) or isinstance(sent, Refused), sent
        refused += isinstance(sent, Refused)
    assert broker.store.waiting_count() == 0
    if not broker.is_sqlite:  # both orders happened: the race was really run
        assert 0 < refused < rounds


def test_expire_deletes_old_unleased_envelopes_only(broker: Broker) -> None:
    store = broker.store
    week, now = dt.timedelta(days=7), at(9 * 86400)
    old = put(store, "old", when=0)  # never fetched
    in_delivery = put(store, "in-delivery", recipient="agency-d", when=1)
    fresh = put(store, "fresh", when=8 * 86400)
    put(store, "acked", recipient="agency-c", when=2)
    (acked,) = store.claim("agency-c", "broker-1", 1, 30, at(3))
    store.acknowledge("agency-c", [acked.envelope_id], at(4))
    # in-delivery is leased right now: its recipient may be acknowledging it this very second.
    assert len(store.claim("agency-d", "broker-1", 1, 600, now)) == 1

    assert store.expire(now, week) == 1
    remaining = {row[0] for row in broker.sql("SELECT envelope_id FROM broker_envelope")}
    assert remaining == {in_delivery.envelope_id, fresh.envelope_id}
    assert old.envelope_id not in remaining
    # Receipts past retention are forgotten once their envelope is gone.
    receipts = {row[0] for row in broker.sql("SELECT idempotency_key FROM broker_receipt")}
    assert receipts == {"in-delivery", "fresh"}
    with pytest.raises(InvalidInput):
        store.expire(now, dt.timedelta(0))


def test_purge_agency_drops_its_mailbox_only(broker: Broker) -> None:
    store = broker.store
    put(store, "to-b", recipient="agency-b")
    from_b = put(store, "from-b", sender="agency-b", recipient="agency-c")
    assert store.purge_agency("agency-b") == 1
    assert store.waiting_count("agency-b") == 0
    assert [e.envelope_id for e in store.claim("agency-c", "p", 5, 30, at(1))] == [
        from_b.envelope_id
    ]


# --- several broker processes ------------------------------------------------------------------


def test_several_brokers_deliver_every_envelope_exactly_once(broker: Broker) -> None:
    total = 300 if broker.is_sqlite else 2000
    senders = 8
    in_parallel(
        senders,
        lambda s: [
            put(broker.store, f"k{s}-{i}", sender=f"agency-{s}", when=i)
            for i in range(s, total, senders)
        ],
    )
    assert broker.store.waiting_count("agency-r") == 0
    assert broker.store.waiting_count("agency-b") == total
    stores = [broker.store, broker.another()]  # two processes, two pools
    claimed: list[list[str]] = [[] for _ in range(4)]
    acked: list[list[str]] = [[] for _ in range(4)]

    def deliver(worker: int) -> int:
        store = stores[worker % 2]
        while batch := store.claim("agency-b", f"broker-{worker}", 25, 600, at(10_000)):
            ids = [e.envelope_id for e in batch]
            claimed[worker].extend(ids)
            acked[worker].extend(store.acknowledge("agency-b", ids, at(10_001)))
        return len(claimed[worker])

    results = in_parallel(4, deliver)
    assert all(isinstance(r, int) for r in results), results
    every = [i for ids in claimed for i in ids]
    assert len(every) == total and len(set(every)) == total  # none twice, none lost
    assert sorted(i for ids in acked for i in ids) == sorted(every)
    assert broker.store.waiting_count() == 0
    if not broker.is_sqlite:  # SQLite is one writer at a time; one process may well do it all
        assert claimed[0] + claimed[2] and claimed[1] + claimed[3]  # both processes took a share


def test_replayed_nonce_is_caught_by_another_broker(broker: Broker) -> None:
    first, second = broker.store, broker.another()
    signer, other_signer = secrets.token_bytes(32), secrets.token_bytes(32)
    nonce = secrets.token_bytes(16)
    assert first.remember_nonce(signer, nonce, at(0), 300)
    assert not second.remember_nonce(signer, nonce, at(1), 300)
    assert second.remember_nonce(other_signer, nonce, at(1), 300)
    assert second.remember_nonce(signer, secrets.token_bytes(16), at(1), 300)

    raced = secrets.token_bytes(16)
    results = in_parallel(
        6, lambda i: (first, second)[i % 2].remember_nonce(signer, raced, at(2), 300)
    )
    assert (results.count(True), results.count(False)) == (1, 5), results

    assert first.prune_nonces(at(250)) == 0
    assert first.prune_nonces(at(302.5)) == 4
    assert broker.count("broker_nonce") == 0


def test_batched_nonces_catch_replays_within_the_batch_and_before_it(broker: Broker) -> None:
    store, signer = broker.store, secrets.token_bytes(32)
    earlier, fresh = secrets.token_bytes(16), secrets.token_bytes(16)
    assert store.remember_nonce(signer, earlier, at(0), 300)
    outcomes = broker.another().remember_nonces(
        [
            (signer, fresh, at(1)),
            (signer, earlier, at(1)),  # replays a request accepted before
            (signer, fresh, at(1)),  # replays one earlier in the same batch
            (signer, b"", at(1)),  # malformed: refused alone
            (secrets.token_bytes(32), fresh, at(1)),  # the same nonce from another signer
        ],
        300,
    )
    assert outcomes[:3] == [True, False, False] and outcomes[4] is True
    assert isinstance(outcomes[3], InvalidInput)
    assert broker.count("broker_nonce") == 3


def test_stored_mail_wakes_listeners_in_every_broker_process(pg_broker: Broker) -> None:
    # LISTEN/NOTIFY (broker.store.notify): a put committed by one broker process wakes the
    # recipient's stream in another at once, instead of at its next poll.
    async def scenario() -> tuple[set[str], bool]:
        woken: asyncio.Queue[str] = asyncio.Queue()
        listening = asyncio.Event()
        listener = asyncio.create_task(
            listen_for_mail(pg_broker.url, woken.put_nowait, listening.set)
        )
        try:
            await asyncio.wait_for(listening.wait(), 10)
            other = pg_broker.another()
            puts = [
                EnvelopePut("agency-a", "agency-b", "k1", b"", b"sealed"),
                EnvelopePut("agency-a", "agency-c", "k2", b"", b"sealed"),
            ]
            await asyncio.to_thread(other.put_envelopes, puts, at(0))
            got = {await asyncio.wait_for(woken.get(), 10) for _ in puts}
            # A repeat stores nothing, so it wakes nobody.
            await asyncio.to_thread(other.put_envelopes, puts[:1], at(1))
            try:
                await asyncio.wait_for(woken.get(), 0.5)
                repeat_woke = True
            except TimeoutError:
                repeat_woke = False
            return got, repeat_woke
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    woken, repeat_woke = asyncio.run(scenario())
    assert woken == {"agency-b", "agency-c"}
    assert not repeat_woke


# --- what the database holds ------------------------------------------------------------------


def test_ciphertext_sits_only_in_the_mailbox_and_plaintext_nowhere(broker: Broker) -> None:
    sender, recipient = crypto.Identity.generate(), crypto.Identity.generate()
    marker = f"PLAINTEXT-MARKER-{secrets.token_hex(8)}"
    payload = f"referral for {marker}: safe housing, legal aid".encode()
    sealed = crypto.seal(sender, recipient.public, labels.LABEL_ENVELOPE, payload)
    sent = put(broker.store, "k", sealed, consent=commitment("c"), sender="sender-agency-x")

    holders = [
        (table, column)
        for table, rows in broker.rows().items()
        for row in rows
        for column, value in row.items()
        if isinstance(value, bytes | memoryview) and sealed in bytes(value)
    ]
    assert holders == [("broker_envelope", "ciphertext")]
    raw = broker.raw_bytes()
    assert marker.encode() not in raw and payload not in raw
    assert b"sender-agency-x" in raw  # the scan does see the data: ids are stored in clear
    assert (sealed if broker.is_sqlite else sealed.hex().encode()) in raw

    (delivered,) = broker.store.claim("agency-b", "broker-1", 1, 30, at(1))
    assert (
        crypto.open_sealed(recipient, sender.public, labels.LABEL_ENVELOPE, delivered.ciphertext)
        == payload
    )
    broker.store.acknowledge("agency-b", [sent.envelope_id], at(2))
    assert not any(
        isinstance(value, bytes | memoryview) and sealed in bytes(value)
        for rows in broker.rows().values()
        for row in rows
        for value in row.values()
    )


# --- failures ---------------------------------------------------------------------------------


def _sqlite_store(url: str, *pragmas: str) -> tuple[Engine, BrokerStore]:
    """A store whose new connections also run ``pragmas`` (after tessera.db's own)."""
    engine = open_database(url)
    engine.dispose()

    def apply(dbapi_connection: Any, _record: Any) -> None:
        for pragma in pragmas:
            dbapi_connection.execute(pragma)

    event.listen(engine, "connect", apply)
    return engine, BrokerStore(engine)


def test_locked_database_is_a_storage_error_and_nothing_is_written(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    engine, store = _sqlite_store(f"sqlite:///{path}", "PRAGMA busy_timeout=50")
    other = sqlite3.connect(path, isolation_level=None)  # another process holds the write lock
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StorageError, match="busy; nothing was written") as info:
            put(store, "k")
        assert info.value.hint == "retry shortly"
        other.execute("ROLLBACK")
        assert store.waiting_count() == 0
        assert put(store, "k").duplicate is False  # the retry is a first put, not a repeat
    finally:
        other.close()
        engine.dispose()


def test_full_disk_is_a_storage_error_and_nothing_is_written(tmp_path: Path) -> None:
    path = tmp_path / "broker.db"
    engine = open_database(f"sqlite:///{path}")
    with engine.connect() as conn:
        pages = int(conn.execute(text("PRAGMA page_count")).scalar_one())
    engine.dispose()
    engine, store = _sqlite_store(f"sqlite:///{path}", f"PRAGMA max_page_count={pages + 2}")
    try:
        put(store, "small", b"x" * 100)
        with pytest.raises(StorageError, match="disk is full; nothing was written"):
            put(store, "big", secrets.token_bytes(256 * 1024))
        assert store.waiting_count() == 1
        assert put(store, "small", b"x" * 100).duplicate  # the earlier put is intact
    finally:
        engine.dispose()


def test_unreachable_database_is_unavailable() -> None:
    with pytest.raises(Unavailable, match="cannot open the broker's database"):
        open_database("postgresql://postgres@127.0.0.1:1/tessera")


def test_bad_arguments_are_refused_before_touching_the_database(broker: Broker) -> None:
    store = broker.store
    with pytest.raises(InvalidInput, match="timezone-aware"):
        store.put_envelope("a", "b", "k", b"", b"x", dt.datetime(2026, 1, 1))
    with pytest.raises(InvalidInput, match="consent commitment"):
        store.put_envelope("a", "b", "k", b"short", b"x", T0)
    with pytest.raises(InvalidInput, match="non-empty"):
        store.put_envelope("a", "b", "k", b"", b"", T0)
    with pytest.raises(InvalidInput, match="idempotency key"):
        store.put_envelope("a", "b", "k" * 129, b"", b"x", T0)
    with pytest.raises(InvalidInput):
        store.claim("b", "owner", 10, 0, T0)
    with pytest.raises(InvalidInput):
        store.purge_consent("a", b"", T0)
    assert broker.count("broker_receipt") == 0
