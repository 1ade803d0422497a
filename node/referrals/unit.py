"""The unit of work the referral stores share (consents, outgoing with the outbox, incoming).

One :class:`UnitOfWork` per node, beside its :class:`~node.store.cases.NodeStore`: the same
engine, keyring, write lock and hash-chained audit log, so every change is appended to the audit
log in the same transaction as the change ("an action is logged if and only if it happened").

A store method opens :meth:`UnitOfWork.writing`; when a flow already opened one on this thread,
the method joins it, so a use case that spans stores (revoke a consent, withdraw its envelopes,
queue its purge at the broker) commits once or not at all. What must happen only after the
commit (a line of the node's ledger, a WAL checkpoint) is queued with :meth:`after_commit`.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Final

from sqlmodel import Session, col, select

from node.referrals.model import Direction, OutboxKind, ReferralState, ReferralStep
from node.store.cases import NodeStore
from node.store.tables import ProcessedMessageRow, ReferralEventRow, as_utc
from node.store.transactions import serialised_writing

__all__ = ["UnitOfWork"]

_CONFLICT: Final = "that change conflicts with a record the node already holds; nothing was written"
_CONFLICT_HINT: Final = "check the ids and idempotency keys you used"


class UnitOfWork:
    """One transaction at a time for the referral stores, joined by nested calls."""

    def __init__(self, node_store: NodeStore) -> None:
        self.node = node_store
        self._local = threading.local()

    @contextmanager
    def writing(self) -> Iterator[Session]:
        """The current write transaction on this thread, or a new one (committed on exit)."""
        current: Session | None = getattr(self._local, "session", None)
        if current is not None:
            yield current
            return
        after: list[Callable[[], None]] = []
        self._local.after = after
        try:
            with serialised_writing(self.node, _CONFLICT, hint=_CONFLICT_HINT) as session:
                self._local.session = session
                try:
                    yield session
                finally:
                    self._local.session = None
        finally:
            self._local.after = None
        for action in after:
            action()

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """The current write transaction if there is one (it sees its own changes), else a
        read-only session."""
        current: Session | None = getattr(self._local, "session", None)
        if current is not None:
            yield current
            return
        with self.node.core.reading() as session:
            yield session

    def after_commit(self, action: Callable[[], None]) -> None:
        """Run ``action`` once the current write transaction has committed."""
        after: list[Callable[[], None]] | None = getattr(self._local, "after", None)
        if after is None:
            raise RuntimeError("after_commit outside a write transaction")
        after.append(action)

    def append_ledger(self, line: str) -> None:
        """After the commit: a line of the node's ledger, which a restore re-applies."""
        self.after_commit(lambda: self.node.core.append_ledger(line))

    def checkpoint(self) -> None:
        """After the commit: push SQLite's WAL into the main file (no copy of a shredded key)."""
        self.after_commit(self.node.core.checkpoint)

    def audit(
        self,
        session: Session,
        actor: str,
        action: str,
        case_id: str | None,
        detail: Mapping[str, Any],
    ) -> None:
        """Append to the audit log, in this transaction."""
        self.node.core.audit_log.append(session, actor, action, case_id, detail)

    # --- what both directions keep: the steps, and the messages applied -----------------------

    def step(
        self,
        session: Session,
        referral_id: str,
        direction: Direction,
        state: ReferralState,
        at: dt.datetime,
    ) -> None:
        """Record that a referral reached ``state`` at ``at``."""
        session.add(
            ReferralEventRow(
                referral_id=referral_id, direction=direction.value, state=state.value, at=at
            )
        )

    def history(
        self, session: Session, direction: Direction, referral_ids: Sequence[str]
    ) -> dict[str, tuple[ReferralStep, ...]]:
        """The steps of each referral, in order."""
        steps: dict[str, list[ReferralStep]] = {}
        if referral_ids:
            rows = session.exec(
                select(ReferralEventRow)
                .where(
                    col(ReferralEventRow.referral_id).in_(referral_ids),
                    ReferralEventRow.direction == direction.value,
                )
                .order_by(col(ReferralEventRow.id))
            )
            for row in rows:
                steps.setdefault(row.referral_id, []).append(
                    ReferralStep(ReferralState(row.state), as_utc(row.at))
                )
        return {key: tuple(value) for key, value in steps.items()}

    def first_time(
        self, session: Session, sender: str, message_id: str, kind: OutboxKind, referral_id: str
    ) -> bool:
        """Record ``(sender, message_id)`` as applied; False if it already was."""
        if session.get(ProcessedMessageRow, (sender, message_id)) is not None:
            return False
        self.processed(session, sender, message_id, kind, referral_id, None)
        return True

    def processed(
        self,
        session: Session,
        sender: str,
        message_id: str,
        kind: OutboxKind,
        referral_id: str,
        delivery_id: str | None,
    ) -> None:
        """Record a message (and the relay delivery it came in) as applied."""
        session.add(
            ProcessedMessageRow(
                sender_id=sender,
                message_id=message_id,
                kind=kind.value,
                referral_id=referral_id,
                delivery_id=delivery_id,
            )
        )

    def seen(
        self, session: Session, sender: str, message_id: str, delivery_id: str
    ) -> ProcessedMessageRow | None:
        """The record of a message already applied, by message id or by relay delivery id."""
        by_message = session.get(ProcessedMessageRow, (sender, message_id))
        if by_message is not None:
            return by_message
        return session.exec(
            select(ProcessedMessageRow).where(ProcessedMessageRow.delivery_id == delivery_id)
        ).first()
