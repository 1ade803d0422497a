"""Schema migrations are atomic: a process killed while migrating leaves a database that opens."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broker.store.database import open_database as open_broker_database
from node.store.database import open_database as open_node_database

_MIGRATE = "import sys; from {module} import open_database; open_database(sys.argv[1])"


@pytest.mark.parametrize(
    ("module", "reopen"),
    [("broker.store.database", open_broker_database), ("node.store.database", open_node_database)],
)
def test_a_migration_killed_midway_never_leaves_a_broken_database(
    tmp_path: Path, module: str, reopen: object
) -> None:
    import random

    rng = random.Random(20261125)
    for attempt in range(6):
        path = tmp_path / f"db{attempt}.sqlite"
        url = f"sqlite:///{path}"
        process = subprocess.Popen([sys.executable, "-c", _MIGRATE.format(module=module), url])
        deadline = time.monotonic() + 30
        while not path.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.03))
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        assert callable(reopen)
        engine = reopen(url)  # must open (and finish migrating) whatever the kill interrupted
        engine.dispose()
