"""Schema migrations: a node created by an older version upgrades in place and loses nothing."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config

from node.keyring import Keyring
from node.store.cases import NewCase, NodeStore
from node.store.database import current_revision, head_revision, migrate
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
    old = NodeStore(engine, keyring)
    ids = old.create_cases(
        "test", [NewCase(fields={"prs_FirstName": f"Vell{i}"}) for i in range(5)]
    )
    migrate(engine)
    assert current_revision(engine) == head_revision()
    store = NodeStore(engine, keyring)
    assert [c.fields["prs_FirstName"] for c in store.read_cases(ids)] == [
        f"Vell{i}" for i in range(5)
    ]
    # The new revision's feature works on the upgraded database.
    again = store.create_cases("test", [NewCase(fields={})], idempotency_key="k-1")
    assert store.create_cases("test", [NewCase(fields={})], idempotency_key="k-1") == again
    assert store.verify_audit().ok
    migrate(engine)  # running it again is a no-op
    engine.dispose()
