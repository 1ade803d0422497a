"""statistics rounds, attempts, participants, shares and releases

Revision ID: b0002
Revises: b0001
Create Date: 2026-11-25 21:45:48.374433
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString, UTCDateTime

revision = "b0002"
down_revision = "b0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "broker_stats_attempt",
        sa.Column("round_id", AutoString(length=36), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.Column("deadline", UTCDateTime(), nullable=False),
        sa.Column("abandoned_at", UTCDateTime(), nullable=True),
        sa.Column("abandon_reason", AutoString(length=500), nullable=True),
        sa.PrimaryKeyConstraint("round_id", "attempt"),
    )
    op.create_table(
        "broker_stats_participant",
        sa.Column("round_id", AutoString(length=36), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("agency_id", AutoString(length=128), nullable=False),
        sa.PrimaryKeyConstraint("round_id", "attempt", "agency_id"),
    )
    with op.batch_alter_table("broker_stats_participant", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_broker_stats_participant_agency_id"), ["agency_id"], unique=False
        )

    op.create_table(
        "broker_stats_release",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("release_id", AutoString(length=36), nullable=False),
        sa.Column("round_id", AutoString(length=36), nullable=False),
        sa.Column("period", AutoString(length=7), nullable=False),
        sa.Column("table_name", AutoString(length=128), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.Column("released_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("release_id"),
        sa.UniqueConstraint("round_id"),
    )
    with op.batch_alter_table("broker_stats_release", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_broker_stats_release_period"), ["period"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_broker_stats_release_table_name"), ["table_name"], unique=False
        )

    op.create_table(
        "broker_stats_round",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("round_id", AutoString(length=36), nullable=False),
        sa.Column("idempotency_key", AutoString(length=128), nullable=True),
        sa.Column("period", AutoString(length=7), nullable=False),
        sa.Column("table_name", AutoString(length=128), nullable=False),
        sa.Column("state", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("attempt_timeout_seconds", sa.Integer(), nullable=False),
        sa.Column("release_id", AutoString(length=36), nullable=True),
        sa.Column("opened_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("idempotency_key"),
        sa.UniqueConstraint("round_id"),
    )
    with op.batch_alter_table("broker_stats_round", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_broker_stats_round_period"), ["period"], unique=False)

    op.create_table(
        "broker_stats_share",
        sa.Column("round_id", AutoString(length=36), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("agency_id", AutoString(length=128), nullable=False),
        sa.Column("digest", sa.LargeBinary(), nullable=False),
        sa.Column("cells", sa.LargeBinary(), nullable=True),
        sa.Column("submitted_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("round_id", "attempt", "agency_id"),
    )


def downgrade() -> None:
    op.drop_table("broker_stats_share")
    with op.batch_alter_table("broker_stats_round", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_broker_stats_round_period"))

    op.drop_table("broker_stats_round")
    with op.batch_alter_table("broker_stats_release", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_broker_stats_release_table_name"))
        batch_op.drop_index(batch_op.f("ix_broker_stats_release_period"))

    op.drop_table("broker_stats_release")
    with op.batch_alter_table("broker_stats_participant", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_broker_stats_participant_agency_id"))

    op.drop_table("broker_stats_participant")
    op.drop_table("broker_stats_attempt")
