"""Opening a node's database: engine, then versioned migrations (tessera.schema) to the current
schema, whose revisions live in ``node/migrations/versions``."""

from __future__ import annotations

from sqlalchemy import Engine

from tessera.schema import Schema

# "tsnode" in ASCII: the advisory lock key taken while migrating on PostgreSQL.
SCHEMA = Schema(package="node", version_table="alembic_version", lock_key=0x74736E6F6465)


def migrate(engine: Engine) -> None:
    """Bring the node's schema to the newest revision."""
    SCHEMA.migrate(engine)


def current_revision(engine: Engine) -> str | None:
    """The node schema revision the database is at."""
    return SCHEMA.current_revision(engine)


def head_revision() -> str | None:
    """The newest node schema revision this version knows."""
    return SCHEMA.head_revision()


def open_database(url: str) -> Engine:
    """An engine on ``url`` with the node's schema migrated."""
    return SCHEMA.open_database(url)
