"""The installed ``tessera`` command: its groups, its placeholders and its error contract."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

GROUPS = ["node", "broker", "case", "consent", "referral", "stats", "agency", "demo"]


def tessera(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("tessera", path=os.path.dirname(sys.executable))
    assert exe, "the tessera console script is not installed next to this Python"
    return subprocess.run(
        [exe, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "120", **(env or {})},
        timeout=60,
        check=False,
    )


def test_help_lists_every_group() -> None:
    result = tessera("--help")
    assert result.returncode == 0
    for group in GROUPS:
        assert f" {group} " in result.stdout, group


def test_version() -> None:
    result = tessera("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("tessera ")


def test_unknown_command_is_a_usage_error() -> None:
    result = tessera("frobnicate")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_every_group_is_built() -> None:
    # Every group now has its module; a placeholder would say "not built yet" (exit 13).
    result = tessera("stats", "--help")
    assert result.returncode == 0
    assert "budget" in result.stdout and "not built yet" not in result.stdout


def test_table_cells_are_data_never_markup(capsys: pytest.CaptureFixture[str]) -> None:
    from cli.output import OutputFormat, render

    hostile = "[/bold] [red]alarm[/red] [link=http://x]y[/link]"
    render([{"reason": hostile}], OutputFormat.TABLE, title="[bold]t[/bold]")
    printed = capsys.readouterr().out
    assert "[/bold]" in printed and "[red]alarm[/red]" in printed
    assert "[bold]t[/bold]" in printed
