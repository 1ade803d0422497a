"""Opening a node's database: engine, then versioned migrations (Alembic) to the current schema.

Upgrading Tessera never loses data: the schema only moves forward through the revisions in
``node/migrations/versions``, each applied in its own transaction at start-up.
"""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from tessera.db import make_engine
from tessera.errors import Unavailable


def _alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("node") / "migrations"))
    return cfg


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (a no-op when it is already there)."""
    cfg = _alembic_config()
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at (None before the first migration)."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


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
            f"cannot open the node's database: {exc.orig}",
            hint="check database_url / TESSERA_DATABASE_URL and that the server is running",
        ) from None
    return engine
