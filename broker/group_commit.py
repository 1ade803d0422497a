"""Group commit: concurrent requests share one database transaction (DESIGN.md section 6).

A durable write costs one commit, and a commit costs a disk flush (SQLite WAL with
``synchronous=FULL``, PostgreSQL with ``synchronous_commit``) plus the transaction's fixed
overhead. When many Send calls arrive at once, writing each in its own transaction makes the
flushes, not the work, the broker's limit. A :class:`GroupCommitter` queues the items that
arrive while a transaction is being written and writes them all in the next one: one commit for
a whole batch, and no waiting at all when calls arrive one at a time (a lone item is written at
once, in a batch of one).

Every caller still gets its own outcome, and only after the batch's commit: a value, or the
typed error for its item alone (a conflict, a refusal), or the error of the whole transaction
when the commit itself failed (then nothing of the batch was written). A caller that gives up
(its RPC was cancelled) leaves its item in the batch; the writes it is used for are idempotent,
so a retry finds the first attempt's result.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Outcome = TypeVar("Outcome")

WriteBatch = Callable[[Sequence[Item]], Sequence[Outcome | BaseException]]
"""Writes items in one transaction (in a worker thread); one outcome or error per item, in order.
Raising instead fails every item of the batch with that error."""


class GroupCommitter(Generic[Item, Outcome]):
    """Batches concurrent :meth:`submit` calls into calls of ``write`` on a worker thread.

    At most one batch is being written at any moment. A batch holds at most ``max_batch`` items
    and, when ``size`` is given, items of at most ``max_bytes`` in all (one item always fits), so
    one transaction's memory stays bounded whatever the items weigh. Use from a single event
    loop.
    """

    def __init__(
        self,
        write: WriteBatch[Item, Outcome],
        max_batch: int = 256,
        *,
        size: Callable[[Item], int] | None = None,
        max_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        if max_batch < 1 or max_bytes < 1:
            raise ValueError("max_batch and max_bytes must be at least 1")
        self._write = write
        self._max_batch = max_batch
        self._size = size
        self._max_bytes = max_bytes
        self._waiting: list[tuple[Item, asyncio.Future[Outcome]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.batches = 0  # transactions written so far (for tests and metrics)

    async def submit(self, item: Item) -> Outcome:
        """Write ``item`` in the next batch; returns its outcome once that batch is committed."""
        future = self._enqueue(item)
        self._start_writing()
        # Shielded: a caller that is cancelled stops waiting, but its item is written anyway, as
        # part of a batch other callers wait for.
        return await asyncio.shield(future)

    async def submit_many(self, items: Sequence[Item]) -> list[Outcome | BaseException]:
        """Write ``items`` in the next batches (in order, sharing them with other callers);
        returns each item's outcome or error, in order, once every one is committed or failed."""
        futures = [self._enqueue(item) for item in items]
        if futures:
            self._start_writing()
        # Shielded as in submit: the items are written even if the caller stops waiting.
        return list(await asyncio.shield(asyncio.gather(*futures, return_exceptions=True)))

    def _enqueue(self, item: Item) -> asyncio.Future[Outcome]:
        """Queue ``item`` for the next batch; the future its outcome will be set on."""
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)
        self._waiting.append((item, future))
        return future

    def _start_writing(self) -> None:
        """Start the writer task unless one is running (it drains everything queued)."""
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain())

    def _batch_length(self) -> int:
        """How many of the waiting items go into the next batch."""
        if self._size is None:
            return min(len(self._waiting), self._max_batch)
        total = 0
        for count, (item, _future) in enumerate(self._waiting[: self._max_batch]):
            total += self._size(item)
            if total > self._max_bytes and count > 0:
                return count
        return min(len(self._waiting), self._max_batch)

    async def _drain(self) -> None:
        while self._waiting:
            count = self._batch_length()
            batch = self._waiting[:count]
            del self._waiting[:count]
            items = [item for item, _future in batch]
            try:
                outcomes = await asyncio.to_thread(self._write, items)
                if len(outcomes) != len(items):
                    raise RuntimeError("a batch write returned the wrong number of outcomes")
            except BaseException as exc:  # the whole transaction failed: every item with it
                for _item, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            finally:
                self.batches += 1
            for (_item, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)


def _retrieve(future: asyncio.Future[Any]) -> None:
    # A caller that was cancelled never reads its item's error; reading it here keeps asyncio
    # from logging "exception was never retrieved" for an outcome nobody is waiting for.
    if not future.cancelled():
        future.exception()
