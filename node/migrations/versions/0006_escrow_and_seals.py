"""escrow outbox, escrow anchor, record seals (issue 14)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString, UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "escrow_outbox",
        sa.Column("tombstone_id", AutoString(length=36), nullable=False),
        sa.Column("sealed", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", AutoString(length=500), nullable=False),
        sa.PrimaryKeyConstraint("tombstone_id"),
    )
    op.create_table(
        "anchor",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("escrow_size", sa.Integer(), nullable=False),
        sa.Column("escrow_chain", sa.LargeBinary(), nullable=False),
        sa.Column("escrow_confirmed_at", UTCDateTime(), nullable=True),
        sa.Column("sealed_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    # Cases written before this revision get their seals from the node at its next start
    # (node.store.anchors.RecordSeals.backfill), which needs the record key.
    op.create_table(
        "record_seal",
        sa.Column("case_id", AutoString(length=36), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("audit_seq", sa.Integer(), nullable=False),
        sa.Column("seal", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("case_id"),
    )


def downgrade() -> None:
    op.drop_table("record_seal")
    op.drop_table("anchor")
    op.drop_table("escrow_outbox")
