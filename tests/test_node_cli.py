"""The ``tessera node`` and ``tessera case`` commands, run as a person would, against a real node.

Each command is the installed console script in a subprocess; the node is ``tessera node serve``
in another. Expected failures must print a message and exit with the documented code, never a
stack trace.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.htcds.csv_format import write_csv
from node.htcds.reading import FORMULA_REASON
from node.htcds.synthetic import synthetic_records
from tests.test_htcds_formulas import DETAILS, column_of, intake

PASSPHRASE = "a long test passphrase"


def _env(**extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "COLUMNS": "200",
        "TESSERA_ARGON2": "test-cheap",
        "TESSERA_PASSPHRASE": PASSPHRASE,
        "TESSERA_LOG_FORMAT": "json",
    }
    env.update(extra)
    return env


def tessera(
    home: Path, *args: str, stdin: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("tessera", path=os.path.dirname(sys.executable))
    assert exe
    result = subprocess.run(
        [exe, "--home", str(home), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=_env(**env),
        timeout=120,
        check=False,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "shelter"
    result = tessera(
        path,
        "node",
        "init",
        "--name",
        "Harbour Shelter",
        "--region",
        "north",
        "--listen",
        "127.0.0.1:0",
    )
    assert result.returncode == 0, result.stderr
    return path


@pytest.fixture
def served(home: Path) -> Iterator[Path]:
    exe = shutil.which("tessera", path=os.path.dirname(sys.executable))
    assert exe
    process = subprocess.Popen(
        [exe, "--home", str(home), "node", "serve"],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    run_file = home / "run" / "node.json"
    deadline = time.monotonic() + 30
    while not run_file.exists():
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        assert time.monotonic() < deadline, "the node did not start"
        time.sleep(0.05)
    try:
        yield home
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        if process.stderr is not None:
            process.stderr.close()
        assert not run_file.exists(), "a graceful stop removes the run file"


def test_init_refuses_a_home_in_use(home: Path) -> None:
    again = tessera(home, "node", "init", "--name", "Other")
    assert again.returncode == 3
    assert "already holds a Tessera configuration" in again.stderr


def test_init_needs_a_passphrase_without_a_terminal(tmp_path: Path) -> None:
    result = tessera(tmp_path / "n", "node", "init", "--name", "X", TESSERA_PASSPHRASE="")
    assert result.returncode == 3
    assert "TESSERA_PASSPHRASE" in result.stderr


def test_wrong_passphrase_is_named_and_exits_4(home: Path) -> None:
    result = tessera(home, "node", "serve", TESSERA_PASSPHRASE="not the passphrase")
    assert result.returncode == 4
    assert "passphrase does not open this node's key" in result.stderr


def test_a_stopped_node_is_reported_unreachable(home: Path) -> None:
    result = tessera(home, "node", "status")
    assert result.returncode == 10
    assert "cannot reach" in result.stderr


def test_cases_from_the_command_line(served: Path, tmp_path: Path) -> None:
    home = served
    created = tessera(
        home,
        "case",
        "create",
        "--from-json",
        "-",
        "--need",
        "legal_civil",
        "--format",
        "json",
        stdin=json.dumps({"prs_FirstName": "Tamsir", "prs_SecondName": "Velko"}),
    )
    assert created.returncode == 0, created.stderr
    case_id = json.loads(created.stdout)["case_id"]
    shown = json.loads(tessera(home, "case", "show", case_id, "-f", "json").stdout)
    assert shown["fields"]["prs_FirstName"] == "Tamsir"
    needs = tessera(home, "case", "need", case_id, "legal_civil", "unmet")
    assert needs.returncode == 0, needs.stderr
    listed = json.loads(
        tessera(home, "case", "list", "--need-status", "unmet", "-f", "json").stdout
    )
    assert [row["case_id"] for row in listed] == [case_id]
    found = tessera(home, "case", "find", "--name", "tamsir velko", "-f", "csv")
    assert case_id in found.stdout
    bad = tessera(home, "case", "need", case_id, "flying", "met")
    assert bad.returncode == 7
    assert "unknown need category" in bad.stderr
    audit = json.loads(tessera(home, "node", "audit", "verify", "-f", "json").stdout)
    assert audit["intact"] is True


def test_import_reports_rows_and_writes_rejects(served: Path, tmp_path: Path) -> None:
    records = synthetic_records(30, seed=11)
    records[0]["prs_Citizenship"] = "XX"
    source = tmp_path / "intake.csv"
    write_csv(source, records)
    refused = tessera(served, "case", "import", str(source))
    assert refused.returncode == 7
    assert "row 2, prs_Citizenship" in refused.stderr
    assert "nothing was imported" in refused.stderr
    rejects = tmp_path / "rejects.csv"
    accepted = tessera(
        served, "case", "import", str(source), "--skip-bad-rows", "--rejects", str(rejects)
    )
    assert accepted.returncode == 0, accepted.stderr
    assert "Imported 29 case(s); 1 row(s) refused." in accepted.stdout
    assert "tessera_errors" in rejects.read_text(encoding="utf-8-sig").splitlines()[0]
    exported = tmp_path / "out.csv"
    assert tessera(served, "case", "export", str(exported)).returncode == 0
    assert len(exported.read_text(encoding="utf-8-sig").splitlines()) == 30  # header + 29


def test_xlsx_formula_rows_are_refused_like_bad_rows(served: Path, tmp_path: Path) -> None:
    # Issue 16: a formula-only row used to vanish, and a calculated formula came in as its
    # result. Rows 3 (only a formula) and 4 (a formula among good values) are refused now.
    source, good = intake(tmp_path, cached=True)
    details = f"cas_IncomingReferralDetails: column {column_of(DETAILS)} holds a formula"
    refused = tessera(served, "case", "import", str(source))
    assert refused.returncode == 7  # as for any bad row: nothing imported without --skip-bad-rows
    assert f"row 3, {details}" in refused.stderr
    assert f"row 4, {details}" in refused.stderr
    assert FORMULA_REASON in refused.stderr
    assert "nothing was imported" in refused.stderr
    rejects = tmp_path / "rejects.csv"
    accepted = tessera(
        served, "case", "import", str(source), "--skip-bad-rows", "--rejects", str(rejects)
    )
    assert accepted.returncode == 0, accepted.stderr
    assert "Imported 2 case(s); 2 row(s) refused." in accepted.stdout
    rejected = rejects.read_text(encoding="utf-8-sig").splitlines()
    assert len(rejected) == 3  # header and rows 3 and 4
    assert all(FORMULA_REASON in line for line in rejected[1:])
    exported = tmp_path / "out.csv"
    assert tessera(served, "case", "export", str(exported)).returncode == 0
    with exported.open(encoding="utf-8-sig", newline="") as handle:
        landed = list(csv.DictReader(handle))
    assert sorted(row["prs_Email"] for row in landed) == sorted(r["prs_Email"] for r in good[:2])
    assert {row[DETAILS] for row in landed} == {r[DETAILS] for r in good[:2]}  # no "3" came in


ANA_PASSPHRASE = "ledger orchid tramline quiet"


def test_staff_credential_for_a_caseworker(served: Path, tmp_path: Path) -> None:
    ana = tmp_path / "ana"
    added = tessera(
        served,
        "node",
        "staff",
        "add",
        "Ana Ruiz",
        "--out-home",
        str(ana),
        TESSERA_NEW_PASSPHRASE=ANA_PASSPHRASE,
    )
    assert added.returncode == 0, added.stderr
    assert (ana / "credential.json").stat().st_mode & 0o077 == 0
    as_ana = {"TESSERA_PASSPHRASE": ANA_PASSPHRASE}
    status = json.loads(tessera(ana, "node", "status", "-f", "json", **as_ana).stdout)
    assert status["your_role"] == "caseworker"
    denied = tessera(ana, "case", "export", str(tmp_path / "x.csv"), **as_ana)
    assert denied.returncode == 5
    assert "caseworkers may not call ExportCases" in denied.stderr
    assert tessera(served, "node", "staff", "remove", "Ana Ruiz").returncode == 0
    gone = tessera(ana, "node", "status", **as_ana)
    assert gone.returncode == 4


def test_a_header_of_thousands_of_unknown_columns_is_refused_clearly(
    served: Path, tmp_path: Path
) -> None:
    """Over the wire: the refusal names the first columns and counts the rest (it used to be too
    long for a gRPC status), and nothing is imported."""
    wide = tmp_path / "wide.csv"
    header = ["prs_FirstName", *(f"column_{i}_" + "x" * 40 for i in range(4000))]
    wide.write_text(",".join(header) + "\nAna" + "," * 4000 + "\n", encoding="utf-8")
    refused = tessera(served, "case", "import", str(wide))
    assert refused.returncode == 7, refused.stderr
    assert "4000 column(s) that are not HTCDS v2.0 fields" in refused.stderr
    assert "and 3990 more" in refused.stderr
    listed = json.loads(tessera(served, "case", "list", "-f", "json").stdout)
    assert listed == []
