"""Opening the broker's database: engine, then versioned migrations (tessera.schema) to the
current schema, whose revisions live in ``broker/migrations/versions`` (ids b0001, b0002, ...)."""

from __future__ import annotations

from sqlalchemy import Engine

from tessera.schema import Schema

# Version table of the broker's Alembic history (broker/migrations/env.py sets the same name), so
# a broker and a node may share one database.
VERSION_TABLE = "broker_alembic_version"
# "tsbroker" in ASCII: the advisory lock key taken while migrating on PostgreSQL.
SCHEMA = Schema(package="broker", version_table=VERSION_TABLE, lock_key=0x747362726F6B6572)


def migrate(engine: Engine) -> None:
    """Bring the broker's schema to the newest revision."""
    SCHEMA.migrate(engine)


def current_revision(engine: Engine) -> str | None:
    """The broker schema revision the database is at."""
    return SCHEMA.current_revision(engine)


def head_revision() -> str | None:
    """The newest broker schema revision this version knows."""
    return SCHEMA.head_revision()


def open_database(url: str) -> Engine:
    """An engine on ``url`` with the broker's schema migrated."""
    return SCHEMA.open_database(url)
