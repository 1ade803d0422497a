"""Survivor data never leaves the places it is meant to be (issue 16 item 5).

One real broker and two real enrolled nodes (TLS, SQLite files, Prometheus endpoints on) run
every feature with marker strings planted in survivor data: an HTCDS import (names, e-mail,
free-text details, and a bad row), a case created and updated with notes, a blind-index search,
a consented referral with a note sent and accepted, an erasure, a backup, a private statistics
round, typed errors provoked with marker values, and an export. Then every byte the run left is
scanned for the markers in clear (as typed, lower and upper case), hex, base64 (standard and
URL-safe, at every alignment) and UTF-16 (both byte orders):

* every file under the test's folder: both nodes' raw database files (and WAL), the broker's
  database, keyrings, directory caches, scratch folders, backups, the JSON log every server
  wrote (the production formatter, at DEBUG), the coordinator's home;
* files that appeared in the system temp folder during the run;
* both servers' ``/metrics`` text, scraped over HTTP;
* the message and hint of every typed error the run provoked, and the row problems of the import.

Only the files the user handed in or asked for (the import file, the export file) may hold them;
the export must, which also shows the scanner would have seen a leak.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import functools
import logging
import socket
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from broker.coordinators import add_coordinator
from broker.stats import StatsClient
from node import directory_sync, stats
from node.client import NodeClient
from node.keyring import open_keyring
from tessera import logs
from tessera.config import Settings
from tessera.errors import TesseraError
from tessera.needs import NeedCategory, NeedStatus
from tessera.v1 import stats_pb2 as stats_pb
from tests.support import (
    PASSPHRASE,
    BackgroundBroker,
    BackgroundNode,
    enrolled_node,
    make_broker,
    unlock,
    wait_for,
)

HARBOUR, LANTERN = "harbour-shelter", "lantern-clinic"
# Distinctive, long enough that a base64 fragment of one cannot occur by chance.
IMPORTED_FIRST = "Zanthropelle"
IMPORTED_SECOND = "Quillimaxworth"
IMPORTED_EMAIL = "vexholm.marker@example.org"
IMPORTED_DETAILS = "Plivander-incoming-details"
BAD_ROW_NAME = "Rejectamundi"
CREATED_FIRST = "Ostrevalda"
NOTES = "Notemarker Cravensholt"
UPDATED_NOTES = "Updatedmarker Thistlewick"
REFERRAL_NOTE = "Referralmarker Brumbleton"
ERASED_FIRST = "Erasemarker Pellucidor"
ERROR_VALUE = "Errormarker Wintergrue"
MARKERS = (
    IMPORTED_FIRST,
    IMPORTED_SECOND,
    IMPORTED_EMAIL,
    IMPORTED_DETAILS,
    BAD_ROW_NAME,
    CREATED_FIRST,
    NOTES,
    UPDATED_NOTES,
    REFERRAL_NOTE,
    ERASED_FIRST,
    ERROR_VALUE,
)


def _base64_fragments(data: bytes) -> list[bytes]:
    """The base64 text ``data`` becomes inside a longer base64 string, at each of the three
    alignments: only the characters that depend on ``data`` alone."""
    fragments = []
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + data + b"\0\0")
        first = -(-(8 * offset) // 6)  # the first character made of data bits only
        last = (8 * (offset + len(data))) // 6  # one past the last such character
        fragments.append(encoded[first:last])
    return fragments


def marker_forms(marker: str) -> dict[str, bytes]:
    """Every form a marker could sit in a file as: clear (and case-folded), hex, base64, UTF-16."""
    raw = marker.encode()
    forms = {
        "clear": raw,
        "lower": marker.lower().encode(),
        "upper": marker.upper().encode(),
        "hex": raw.hex().encode(),
        "HEX": raw.hex().upper().encode(),
        "utf-16-le": marker.encode("utf-16-le"),
        "utf-16-be": marker.encode("utf-16-be"),
    }
    for i, fragment in enumerate(_base64_fragments(raw)):
        forms[f"base64/{i}"] = fragment
        forms[f"base64url/{i}"] = fragment.replace(b"+", b"-").replace(b"/", b"_")
    return forms


def hits(data: bytes, where: str, markers: tuple[str, ...] = MARKERS) -> list[str]:
    """``where: marker as form`` for each marker form found in ``data``."""
    return [
        f"{where}: {marker!r} as {name}"
        for marker in markers
        for name, form in marker_forms(marker).items()
        if form in data
    ]


def test_the_scanner_sees_each_form() -> None:
    """A marker planted in each encoding, at each base64 alignment, is found; noise is not."""
    marker = IMPORTED_FIRST
    assert hits(b"noise " * 100, "noise") == []
    for prefix in (b"", b"a", b"ab", b"abc"):
        blob = prefix + marker.encode() + b"tail"
        assert hits(base64.b64encode(blob), "b64", (marker,))
        assert hits(base64.urlsafe_b64encode(blob), "b64url", (marker,))
    assert hits(b"x" + marker.encode().hex().encode(), "hex", (marker,))
    assert hits(marker.encode("utf-16"), "utf-16", (marker,))
    assert hits(marker.upper().encode(), "upper", (marker,))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _with_metrics(settings: Settings) -> Settings:
    return dataclasses.replace(settings, metrics_port=_free_port())


@pytest.fixture
def json_log(tmp_path: Path) -> Iterator[Path]:
    """Every record any server logs, as the production JSON lines, at DEBUG."""
    path = tmp_path / "logs" / "servers.jsonl"
    path.parent.mkdir()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logs.JsonFormatter())
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def _import_file(path: Path) -> None:
    header = "prs_FirstName,prs_SecondName,prs_Email,prs_Gender,cas_IncomingReferralDetails"
    rows = [
        f"{IMPORTED_FIRST},{IMPORTED_SECOND},{IMPORTED_EMAIL},Feminine,{IMPORTED_DETAILS}",
        f"{BAD_ROW_NAME},{IMPORTED_SECOND},not-an-email,not-a-gender,{IMPORTED_DETAILS}",
    ]
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")


def _temp_entries() -> set[Path]:
    return set(Path(tempfile.gettempdir()).iterdir())


@pytest.mark.slow
def test_no_marker_leaves_a_node_in_any_form(tmp_path: Path, json_log: Path) -> None:
    user = tmp_path / "user-files"  # what the user handed in and asked for: not scanned
    user.mkdir()
    temp_before = _temp_entries()
    errors: list[str] = []
    metrics_text: dict[str, bytes] = {}

    def provoke(call: Callable[[], object]) -> None:
        try:
            call()
        except TesseraError as exc:
            errors.append(f"{type(exc).__name__}: {exc.message} | {exc.hint or ''}")
        else:
            raise AssertionError("expected a typed error")

    broker = BackgroundBroker(_with_metrics(make_broker(tmp_path / "broker")))
    running: list[BackgroundNode] = []
    try:
        homes = [enrolled_node(broker, tmp_path, a) for a in (HARBOUR, LANTERN)]
        for s in homes:
            identity = open_keyring(s.home, PASSPHRASE).identity
            directory_sync.sync(s.home, identity, directory_sync.load_link(s.home))
            directory_sync.mark_verified(s.home, LANTERN if s.home.name == HARBOUR else HARBOUR)
        running = [BackgroundNode(_with_metrics(s)) for s in homes]
        harbour_home, lantern_home = (s.home for s in homes)
        add_coordinator(broker.settings, "north-coordinator", tmp_path / "coordinator")

        with NodeClient(harbour_home, unlock=unlock) as harbour:
            # Import: one good row, one bad row whose problems come back as text.
            source = user / "intake.csv"
            _import_file(source)
            imported = harbour.import_cases(source, True, lambda *_p: None)
            assert imported.imported == 1 and imported.rejected == 1, imported
            errors += [f"row {e.row} {e.field}: {e.reason}" for e in imported.problems]
            # Create, update (notes), a refused update carrying a marker, a search.
            case = harbour.create_case(
                {"prs_FirstName": CREATED_FIRST, "prs_Gender": "Feminine"},
                NOTES,
                [(NeedCategory.MEDICAL, NeedStatus.UNMET)],
            )
            case_id = str(case.case_id)
            harbour.update_case(case_id, case.version, {}, [], UPDATED_NOTES)
            # Refused values of survivor data come back hidden. (A short value in a code
            # column, say 'Femnine' for prs_Gender, is quoted back to the caller who typed it,
            # by design, so they can fix it: that is no survivor data and is not planted here.)
            for bad in (
                {"prs_FirstName": ERROR_VALUE + "\x01"},
                {"cas_IncomingReferralDetails": ERROR_VALUE + "\x02"},
                {"prs_SecondName": ERROR_VALUE * 2000},
            ):
                provoke(functools.partial(harbour.update_case, case_id, 2, bad, [], None))
            provoke(
                lambda: harbour.create_case(
                    {"prs_FirstName": ERROR_VALUE},
                    ERROR_VALUE,
                    [(NeedCategory.MEDICAL, NeedStatus.UNMET)] * 2,
                )
            )
            provoke(lambda: harbour.update_case(case_id, 999, {}, [], ERROR_VALUE))
            provoke(lambda: harbour.find_cases({"prs_FirstName": ERROR_VALUE}))
            assert harbour.find_cases(
                {"prs_FirstName": IMPORTED_FIRST, "prs_SecondName": IMPORTED_SECOND}
            )
            # A referral refused without consent, then consented, sent with a note, accepted.
            provoke(
                lambda: harbour.send_referral(
                    case_id, LANTERN, NeedCategory.MEDICAL, note=ERROR_VALUE
                )
            )
            consent = harbour.grant_consent(
                case_id,
                LANTERN,
                NeedCategory.MEDICAL,
                ("identity", "notes"),
                dt.date.today() + dt.timedelta(days=30),
                "verbal",
            )
            sent = harbour.send_referral(
                case_id,
                LANTERN,
                NeedCategory.MEDICAL,
                consent_id=str(consent.consent_id),
                note=REFERRAL_NOTE,
            )
            referral_id = str(sent.referral_id)
            with NodeClient(lantern_home, unlock=unlock) as lantern:
                wait_for(
                    lambda: [r for r in lantern.inbox(True) if r.referral_id == referral_id],
                    "the referral at the clinic",
                )
                shown = lantern.show_referral(referral_id)
                assert shown.fields["prs_FirstName"] == CREATED_FIRST
                lantern.answer_referral(referral_id, "accept")
            wait_for(
                lambda: any(
                    r.referral_id == referral_id and r.state == "accepted"
                    for r in harbour.referrals("outgoing")
                ),
                "the acceptance back at the shelter",
            )
            # Erase a case, take a backup.
            doomed = harbour.create_case({"prs_FirstName": ERASED_FIRST}, ERASED_FIRST, [])
            harbour.erase_case(str(doomed.case_id), "survivor asked")
            made = harbour.backup(None)
            assert Path(made.path).is_file()

        # A private statistics round over both nodes, released.
        period = stats.period_of(dt.datetime.now(dt.UTC))
        with StatsClient(tmp_path / "coordinator") as coordinator:
            blob = coordinator.open_round("north", period, 2, 0.5, participants=[HARBOUR, LANTERN])
            round_id = stats_pb.Round.FromString(blob.body).round_id
            release_id = wait_for(
                lambda: coordinator.round(round_id).release_id or None, "the release", timeout=60
            )
            assert coordinator.release(release_id=release_id).body

        # The export the user asked for: it must hold the survivors (not the erased one).
        with NodeClient(harbour_home, unlock=unlock) as harbour:
            export = user / "export.csv"
            export.write_bytes(b"".join(chunk for chunk, _n in harbour.export_cases("csv", None)))
        exported = export.read_bytes()
        for marker in (IMPORTED_FIRST, IMPORTED_EMAIL, CREATED_FIRST):
            assert hits(exported, "export", (marker,)), f"the export lacks {marker}"
        assert not hits(exported, "export", (ERASED_FIRST,)), "an erased case was exported"

        exporters = [broker.running.metrics, *(node.running.metrics for node in running)]
        for exporter in exporters:
            assert exporter is not None
            with urllib.request.urlopen(exporter.address, timeout=10) as reply:
                metrics_text[exporter.address] = reply.read()
    finally:
        for node in running:
            node.stop()
        broker.stop()

    assert len(errors) >= 8, errors
    found: list[str] = []
    scanned = 0
    for path in sorted(tmp_path.rglob("*")):
        if path.is_file() and user not in path.parents:
            scanned += 1
            found += hits(path.read_bytes(), str(path.relative_to(tmp_path)))
    for path in _temp_entries() - temp_before:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            found += hits(file.read_bytes(), f"system temp {file}")
    for address, text in metrics_text.items():
        found += hits(text, address)
    for i, message in enumerate(errors):
        found += hits(message.encode(), f"error message {i} ({message[:60]}...)")
    assert json_log.stat().st_size > 0 and scanned > 20
    assert found == [], "survivor data leaked:\n" + "\n".join(found)
