"""The node taking part in statistics rounds: find, check, charge, build, submit or decline.

The arithmetic and the checks are :mod:`node.stats` (pure); the ledger is
:class:`node.store.budget.BudgetStore`; this module does the I/O in between, on the relay
worker's broker channel. For every open round whose current attempt lists this agency:

1. check it (:func:`node.stats.check_round`, under this node's own :class:`StatsPolicy`);
2. build the share from the need rows and keep it in the home (``shares/``, written before the
   charge), then charge ε to the period's budget, once per (round, attempt), BEFORE anything is
   sent, so every share the broker ever sees was counted and none is ever built twice;
3. submit it; a lost answer is retried with the very same cells (never fresh noise for the same
   attempt), also by a process started after this one was killed between the charge and the
   broker's answer: the kept share is what it sends, so no charged budget is left unused;
4. a round it will not take part in is audited ``stats.round_refused`` and declined at the broker
   with the reason (``Stats.DeclineRound``), so the coordinator sees why instead of a round that
   stays open; a decline the broker did not get is sent again at the next poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from node import directory_sync, stats
from node.keyring import Keyring
from node.store.budget import STATS_ACTOR, BudgetStore
from node.store.cases import NodeStore
from tessera import dp, files, rpc
from tessera.config import StatsPolicy
from tessera.errors import Conflict, Refused, TesseraError
from tessera.logs import fields
from tessera.v1 import stats_pb2 as stats_pb
from tessera.v1 import stats_pb2_grpc as stats_grpc

__all__ = ["ROUND_POLL", "RoundTaker"]

log = logging.getLogger(__name__)

ROUND_POLL = 5.0
_CALL_TIMEOUT = 15.0
_REASON_CHARS = 300
_TRANSPORT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

RoundKey = tuple[str, int]

# Shares built and charged but not yet accepted by the broker, one file per (round, attempt).
SHARES_DIR = Path("shares")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _head(blob: Any) -> stats_pb.Round:
    """The round's body, parsed only to name it (it is checked before anything is built)."""
    head = stats_pb.Round()
    with contextlib.suppress(Exception):
        head.ParseFromString(bytes(blob.body))
    return head


