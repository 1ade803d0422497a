"""Schema migrations: a node created by an older version upgrades in place and loses nothing."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from importlib import resources
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Date, Engine, bindparam, text
from sqlmodel import SQLModel
from sqlmodel.sql.sqltypes import UTCDateTime

from node.keyring import Keyring
from node.store import tables as node_tables
from node.store.cases import NewCase, NodeStore
from node.store.database import current_revision, head_revision, migrate
from node.store.escrow import EscrowStore
from node.store.records import record_associated_data, survivor_key_context
from tessera import crypto
from tessera.db import make_engine
from tessera.errors import ConfigError
from tessera.needs import NeedCategory, NeedStatus
from tests.nodefixtures import pg_dump_data


def _upgrade_to(url: str, revision: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("node") / "migrations"))
    engine = make_engine(url)
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)
    engine.dispose()


def _old_cases(engine: Engine, keyring: Keyring, names: list[str]) -> list[str]:
    """Case rows as revision 0001's node wrote them: the row alone, encrypted the same way."""
    ids = []
    with engine.begin() as conn:
        for name in names:
            case_id = str(uuid.uuid4())
            data_key = crypto.DataKey.generate()
            payload = json.dumps({"fields": {"prs_FirstName": name}, "notes": ""}).encode()
            now = dt.datetime.now(dt.UTC)
            conn.execute(
                text(
                    "INSERT INTO case_record (case_id, version, state, created_at, updated_at,"
                    " ciphertext, wrapped_key) VALUES (:c, 1, 'open', :t, :t, :ct, :wk)"
                ),
                {
                    "c": case_id,
                    "t": now,
                    "ct": crypto.encrypt(data_key, payload, record_associated_data(case_id, 1)),
                    "wk": crypto.wrap_key(
                        keyring.record_key, data_key, survivor_key_context(case_id)
                    ),
                },
            )
            ids.append(case_id)
    return ids


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'old.db'}"
    return str(request.getfixturevalue("postgres_url"))


def test_an_old_schema_upgrades_without_losing_cases(url: str) -> None:
    _upgrade_to(url, "0001")
    engine = make_engine(url)
    assert current_revision(engine) == "0001"
    keyring = Keyring(crypto.Identity.generate(), crypto.DataKey.generate())
    ids = _old_cases(engine, keyring, [f"Vell{i}" for i in range(5)])
    migrate(engine)
    assert current_revision(engine) == head_revision()
    store = NodeStore(engine, keyring)
    # Cases written before record seals existed are sealed once, as the node's start does.
    assert EscrowStore(store).backfill_seals("system:start") == 5
    assert EscrowStore(store).backfill_seals("system:start") == 0
    assert [c.fields["prs_FirstName"] for c in store.read_cases(ids)] == [
        f"Vell{i}" for i in range(5)
    ]
    # The new revision's feature works on the upgraded database.
    again = store.create_cases("test", [NewCase(fields={})], idempotency_key="k-1")
    assert store.create_cases("test", [NewCase(fields={})], idempotency_key="k-1") == again
    assert store.verify_audit().ok
    migrate(engine)  # running it again is a no-op
    engine.dispose()


# Other components' tables share SQLModel.metadata in this process; the node's are these.
NODE_TABLES = {
    model.__tablename__
    for model in vars(node_tables).values()
    if isinstance(model, type) and issubclass(model, SQLModel) and hasattr(model, "__table__")
}


def _node_tables_only(obj: object, name: str | None, type_: str, *_: object) -> bool:
    return type_ != "table" or name in NODE_TABLES


def _raw_bytes(url: str) -> bytes:
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        wal = path.with_name(path.name + "-wal")
        return path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    return pg_dump_data(url)


def test_an_upgrade_seals_the_need_records_it_finds_in_clear(url: str) -> None:
    _upgrade_to(url, "0004")
    engine = make_engine(url)
    keyring = Keyring(crypto.Identity.generate(), crypto.DataKey.generate())
    ids = _old_cases(engine, keyring, [f"Vell{i}" for i in range(3)])
    clear = [
        (ids[0], "substance_use", "unmet", dt.date(2026, 1, 5)),
        (ids[0], "legal_civil", "in_progress", dt.date(2026, 2, 1)),
        (ids[2], "immigration", "declined", dt.date(2026, 3, 9)),
    ]
    at = dt.datetime(2026, 4, 1, 12, 30, 15, 123456, tzinfo=dt.UTC)
    with engine.begin() as conn:
        for case_id, category, status, identified_on in clear:
            conn.execute(
                text(
                    "INSERT INTO need (case_id, category, status, identified_on, updated_at) "
                    "VALUES (:c, :cat, :st, :on, :at)"
                ).bindparams(bindparam("on", type_=Date()), bindparam("at", type_=UTCDateTime())),
                {"c": case_id, "cat": category, "st": status, "on": identified_on, "at": at},
            )
    if url.startswith("sqlite"):
        assert b"substance_use" in _raw_bytes(url)  # the attack below sees clear codes

    # Without the keyring the upgrade cannot seal them: refused, and nothing changed.
    with pytest.raises(ConfigError, match="3 need records in clear"):
        migrate(engine)
    assert current_revision(engine) == "0004"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM need")).scalar() == 3

    migrate(engine, keyring)
    assert current_revision(engine) == head_revision()
    store = NodeStore(engine, keyring)
    EscrowStore(store).backfill_seals("system:start")  # as the node's start does
    needs = {c.case_id: c.needs for c in store.read_cases(ids)}
    got = sorted(
        (case_id, n.category.value, n.status.value, n.identified_on, n.updated_at)
        for case_id, case_needs in needs.items()
        for n in case_needs
    )
    assert got == sorted((*row, at) for row in clear)
    assert [s.case_id for s in store.list_cases(need=NeedCategory.SUBSTANCE_USE)] == [ids[0]]
    # A need can still be changed, and one per category per case.
    store.set_need("test", ids[0], NeedCategory.SUBSTANCE_USE, NeedStatus.MET)
    assert len(store.summary(ids[0]).needs) == 2
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"include_object": _node_tables_only})
        assert compare_metadata(context, SQLModel.metadata) == []
    engine.dispose()
    codes = ["substance_use", "legal_civil", "immigration", "in_progress", "declined", "unmet"]
    assert [c for c in codes if c.encode() in _raw_bytes(url)] == []
