"""Helpers that run real Tessera servers for tests: each in its own event loop thread."""

from __future__ import annotations

from pathlib import Path

from node.server import RunningNode, start_node
from node.setup import NodeInit, init_node
from tessera.config import Argon2Profile, Settings
from tessera.loop import LoopThread

PASSPHRASE = "a long test passphrase"


def make_node(home: Path, name: str = "Harbour Shelter", database_url: str = "") -> Settings:
    """A node home with cheap Argon2, listening on a free loopback port."""
    return init_node(
        NodeInit(
            home=home,
            name=name,
            region="north",
            listen="127.0.0.1:0",
            database_url=database_url,
            argon2=Argon2Profile.TEST_CHEAP,
        ),
        PASSPHRASE,
    )


class BackgroundNode:
    """A real node server (TLS, signed requests, SQLite or PostgreSQL) on a loopback port."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._loop = LoopThread()
        self.running: RunningNode = self._loop.run(start_node(settings, PASSPHRASE))

    @property
    def address(self) -> str:
        return self.running.address

    def stop(self) -> None:
        self._loop.run(self.running.stop(grace=0.5))
        self._loop.close()


class BackgroundBroker:
    """A real broker server (TLS, signed requests) on a loopback port."""

    def __init__(self, settings: Settings) -> None:
        from broker.server import start_broker

        self.settings = settings
        self._loop = LoopThread()
        self.running = self._loop.run(start_broker(settings))

    @property
    def address(self) -> str:
        return self.running.address

    def stop(self) -> None:
        self._loop.run(self.running.stop(grace=0.5))
        self._loop.close()


def make_broker(home: Path, database_url: str = "", **limits: float) -> Settings:
    """A broker home listening on a free loopback port (limits overridable for tests)."""
    import dataclasses

    from broker.setup import BrokerInit, init_broker
    from tessera.config import Limits

    settings = init_broker(
        BrokerInit(
            home=home,
            name="North broker",
            region="north",
            listen="127.0.0.1:0",
            database_url=database_url,
        )
    )
    return dataclasses.replace(settings, limits=dataclasses.replace(Limits(), **limits))
