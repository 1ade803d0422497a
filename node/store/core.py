"""The node's database as its stores share it: one engine, keyring, write lock and hash-chained
audit log, the record seals, the tombstone outbox, the ledger and the escrow's guard.

:class:`StoreCore` is the public surface the case store (:class:`~node.store.cases.NodeStore`,
which holds one as ``NodeStore.core``) and its companion stores (``node.store.budget``,
``node.store.escrow``, ``node.store.imports``, ``node.referrals``) build on, so none of them
reaches into another's private members:

- :meth:`StoreCore.writing` is the unit of work: one write transaction at a time in this
  process, committed on exit or rolled back, after which the audit head is recorded;
  :meth:`StoreCore.reading` and :meth:`StoreCore.snapshot` are read sessions;
- :attr:`StoreCore.audit_log` appends to the audit log in the caller's transaction, so an
  action is recorded if and only if it happened; :attr:`StoreCore.seals` pins case versions;
- :meth:`StoreCore.queue_tombstone`, :meth:`StoreCore.append_ledger` and
  :meth:`StoreCore.checkpoint` are what an erasure or a removal leaves outside its rows.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from node.keyring import Keyring
from node.store import anchors
from node.store.audit_log import AuditLog
from node.tombstones import TombstoneKind
from tessera.errors import StorageError

__all__ = ["AUDIT_HEAD_FILE", "LEDGER_FILE", "StoreCore"]

# The file in the node's home that records erasures and staff removals outside the database.
LEDGER_FILE = "ledger.log"
# The file in the node's home holding the last audit head the node recorded (node.store.audit_log).
AUDIT_HEAD_FILE = "audit-head"


class StoreCore:
    """Transactions, audit log, seals, tombstones and ledger of one node's database."""

    def __init__(self, engine: Engine, keyring: Keyring, home: Path | None = None) -> None:
        self._engine = engine
        self._keyring = keyring
        self._home = home
        self._audit = AuditLog(
            keyring.identity,
            home / AUDIT_HEAD_FILE if home else None,
            [r.public for r in keyring.retired],
        )
        # One writer at a time inside this process; the audit head row's lock covers others.
        self._write_lock = threading.Lock()
        # Seals pin each case's last written version outside its row (node.store.anchors).
        self._seals = anchors.RecordSeals(keyring.record_key)
        #: Set by the running node (node.escrow.EscrowGate): whether cases may be opened now.
        self.guard: anchors.CaseGuard | None = None

    @property
    def engine(self) -> Engine:
        """The database engine."""
        return self._engine

    @property
    def keyring(self) -> Keyring:
        """The node's unwrapped keyring."""
        return self._keyring

    @property
    def home(self) -> Path | None:
        """The node's home directory (None for a store without one, as in some tests)."""
        return self._home

    @property
    def audit_log(self) -> AuditLog:
        """The hash-chained audit log; append to it inside the transaction of the change."""
        return self._audit

    @property
    def seals(self) -> anchors.RecordSeals:
        """The seals pinning each case's last written version (node.store.anchors)."""
        return self._seals

    # --- transactions --------------------------------------------------------------------

    @contextmanager
    def writing(self) -> Iterator[Session]:
        """The write transaction (unit of work): committed on exit, rolled back on an error (a
        database refusal becomes a StorageError); the audit head is recorded after the commit."""
        with self._write_lock, Session(self._engine, expire_on_commit=False) as session:
            try:
                if self._engine.dialect.name == "sqlite":
                    # Take SQLite's write lock before the first read. The sqlite3 driver would
                    # read the audit head and the case version outside any transaction, so a
                    # commit by another process could slip in between: a lost update, or a
                    # duplicate audit sequence number.
                    session.connection().exec_driver_sql("BEGIN IMMEDIATE")
                yield session
                session.commit()
            except OperationalError as exc:
                session.rollback()
                raise _storage_error(exc) from None
            except BaseException:
                session.rollback()
                raise
            self._audit.record_head(session)

    def reading(self) -> Session:
        """A read session (use it as a context manager)."""
        return Session(self._engine, expire_on_commit=False)

    @contextmanager
    def snapshot(self) -> Iterator[Session]:
        """A read session that sees one moment: a case row, its seal and the audit log read in
        it agree, whatever another writer commits meanwhile."""
        with self.reading() as session:
            if self._engine.dialect.name == "sqlite":
                session.connection().exec_driver_sql("BEGIN")
            else:
                session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            yield session

    def audit(
        self,
        actor: str,
        action: str,
        case_id: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Record an event that changes nothing else, in a transaction of its own."""
        with self.writing() as session:
            self._audit.append(session, actor, action, case_id, detail)

    # --- what an erasure or a removal leaves outside its rows ------------------------------

    def queue_tombstone(self, session: Session, kind: TombstoneKind, subject: str) -> None:
        """Queue, in ``session``, a signed tombstone for the broker's escrow (node.escrow)."""
        anchors.queue_tombstone(
            session, self._keyring.identity, self._keyring.record_key, kind, subject
        )

    def check_guard(self, case_ids: Sequence[str]) -> None:
        """The running node's gate (node.escrow): refuses while it cannot know every erasure."""
        if self.guard is not None:
            self.guard.check_cases(case_ids)

    def append_ledger(self, line: str) -> None:
        """Append a line to the ledger outside the database: what a restore of an older backup
        must not undo (nothing without a home)."""
        if self._home is None:
            return
        with (self._home / LEDGER_FILE).open("a", encoding="utf-8") as ledger:
            ledger.write(f"{line}\n")
            ledger.flush()
            os.fsync(ledger.fileno())

    def checkpoint(self) -> None:
        """Push SQLite's WAL into the main file (whose freed pages secure_delete zeroed) and
        truncate it, so no copy of an erased survivor's key lingers in the write-ahead log."""
        if self._engine.dialect.name == "sqlite":
            with self._engine.connect() as conn:
                conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))


def _storage_error(exc: OperationalError) -> StorageError:
    text_ = str(exc.orig) if exc.orig else str(exc)
    if "full" in text_.lower() or "no space" in text_.lower():
        return StorageError(
            "the disk is full; nothing was written", hint="free disk space, then retry"
        )
    if "locked" in text_.lower():
        return StorageError("the database is busy; nothing was written", hint="retry shortly")
    return StorageError(
        "the database refused the write; nothing was written",
        hint="check the node's log and database",
    )
