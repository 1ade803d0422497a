"""Group commit (broker.group_commit) over a real broker store on SQLite.

Concurrent Sends must share transactions, yet each caller must get exactly its own outcome; a
failed commit must fail every put of its batch and store none of it; a caller that gives up must
not take its put out of the batch. The batch writer here is the broker's own
``BrokerStore.put_envelopes`` on a real database file.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import sqlite3
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path

import pytest
from sqlalchemy import event

from broker.domain import AcceptedEnvelope, EnvelopePut
from broker.group_commit import GroupCommitter
from broker.store import BrokerStore
from broker.store.database import open_database
from tessera.errors import Conflict, StorageError, TesseraError

NOW = dt.datetime(2026, 3, 1, 9, 0, tzinfo=dt.UTC)


def in_event_loop(test: Callable[..., Coroutine[object, object, None]]) -> Callable[..., None]:
    """Run an async test in its own event loop (the suite has no asyncio plugin)."""

    @functools.wraps(test)
    def run(*args: object, **kwargs: object) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


@pytest.fixture
def store(tmp_path: Path) -> BrokerStore:
    engine = open_database(f"sqlite:///{tmp_path / 'broker.db'}")
    engine.dispose()
    # A short busy timeout, so the test that locks the file fails its batch quickly.
    event.listen(engine, "connect", lambda conn, _record: conn.execute("PRAGMA busy_timeout=50"))
    return BrokerStore(engine)


def envelope(key: str, body: bytes = b"sealed bytes") -> EnvelopePut:
    return EnvelopePut("agency-a", "agency-b", key, b"", body)


class CountingWriter:
    """The store's batch write, recording the size of every batch it was given."""

    def __init__(self, store: BrokerStore) -> None:
        self.store = store
        self.sizes: list[int] = []
        self.keys: list[list[str]] = []

    def __call__(self, puts: Sequence[EnvelopePut]) -> list[AcceptedEnvelope | TesseraError]:
        self.sizes.append(len(puts))
        self.keys.append([put.idempotency_key for put in puts])
        return self.store.put_envelopes(puts, NOW)


@in_event_loop
async def test_concurrent_submits_share_transactions_and_keep_their_own_outcomes(
    store: BrokerStore,
) -> None:
    writer = CountingWriter(store)
    committer: GroupCommitter[EnvelopePut, AcceptedEnvelope] = GroupCommitter(writer, max_batch=64)
    store.put_envelope("agency-a", "agency-b", "taken", b"", b"other bytes", NOW)

    puts = [envelope(f"k{i}") for i in range(200)] + [envelope("taken")]
    outcomes = await asyncio.gather(*(committer.submit(p) for p in puts), return_exceptions=True)

    accepted = outcomes[:200]
    assert all(isinstance(o, AcceptedEnvelope) and not o.duplicate for o in accepted), outcomes
    assert [o.idempotency_key for o in accepted if isinstance(o, AcceptedEnvelope)] == [
        f"k{i}" for i in range(200)
    ]
    # The one bad put failed alone, with its own error.
    assert isinstance(outcomes[200], Conflict)
    assert sum(writer.sizes) == 201 and max(writer.sizes) <= 64
    assert len(writer.sizes) < 201 / 8  # shared transactions, not one each
    assert committer.batches == len(writer.sizes)
    assert store.waiting_count("agency-b") == 201  # 200 new and the one stored before


@in_event_loop
async def test_a_lone_submit_is_written_at_once(store: BrokerStore) -> None:
    writer = CountingWriter(store)
    committer: GroupCommitter[EnvelopePut, AcceptedEnvelope] = GroupCommitter(writer)
    accepted = await asyncio.wait_for(committer.submit(envelope("alone")), timeout=5)
    assert accepted.idempotency_key == "alone" and writer.sizes == [1]


@in_event_loop
async def test_a_failed_commit_fails_its_whole_batch_and_stores_none_of_it(
    store: BrokerStore, tmp_path: Path
) -> None:
    committer: GroupCommitter[EnvelopePut, AcceptedEnvelope] = GroupCommitter(
        lambda puts: store.put_envelopes(puts, NOW)
    )
    holder = sqlite3.connect(tmp_path / "broker.db", timeout=0)
    holder.execute("BEGIN EXCLUSIVE")  # another writer holds the database file
    try:
        outcomes = await asyncio.gather(
            *(committer.submit(envelope(f"k{i}")) for i in range(20)), return_exceptions=True
        )
    finally:
        holder.rollback()
        holder.close()
    assert all(isinstance(o, StorageError) for o in outcomes), outcomes
    assert store.waiting_count() == 0
    # The committer is still usable, and the retries store each envelope once.
    retried = await asyncio.gather(*(committer.submit(envelope(f"k{i}")) for i in range(20)))
    assert all(not r.duplicate for r in retried)
    assert store.waiting_count() == 20


class HeldWriter:
    """The store's batch write, held back until released: what queues behind a batch being
    written can be arranged, and cancelled, while it is held."""

    def __init__(self, store: BrokerStore, loop: asyncio.AbstractEventLoop) -> None:
        self.store, self.loop = store, loop
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    def __call__(self, puts: Sequence[EnvelopePut]) -> list[AcceptedEnvelope | TesseraError]:
        self.loop.call_soon_threadsafe(self.started.set)
        asyncio.run_coroutine_threadsafe(self.release.wait(), self.loop).result(timeout=10)
        return self.store.put_envelopes(puts, NOW)


