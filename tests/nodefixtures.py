"""Real agency nodes for the storage-layer tests: a home made by ``init_node``, a real database.

A :class:`Node` is what an administrator's machine holds: the home directory (keyring, audit-head
file, ledger) and the database, SQLite in the home or a fresh PostgreSQL database. Tests attack it
with raw SQL and raw file bytes; nothing is mocked.

Test modules import the ``db_url`` fixture (parametrised over SQLite and PostgreSQL) and the
``nodes`` factory fixture from here.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from node.htcds.synthetic import synthetic_records
from node.keyring import Keyring, open_keyring
from node.setup import NodeInit, init_node
from node.store.cases import NewCase, NodeStore
from node.store.database import open_database
from tessera.config import Argon2Profile, KekSource

PASSPHRASE = "correct horse battery staple"
SQLITE = "sqlite"
POSTGRESQL = "postgresql"
# Tables of the node, in an order whose rows can be compared one table at a time.
NODE_TABLES = (
    "case_record",
    "blind_index",
    "need",
    "erasure",
    "staff",
    "audit_log",
    "audit_head",
)
# The fields issue 4 names as the ones that must never be at rest in clear.
IDENTIFYING_FIELDS = (
    "prs_FirstName",
    "prs_SecondName",
    "prs_Email",
    "prs_MobilePhone",
    "prs_HomePhone",
    "prs_MailingStreet",
)


@dataclass
class Node:
    """One node: its home, its database URL, and a store opened on them."""

    home: Path
    url: str
    passphrase: str | None
    keyring: Keyring
    engine: Engine
    store: NodeStore
    _engines: list[Engine] = field(default_factory=list, repr=False)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == SQLITE

    @property
    def sqlite_file(self) -> Path:
        assert self.url.startswith("sqlite:///")
        return Path(self.url.removeprefix("sqlite:///"))

    @property
    def wal_file(self) -> Path:
        return self.sqlite_file.with_name(self.sqlite_file.name + "-wal")

    def sql(self, statement: str, **params: Any) -> list[Any]:
        """Run raw SQL in its own transaction (the attacker's tool); rows for a SELECT."""
        with self.engine.begin() as conn:
            result = conn.execute(text(statement), params)
            return list(result) if result.returns_rows else []

    def another_store(self) -> NodeStore:
        """A second NodeStore with its own engine on the same home and database."""
        engine = open_database(self.url)
        self._engines.append(engine)
        return NodeStore(engine, open_keyring(self.home, self.passphrase), self.home)

    def table_rows(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every node table, for before/after comparisons."""
        order = {"audit_log": "seq", "audit_head": "id", "blind_index": "id", "need": "id"}
        rows: dict[str, list[tuple[Any, ...]]] = {}
        for table in NODE_TABLES:
            key = order.get(table, "case_id" if table != "staff" else "staff_id")
            rows[table] = [tuple(r) for r in self.sql(f"SELECT * FROM {table} ORDER BY {key}")]
        return rows

    def disk_bytes(self) -> bytes:
        """The raw bytes the database has on disk: the SQLite file plus its write-ahead log."""
        data = self.sqlite_file.read_bytes()
        return data + (self.wal_file.read_bytes() if self.wal_file.exists() else b"")

    def dispose(self) -> None:
        for engine in (self.engine, *self._engines):
            engine.dispose()


class NodeFactory:
    """Makes nodes under one test's ``tmp_path`` and disposes their engines afterwards."""

    def __init__(self, tmp_path: Path) -> None:
        self._tmp_path = tmp_path
        self._nodes: list[Node] = []

    def make(
        self,
        database_url: str = "",
        *,
        name: str = "node",
        passphrase: str | None = PASSPHRASE,
        kek_source: KekSource = KekSource.PASSPHRASE,
        key_file: Path | None = None,
    ) -> Node:
        """``init_node`` a new home, then open its keyring, database and store."""
        home = self._tmp_path / name
        settings = init_node(
            NodeInit(
                home=home,
                name=f"Agency {name}",
                region="test-region",
                listen="127.0.0.1:0",
                database_url=database_url,
                kek_source=kek_source,
                key_file=key_file,
                argon2=Argon2Profile.TEST_CHEAP,
            ),
            passphrase,
        )
        return self.open(home, settings.effective_database_url, passphrase)

    def open(self, home: Path, url: str, passphrase: str | None = PASSPHRASE) -> Node:
        """Open an existing home and database as the node's server would."""
        keyring = open_keyring(home, passphrase)
        engine = open_database(url)
        node = Node(home, url, passphrase, keyring, engine, NodeStore(engine, keyring, home))
        self._nodes.append(node)
        return node

    def close(self) -> None:
        for node in self._nodes:
            node.dispose()


@pytest.fixture(name="nodes")
def nodes_fixture(tmp_path: Path) -> Iterator[NodeFactory]:
    """A factory of real nodes under ``tmp_path``."""
    factory = NodeFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(
    name="db_url", params=[SQLITE, pytest.param(POSTGRESQL, marks=pytest.mark.postgres)]
)
def db_url_fixture(request: pytest.FixtureRequest) -> str:
    """``""`` (SQLite in the node's home) or a fresh PostgreSQL database's URL."""
    if request.param == POSTGRESQL:
        url: str = request.getfixturevalue("postgres_url")
        return url
    return ""


@contextmanager
def extra_postgres_database(postgres_url: str) -> Iterator[str]:
    """One more empty database on the server of ``postgres_url`` (a second machine, say)."""
    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(postgres_url).set(database="postgres")
    admin_dsn = admin.render_as_string(hide_password=False)
    name = f"tessera_test_{secrets.token_hex(6)}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pg_dump_data(postgres_url: str) -> bytes:
    """``pg_dump --data-only`` of one database: every row the server holds, as text."""
    env = dict(os.environ, PGCONNECT_TIMEOUT="10")
    done = subprocess.run(
        ["pg_dump", "--data-only", "--no-owner", f"--dbname={postgres_url}"],
        check=True,
        capture_output=True,
        env=env,
        timeout=30,
    )
    return done.stdout


def synthetic_cases(count: int, seed: int = 7) -> list[NewCase]:
    """``count`` fictional HTCDS records as new cases."""
    return [NewCase(fields=record) for record in synthetic_records(count, seed)]


def identifying_values(records: Sequence[Mapping[str, str]]) -> list[str]:
    """Every name, email, phone number and street of ``records`` (non-empty ones)."""
    return [r[f] for r in records for f in IDENTIFYING_FIELDS if r.get(f)]


def encodings(value: str) -> list[bytes]:
    """How a value could sit in a file if stored in clear: UTF-8, and JSON-escaped ASCII."""
    import json

    forms = {value.encode("utf-8"), json.dumps(value)[1:-1].encode("ascii")}
    return sorted(forms)


def found_in(data: bytes, values: Sequence[str]) -> list[str]:
    """The values of ``values`` that occur in ``data`` in any of their clear encodings."""
    return [v for v in values if any(form in data for form in encodings(v))]


def flip_byte(data: bytes, index: int) -> bytes:
    """``data`` with the byte at ``index`` inverted (a one-byte corruption)."""
    index %= len(data)
    return data[:index] + bytes([data[index] ^ 0xFF]) + data[index + 1 :]


def problem_about(problems: Sequence[str], seq: int, words: str) -> bool:
    """True if some problem names entry ``seq`` (exactly, not 30 for 3) and contains ``words``."""
    pattern = re.compile(rf"\bentry {seq}\b")
    return any(pattern.search(p) and words in p for p in problems)
