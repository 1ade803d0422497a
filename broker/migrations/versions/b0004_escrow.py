"""the escrow of agencies' sealed tombstones and audit checkpoints (issue 14)

Revision ID: b0004
Revises: b0003
Create Date: 2026-12-02 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString, UTCDateTime

revision = "b0004"
down_revision = "b0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "broker_escrow_tombstone",
        sa.Column("agency_id", AutoString(length=128), nullable=False),
        sa.Column("sequence", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("tombstone_id", AutoString(length=36), nullable=False),
        sa.Column("sealed", sa.LargeBinary(), nullable=False),
        sa.Column("chain", sa.LargeBinary(), nullable=False),
        sa.Column("deposited_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("agency_id", "sequence"),
        sa.UniqueConstraint("agency_id", "tombstone_id"),
    )
    op.create_table(
        "broker_audit_checkpoint",
        sa.Column("agency_id", AutoString(length=128), nullable=False),
        sa.Column("number", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.Column("checkpointed_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("agency_id", "number"),
    )


def downgrade() -> None:
    op.drop_table("broker_audit_checkpoint")
    op.drop_table("broker_escrow_tombstone")
