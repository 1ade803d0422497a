"""The README's first command: ``tessera demo`` runs to the end and leaves no plaintext behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from node.htcds.catalogue import IDENTIFYING_FIELDS
from node.htcds.synthetic import synthetic_records


def _demo(directory: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("tessera", path=os.path.dirname(sys.executable))
    assert exe
    return subprocess.run(
        [exe, "demo", "--dir", str(directory)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "120"},
        timeout=180,
        check=False,
    )


def test_demo_runs_twice_in_the_same_directory_and_leaks_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "demo"
    first = _demo(directory)
    assert first.returncode == 0, first.stderr
    assert "Demo finished" in first.stdout
    assert "plaintext identifiers found on disk: 0" in first.stdout
    assert "the medical need is now 'in_progress'" in first.stdout
    assert "unmet needs by category" in first.stdout
    assert list(directory.glob("unmet-needs-*.png")), "the demo writes its chart"
    second = _demo(directory)  # a second run in the same directory works too
    assert second.returncode == 0, second.stderr
    # The demo's own synthetic cases, one seed per agency.
    records = [r for seed in (2026, 2027, 2028) for r in synthetic_records(36, seed=seed)]
    secrets = {
        v
        for r in records
        for k, v in r.items()
        if k in IDENTIFYING_FIELDS and len(v) > 4 and not v.isdigit()
    }
    for path in directory.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            leaked = [s for s in secrets if s.encode() in content]
            assert leaked == [], f"{path} holds survivor data in clear"
    # Nor does anything the demo printed: its steps, and its servers' logs on stderr.
    for run in (first, second):
        printed = run.stdout + run.stderr
        assert [s for s in secrets if s in printed] == [], "the demo printed survivor data"


def test_demo_refuses_a_directory_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("precious")
    result = _demo(tmp_path)
    assert result.returncode == 3
    assert (tmp_path / "mine.txt").read_text() == "precious"
