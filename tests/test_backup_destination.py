"""The Backup call writes only under the node's backup root (issue 16): a caller naming any other
place, by an absolute path, by ``..`` or through a symlink, is refused and nothing is created."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.client import NodeClient
from tessera import config
from tessera.errors import InvalidInput
from tests.support import PASSPHRASE, BackgroundNode, make_node, unlock


@pytest.fixture
def node(tmp_path: Path) -> Iterator[BackgroundNode]:
    settings = make_node(tmp_path / "node")
    # The administrator points backups at an off-site mount.
    settings = dataclasses.replace(settings, backup_root=tmp_path / "offsite")
    config.write(settings)
    running = BackgroundNode(config.load(settings.home, {}))
    try:
        yield running
    finally:
        running.stop()


def _backup(node: BackgroundNode, destination: Path | None) -> Path:
    with NodeClient(node.settings.home, unlock=unlock) as client:
        return Path(client.backup(destination)["path"])


def test_backups_land_under_the_configured_root(node: BackgroundNode, tmp_path: Path) -> None:
    root = (tmp_path / "offsite").resolve()
    assert _backup(node, None).parent == root
    assert _backup(node, Path("nightly")).parent == root / "nightly"
    assert _backup(node, root / "weekly" / "w49").parent == root / "weekly" / "w49"
    # The default, with nothing configured, is HOME/backups.
    bare = dataclasses.replace(node.settings, backup_root=None)
    assert bare.backups_path == node.settings.home / "backups"


@pytest.mark.parametrize(
    "destination",
    ["/etc/tessera-owned", "../outside", "nightly/../../outside", "a" * 2000, "bad\x00name"],
)
def test_a_destination_outside_the_root_is_refused_and_nothing_is_created(
    node: BackgroundNode, tmp_path: Path, destination: str
) -> None:
    folders = {p for p in tmp_path.rglob("*") if p.is_dir()}
    with pytest.raises(InvalidInput) as refused:
        _backup(node, Path(destination))
    assert "backup" in refused.value.message
    assert not Path("/etc/tessera-owned").exists()
    # No folder appeared anywhere, and no backup was written.
    assert {p for p in tmp_path.rglob("*") if p.is_dir()} == folders
    assert not list(tmp_path.rglob("*.tbk"))


def test_a_symlink_inside_the_root_that_leads_out_is_refused(
    node: BackgroundNode, tmp_path: Path
) -> None:
    root = tmp_path / "offsite"
    root.mkdir(exist_ok=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, root / "escape")
    with pytest.raises(InvalidInput, match="outside it"):
        _backup(node, Path("escape"))
    assert list(elsewhere.iterdir()) == []


def test_the_cli_refuses_with_its_invalid_input_exit_code(
    node: BackgroundNode, tmp_path: Path
) -> None:
    exe = shutil.which("tessera", path=os.path.dirname(sys.executable))
    assert exe
    result = subprocess.run(
        [exe, "--home", str(node.settings.home), "node", "backup", "--destination", "/tmp/x-out"],
        capture_output=True,
        text=True,
        env={**os.environ, "TESSERA_PASSPHRASE": PASSPHRASE},
        timeout=120,
        check=False,
    )
    assert result.returncode == 7, result.stderr  # INVALID_INPUT
    assert "outside it" in result.stderr and "backup_root" in result.stderr
    assert "Traceback" not in result.stderr
    assert not Path("/tmp/x-out").exists()
