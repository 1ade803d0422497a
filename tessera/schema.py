"""Versioned schema migrations (Alembic) for one component's database: the node's or the broker's.

Upgrading Tessera never loses data: a schema only moves forward through the revisions in its
``migrations/versions`` folder, applied at start-up in one transaction (begun explicitly on
SQLite, whose driver would otherwise commit each DDL statement on its own). Several processes
may start at once on one PostgreSQL: a transaction-scoped advisory lock lets exactly one migrate
while the others wait, then find nothing left to do.

Each component's ``store/database.py`` names its :class:`Schema` and calls it; everything else
about opening a database (engine, migration, the errors a person sees) is here, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import OperationalError

from tessera.db import make_engine
from tessera.errors import Unavailable


@dataclass(frozen=True)
class Schema:
    """One component's migration history: its package, Alembic version table and lock key."""

    package: str
    version_table: str
    lock_key: int

    def _config(self) -> Config:
        cfg = Config()
        cfg.set_main_option("script_location", str(resources.files(self.package) / "migrations"))
        return cfg

    def migrate(self, engine: Engine, attributes: dict[str, Any] | None = None) -> None:
        """Bring the schema to the newest revision (a no-op when it is already there).

        ``attributes`` reach the revisions in ``config.attributes`` (say the node's keyring, for
        a revision that must encrypt).
        """
        before = self.current_revision(engine)
        self._upgrade(engine, attributes)
        if before != self.head_revision() and engine.dialect.name == "sqlite":
            # A revision that rewrote rows (the node's 0005 seals clear ones) freed pages that
            # secure_delete zeroed in the write-ahead log: push them into the main file now, so
            # the clear originals do not sit there until some later checkpoint.
            with engine.connect() as conn:
                conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))

    def _upgrade(self, engine: Engine, attributes: dict[str, Any] | None) -> None:
        cfg = self._config()
        cfg.attributes.update(attributes or {})
        with engine.begin() as connection:
            if connection.dialect.name == "sqlite":
                # Python's sqlite3 driver opens no transaction before DDL, so each CREATE TABLE
                # would commit on its own and a crash mid-migration would leave a database that
                # never opens again. An explicit one makes the whole upgrade atomic.
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            self._lock(connection)
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "head")

    def _lock(self, connection: Connection) -> None:
        # Two replicas starting together would otherwise both create the tables and one would
        # fail. The lock is released when the migration's transaction ends.
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": self.lock_key})

    def current_revision(self, engine: Engine) -> str | None:
        """The revision the database is at (None before the first migration)."""
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"version_table": self.version_table}
            )
            return context.get_current_revision()

    def head_revision(self) -> str | None:
        """The newest revision this version of Tessera knows."""
        return ScriptDirectory.from_config(self._config()).get_current_head()

    def open_database(self, url: str, attributes: dict[str, Any] | None = None) -> Engine:
        """An engine on ``url`` with the schema migrated; Unavailable if it cannot be reached."""
        engine = make_engine(url)
        try:
            self.migrate(engine, attributes)
        except OperationalError as exc:
            engine.dispose()
            raise Unavailable(
                f"cannot open the {self.package}'s database: {exc.orig}",
                hint="check database_url / TESSERA_DATABASE_URL and that the server is running",
            ) from None
        except BaseException:  # a refused migration (ConfigError), an interrupt: no engine leaks
            engine.dispose()
            raise
        return engine
