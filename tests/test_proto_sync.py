"""The committed generated code in tessera/v1/ matches the .proto sources (DESIGN.md section 3).

Regenerates everything into a temporary directory with the same command a developer runs, and
compares file by file. tessera/v1/__init__.py is hand-written and not compared.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
GENERATE = REPO_ROOT / "proto" / "generate.py"
COMMITTED_DIR = REPO_ROOT / "tessera" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
FIX = (
    "run `.venv/bin/python proto/generate.py` (the project's virtualenv, pinned tool versions) "
    "from the repository root, and commit the regenerated files"
)


def _generated_files(directory: Path) -> dict[str, bytes]:
    return {
        path.name: path.read_bytes()
        for path in sorted(directory.iterdir())
        if path.name.endswith(GENERATED_SUFFIXES)
    }


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    fresh_dir = tmp_path / "v1"
    completed = subprocess.run(
        [sys.executable, str(GENERATE), "--out", str(fresh_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, f"proto/generate.py failed:\n{completed.stderr}"

    fresh = _generated_files(fresh_dir)
    committed = _generated_files(COMMITTED_DIR)
    assert fresh, "proto/generate.py produced no files"

    problems = [f"tessera/v1/{name} is missing" for name in sorted(fresh.keys() - committed.keys())]
    problems += [
        f"tessera/v1/{name} is not produced by any .proto source (delete it)"
        for name in sorted(committed.keys() - fresh.keys())
    ]
    problems += [
        f"tessera/v1/{name} differs from what its .proto source generates"
        for name in sorted(fresh.keys() & committed.keys())
        if fresh[name] != committed[name]
    ]
    assert not problems, (
        "generated code is out of date with proto/:\n  "
        + "\n  ".join(problems)
        + f"\nTo fix: {FIX}."
    )


def test_package_init_is_hand_written() -> None:
    init = COMMITTED_DIR / "__init__.py"
    assert init.is_file(), "tessera/v1/__init__.py is missing; it holds the package docstring"
    assert init.read_text(encoding="utf-8").startswith('"""'), "it should start with a docstring"
