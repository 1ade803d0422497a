"""statistics rounds: participants' declines per attempt, a round's cancellation and its reason

Revision ID: b0003
Revises: b0002
Create Date: 2026-12-04 10:12:31.508214
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString, UTCDateTime

revision = "b0003"
down_revision = "b0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "broker_stats_decline",
        sa.Column("round_id", AutoString(length=36), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("agency_id", AutoString(length=128), nullable=False),
        sa.Column("reason", AutoString(length=300), nullable=False),
        sa.Column("declined_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("round_id", "attempt", "agency_id"),
    )
    with op.batch_alter_table("broker_stats_round", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cancelled_at", UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("cancel_reason", AutoString(length=300), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("broker_stats_round", schema=None) as batch_op:
        batch_op.drop_column("cancel_reason")
        batch_op.drop_column("cancelled_at")

    op.drop_table("broker_stats_decline")
