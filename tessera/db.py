"""Database engines: embedded SQLite (WAL) by default, PostgreSQL by URL, nothing else changed.

Only storage modules (``node/store``, ``broker/store``) build on this; everything above them works
with domain objects.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url

from tessera import metrics
from tessera.errors import ConfigError


def normalise_url(url: str) -> str:
    """Select the psycopg 3 driver for plain ``postgresql://`` URLs; validate the scheme."""
    try:
        parsed = make_url(url)
    except Exception as exc:  # SQLAlchemy raises ArgumentError with a terse message
        raise ConfigError(f"not a database URL: {url!r}", hint="see docs/configuration.md") from exc
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    if backend == "sqlite":
        return url
    raise ConfigError(
        f"unsupported database {backend!r}", hint="use sqlite:///PATH or postgresql://..."
    )


def libpq_dsn(url: str) -> str:
    """The ``postgresql://`` connection string psycopg takes directly, from a database URL in
    SQLAlchemy's form (``postgresql+psycopg://...`` included)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def is_sqlite(url: str) -> bool:
    """True for the embedded SQLite backend."""
    return make_url(url).get_backend_name() == "sqlite"


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``; SQLite gets WAL, foreign keys and a busy timeout on every connection.

    WAL with ``synchronous=FULL`` keeps every committed transaction across a killed process or a
    power cut, which the relay's never-lose-an-envelope promise needs (DESIGN.md section 6).
    """
    url = normalise_url(url)
    if is_sqlite(url):
        engine = create_engine(url, connect_args={"check_same_thread": False}, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    # Erased survivors must not linger in free pages (crypto-shredding, DESIGN.md section 5).
    cursor.execute("PRAGMA secure_delete=ON")
    cursor.close()


def database_answers(engine: Engine) -> bool:
    """Whether the database answers a trivial query now; keeps the ``database_up`` gauge."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception:  # any failure to reach the database means not serving
        metrics.DATABASE_UP.set(0)
        return False
    metrics.DATABASE_UP.set(1)
    return True
