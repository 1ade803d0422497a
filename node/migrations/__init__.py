"""Versioned schema migrations of the node's database (Alembic), applied at start-up."""
