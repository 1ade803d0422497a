"""Alembic environment for the node's schema; run through node.store.database.migrate."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

import node.store.tables  # noqa: F401  (registers the node's tables on SQLModel.metadata)

NODE_TABLES = {
    "case_record",
    "blind_index",
    "need",
    "erasure",
    "staff",
    "audit_log",
    "audit_head",
    "request_key",
    "consent",
    "outgoing_referral",
    "outbox",
    "incoming_referral",
    "processed_message",
    "referral_event",
    "budget_period",
    "budget_charge",
    "escrow_outbox",
    "anchor",
    "record_seal",
}


def _include(
    obj: object, name: str | None, type_: str, reflected: bool, compare_to: object
) -> bool:
    # Other components' tables may share SQLModel.metadata in one process; ignore them.
    return type_ != "table" or name in NODE_TABLES


connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    include_object=_include,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
