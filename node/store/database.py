"""Opening a node's database: engine, then versioned migrations (tessera.schema) to the current
schema, whose revisions live in ``node/migrations/versions``.

Some revisions encrypt what older ones stored in clear (0005 seals need records), so they need the
node's keyring: pass it whenever the node's own keys are at hand. Without it, a database that
holds something to encrypt is refused (ConfigError) and left as it was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import Engine

from tessera.schema import Schema

if TYPE_CHECKING:
    from node.keyring import Keyring

# "tsnode" in ASCII: the advisory lock key taken while migrating on PostgreSQL.
SCHEMA = Schema(package="node", version_table="alembic_version", lock_key=0x74736E6F6465)


def migrate(engine: Engine, keyring: Keyring | None = None) -> None:
    """Bring the node's schema to the newest revision."""
    SCHEMA.migrate(engine, {"keyring": keyring})


def current_revision(engine: Engine) -> str | None:
    """The node schema revision the database is at."""
    return SCHEMA.current_revision(engine)


def head_revision() -> str | None:
    """The newest node schema revision this version knows."""
    return SCHEMA.head_revision()


def open_database(url: str, keyring: Keyring | None = None) -> Engine:
    """An engine on ``url`` with the node's schema migrated (with the keyring, when a revision
    must encrypt existing rows)."""
    return SCHEMA.open_database(url, {"keyring": keyring})
