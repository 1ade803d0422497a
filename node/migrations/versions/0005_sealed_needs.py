"""sealed needs: need records encrypted under the survivor's data key (issue 14 item 5)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 10:00:00.000000

Every clear need row (category, status, identified_on, updated_at) becomes a ``tag`` and a
``ciphertext`` (node.store.needs), then the clear columns go. Sealing needs the node's keyring,
which node.store.database.migrate passes in the Alembic attributes; a database that holds need
rows and is upgraded without it is refused (nothing changes), with a hint to start the node.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_CLEAR = ("category", "status", "identified_on", "updated_at")


def _keyring(rows: int) -> Any:
    from tessera.errors import ConfigError

    keyring = op.get_context().config.attributes.get("keyring")  # type: ignore[union-attr]
    if keyring is None and rows:
        raise ConfigError(
            f"this database holds {rows} need records in clear; upgrading it seals them under "
            "each survivor's key, which needs the node's keyring",
            hint="start the node (`tessera node serve`) to upgrade its database",
        )
    return keyring


def _data_key(keyring: Any, case_id: str, wrapped: bytes) -> Any:
    from tessera import crypto

    context = f"tessera/v1|survivor_key|{case_id}".encode()
    return crypto.unwrap_key(keyring.record_key, bytes(wrapped), context)


def _as_utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def upgrade() -> None:
    from node.domain import Need
    from node.store.needs import seal_need
    from tessera.needs import NeedCategory, NeedStatus

    with op.batch_alter_table("need", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("tag", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True)
        )
        batch_op.add_column(sa.Column("ciphertext", sa.LargeBinary(), nullable=True))
    bind = op.get_bind()
    rows = bind.execute(
        sa.text(
            "SELECT need.id, need.case_id, need.category, need.status, need.identified_on, "
            "need.updated_at, case_record.wrapped_key FROM need "
            "JOIN case_record ON case_record.case_id = need.case_id ORDER BY need.case_id"
        ).columns(
            identified_on=sa.Date(),
            updated_at=sqlmodel.sql.sqltypes.UTCDateTime(),
            wrapped_key=sa.LargeBinary(),
        )
    ).all()
    keyring = _keyring(len(rows))
    data_key, key_case = None, ""
    for row in rows:
        if row.case_id != key_case:
            data_key, key_case = _data_key(keyring, row.case_id, row.wrapped_key), row.case_id
        need = Need(
            NeedCategory(row.category),
            NeedStatus(row.status),
            row.identified_on,
            _as_utc(row.updated_at),
        )
        sealed = seal_need(data_key, row.case_id, need)
        bind.execute(
            sa.text("UPDATE need SET tag = :tag, ciphertext = :ciphertext WHERE id = :id"),
            {"tag": sealed.tag, "ciphertext": sealed.ciphertext, "id": row.id},
        )
    with op.batch_alter_table("need", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_need_category"))
        batch_op.drop_index(batch_op.f("ix_need_status"))
        for column in _CLEAR:
            batch_op.drop_column(column)
        batch_op.alter_column(
            "tag", existing_type=sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False
        )
        batch_op.alter_column("ciphertext", existing_type=sa.LargeBinary(), nullable=False)
        batch_op.create_unique_constraint("uq_need_case_id_tag", ["case_id", "tag"])


def downgrade() -> None:
    from node.store.needs import open_need

    with op.batch_alter_table("need", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("category", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True)
        )
        batch_op.add_column(
            sa.Column("status", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True)
        )
        batch_op.add_column(sa.Column("identified_on", sa.Date(), nullable=True))
        batch_op.add_column(
            sa.Column("updated_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True)
        )
    bind = op.get_bind()
    rows = bind.execute(
        sa.text(
            "SELECT need.id, need.case_id, need.tag, need.ciphertext, case_record.wrapped_key "
            "FROM need JOIN case_record ON case_record.case_id = need.case_id"
        ).columns(ciphertext=sa.LargeBinary(), wrapped_key=sa.LargeBinary())
    ).all()
    keyring = _keyring(len(rows))
    for row in rows:
        data_key = _data_key(keyring, row.case_id, row.wrapped_key)
        need = open_need(data_key, row.case_id, row.tag, bytes(row.ciphertext))
        bind.execute(
            sa.text(
                "UPDATE need SET category = :c, status = :s, identified_on = :i, "
                "updated_at = :u WHERE id = :id"
            ).bindparams(
                sa.bindparam("i", type_=sa.Date()),
                sa.bindparam("u", type_=sqlmodel.sql.sqltypes.UTCDateTime()),
            ),
            {
                "c": need.category.value,
                "s": need.status.value,
                "i": need.identified_on,
                "u": need.updated_at,
                "id": row.id,
            },
        )
    with op.batch_alter_table("need", schema=None) as batch_op:
        batch_op.drop_constraint("uq_need_case_id_tag", type_="unique")
        batch_op.drop_column("tag")
        batch_op.drop_column("ciphertext")
        for column, kind in (
            ("category", sqlmodel.sql.sqltypes.AutoString(length=32)),
            ("status", sqlmodel.sql.sqltypes.AutoString(length=16)),
            ("identified_on", sa.Date()),
            ("updated_at", sqlmodel.sql.sqltypes.UTCDateTime()),
        ):
            batch_op.alter_column(column, existing_type=kind, nullable=False)
        batch_op.create_unique_constraint("uq_need_case_id_category", ["case_id", "category"])
        batch_op.create_index(batch_op.f("ix_need_category"), ["category"], unique=False)
        batch_op.create_index(batch_op.f("ix_need_status"), ["status"], unique=False)
