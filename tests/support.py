"""Helpers that run real Tessera servers for tests: each in its own event loop thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from node.server import RunningNode, start_node
from node.setup import NodeInit, init_node
from tessera.config import Argon2Profile, Settings

T = TypeVar("T")
PASSPHRASE = "a long test passphrase"


class LoopThread:
    """An asyncio loop in a daemon thread, so sync tests can drive async servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


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
