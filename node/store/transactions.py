"""The write transaction of the stores beside ``NodeStore`` (referrals, budget), serialised on
the audit head on PostgreSQL too."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from node.store.cases import NodeStore
from node.store.tables import AuditHeadRow
from tessera.errors import Conflict

__all__ = ["serialised_writing"]


@contextmanager
def serialised_writing(
    node_store: NodeStore, conflict: str, hint: str | None = None
) -> Iterator[Session]:
    """NodeStore's write transaction, serialised on the audit head on PostgreSQL too, for the
    stores beside it (``node.referrals``, ``node.store.budget.BudgetStore``).

    Locking the head first makes the look-ups that make a write idempotent (is this key,
    message, delivery or charge already here?) exclusive across processes, as SQLite's BEGIN
    IMMEDIATE does. A constraint violation anyway rolls everything back and is a Conflict with
    the message ``conflict``.
    """
    try:
        with node_store.core.writing() as session:
            if node_store.engine.dialect.name == "postgresql":
                session.exec(select(AuditHeadRow).with_for_update()).first()
            yield session
    except IntegrityError:
        raise Conflict(conflict, hint=hint) from None
