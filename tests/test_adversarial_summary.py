"""`make adversarial`'s summary line (tests/adversarial.py) counts what its parts report, and
never calls a part clean that left no report or found something."""

from __future__ import annotations

import json
from pathlib import Path

from tests.adversarial import summary


def _reports(tmp_path: Path, *, internal: int = 0, lost: int = 0, leak: str = "0") -> list[Path]:
    fuzz, crash, leaks, flood = (tmp_path / n for n in ("f.json", "c.jsonl", "l", "fl.json"))
    fuzz.write_text(json.dumps({"requests": 3500, "internal": internal, "crashes": 0, "files": 9}))
    runs = [{"kills": 7, "lost": lost, "duplicated": 0}, {"kills": 8, "half_written": 0}]
    crash.write_text("\n".join(json.dumps(r) for r in runs) + "\n")
    leaks.write_text(leak + "\n")
    flood.write_text(json.dumps({"peak_mib": 164}))
    return [fuzz, crash, leaks, flood]


def test_a_clean_run_sums_every_part_in_one_line(tmp_path: Path) -> None:
    line, clean = summary(*_reports(tmp_path))
    assert clean
    assert "\n" not in line
    for part in (
        "3500 requests and 9 HTCDS files fuzzed, INTERNAL replies 0",
        "15 kills survived, envelopes lost 0 or duplicated 0",
        "leaks found 0",
        "flood 164 MiB",
    ):
        assert part in line, line


def test_a_finding_or_a_missing_report_is_never_clean(tmp_path: Path) -> None:
    assert not summary(*_reports(tmp_path, internal=1))[1]
    assert not summary(*_reports(tmp_path, lost=2))[1]
    line, clean = summary(*_reports(tmp_path, leak="1"))
    assert not clean and "leak scan: FAILED" in line
    reports = _reports(tmp_path)
    reports[3].unlink()
    line, clean = summary(*reports)
    assert not clean and "flood: no report" in line