class RoundTaker:
    """One node's part in the statistics rounds of its region."""

    def __init__(
        self,
        store: NodeStore,
        keyring: Keyring,
        home: Path,
        link: directory_sync.BrokerLink,
        policy: StatsPolicy | None = None,
        budget: BudgetStore | None = None,
    ) -> None:
        self._store = store
        self._keyring = keyring
        self._home = home
        self._link = link
        self.policy = policy or StatsPolicy()
        self.budget = budget or BudgetStore(store, default_cap=self.policy.budget_cap)
        self._channel: grpc.aio.Channel | None = None
        # (round id, attempt) -> (digest, cells) charged and built but not yet accepted.
        self._pending: dict[RoundKey, tuple[bytes, list[int]]] = {}
        # (round id, attempt) refused by this process -> the reason; audited once.
        self._refused: dict[RoundKey, str] = {}
        # Refusals the broker has been told of.
        self._declined: set[RoundKey] = set()

    @property
    def agency_id(self) -> str:
        return self._link.agency_id

    def attach(self, channel: grpc.aio.Channel) -> None:
        """Use the relay worker's signed broker channel."""
        self._channel = channel

    def _stub(self) -> Any:
        """The Stats stub on the asyncio channel (awaitable calls; typed Any)."""
        assert self._channel is not None
        return stats_grpc.StatsStub(self._channel)

    async def run(self, poll: float = ROUND_POLL) -> None:
        """Poll for rounds until cancelled."""
        while True:
            try:
                await self.rounds_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker (say without Stats yet), the database
                log.warning("stats.rounds_failed", extra=fields(error=str(exc)[:200]))
            await asyncio.sleep(poll)

    async def rounds_once(self) -> int:
        """Take part in every open round listing this agency; the number of shares submitted."""
        request = stats_pb.ListRoundsRequest(
            state=stats_pb.ROUND_STATE_OPEN, participant=self.agency_id
        )
        submitted = 0
        while True:
            reply = await self._stub().ListRounds(request, timeout=_CALL_TIMEOUT)
            for status in reply.rounds:
                if self.agency_id in status.submitted:
                    head = _head(status.round)
                    self._forget_share((head.round_id, int(head.attempt)))
                    continue
                if await self.take_part(status):
                    submitted += 1
            if not reply.next_page_token:
                return submitted
            request.page_token = reply.next_page_token

    async def take_part(self, status: stats_pb.RoundStatus) -> bool:
        """Submit to one round's current attempt (True), or refuse and decline it (False)."""
        head = _head(status.round)
        key = (head.round_id, int(head.attempt))
        if key in self._refused:
            if key not in self._declined and not any(
                d.agency_id == self.agency_id for d in status.declines
            ):
                await self._decline(key, self._refused[key])
            return False
        pending = self._pending.get(key)
        if pending is None:
            try:
                prepared = await asyncio.to_thread(self.prepare, status.round)
            except Refused as exc:
                await self._refuse(key, str(exc))
                return False
            if prepared is None:  # already charged by an earlier run: never submitted twice
                return False
            pending = prepared
            self._pending[key] = pending
        digest, cells = pending
        request = stats_pb.SubmitShareRequest(
            round_id=key[0],
            attempt=key[1],
            agency_id=self.agency_id,
            round_digest=digest,
            masked_cells=cells,
        )
        try:
            await self._stub().SubmitShare(request, timeout=_CALL_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _TRANSPORT:
                raise  # retried with the same cells at the next poll
            self._pending.pop(key, None)
            self._forget_share(key)
            error = rpc.error_from_rpc(exc, f"the broker at {self._link.address}")
            await self._refuse(key, f"the broker refused the share: {error}")
            return False
        self._pending.pop(key, None)
        self._forget_share(key)
        await asyncio.to_thread(
            self._store.audit,
            STATS_ACTOR,
            "stats.share_submitted",
            None,
            {"round_id": key[0], "attempt": key[1]},
        )
        return True

    def prepare(self, blob: Any) -> tuple[bytes, list[int]] | None:
        """Check, build and keep, charge (in that order); the share kept for an attempt charged
        before (by a process killed before the broker took it), else None if charged before."""
        if self._store.guard is not None:
            # A node that cannot know every erasure counts no survivor (node.escrow); raised
            # before any charge, so the round is tried again at the next poll.
            self._store.guard.check_cases(())
        cache = directory_sync.load_cache(self._home)
        head = _head(blob)
        if any(p != self.agency_id and p not in cache.records for p in head.participants):
            cache = directory_sync.sync(self._home, self._keyring.identity, self._link)
        if head.round_id and head.attempt < self.budget.highest_attempt(head.round_id):
            raise Refused("an attempt later than this one was already submitted to")
        if head.round_id and self.budget.charged(head.round_id, int(head.attempt)):
            return self._kept_share((head.round_id, int(head.attempt)))
        period = head.period if head.period else "0000-01"
        try:
            remaining = self.budget.remaining(period)
        except TesseraError:
            remaining = 0.0
        accepted = stats.check_round(blob, self._link, cache, remaining, _now(), self.policy)
        round_ = accepted.round
        key = (round_.round_id, int(round_.attempt))
        # Built before the charge, kept before the charge commits: nothing leaves before it, and
        # a process killed after it sends these very cells (never a second noisy view).
        rng = dp.new_rng()
        needs = [stats.NeedFact(*row) for row in self.budget.need_rows()]
        counts = stats.local_table(
            needs, accepted.spec, round_.period, rng, accepted.noise.histogram_bins
        )
        cells = stats.build_share(
            self._keyring.identity, accepted, counts, cache, self.agency_id, rng
        )
        self._keep_share(key, accepted.digest, cells)
        try:
            self.budget.charge(
                STATS_ACTOR,
                round_.period,
                round_.round_id,
                int(round_.attempt),
                accepted.spec.name,
                round_.epsilon,
            )
        except Conflict:
            return None
        except BaseException:
            self._forget_share(key)  # never charged: the share is never sent
            raise
        return accepted.digest, cells

    def _share_path(self, key: RoundKey) -> Path:
        round_id, attempt = key
        if not round_id or "/" in round_id or round_id.startswith("."):
            raise Refused(f"the round id {round_id!r} cannot name a file")
        return self._home / SHARES_DIR / f"{round_id}.{attempt}.json"

    def _keep_share(self, key: RoundKey, digest: bytes, cells: list[int]) -> None:
        document = {"digest": digest.hex(), "cells": cells}
        files.atomic_write(self._share_path(key), json.dumps(document).encode())

    def _kept_share(self, key: RoundKey) -> tuple[bytes, list[int]] | None:
        try:
            document = json.loads(self._share_path(key).read_text("utf-8"))
            return bytes.fromhex(document["digest"]), [int(c) for c in document["cells"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # submitted (or never kept): never built again

    def _forget_share(self, key: RoundKey) -> None:
        with contextlib.suppress(OSError, Refused):
            self._share_path(key).unlink(missing_ok=True)

    async def _refuse(self, key: RoundKey, reason: str) -> None:
        reason = reason[:_REASON_CHARS]
        self._refused[key] = reason
        detail = {"round_id": key[0], "attempt": key[1], "reason": reason}
        log.warning("stats.round_refused", extra=fields(**detail))
        await asyncio.to_thread(self._store.audit, STATS_ACTOR, "stats.round_refused", None, detail)
        await self._decline(key, reason)

    async def _decline(self, key: RoundKey, reason: str) -> None:
        """Tell the broker why (best effort: a transport failure is retried at the next poll)."""
        if not key[0] or key[1] < 1 or self._channel is None:
            return  # a round we cannot even name, or no broker channel yet
        request = stats_pb.DeclineRoundRequest(
            round_id=key[0], attempt=key[1], agency_id=self.agency_id, reason=reason
        )
        try:
            await self._stub().DeclineRound(request, timeout=_CALL_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _TRANSPORT:
                return
            # Refused by the broker (the attempt moved on, an older broker): nothing to retry.
            log.info("stats.decline_refused", extra=fields(error=str(exc.details())[:200]))
        self._declined.add(key)
