"""Alembic migrations of the broker's schema (tables ``broker_*`` only)."""
