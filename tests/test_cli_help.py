"""Every leaf command's ``--help`` shows at least one concrete example of calling it."""

from __future__ import annotations

from typing import Any

import pytest
import typer
import typer.main
from typer.testing import CliRunner

import cli.main


def _leaves(command: Any, path: tuple[str, ...]) -> list[tuple[str, ...]]:
    children = getattr(command, "commands", None)
    if children is None:
        return [path]
    found: list[tuple[str, ...]] = []
    for name, child in children.items():
        # Nothing is skipped: Typer's completion switches are root options, not commands.
        found.extend(_leaves(child, (*path, name)))
    return found


LEAVES = _leaves(typer.main.get_command(cli.main.app), ())


def test_the_tree_is_walked() -> None:
    # Guards against the walk silently finding nothing (every group has several commands).
    groups = {path[0] for path in LEAVES}
    assert {"node", "case", "agency", "broker", "consent", "referral", "stats", "demo"} <= groups
    assert len(LEAVES) >= 40


@pytest.mark.parametrize("path", LEAVES, ids=[" ".join(p) for p in LEAVES])
def test_help_shows_an_example(path: tuple[str, ...]) -> None:
    app: typer.Typer = cli.main.app
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    assert "Example" in result.output, result.output
    # The example itself (not just the Usage line above it) calls this very command.
    _before, _sep, examples = result.output.partition("Example")
    assert f"tessera {' '.join(path)}" in examples, result.output
