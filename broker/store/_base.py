"""Transactions and error mapping shared by every part of the broker's store.

One rule holds for every write: it is committed before the method returns, or it raises a typed
error and nothing of it was written (DESIGN.md section 8: "nothing already stored is lost or
half-written"). Database failures become :class:`StorageError` (writes) or :class:`Unavailable`
(reads), whose message says what happened and what to do; raw driver errors never escape.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress

from sqlalchemy import Engine, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.sql.dml import Insert
from sqlmodel import Session, SQLModel

from broker.store.tables import ID_CHARS
from tessera import crypto
from tessera.errors import InvalidInput, StorageError, TesseraError, Unavailable
from tessera.timestamps import require_aware

# Domain separation for the advisory-lock keys derived from a (sender, commitment) pair.
_LABEL_CONSENT_LOCK = b"tessera/v1/broker/consent-lock"
_LOCK_SHARED = text("SELECT pg_advisory_xact_lock_shared(k) FROM unnest(CAST(:keys AS bigint[])) k")
_LOCK_EXCLUSIVE = text("SELECT pg_advisory_xact_lock(k) FROM unnest(CAST(:keys AS bigint[])) k")


class StoreBase:
    """An engine plus the transaction discipline every broker table is written under."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._sqlite = engine.dialect.name == "sqlite"
        # SQLite has one writer at a time per database file. Queueing this process's writers on
        # a lock is cheaper and fairer than letting them spin in SQLite's busy timeout.
        self._sqlite_writer = threading.Lock()

    @property
    def engine(self) -> Engine:
        """The database engine (for health checks and metrics)."""
        return self._engine

    @contextmanager
    def _writing(self, what: str) -> Iterator[Session]:
        """One write transaction; ``what`` names the action in an error ("store the envelope")."""
        guard: AbstractContextManager[object] = (
            self._sqlite_writer if self._sqlite else nullcontext()
        )
        with guard, Session(self._engine, expire_on_commit=False) as session:
            try:
                if self._sqlite:
                    # Take SQLite's write lock before the first read. Python's sqlite3 driver
                    # would otherwise read outside any transaction, and another process's commit
                    # could slip in between a check (is the token unused? is the log at size n?)
                    # and the write that depends on it.
                    session.connection().exec_driver_sql("BEGIN IMMEDIATE")
                yield session
                session.commit()
            except OperationalError as exc:
                _rollback(session)
                raise storage_error(exc, what) from None
            except BaseException:
                _rollback(session)
                raise

    @contextmanager
    def _reading(self, what: str) -> Iterator[Session]:
        """A read-only session; a database that cannot answer becomes :class:`Unavailable`."""
        with Session(self._engine, expire_on_commit=False) as session:
            try:
                yield session
            except OperationalError as exc:
                _rollback(session)
                raise Unavailable(
                    f"cannot {what}: the broker's database did not answer ({_reason(exc)})",
                    hint="check that the database is running and reachable; then retry",
                ) from None

    def _insert_ignoring_duplicates(self, table: type[SQLModel]) -> Insert:
        """INSERT ... ON CONFLICT DO NOTHING, in the dialect of this engine.

        An insert that meets an existing key does nothing instead of failing, which keeps a
        PostgreSQL transaction usable afterwards and makes "insert unless present" one atomic
        statement on both backends.
        """
        if self._sqlite:
            return sqlite.insert(table).on_conflict_do_nothing()
        return postgresql.insert(table).on_conflict_do_nothing()

    def _lock_consents(
        self, session: Session, consents: Sequence[tuple[str, bytes]], *, shared: bool
    ) -> None:
        """Serialise puts under consent commitments against their purge (PostgreSQL only).

        Takes one advisory lock per (sender, commitment) for the rest of the transaction: puts
        take them shared, a purge takes its one lock exclusive. Without them, under READ
        COMMITTED a put could check "not purged" while a purge deletes "every pending envelope"
        without seeing the put's uncommitted row, and an envelope would survive its consent's
        revocation. SQLite needs nothing: BEGIN IMMEDIATE already makes every write transaction
        exclusive.
        """
        if self._sqlite or not consents:
            return
        keys = sorted(
            {
                int.from_bytes(
                    crypto.digest(_LABEL_CONSENT_LOCK, sender_id.encode() + b"\0" + commitment)[:8],
                    "big",
                    signed=True,
                )
                for sender_id, commitment in consents
            }
        )
        session.connection().execute(_LOCK_SHARED if shared else _LOCK_EXCLUSIVE, {"keys": keys})


def _rollback(session: Session) -> None:
    # The connection may already be gone (that is often why we are here); the original error is
    # the one worth reporting.
    with suppress(SQLAlchemyError):
        session.rollback()


def _reason(exc: OperationalError) -> str:
    return str(exc.orig).strip().splitlines()[0] if exc.orig is not None else "unknown error"


def storage_error(exc: OperationalError, what: str) -> TesseraError:
    """A write that failed in the database, as a typed error saying nothing was written."""
    orig = exc.orig
    # psycopg carries the SQLSTATE; Python's sqlite3 carries the SQLite error name.
    sqlstate = str(getattr(orig, "sqlstate", "") or "")
    sqlite_name = str(getattr(orig, "sqlite_errorname", "") or "")
    reason = _reason(exc).lower()
    if sqlstate.startswith("53") or sqlite_name == "SQLITE_FULL" or "full" in reason:
        return StorageError(
            f"could not {what}: the database's disk is full; nothing was written",
            hint="free disk space on the database server, then retry",
        )
    if (
        sqlstate.startswith("40")
        or sqlstate == "55P03"
        or sqlite_name in {"SQLITE_BUSY", "SQLITE_LOCKED"}
        or "locked" in reason
    ):
        return StorageError(
            f"could not {what}: the database is busy; nothing was written",
            hint="retry shortly",
        )
    if sqlstate.startswith("08") or sqlstate.startswith("57"):
        return Unavailable(
            f"could not {what}: the database connection was lost; nothing was written",
            hint="check that the database is running and reachable; then retry",
        )
    if sqlite_name == "SQLITE_READONLY" or "readonly" in reason:
        return StorageError(
            f"could not {what}: the database is read-only; nothing was written",
            hint="check the permissions of the database file and its directory",
        )
    return StorageError(
        f"could not {what}: the database refused the write ({_reason(exc)}); nothing was written",
        hint="check the broker's log and its database",
    )


# --- argument checks --------------------------------------------------------------------------


def check_id(value: str, name: str) -> str:
    """A directory id (agency id, region): non-empty text of at most 128 characters."""
    if not isinstance(value, str) or not value or len(value) > ID_CHARS:
        raise InvalidInput(f"{name} must be 1 to {ID_CHARS} characters")
    return value


def check_time(value: dt.datetime, name: str) -> dt.datetime:
    """A timezone-aware instant (stored in UTC; a naive one would be ambiguous)."""
    return require_aware(value, name).astimezone(dt.UTC)


def check_count(value: int, name: str, *, minimum: int = 0) -> int:
    """An integer no smaller than ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidInput(f"{name} must be an integer of at least {minimum}")
    return value
