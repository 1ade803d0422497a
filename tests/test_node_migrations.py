"""Schema migrations: a node created by an older version upgrades in place and loses nothing."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from importlib import resources
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, text

from node.keyring import Keyring
from node.store.cases import NewCase, NodeStore, _key_context, record_associated_data
from node.store.database import current_revision, head_revision, migrate
from node.store.escrow import EscrowStore
from tessera import crypto
from tessera.db import make_engine


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
                    "wk": crypto.wrap_key(keyring.record_key, data_key, _key_context(case_id)),
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
