"""initial broker schema

Revision ID: b0001
Revises:
Create Date: 2026-11-25 20:46:52.319263
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString, UTCDateTime

revision = "b0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "broker_agency",
        sa.Column("agency_id", AutoString(length=128), nullable=False),
        sa.Column("region", AutoString(length=128), nullable=False),
        sa.Column("signing_key", sa.LargeBinary(), nullable=False),
        sa.Column("encryption_key", sa.LargeBinary(), nullable=False),
        sa.Column("revoked", sa.Boolean(), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("agency_id"),
        sa.UniqueConstraint("signing_key"),
    )
    with op.batch_alter_table("broker_agency", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_broker_agency_region"), ["region"], unique=False)

    op.create_table(
        "broker_enrolment_token",
        sa.Column("token_hash", sa.LargeBinary(), nullable=False),
        sa.Column("agency_id", AutoString(length=128), nullable=False),
        sa.Column("region", AutoString(length=128), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("consumed_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("token_hash"),
    )
    with op.batch_alter_table("broker_enrolment_token", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_broker_enrolment_token_agency_id"), ["agency_id"], unique=False
        )

    op.create_table(
        "broker_envelope",
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("envelope_id", AutoString(length=36), nullable=False),
        sa.Column("sender_id", AutoString(length=128), nullable=False),
        sa.Column("recipient_id", AutoString(length=128), nullable=False),
        sa.Column("consent_commitment", sa.LargeBinary(), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", AutoString(length=128), nullable=True),
        sa.Column("lease_until", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("envelope_id"),
    )
    with op.batch_alter_table("broker_envelope", schema=None) as batch_op:
        batch_op.create_index(
            "ix_broker_envelope_consent", ["sender_id", "consent_commitment"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_broker_envelope_lease_owner"), ["lease_owner"], unique=False
        )
        batch_op.create_index(
            "ix_broker_envelope_mailbox", ["recipient_id", "received_at", "seq"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_broker_envelope_received_at"), ["received_at"], unique=False
        )

    op.create_table(
        "broker_log_entry",
        sa.Column("sequence", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("agency_id", AutoString(length=128), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.Column("chain", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("sequence"),
    )
    with op.batch_alter_table("broker_log_entry", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_broker_log_entry_agency_id"), ["agency_id"], unique=False
        )

    op.create_table(
        "broker_nonce",
        sa.Column("signer", sa.LargeBinary(), nullable=False),
        sa.Column("nonce", sa.LargeBinary(), nullable=False),
        sa.Column("seen_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("signer", "nonce"),
    )
    with op.batch_alter_table("broker_nonce", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_broker_nonce_expires_at"), ["expires_at"], unique=False
        )

    op.create_table(
        "broker_purged_consent",
        sa.Column("sender_id", AutoString(length=128), nullable=False),
        sa.Column("consent_commitment", sa.LargeBinary(), nullable=False),
        sa.Column("purged_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("sender_id", "consent_commitment"),
    )
    op.create_table(
        "broker_receipt",
        sa.Column("sender_id", AutoString(length=128), nullable=False),
        sa.Column("idempotency_key", AutoString(length=128), nullable=False),
        sa.Column("envelope_id", AutoString(length=36), nullable=False),
        sa.Column("recipient_id", AutoString(length=128), nullable=False),
        sa.Column("consent_commitment", sa.LargeBinary(), nullable=False),
        sa.Column("envelope_digest", sa.LargeBinary(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.Column("acknowledged_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("sender_id", "idempotency_key"),
        sa.UniqueConstraint("envelope_id"),
    )
    with op.batch_alter_table("broker_receipt", schema=None) as batch_op:
        batch_op.create_index(
            "ix_broker_receipt_consent", ["sender_id", "consent_commitment"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_broker_receipt_received_at"), ["received_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("broker_receipt", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_broker_receipt_received_at"))
        batch_op.drop_index("ix_broker_receipt_consent")

    op.drop_table("broker_receipt")
    op.drop_table("broker_purged_consent")
    with op.batch_alter_table("broker_nonce", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_broker_nonce_expires_at"))

    op.drop_table("broker_nonce")
    with op.batch_alter_table("broker_log_entry", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_broker_log_entry_agency_id"))

    op.drop_table("broker_log_entry")
    with op.batch_alter_table("broker_envelope", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_broker_envelope_received_at"))
        batch_op.drop_index("ix_broker_envelope_mailbox")
        batch_op.drop_index(batch_op.f("ix_broker_envelope_lease_owner"))
        batch_op.drop_index("ix_broker_envelope_consent")

    op.drop_table("broker_envelope")
    with op.batch_alter_table("broker_enrolment_token", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_broker_enrolment_token_agency_id"))

    op.drop_table("broker_enrolment_token")
    with op.batch_alter_table("broker_agency", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_broker_agency_region"))

    op.drop_table("broker_agency")