@in_event_loop
async def test_a_caller_that_gives_up_leaves_its_put_in_the_batch(store: BrokerStore) -> None:
    held = HeldWriter(store, asyncio.get_running_loop())
    started, release = held.started, held.release
    committer: GroupCommitter[EnvelopePut, AcceptedEnvelope] = GroupCommitter(held)
    first = asyncio.create_task(committer.submit(envelope("first")))
    await started.wait()  # the first batch is being written; the next two queue behind it
    impatient = asyncio.create_task(committer.submit(envelope("impatient")))
    patient = asyncio.create_task(committer.submit(envelope("patient")))
    await asyncio.sleep(0)
    impatient.cancel()  # its RPC was cancelled while queued
    release.set()
    await first
    assert (await patient).idempotency_key == "patient"
    with pytest.raises(asyncio.CancelledError):
        await impatient
    # Written anyway: a retry by its sender finds it, and nothing is stored twice.
    assert store.put_envelope(
        "agency-a", "agency-b", "impatient", b"", b"sealed bytes", NOW
    ).duplicate
    assert store.waiting_count() == 3


@in_event_loop
async def test_a_batch_stays_within_its_byte_bound(store: BrokerStore) -> None:
    # Envelopes may be up to 1 MiB: a batch is bounded by bytes too, so one transaction never
    # holds hundreds of megabytes. One oversized item still goes through, alone.
    writer = CountingWriter(store)
    committer: GroupCommitter[EnvelopePut, AcceptedEnvelope] = GroupCommitter(
        writer, max_batch=100, size=lambda put: len(put.ciphertext), max_bytes=10_000
    )
    puts = [envelope(f"k{i}", bytes([i]) * 3_000) for i in range(12)]
    puts.append(envelope("huge", b"h" * 25_000))
    outcomes = await asyncio.gather(*(committer.submit(p) for p in puts))
    assert all(not o.duplicate for o in outcomes)
    assert sum(writer.sizes) == 13 and max(writer.sizes) <= 3  # 3 x 3,000 bytes fit in 10,000
    assert store.waiting_count("agency-b") == 13


@in_event_loop
async def test_submit_many_shares_batches_with_other_callers_and_answers_each_item_in_order(
    store: BrokerStore,
) -> None:
    # A SendBatch call hands its envelopes over together; single Sends arriving meanwhile join
    # the same transactions, and every item still gets its own outcome.
    writer = CountingWriter(store)
    committer: GroupCommitter[EnvelopePut, AcceptedEnvelope] = GroupCommitter(writer, max_batch=64)
    store.put_envelope("agency-a", "agency-b", "taken", b"", b"other bytes", NOW)
    many = [envelope(f"m{i}") for i in range(100)]
    many.insert(50, envelope("taken"))
    outcomes, *singles = await asyncio.gather(
        committer.submit_many(many), *(committer.submit(envelope(f"s{i}")) for i in range(10))
    )
    assert isinstance(outcomes, list) and len(outcomes) == 101
    assert isinstance(outcomes[50], Conflict)
    accepted = [o for i, o in enumerate(outcomes) if i != 50]
    assert [o.idempotency_key for o in accepted if isinstance(o, AcceptedEnvelope)] == [
        f"m{i}" for i in range(100)
    ]
    assert [s.idempotency_key for s in singles if isinstance(s, AcceptedEnvelope)] == [
        f"s{i}" for i in range(10)
    ]
    assert sum(writer.sizes) == 111 and max(writer.sizes) <= 64 and len(writer.sizes) <= 3
    # The single Sends rode in a transaction with the batch's items, not in their own.
    assert any(
        any(k.startswith("m") for k in keys) and any(k.startswith("s") for k in keys)
        for keys in writer.keys
    )
    assert store.waiting_count("agency-b") == 111


@in_event_loop
async def test_submit_many_of_nothing_writes_nothing(store: BrokerStore) -> None:
    writer = CountingWriter(store)
    committer: GroupCommitter[EnvelopePut, AcceptedEnvelope] = GroupCommitter(writer)
    assert await committer.submit_many([]) == []
    assert writer.sizes == []


@in_event_loop
async def test_submit_many_writes_every_item_even_if_its_caller_gives_up(
    store: BrokerStore,
) -> None:
    held = HeldWriter(store, asyncio.get_running_loop())
    started, release = held.started, held.release
    committer: GroupCommitter[EnvelopePut, AcceptedEnvelope] = GroupCommitter(held)
    first = asyncio.create_task(committer.submit(envelope("first")))
    await started.wait()
    impatient = asyncio.create_task(committer.submit_many([envelope(f"b{i}") for i in range(5)]))
    await asyncio.sleep(0)
    impatient.cancel()  # the SendBatch call was cancelled while its envelopes were queued
    release.set()
    await first
    with pytest.raises(asyncio.CancelledError):
        await impatient
    while committer.batches < 2:  # the queued batch is still written
        await asyncio.sleep(0.01)
    assert store.waiting_count() == 6
