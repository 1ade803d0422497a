"""``make adversarial``'s one summary line, from the reports its four parts leave (issue 16).

Usage: ``python -m tests.adversarial FUZZ.json CRASH.jsonl LEAK.status FLOOD.json``. Each part
writes its report as it ends: the fuzz run (tests/conftest.py, ``TESSERA_FUZZ_REPORT``), the crash
suite (tests/crashsupport.py, ``TESSERA_CRASH_REPORT``), the leak scan (its pytest exit status:
0 means every scan came back empty) and the unauthenticated flood (bench/flood.py). A part that
left no report is named as missing, never counted as clean. Exits 1 unless everything is clean.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except (OSError, ValueError):
        return None


def _crash(path: Path) -> dict[str, int] | None:
    try:
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    keys = ("kills", "lost", "duplicated", "half_written", "audit_breaks")
    return {k: sum(int(t.get(k, 0)) for t in lines) for k in keys} if lines else None


def summary(fuzz: Path, crash: Path, leak: Path, flood: Path) -> tuple[str, bool]:
    """The line, and whether every part ran and came back clean."""
    parts: list[str] = []
    clean = True
    fuzzed = _json(fuzz)
    if fuzzed is None:
        parts.append("fuzz: no report")
        clean = False
    else:
        parts.append(
            f"{fuzzed['requests']} requests and {fuzzed['files']} HTCDS files fuzzed, "
            f"INTERNAL replies {fuzzed['internal']}, crashes {fuzzed['crashes']}"
        )
        clean &= fuzzed["internal"] == 0 and fuzzed["crashes"] == 0
    killed = _crash(crash)
    if killed is None:
        parts.append("crash suite: no report")
        clean = False
    else:
        lost, duplicated = killed["lost"], killed["duplicated"]
        parts.append(
            f"{killed['kills']} kills survived, envelopes lost {lost} or duplicated "
            f"{duplicated}, half-written cases {killed['half_written']}, "
            f"audit breaks {killed['audit_breaks']}"
        )
        clean &= lost == duplicated == killed["half_written"] == killed["audit_breaks"] == 0
    try:
        leak_status = int(leak.read_text().strip())
    except (OSError, ValueError):
        leak_status = -1
    if leak_status == 0:
        parts.append("leaks found 0")
    else:
        parts.append("leak scan: FAILED (see its output)" if leak_status > 0 else "leak: no report")
        clean = False
    flooded = _json(flood)
    if flooded is None:
        parts.append("flood: no report")
        clean = False
    else:
        parts.append(
            f"peak broker memory under the unauthenticated flood {flooded['peak_mib']} MiB"
        )
    return "adversarial: " + "; ".join(parts), clean


def main(argv: list[str]) -> int:
    fuzz, crash, leak, flood = (Path(a) for a in argv)
    line, clean = summary(fuzz, crash, leak, flood)
    print(line)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
