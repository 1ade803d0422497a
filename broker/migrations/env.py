"""Alembic environment for the broker's schema; run through broker.store.database.migrate."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

from broker.store.database import VERSION_TABLE
from broker.store.tables import BROKER_TABLES


def _include(
    obj: object, name: str | None, type_: str, reflected: bool, compare_to: object
) -> bool:
    # Other components' tables may share SQLModel.metadata in one process (tests import node and
    # broker together) or the database itself; the broker's migrations never touch them.
    return type_ != "table" or name in BROKER_TABLES


connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    include_object=_include,
    # Its own version table: the broker can share a PostgreSQL database with another component's
    # Alembic history (a node's uses the default one) without either overwriting the other's.
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
