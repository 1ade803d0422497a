"""An enrolled agency node and its broker, both real servers on loopback, for the escrow attacks
(issue 14). The node's database is SQLite in its home or a fresh PostgreSQL database
(``db_url``); the broker keeps SQLite. Tests stop and start the node, copy its home and its
database around as an administrator (or an attacker) would, and talk to it through the same
signed client the CLI uses.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import Engine, text

from broker.operator_client import OperatorClient
from node import directory_sync
from node.client import NodeClient
from node.domain import StaffRole
from node.escrow import EscrowWorker
from node.htcds.synthetic import synthetic_records
from node.keyring import open_keyring
from node.store.database import open_database
from tessera import crypto, rpc
from tessera.config import Settings
from tessera.errors import TesseraError
from tessera.needs import NeedCategory, NeedStatus
from tessera.v1 import node_pb2 as node_pb
from tessera.v1 import node_pb2_grpc as node_grpc
from tests.support import (
    PASSPHRASE,
    BackgroundBroker,
    BackgroundNode,
    make_broker,
    make_node,
    unlock,
)

AGENCY = "harbour-shelter"


@dataclass
class Site:
    """One agency's node (started and stopped at will) and its broker."""

    root: Path
    broker: BackgroundBroker
    settings: Settings
    node: BackgroundNode | None = None
    records: list[dict[str, str]] = field(default_factory=list)
    broker_stopped: bool = False
    _engines: list[Engine] = field(default_factory=list)

    @property
    def home(self) -> Path:
        return self.settings.home

    @property
    def url(self) -> str:
        return self.settings.effective_database_url

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")

    def start(self) -> BackgroundNode:
        assert self.node is None
        self.node = BackgroundNode(self.settings)
        return self.node

    def stop(self) -> None:
        if self.node is not None:
            self.node.stop()
            self.node = None

    def stop_broker(self) -> None:
        if not self.broker_stopped:
            self.broker.stop()
            self.broker_stopped = True

    def start_broker(self, settings: Settings) -> None:
        self.broker = BackgroundBroker(settings)
        self.broker_stopped = False

    def restart(self) -> BackgroundNode:
        self.stop()
        return self.start()

    @property
    def worker(self) -> EscrowWorker:
        assert self.node is not None and self.node.running.escrow is not None
        return self.node.running.escrow

    def client(self) -> NodeClient:
        return NodeClient(self.home, unlock=unlock)

    def sql(self, statement: str, **params: Any) -> list[Any]:
        """Raw SQL on the node's database, in a transaction of its own (the attacker's tool)."""
        engine = open_database(self.url)
        try:
            with engine.begin() as conn:
                result = conn.execute(text(statement), params)
                return list(result) if result.returns_rows else []
        finally:
            engine.dispose()

    def seed(self, count: int = 3, seed: int = 14) -> list[str]:
        """``count`` cases with an unmet housing need, through the node's API."""
        self.records = synthetic_records(count, seed)
        with self.client() as client:
            return [
                str(
                    client.create_case(r, "note", [(NeedCategory.SAFE_HOUSING, NeedStatus.UNMET)])[
                        "case_id"
                    ]
                )
                for r in self.records
            ]

    def add_staff(self, name: str) -> crypto.Identity:
        """A caseworker credential; its private key stays with the test."""
        identity = crypto.Identity.generate()
        with self.client() as client:
            client.add_staff(name, StaffRole.CASEWORKER, identity.public.signing_key)
        return identity

    def remove_staff(self, name: str) -> None:
        with self.client() as client:
            client.remove_staff(name)

    def call_as(self, identity: crypto.Identity) -> Any:
        """GetStatus signed by ``identity``: the reply, or the typed error the node answered."""
        assert self.node is not None
        channel = rpc.open_channel(
            self.node.address, self.settings.cert_path.read_bytes(), identity, 4 * 1024 * 1024
        )
        try:
            return node_grpc.NodeStub(channel).GetStatus(node_pb.GetStatusRequest(), timeout=10)
        except grpc.RpcError as exc:
            return rpc.error_from_rpc(exc)
        finally:
            channel.close()


def step_until_it_works(site: Site, timeout: float = 30.0) -> None:
    """Run the escrow worker's round until it gets through (a broker that just came back)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            site.worker.step()
            return
        except TesseraError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def attempt(call: Any, *args: Any) -> Any:
    """The result of ``call(*args)``, or the typed error it raised."""
    try:
        return call(*args)
    except TesseraError as exc:
        return exc


def enrolled_site(root: Path, database_url: str) -> Site:
    """A broker, and a node enrolled with it (not started)."""
    broker = BackgroundBroker(make_broker(root / "broker"))
    settings = make_node(root / AGENCY, name="Harbour Shelter", database_url=database_url)
    identity = open_keyring(settings.home, PASSPHRASE).identity
    with OperatorClient(broker.settings.home) as operator:
        code = operator.enrolment_code(AGENCY, 1)
    directory_sync.enrol(settings.home, identity, code, settings.name, ["safe_housing"])
    return Site(root, broker, settings)


@pytest.fixture(name="site")
def site_fixture(tmp_path: Path, db_url: str) -> Iterator[Site]:
    """An enrolled node on SQLite or PostgreSQL, started, with its broker."""
    site = enrolled_site(tmp_path, db_url)
    site.start()
    try:
        yield site
    finally:
        site.stop()
        site.stop_broker()


# --- copies of the node as an administrator (or an attacker) makes them -------------------------


def copy_home(site: Site, to: Path) -> None:
    """A host-level copy of the node's home (with its SQLite database, ledger, anchors)."""
    assert site.node is None, "stop the node first"
    shutil.copytree(site.home, to)


def put_home_back(site: Site, copy: Path) -> None:
    """The disk is lost; the home is brought back from the copy."""
    assert site.node is None
    shutil.rmtree(site.home)
    shutil.copytree(copy, site.home)


def database_copy(site: Site, to: Path) -> None:
    """An older copy of the database alone: the SQLite files, or a pg_dump of PostgreSQL."""
    assert site.node is None
    to.mkdir(parents=True)
    if site.is_sqlite:
        for name in ("tessera.db", "tessera.db-wal", "tessera.db-shm"):
            if (site.home / name).exists():
                shutil.copy2(site.home / name, to / name)
        return
    subprocess.run(
        ["pg_dump", "--format=custom", f"--file={to / 'node.dump'}", f"--dbname={site.url}"],
        check=True,
        capture_output=True,
        env=dict(os.environ, PGCONNECT_TIMEOUT="10"),
        timeout=60,
    )


def put_database_back(site: Site, copy: Path) -> None:
    """The older database is put in place: files copied over, or pg_restore (a point-in-time
    restore of PostgreSQL)."""
    assert site.node is None
    if site.is_sqlite:
        for name in ("tessera.db", "tessera.db-wal", "tessera.db-shm"):
            (site.home / name).unlink(missing_ok=True)
            if (copy / name).exists():
                shutil.copy2(copy / name, site.home / name)
        return
    subprocess.run(
        [
            "pg_restore",
            "--clean",
            "--if-exists",
            "--no-owner",
            f"--dbname={site.url}",
            str(copy / "node.dump"),
        ],
        check=True,
        capture_output=True,
        env=dict(os.environ, PGCONNECT_TIMEOUT="10"),
        timeout=60,
    )


def on_port(settings: Settings, address: str) -> Settings:
    """The same server settings, listening on a fixed address (to come back where it was)."""
    return dataclasses.replace(settings, listen=address)
