"""Opening the broker's database: engine, then versioned migrations (Alembic) to the current schema.

Upgrading Tessera never loses data: the schema only moves forward through the revisions in
``broker/migrations/versions`` (ids ``b0001``, ``b0002``, ...), applied at start-up. Several broker
processes may start at once on one PostgreSQL: a transaction-scoped advisory lock lets exactly one
of them migrate while the others wait and then find nothing left to do.
"""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import OperationalError

from tessera.db import make_engine
from tessera.errors import Unavailable

# Version table of the broker's Alembic history (broker/migrations/env.py sets the same name).
VERSION_TABLE = "broker_alembic_version"
# Arbitrary, fixed key of the PostgreSQL advisory lock taken while migrating ("tsbroker" in ASCII).
_MIGRATION_LOCK_KEY = 0x747362726F6B6572


def _alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("broker") / "migrations"))
    return cfg


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (a no-op when it is already there)."""
    cfg = _alembic_config()
    with engine.begin() as connection:
        _lock_for_migration(connection)
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


def _lock_for_migration(connection: Connection) -> None:
    # Two broker replicas starting together would otherwise both try to create the tables and
    # one would fail. The lock is released when the migration's transaction ends.
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at (None before the first migration)."""
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


def head_revision() -> str | None:
    """The newest revision this version of Tessera knows."""
    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


def open_database(url: str) -> Engine:
    """An engine on ``url`` with the schema migrated; Unavailable if the database is unreachable."""
    engine = make_engine(url)
    try:
        migrate(engine)
    except OperationalError as exc:
        engine.dispose()
        raise Unavailable(
            f"cannot open the broker's database: {exc.orig}",
            hint="check database_url / TESSERA_DATABASE_URL and that the server is running",
        ) from None
    return engine
