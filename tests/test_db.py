"""Database engines: SQLite gets WAL and durable settings; PostgreSQL is selected by URL."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from tessera.db import is_sqlite, make_engine, normalise_url
from tessera.errors import ConfigError


def test_sqlite_engine_uses_wal_and_full_sync(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 't.db'}")
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA secure_delete")).scalar() == 1
    engine.dispose()


def test_postgres_url_selects_psycopg3() -> None:
    assert normalise_url("postgresql://u@h/db").startswith("postgresql+psycopg://")
    assert not is_sqlite("postgresql://u@h/db")


def test_unknown_database_is_refused_with_a_hint() -> None:
    with pytest.raises(ConfigError) as info:
        normalise_url("mysql://u@h/db")
    assert "postgresql://" in (info.value.hint or "")
    with pytest.raises(ConfigError):
        normalise_url("not a url")


def test_real_postgres_round_trip(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (v integer)"))
        conn.execute(text("INSERT INTO t VALUES (41)"))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT v + 1 FROM t")).scalar() == 42
    engine.dispose()
